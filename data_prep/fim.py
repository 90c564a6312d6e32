"""Fill-in-the-middle: rewrite a code sample so the model learns to write a missing middle from both sides.

As in the StarCoder, DeepSeek-Coder and Qwen2.5-Coder recipes, a document is cut at two random points into
prefix, middle and suffix and written with the tokenizer's own FIM special tokens, either

* PSM: ``<fim_prefix>`` prefix ``<fim_suffix>`` suffix ``<fim_middle>`` middle EOS, or
* SPM: ``<fim_prefix>`` ``<fim_suffix>`` suffix ``<fim_middle>`` prefix middle EOS (StarCoder's variant, where
  the middle continues the prefix directly),

and the loss covers what the model produces at inference: the middle and the EOS that ends it. Which
samples are rewritten, in which order and where they are cut is decided per record from ``--seed``, the
task and the record's index (and its copy number under ``--mix``) alone, so the output is the same for any
``--workers`` and batch size. What is cut: the last assistant reply of a conversation (the prompt is dropped:
FIM is used raw, without a chat template, at inference), the completion of a plain prompt/completion
record (the prompt stays in front of the prefix), or a whole ``text`` document.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from mftcoder_coba.data_prep.formats import Chat, Completion, Text
from mftcoder_coba.errors import UserError

# (prefix, suffix, middle) marker families, in the order they are looked for
FAMILIES = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
            ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma-style
            ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"))  # DeepSeek
_SCALE = 1 << 32


@dataclass(frozen=True)
class FimTokens:
    """The tokenizer's three FIM markers."""

    prefix: str
    suffix: str
    middle: str


@dataclass(frozen=True)
class FimRate:
    """``--fim NAME=RATE[,SPM_RATE]`` of one task."""

    rate: float
    """Share of the task's samples rewritten into FIM form."""
    spm_rate: float = 0.0
    """Share of those written in SPM order (the rest PSM)."""

    def validate(self, task: str) -> None:
        for name, value in (("RATE", self.rate), ("SPM_RATE", self.spm_rate)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UserError(f"--fim {task}: {name} must be a number in [0, 1], got {value!r}")


Directive = tuple[bool, int, int]
"""A record's FIM form: ``(spm, x, y)``, the cut points being ``x`` and ``y`` of 2**32 of the way through."""


@dataclass(frozen=True)
class Fim:
    """A sample in FIM form (``lead`` is text kept in front of the prefix: a plain completion's prompt)."""

    prefix: str
    middle: str
    suffix: str
    spm: bool
    lead: str = ""


def parse_rate(value: str) -> tuple[str, FimRate]:
    """``NAME=RATE[,SPM_RATE]`` from the command line."""
    name, sep, rates = value.partition("=")
    parts = rates.split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not sep or not name.strip() or not 1 <= len(numbers) <= 2:
        raise UserError(f"--fim {value!r}: expected NAME=RATE[,SPM_RATE], e.g. --fim code=0.5,0.5")
    rate = FimRate(*numbers)
    rate.validate(name.strip())
    return name.strip(), rate


def find_tokens(tokenizer: Any) -> FimTokens | None:
    """The first family of FIM markers that the tokenizer holds as single special (or added) tokens."""
    vocab = tokenizer.get_vocab()
    added = {str(t.content) for t in tokenizer.added_tokens_decoder.values()}
    for family in FAMILIES:
        if all(token in vocab and token in added for token in family):
            return FimTokens(*family)
    return None


def require_tokens(tokens: FimTokens | None, tokenizer_name: str, tasks: list[str]) -> FimTokens:
    """The tokenizer's FIM markers (:func:`find_tokens`), or one error line saying which it lacks."""
    if tokens is None:
        known = "; ".join("/".join(family) for family in FAMILIES)
        raise UserError(f"--fim {', '.join(tasks)}: tokenizer '{tokenizer_name}' has no FIM special tokens "
                        f"(looked for {known}); use a code model's tokenizer or drop --fim")
    return tokens


def directive(rate: FimRate, seed: int, task: str, index: int, copy: int = 0) -> Directive | None:
    """Whether and how record ``index`` (its ``copy``-th exposure under --mix) of ``task`` is rewritten.

    A hash of (seed, task, index, copy), not a running random stream, so the choice depends on nothing
    else: not on how records are batched or spread over workers.
    """
    if rate.rate <= 0.0:
        return None
    key = struct.pack("<qIqq", seed, zlib.crc32(task.encode("utf-8")), index, copy)
    take, order, x, y = struct.unpack("<4I", hashlib.blake2b(key, digest_size=16).digest())
    if take >= rate.rate * _SCALE:
        return None
    return order < rate.spm_rate * _SCALE, x, y


def _cut(text: str, x: int, y: int) -> tuple[str, str, str]:
    a, b = sorted(((x * (len(text) + 1)) >> 32, (y * (len(text) + 1)) >> 32))
    return text[:a], text[a:b], text[b:]


def rewrite(sample: Chat | Completion | Text, how: Directive) -> Fim:
    """The sample in FIM form: its answer (or document) cut at the directive's two points."""
    spm, x, y = how
    lead = ""
    if isinstance(sample, Text):
        document = sample.text
    elif isinstance(sample, Completion):
        lead, document = sample.prompt, sample.completion
    else:
        document = sample.turns[-1][1]
    prefix, middle, suffix = _cut(document, x, y)
    return Fim(prefix, middle, suffix, spm, lead)


def render(sample: Fim, tokens: FimTokens, bos: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """``(text, loss spans)``: the loss covers the middle and the EOS after it."""
    if sample.spm:
        head = f"{bos}{tokens.prefix}{tokens.suffix}{sample.suffix}{tokens.middle}{sample.lead}{sample.prefix}"
    else:
        head = f"{bos}{tokens.prefix}{sample.lead}{sample.prefix}{tokens.suffix}{sample.suffix}{tokens.middle}"
    text = f"{head}{sample.middle}{eos}"
    return text, [(len(head), len(text))]
