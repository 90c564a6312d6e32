"""Load the tokenizer offline and turn rendered samples into token ids plus a per-token loss mask.

The text before a reply (system, user turns, role markers, the generation prompt) and each reply with its
end marker are tokenised as separate pieces and concatenated, exactly as at inference: the prompt is
tokenised on its own and the model generates the reply's tokens after it. (Tokenising the whole sample in
one piece would let BPE merge the prompt's trailing newline with the reply's indentation into one token the
model never produces at inference.) Tokenizers that put a prefix space in front of every string they encode
(SentencePiece style) cannot be tokenised piecewise; for them the whole sample is tokenised once and the
spans are mapped to tokens through the encoding's char-to-token table. Either way a whole batch goes
through one ``encode_batch`` call, which releases the GIL while Rust encodes.

Piecewise tokenisation does not need one encoding per piece: a tokenizer splits its input at special tokens
first and normalises, pre-tokenises and encodes the text between them independently, so a sample's pieces
joined by a private special token (:data:`SEPARATOR`, known only to a copy of the tokenizer) encode to
exactly the pieces' tokens with that token between them. One encoding per sample instead of one per piece
saves the tokenizer's per-encoding work and Python's per-object work; the result is checked (the separator
count of every sample) and the batch falls back to one encoding per piece when it does not hold.

A batch comes back flat (:class:`Encoded`: all samples' ids and masks in two arrays plus offsets), so the
pipeline slices views instead of building arrays per sample.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mftcoder_coba.data.layout import file_sha256
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


class LazyTokenizer:
    """Stands in for the Hugging Face tokenizer beside an unpickled renderer (prep's own process and every
    ``--workers`` process, :mod:`tokenizer_cache`): loads it only when first used.

    Why: rendering and encoding need only the Rust tokenizer and the renderer's per-shape plans, both
    unpickled; importing transformers (and torch, which it pulls in) and loading the tokenizer costs 2-3 s
    of CPU per process, a sixth of what a 15 M-token corpus takes to tokenise. Records that do need the real
    tokenizer (a conversation shape not planned, a chat template applied per record, tool calls) load it on
    first use, once per process: a lock makes the threads of ``--workers 1`` wait for one load instead of
    importing transformers side by side (concurrent first imports of one package can fail half-initialised).
    ``name_or_path`` is kept for messages without loading anything.
    """

    def __init__(self, path: str | Path, name_or_path: str) -> None:
        self.path = str(path)
        self.name_or_path = name_or_path
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # only for what is not set above
        if name.startswith("__"):
            raise AttributeError(name)
        tokenizer = self.__dict__.get("_tokenizer")
        if tokenizer is None:
            with self._lock:
                tokenizer = self.__dict__.get("_tokenizer")
                if tokenizer is None:
                    tokenizer = self.__dict__["_tokenizer"] = load_tokenizer(self.path)
        return getattr(tokenizer, name)

    @property
    def loaded(self) -> bool:
        return "_tokenizer" in self.__dict__


def tokenizer_files_sha256(path: Path, names: Iterable[str] | None = None) -> tuple[str, dict[str, str]]:
    """Hash of the tokenizer directory's files (names and bytes), and each file's own hash: every file under
    ``path``, or only ``names``."""
    chosen = (path / name for name in names) if names is not None else (p for p in path.rglob("*") if p.is_file())
    files: dict[str, str] = {}
    for file in sorted(chosen):
        files[file.relative_to(path).as_posix()] = file_sha256(file)
    total = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in files.items()).encode()).hexdigest()
    return total, files


SEPARATOR = "\ue002mftcoder-coba:piece\ue003"
"""Joins the pieces of a sample (private-use characters around a name no real text contains; a batch whose
text does contain it is encoded one piece at a time)."""


@dataclass(frozen=True)
class Encoded:
    """A tokenised batch, flat: sample ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (and the same of ``mask``)."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8, 1 where the token is a loss target
    offsets: np.ndarray  # int64, one more than there are samples

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]


