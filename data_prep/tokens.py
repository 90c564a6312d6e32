"""Load the tokenizer offline and turn rendered samples into token ids plus a per-token loss mask.

The text before a reply (system, user turns, role markers, the generation prompt) and each reply with its
end marker are tokenised as separate pieces and concatenated, exactly as at inference: the prompt is
tokenised on its own and the model generates the reply's tokens after it. (Tokenising the whole sample in
one piece would let BPE merge the prompt's trailing newline with the reply's indentation into one token the
model never produces at inference.) Tokenizers that put a prefix space in front of every string they encode
(SentencePiece style) cannot be tokenised piecewise; for them the whole sample is tokenised once and the
spans are mapped to tokens through the encoding's char-to-token table. Either way all pieces of a batch go
through one ``encode_batch`` call, so the Rust tokenizer's own threads do the heavy lifting.

"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from mftcoder_coba.errors import UserError


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer`` from a local directory, never the network; a one-line error when that fails."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: tokenizer directory not found")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load tokenizer: {first}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{path}: needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


def tokenizer_files_sha256(path: Path) -> tuple[str, dict[str, str]]:
    """Hash of every file of the tokenizer directory (names and bytes), and each file's own hash."""
    files: dict[str, str] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        files[file.relative_to(path).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    total = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in files.items()).encode()).hexdigest()
    return total, files


class Encoder:
    """Batched tokenisation of ``(text, loss spans)`` into int32 ids and uint8 "is a loss target" masks."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend = tokenizer.backend_tokenizer
        self.vocab_size = len(tokenizer)
        self.piecewise = self._ids(["\n", "def"]) == [self._ids(["\n"])[0], self._ids(["def"])[0]] and \
            self._ids(["\ndef"])[0] == self._ids(["\n"])[0] + self._ids(["def"])[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which the piecewise path does not need
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._piecewise(texts, spans) if self.piecewise else self._whole(texts, spans)

    def _piecewise(self, texts: list[str], spans: list[list[tuple[int, int]]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        pieces: list[str] = []
        layout: list[list[tuple[int, bool]]] = []  # per sample: (number of pieces, is loss) runs
        for text, sample_spans in zip(texts, spans):
            parts, pos = [], 0
            for start, end in sample_spans:
                if start > pos:
                    pieces.append(text[pos:start])
                    parts.append(False)
                pieces.append(text[start:end])
                parts.append(True)
                pos = end
            if pos < len(text):
                pieces.append(text[pos:])
                parts.append(False)
            layout.append(parts)
        encoded = iter(self._ids(pieces))
        out = []
        for parts in layout:
            ids: list[int] = []
            bounds: list[tuple[int, int]] = []
            for is_loss in parts:
                piece = next(encoded)
                if is_loss:
                    bounds.append((len(ids), len(ids) + len(piece)))
                ids += piece
            mask = np.zeros(len(ids), dtype=np.uint8)
            for a, b in bounds:
                mask[a:b] = 1
            out.append((np.asarray(ids, dtype=np.int32), mask))
        return out

    def _whole(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for enc, sample_spans in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans):
            ids = np.asarray(enc.ids, dtype=np.int32)
            mask = np.zeros(len(ids), dtype=np.uint8)
            for start, end in sample_spans:
                first = _token_at(enc, start, end, +1)
                last = _token_at(enc, end - 1, start - 1, -1)
                if first is not None and last is not None and last >= first:
                    mask[first : last + 1] = 1
            out.append((ids, mask))
        return out


def _token_at(enc: Any, pos: int, stop: int, step: int) -> int | None:
    """Token holding character ``pos``, or the nearest one towards ``stop`` (skips trimmed whitespace)."""
    while pos != stop:
        token = enc.char_to_token(pos)
        if token is not None:
            return int(token)
        pos += step
    return None


def quiet_worker_threads() -> None:
    """One Rust thread per worker process: ``--workers`` processes must not each spawn a thread per core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
