"""Completions of code prompts: what every generation engine shares, and the transformers engine.

An engine turns benchmark prompts into completions (:data:`Engine`); :func:`generate_completions` draws ``n`` per
problem from one. :func:`generate` is the transformers engine (``generate``: batched, KV cache, sampling or
greedy); :mod:`mftcoder_coba.evaluation.vllm_engine` is the other. Both start from the same token ids
(:func:`encode_prompts`), stop on the same end token (:func:`end_token`) and at the same stop sequences, seen in
the completion only, and cut their tokens into completions the same way (:func:`decode_completions`), so that
greedy decoding gives the same completions whichever engine ran. Prompts are rendered and replies cut as
:mod:`mftcoder_coba.evaluation.prompts` describes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from mftcoder_coba.end_tokens import trained_end_ids
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.problems import STOP_SEQUENCES, Problem
from mftcoder_coba.evaluation.prompts import Sampling, extract_completion, render_prompt
from mftcoder_coba.models import causal_lm
from mftcoder_coba.models.cgc_lora import task_ids_context

log = logging.getLogger(__name__)

Engine = Callable[[list[str], Callable[[int], None]], list[str]]
"""``engine(prompts, progress)``: one completion per benchmark prompt, ``progress(done)`` called as they come."""


def encode_prompts(tokenizer, prompts: Sequence[str], sampling: Sampling) -> list[list[int]]:
    """Token ids of each rendered prompt. Raw prompts get the tokenizer's special tokens (a BOS); a chat template
    already holds its own."""
    texts = [render_prompt(tokenizer, p, sampling) for p in prompts]
    return tokenizer(texts, add_special_tokens=sampling.prompt_format == "raw")["input_ids"]


def end_token(tokenizer, config_eos: int | list[int] | None) -> int | list[int] | None:
    """The token(s) that end a completion: every end token training taught (the tokenizer's EOS, the chat
    template's end-of-turn token, the model config's special end ids; :func:`trained_end_ids`), as an export
    lists them; the model config's own when the tokenizer gives none."""
    ends = trained_end_ids(tokenizer, None, config_eos)
    return config_eos if not ends else ends[0] if len(ends) == 1 else ends


def decode_completions(tokenizer, rows: Sequence[Sequence[int]], sampling: Sampling) -> list[str]:
    """Completions from each row of generated token ids (special tokens and padding dropped)."""
    return [extract_completion(text, sampling.prompt_format)
            for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


class StopInCompletion(StoppingCriteria):
    """Ends a row once its generated text holds a stop sequence. transformers' own ``stop_strings`` also match
    across the prompt's end, so a completion whose first token is ``def`` after the prompt's final newline
    would end there; HumanEval's stop sequences, like vLLM's ``stop``, apply to the completion only."""

    def __init__(self, tokenizer, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in STOP_SEQUENCES) for text in texts],
                            dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], sampling: Sampling, *, task_id: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """One completion per entry of ``prompts`` (benchmark prompts; repeat a prompt for several samples).

    ``task_id``: for a CGC-LoRA model, the task whose gates every generated token uses.
    ``progress(done)`` is called after each batch with the number of completions so far.
    """
    lm = causal_lm(model)
    device = next(model.parameters()).device
    eos = end_token(tokenizer, lm.config.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if isinstance(eos, list) else eos
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an end-of-sequence token; generation needs one")
    tokenizer.padding_side = "left"  # the newest tokens of every row line up at the right for the cache
    torch.manual_seed(sampling.seed)  # generate samples from the global generator
    encoded_prompts = encode_prompts(tokenizer, prompts, sampling)
    options = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad, "eos_token_id": eos,
               "use_cache": True, "do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    completions: list[str] = []
    for start in range(0, len(encoded_prompts), sampling.batch_size):
        chunk = encoded_prompts[start:start + sampling.batch_size]
        encoded = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt").to(device)
        width = encoded["input_ids"].shape[1]
        if sampling.prompt_format == "raw":  # stop each row at its first stop sequence instead of max_new_tokens
            options["stopping_criteria"] = StoppingCriteriaList([StopInCompletion(tokenizer, width)])
        if task_id is not None:
            with task_ids_context(lm, torch.full((len(chunk),), task_id, dtype=torch.long, device=device)):
                out = model.generate(**encoded, **options)
        else:
            out = model.generate(**encoded, **options)
        completions.extend(decode_completions(tokenizer, out[:, width:], sampling))
        if progress is not None:
            progress(len(completions))
    return completions


def generate_completions(engine: Engine, problems: Sequence[Problem], n: int, sampling: Sampling) -> list[list[str]]:
    """``n`` completions per problem from ``engine``. Greedy decoding (temperature 0) generates one and repeats it."""
    draws = 1 if sampling.temperature == 0 else n
    if draws < n:
        log.info("temperature 0 is greedy: one completion per problem, counted %d times", n)
    prompts = [p.prompt for p in problems for _ in range(draws)]
    total = len(prompts)

    def report(done: int) -> None:
        log.info("generated %d/%d completions", done, total)

    flat = engine(prompts, report)
    return [flat[i * draws:(i + 1) * draws] * (n // draws) for i in range(len(problems))]