class Encoder:
    """Batched tokenisation of ``(text, loss spans)`` into int32 ids and uint8 "is a loss target" masks."""

    def __init__(self, tokenizer: Any) -> None:
        self._backend: Any = tokenizer.backend_tokenizer
        self._backend_json: str | None = None
        self.vocab_size = len(tokenizer)
        self.piecewise = self._ids(["\n", "def"]) == [self._ids(["\n"])[0], self._ids(["def"])[0]] and \
            self._ids(["\ndef"])[0] == self._ids(["\n"])[0] + self._ids(["def"])[0]
        self._joiner = _joining_copy(self.backend, tokenizer) if self.piecewise else None

    @property
    def backend(self) -> Any:
        """The Rust tokenizer (rebuilt on first use after unpickling, see :meth:`__getstate__`)."""
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self._backend_json)
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ``--workers`` and the prep tokenizer cache: where the joining copy encodes every batch,
        the backend itself serves only the rare batch that holds the separator, so it travels as its JSON and
        is rebuilt when such a batch comes. Rebuilding a tokenizer is most of a worker's start-up (about 0.4 s
        for a 128k vocabulary), and unpickling would otherwise rebuild two."""
        state = dict(self.__dict__)
        if self._joiner is not None and self._backend is not None:
            state["_backend"], state["_backend_json"] = None, self._backend.to_str()
        return state

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in _encode_fast(self.backend, texts)]

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sample ``(ids, mask)``."""
        encoded = self.encode_flat(texts, spans)
        return [encoded.sample(i) for i in range(len(encoded))]

    def encode_flat(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> Encoded:
        if not self.piecewise:
            return self._whole(texts, spans)
        layout: list[list[str]] = []  # per sample: its pieces, alternately outside and inside the loss spans
        loss: list[bool] = []  # per piece
        for text, sample_spans in zip(texts, spans):
            parts, pos = [], 0
            for start, end in sample_spans:
                if start > pos:
                    parts.append(text[pos:start])
                    loss.append(False)
                parts.append(text[start:end])
                loss.append(True)
                pos = end
            if pos < len(text):
                parts.append(text[pos:])
                loss.append(False)
            layout.append(parts)
        counts = np.fromiter(map(len, layout), dtype=np.int64, count=len(layout))
        flags = np.array(loss, dtype=np.uint8)
        if self._joiner is not None and not any(SEPARATOR in text for text in texts):
            joined = self._joined(layout, counts, flags)
            if joined is not None:
                return joined
        return self._per_piece(layout, counts, flags)

    def _joined(self, layout: list[list[str]], counts: np.ndarray, flags: np.ndarray) -> Encoded | None:
        """One encoding per sample, pieces joined by the separator; None if a separator count is off."""
        backend, separator_id = self._joiner  # type: ignore[misc]
        ids, bounds = _flat_ids(_encode_fast(backend, [SEPARATOR.join(parts) for parts in layout]))
        is_separator = ids == separator_id
        separators = np.flatnonzero(is_separator)
        before = np.searchsorted(separators, bounds)  # separators ahead of each sample bound
        if not np.array_equal(np.diff(before), counts - 1):
            return None
        # piece k of the batch runs from starts[k] to ends[k]; the separators themselves are dropped
        starts = np.sort(np.concatenate([bounds[:-1], separators + 1]))
        ends = np.sort(np.concatenate([separators, bounds[1:]]))
        return Encoded(ids[~is_separator], np.repeat(flags, ends - starts), bounds - before)

    def _per_piece(self, layout: list[list[str]], counts: np.ndarray, flags: np.ndarray) -> Encoded:
        ids, piece_bounds = _flat_ids(_encode_fast(self.backend, [p for parts in layout for p in parts]))
        first_piece = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=first_piece[1:])
        return Encoded(ids, np.repeat(flags, np.diff(piece_bounds)), piece_bounds[first_piece])

    def _whole(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> Encoded:
        ids_list, masks = [], []
        for enc, sample_spans in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans):
            ids = np.asarray(enc.ids, dtype=np.int32)
            mask = np.zeros(len(ids), dtype=np.uint8)
            for start, end in sample_spans:
                first = _token_at(enc, start, end, +1)
                last = _token_at(enc, end - 1, start - 1, -1)
                if first is not None and last is not None and last >= first:
                    mask[first : last + 1] = 1
            ids_list.append(ids)
            masks.append(mask)
        offsets = np.zeros(len(ids_list) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in ids_list], out=offsets[1:])
        return Encoded(np.concatenate(ids_list) if ids_list else np.zeros(0, np.int32),
                       np.concatenate(masks) if masks else np.zeros(0, np.uint8), offsets)


