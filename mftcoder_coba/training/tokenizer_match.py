"""Whether the shards' tokenizer is the model's own: a run on another tokenizer's ids trains on nonsense.

Shards prepared with a 1,268-token tokenizer once trained a 50k-vocabulary model without a word (only a
tokenizer larger than the embeddings was refused), and the run then carried that tokenizer into every
export. The shards' copy (``OUT/tokenizer``) is compared with the tokenizer files in the model directory:
byte-identical vocabulary files settle it at once; otherwise both are loaded and compared by what matters to
the embeddings: the size, the token -> id map, the special tokens' ids and the ids of a fixed probe text
(code, whitespace runs, digits, non-ASCII). A chat template or the choice of EOS may differ: those change how
text is rendered, not what an id means.

A model directory without tokenizer files (weights saved alone) gives nothing to compare: the run goes on
with a warning, the vocabulary-size check (:func:`mftcoder_coba.models.check_model`) still applies. A model
built from ``model_config`` has no tokenizer of its own; the shards' becomes its tokenizer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mftcoder_coba.data.layout import TOKENIZER_FILES, file_sha256
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.models.config import ModelConfig

log = logging.getLogger(__name__)

VOCABULARY_FILES = tuple(name for name in TOKENIZER_FILES
                         if name not in ("config.json", "chat_template.jinja", "chat_template.json"))
"""The files that define what an id means (a model's ``config.json`` and chat templates do not)."""

PROBE_TEXT = ("def add(a, b):\n    return a + b  # sum\n\n\tclass Größe:\n        x = [1, 22, 333, 4444]\r\n"
              "print('héllo wörld', \"你好\", 3.14e-10)  🙂\n  \n\n\n    if x != y and z <= 0: pass\n")
"""Fixed text both tokenizers encode: ids that differ here mean the vocabularies or their rules differ."""


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds tokenizer files of its own."""
    return any((directory / name).is_file() for name in VOCABULARY_FILES)


def same_files(a: Path, b: Path) -> bool:
    """Both folders hold the same vocabulary files, byte for byte."""
    names = [n for n in VOCABULARY_FILES if (a / n).is_file() or (b / n).is_file()]
    return all((a / n).is_file() and (b / n).is_file() and file_sha256(a / n) == file_sha256(b / n) for n in names)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {str(t.content): i for i, t in tokenizer.added_tokens_decoder.items()}


def difference(shards: Any, model: Any) -> str | None:
    """How two loaded tokenizers differ in what their ids mean (None: they do not)."""
    if len(shards) != len(model):
        return f"{len(shards)} tokens vs {len(model)}"
    ours, theirs = shards.get_vocab(), model.get_vocab()
    moved = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    if moved:
        first = moved[0]
        return f"{len(moved)} tokens have other ids (e.g. {first!r}: {ours.get(first)} vs {theirs.get(first)})"
    if _special_ids(shards) != _special_ids(model):
        return "their added/special tokens differ"
    a, b = (tok(PROBE_TEXT, add_special_tokens=False)["input_ids"] for tok in (shards, model))
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"a probe text encodes differently from token {at} on ({len(a)} vs {len(b)} ids)"
    return None


def tokenizer_mismatch(shards_dir: Path, model_dir: Path) -> str | None:
    """Why the shards' tokenizer (``shards_dir``) is not the one in ``model_dir``; None when it is, or when
    ``model_dir`` has no tokenizer to compare with (logged)."""
    if not has_tokenizer(model_dir):
        log.warning("%s holds no tokenizer: cannot check that the shards' tokenizer %s is the model's own",
                    model_dir, shards_dir)
        return None
    if same_files(shards_dir, model_dir):
        return None
    from transformers import AutoTokenizer

    loaded = []
    for folder in (shards_dir, model_dir):
        try:
            loaded.append(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as exc:
            return f"{folder}: the tokenizer does not load ({str(exc).strip().splitlines()[0]})"
    return difference(*loaded)


def check_run_tokenizer(cfg: ModelConfig, shards_tokenizer: Path | None) -> None:
    """Refuse (one :class:`ConfigError` line) shards whose tokenizer is not ``model.path``'s own, unless
    ``model.allow_other_tokenizer`` says the vocabulary change is deliberate (then a warning)."""
    if cfg.path is None or shards_tokenizer is None:
        return
    problem = tokenizer_mismatch(shards_tokenizer, Path(cfg.path))
    if problem is None:
        return
    if cfg.allow_other_tokenizer:
        log.warning("the shards' tokenizer differs from %s's own (%s); model.allow_other_tokenizer is set",
                    cfg.path, problem)
        return
    raise ConfigError(f"config field 'model.path': the shards' tokenizer {shards_tokenizer} is not the model's "
                      f"own ({problem}); prepare the data with the tokenizer in {cfg.path}, or set "
                      "model.allow_other_tokenizer: true for a deliberate vocabulary change")
