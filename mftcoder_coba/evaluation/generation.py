"""Completions of code prompts with transformers ``generate``: batched, KV cache, sampling or greedy.

``raw`` prompts are continued as text and the completion is cut at the benchmark's stop sequences.
``chat`` prompts go through the tokenizer's chat template as one user message; the reply's first fenced
code block (or the whole reply) is the completion, appended after the prompt, so a reply that restates
the whole function redefines it and one that gives only the body completes it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn

from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.problems import STOP_SEQUENCES, truncate_at_stop
from mftcoder_coba.models import causal_lm
from mftcoder_coba.models.cgc_lora import task_ids_context

log = logging.getLogger(__name__)

CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in a ```python code "
                    "block.\n\n")
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn."""

    temperature: float = 0.2
    """Softmax temperature; 0 means greedy decoding (every sample of a prompt is the same)."""
    top_p: float = 0.95
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    max_new_tokens: int = 512
    """Generated tokens per completion at most."""
    batch_size: int = 16
    """Sequences generated together."""
    prompt_format: str = "raw"
    """``raw`` (continue the code) or ``chat`` (the tokenizer's chat template)."""
    seed: int = 0
    """Seed of the sampling generator, so a rerun draws the same samples on the same hardware."""
    instruction: str = CHAT_INSTRUCTION
    """``chat``: text put before the benchmark prompt in the user message (empty for models fine-tuned on
    bare prompts as the user turn, like the demo's code_completion task)."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.prompt_format not in ("raw", "chat"):
            raise UserError(f"--prompt-format must be raw or chat, got {self.prompt_format!r}")


def render_prompt(tokenizer, prompt: str, sampling: Sampling) -> str:
    """The text the model is given for a benchmark ``prompt``."""
    if sampling.prompt_format == "raw":
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--prompt-format chat: the tokenizer has no chat template; use --prompt-format raw")
    return tokenizer.apply_chat_template([{"role": "user", "content": sampling.instruction + prompt}],
                                         add_generation_prompt=True, tokenize=False)


def extract_completion(text: str, prompt_format: str) -> str:
    """The part of generated ``text`` that follows the benchmark prompt in the program."""
    if prompt_format == "raw":
        return truncate_at_stop(text, STOP_SEQUENCES)
    found = _FENCE.search(text)
    return "\n" + (found.group(1) if found else text)


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