def _encode_fast(backend: Any, texts: list[str]) -> list[Any]:
    # encode_batch_fast skips computing character offsets, which the piecewise path does not need
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=False)


def _flat_ids(encodings: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """All encodings' ids in one int32 array, and the bounds of each encoding in it."""
    bounds = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings)), out=bounds[1:])
    ids = np.fromiter(itertools.chain.from_iterable(enc.ids for enc in encodings), dtype=np.int32,
                      count=int(bounds[-1]))
    return ids, bounds


_JOIN_PROBE = ["\n", "  x = 1\n", " ", "def f():\n    return 1\n\n", "\t", "\u00e9t\u00e9 ", "\n\n"]


def _joining_copy(backend: Any, tokenizer: Any) -> tuple[Any, int] | None:
    """A copy of the backend that knows :data:`SEPARATOR` as a special token, and that token's id.

    None where joining could change the result: the backend truncates or pads (per encoding), encodes
    special tokens as text, already knows the separator, or a probe of piece boundaries (whitespace on both
    sides, the tokenizer's own special tokens) does not come out as the pieces' own tokens.
    """
    from tokenizers import AddedToken, Tokenizer

    if backend.truncation is not None or backend.padding is not None or \
            getattr(backend, "encode_special_tokens", False) or backend.token_to_id(SEPARATOR) is not None:
        return None
    copy = Tokenizer.from_str(backend.to_str())
    copy.add_special_tokens([AddedToken(SEPARATOR, special=True, normalized=False)])
    separator_id = copy.token_to_id(SEPARATOR)
    probe = _JOIN_PROBE + [str(t) for t in tokenizer.all_special_tokens]
    pairs = [[a, b] for a in probe for b in probe]
    expected = [[i for enc in _encode_fast(backend, pair) for i in enc.ids + [separator_id]][:-1] for pair in pairs]
    joined = [enc.ids for enc in _encode_fast(copy, [SEPARATOR.join(pair) for pair in pairs])]
    return (copy, separator_id) if joined == expected else None


def _token_at(enc: Any, pos: int, stop: int, step: int) -> int | None:
    """Token holding character ``pos``, or the nearest one towards ``stop`` (skips trimmed whitespace)."""
    while pos != stop:
        token = enc.char_to_token(pos)
        if token is not None:
            return int(token)
        pos += step
    return None


ENCODE_THREADS_MAX = 8  # beyond this the Python half of the work (one GIL) is the limit, not the cores


def encode_threads() -> int:
    """Threads that render and encode in one process: one per usable core (at most ``ENCODE_THREADS_MAX``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, ENCODE_THREADS_MAX))


@contextlib.contextmanager
def serial_encode_calls() -> Iterator[None]:
    """Every encode call runs in its calling thread alone while this is active (restored after, even on errors).

    The tokenizer spreads one ``encode_batch`` call over its own thread pool; when several threads of this
    process each call it (:func:`encode_threads`), that pool only adds its hand-offs, and each call's tail
    (the pool waiting for its last long sample) idles cores. The switch is the tokenizer's
    ``TOKENIZERS_PARALLELISM`` variable, which it reads at every call; it is process-wide, so it is set
    before the threads start and restored after they end.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def quiet_worker_threads() -> None:
    """One Rust thread per worker process: ``--workers`` processes must not each spawn a thread per core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
