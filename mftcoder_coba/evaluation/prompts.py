"""How a benchmark prompt is put to the model and what part of the reply is the completion.

``raw`` prompts are continued as text and the completion is cut at the benchmark's stop sequences.
``chat`` prompts go through the tokenizer's chat template as one user message; the reply's first fenced
code block (or the whole reply) is the completion, appended after the prompt, so a reply that restates
the whole function redefines it and one that gives only the body completes it. No torch here: the
``eval-code`` command checks its options before it imports a model library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.problems import STOP_SEQUENCES, truncate_at_stop

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
