"""Completions of code prompts with transformers ``generate``: batched, KV cache, sampling or greedy.

Prompts are rendered and replies cut as :mod:`mftcoder_coba.evaluation.prompts` describes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.problems import STOP_SEQUENCES, Problem
from mftcoder_coba.evaluation.prompts import Sampling, extract_completion, render_prompt
from mftcoder_coba.models import causal_lm
from mftcoder_coba.models.cgc_lora import task_ids_context

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], sampling: Sampling, *, task_id: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """One completion per entry of ``prompts`` (benchmark prompts; repeat a prompt for several samples).

    ``task_id``: for a CGC-LoRA model, the task whose gates every generated token uses.
    ``progress(done)`` is called after each batch with the number of completions so far.
    """
    lm = causal_lm(model)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else lm.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an end-of-sequence token; generation needs one")
    tokenizer.padding_side = "left"  # the newest tokens of every row line up at the right for the cache
    torch.manual_seed(sampling.seed)  # generate samples from the global generator
    texts = [render_prompt(tokenizer, p, sampling) for p in prompts]
    options = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos,
               "use_cache": True, "do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    if sampling.prompt_format == "raw":  # stop each row at its first stop sequence instead of max_new_tokens
        options.update(stop_strings=list(STOP_SEQUENCES), tokenizer=tokenizer)
    completions: list[str] = []
    for start in range(0, len(texts), sampling.batch_size):
        chunk = texts[start:start + sampling.batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=sampling.prompt_format == "raw").to(device)
        if task_id is not None:
            with task_ids_context(lm, torch.full((len(chunk),), task_id, dtype=torch.long, device=device)):
                out = model.generate(**encoded, **options)
        else:
            out = model.generate(**encoded, **options)
        new = out[:, encoded["input_ids"].shape[1]:]
        for row in tokenizer.batch_decode(new, skip_special_tokens=True):
            completions.append(extract_completion(row, sampling.prompt_format))
        if progress is not None:
            progress(len(completions))
    return completions


def generate_completions(model: nn.Module, tokenizer, problems: Sequence[Problem], n: int, sampling: Sampling, *,
                         task_id: int | None = None) -> list[list[str]]:
    """``n`` completions per problem. Greedy decoding (temperature 0) generates one and repeats it."""
    draws = 1 if sampling.temperature == 0 else n
    if draws < n:
        log.info("temperature 0 is greedy: one completion per problem, counted %d times", n)
    prompts = [p.prompt for p in problems for _ in range(draws)]
    total = len(prompts)

    def report(done: int) -> None:
        log.info("generated %d/%d completions", done, total)

    flat = generate(model, tokenizer, prompts, sampling, task_id=task_id, progress=report)
    return [flat[i * draws:(i + 1) * draws] * (n // draws) for i in range(len(problems))]
