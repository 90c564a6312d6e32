"""Task inputs and record formats: where records come from and what a valid record is.

A task's PATH is a record file, a directory searched recursively for them, a ``datasets``
``save_to_disk`` directory, or a Hugging Face Hub dataset (``hf:org/dataset[:config][@split]``, from the
network or the local HF cache). Record files are recognised by their suffix, in any letter case, through
one table, :data:`READERS`: ``.jsonl`` (JSON lines) and ``.json`` (a top-level JSON array, or JSON lines),
each also compressed as ``.gz`` or ``.bz2``, and ``.parquet`` and ``.arrow`` tables; a new file format is
one more entry there. Records are read lazily (a line, an array element or a slice of a record batch at a
time), so memory does not depend on file size. Every record is normalised here into a :class:`Chat`
(optional system prompt plus alternating user/assistant turns, possibly with tool calls), a
:class:`Completion` (raw prompt + completion text) or a :class:`Text` (continued pretraining), the format
being detected per record: MFTCoder's own fields, OpenAI/TRL ``messages``, ShareGPT ``conversations``, TRL
``prompt``/``completion``, Alpaca with ``system``/``history``. A bad record raises :class:`BadRecord`
carrying a reason key (counted in the manifest under ``--skip-bad``) and a message that names ``path:line``
(``path:line:column`` for a record that does not start a line, as in a JSON array; the row number for
table rows).
"""
from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "bot": "assistant", "assistant": "assistant",
                "gpt": "assistant", "tool": "tool"}
# (prompt field, answer field) pairs, tried in this order; an optional "system" field applies to all of them.
PROMPT_ANSWER_FIELDS = (("prompt", "answer"), ("prompt", "response"), ("instruction", "output"),
                        ("input", "output"), ("question", "answer"), ("query", "answer"))
CHAT_FIELDS = ("chat_rounds", "data")  # MFTCoder writes "chat_rounds"; its older ChatML files use "data"


@dataclass(frozen=True)
class Chat:
    """A conversation: optional system prompt, then (role, content) turns alternating user/assistant.

    A conversation with tool calls keeps its full message list in ``messages`` (OpenAI form: assistant
    ``tool_calls``, ``tool`` turns between an assistant turn and the next), which only a chat template that
    renders tools can turn into text; ``where`` names the record for the error when it cannot.
    """

    system: str | None
    turns: tuple[tuple[str, str], ...]
    context_only: frozenset[int] = frozenset()
    """Assistant turns, counted among the assistant turns from 0, that are context without loss."""
    messages: tuple[dict[str, Any], ...] | None = None
    tools: tuple[Any, ...] | None = None
    """Tool definitions (the record's ``tools``), passed to the chat template."""
    where: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class Completion:
    """TRL's plain prompt-completion: raw text, no template; the loss covers the completion and EOS."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Text:
    """Plain text for continued pretraining: the loss covers every token."""

    text: str


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is the short key counted in the manifest."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


Raw = bytes | dict[str, Any]
"""A record as read: the undecoded bytes of one JSON value, or a row a reader already decoded (datasets)."""
Item = tuple[int, int, Raw]
"""``(line, column, raw)``: where a record starts in its file (1-based; the row number for datasets rows)."""


HUB_PREFIX = "hf:"
_HUB_SPEC = re.compile(r"hf:(?P<repo>[^:@]+)(?::(?P<config>[^:@]+))?(?:@(?P<split>[^:@]+))?")


@dataclass(frozen=True)
class HubDataset:
    """``hf:org/dataset[:config][@split]``: a dataset loaded by name through ``datasets.load_dataset``."""

    repo: str
    config: str | None
    split: str

    @property
    def label(self) -> str:
        return f"{HUB_PREFIX}{self.repo}{':' + self.config if self.config else ''}@{self.split}"


def parse_hub(value: str) -> HubDataset:
    """The dataset named by a task path ``hf:org/dataset[:config][@split]`` (split ``train`` by default)."""
    found = _HUB_SPEC.fullmatch(value.strip())
    if found is None or not found["repo"].strip("/"):
        raise UserError(f"{value}: expected hf:ORG/DATASET[:CONFIG][@SPLIT], e.g. hf:openai/gsm8k:main@train")
    return HubDataset(found["repo"].strip("/"), found["config"], found["split"] or "train")


def is_hub(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


@dataclass(frozen=True)
class Source:
    """One readable input of a task: a record file, a split of a ``save_to_disk`` dataset, or a Hub dataset."""

    path: Path
    split: str | None = None  # set for datasets directories
    hub: HubDataset | None = None

    @property
    def label(self) -> str:
        if self.hub is not None:
            return self.hub.label
        return f"{self.path}[{self.split}]" if self.split else str(self.path)


# ---------------------------------------------------------------------------------------------------------------
# Record files, one reader per suffix.

@dataclass(frozen=True)
class FileReader:
    """How to read one kind of record file: a value of :data:`READERS`.

    ``count(path)`` counts the records without parsing them (prep plans the held-out split before any
    work); ``records(path)`` yields them as :data:`Item`. Both raise :class:`UserError` naming the file for
    a file that cannot be read as a whole (a broken compressed stream, a JSON array that never closes).
    """

    description: str
    count: Callable[[Path], int]
    records: Callable[[Path], Iterator[Item]]


Opener = Callable[[], IO[bytes]]


def _jsonl_count(open_stream: Opener, label: str) -> int:
    with open_stream() as stream:
        return sum(1 for line in stream if not line.isspace())  # iteration never yields an empty line


def _jsonl_records(open_stream: Opener, label: str) -> Iterator[Item]:
    with open_stream() as stream:
        for lineno, line in enumerate(stream, 1):
            if not line.isspace():
                yield lineno, 1, line


def _json_records(open_stream: Opener, label: str) -> Iterator[Item]:
    """A ``.json`` file: the elements of its top-level array, or its lines when it does not open with ``[``."""
    with open_stream() as stream:
        head = b""
        while not head.strip():
            chunk = stream.read(_CHUNK)
            if not chunk:
                return
            head += chunk
        if head.lstrip()[:1] == b"[":
            yield from _ArrayScan(stream, head, label).elements()
            return
    yield from _jsonl_records(open_stream, label)


def _json_count(open_stream: Opener, label: str) -> int:
    return sum(1 for _ in _json_records(open_stream, label))


_CHUNK = 1 << 20
_SPACE = re.compile(rb"[ \t\r\n]*+")
_STRUCTURE = re.compile(rb'[\[\]{}",]')
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)


class _ArrayScan:
    """The elements of a top-level JSON array, read a chunk at a time, as undecoded bytes with their place.

    Why not ``json.load``: the file may not fit in memory. Only the boundaries between elements are found
    here (a scan over strings and brackets); each element is parsed where every record is, in
    :func:`decode`, so a malformed element is one bad record named by its line and column, and worker
    processes share the parsing.
    """

    def __init__(self, stream: IO[bytes], head: bytes, label: str) -> None:
        self.stream, self.buf, self.label = stream, head, label
        self.pos = 0         # next unread byte of buf
        self.line = 1        # line of buf[pos]
        self.line_start = 0  # index in buf where that line starts (negative once dropped from buf)
        self.eof = False

    def elements(self) -> Iterator[Item]:
        self._skip_space()
        self._advance(self.pos + 1)  # the '[' the caller found
        if not self._skip_space():
            raise UserError(f"{self._where()}: the JSON array is never closed (the file ends after its '[')")
        if self.buf[self.pos] == ord("]"):
            self._advance(self.pos + 1)
            self._end()
            return
        while True:
            if not self._skip_space():
                raise UserError(f"{self._where()}: the JSON array is never closed (the file ends after a ',')")
            end = self._element_end()
            while end is None:
                if not self._more():
                    raise UserError(f"{self._where()}: the file ends inside this record of the JSON array "
                                    "(a string or bracket is never closed)")
                end = self._element_end()
            yield self.line, self.pos - self.line_start + 1, self.buf[self.pos:end].rstrip()
            self._advance(end)
            separator = self.buf[end]
            if separator not in b",]":
                raise UserError(f"{self._where()}: unexpected '{chr(separator)}' between the records of the JSON "
                                "array (expected ',' or ']')")
            self._advance(end + 1)
            if separator == ord("]"):
                self._end()
                return

    def _element_end(self) -> int | None:
        """Index of the ',' or ']' that ends the element at pos, or None when it goes on past the buffer."""
        buf, i, depth = self.buf, self.pos, 0
        while True:
            found = _STRUCTURE.search(buf, i)
            if found is None:
                return None
            j = found.start()
            c = buf[j]
            if c == 0x22:  # '"': skip the whole string, escapes included
                string = _STRING.match(buf, j)
                if string is None:
                    return None
                i = string.end()
                continue
            if c in b"[{":
                depth += 1
            elif depth == 0:
                return j
            elif c != 0x2C:  # a closing bracket inside the element
                depth -= 1
            i = j + 1

    def _end(self) -> None:
        if self._skip_space():
            raise UserError(f"{self._where()}: unexpected content after the closing ']' of the JSON array")

    def _advance(self, to: int) -> None:
        newlines = self.buf.count(b"\n", self.pos, to)
        if newlines:
            self.line += newlines
            self.line_start = self.buf.rfind(b"\n", self.pos, to) + 1
        self.pos = to

    def _skip_space(self) -> bool:
        """Move pos to the next non-blank byte; False at the end of the file."""
        while True:
            self._advance(_SPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return True
            if not self._more():
                return False

    def _more(self) -> bool:
        """Append the next chunk, dropping what lies before pos (at least doubling what is left, so an
        element larger than a chunk is rescanned a logarithmic number of times); False at the end."""
        if self.eof:
            return False
        chunk = self.stream.read(max(_CHUNK, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.line_start -= self.pos
        self.pos = 0
        return True

    def _where(self) -> str:
        return place(self.label, self.line, self.pos - self.line_start + 1)


def _counting(opener: Callable[..., IO[bytes]], count: Callable[[Opener, str], int], path: Path) -> int:
    try:
        return count(partial(opener, path, "rb"), str(path))
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None


def _reading(opener: Callable[..., IO[bytes]], records: Callable[[Opener, str], Iterator[Item]],
             path: Path) -> Iterator[Item]:
    try:
        yield from records(partial(opener, path, "rb"), str(path))
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None


_COMPRESSIONS: dict[str, tuple[str, Callable[..., IO[bytes]]]] = {
    "": ("", open), ".gz": (", gzip", gzip.open), ".bz2": (", bzip2", bz2.open)}
_JSON_FORMATS = {".jsonl": ("JSON lines", _jsonl_count, _jsonl_records),
                 ".json": ("JSON array or JSON lines", _json_count, _json_records)}

_ARROW_ROWS = 1024  # rows decoded into Python at a time: memory stays flat however large a file or batch is


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A table row without its null columns: a column that other rows fill is absent from this record."""
    return {k: v for k, v in row.items() if v is not None}


def _table_rows(batches: Iterator[Any]) -> Iterator[Item]:
    row = 0
    for batch in batches:
        for start in range(0, batch.num_rows, _ARROW_ROWS):
            for record in batch.slice(start, _ARROW_ROWS).to_pylist():
                row += 1
                yield row, 1, _present(record)


def _parquet_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _parquet_records(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        yield from _table_rows(file.iter_batches(batch_size=_ARROW_ROWS))


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of an Arrow IPC file, memory-mapped: the file format, or the stream format that
    ``datasets`` writes into its cache and ``save_to_disk`` folders."""
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            yield from pa.ipc.open_stream(source)
            return
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _arrow_count(path: Path) -> int:
    return sum(batch.num_rows for batch in _arrow_batches(path))


def _arrow_records(path: Path) -> Iterator[Item]:
    yield from _table_rows(_arrow_batches(path))


def _table_counting(count: Callable[[Path], int], path: Path) -> int:
    import pyarrow as pa

    try:
        return count(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                        ) from None


def _table_reading(records: Callable[[Path], Iterator[Item]], path: Path) -> Iterator[Item]:
    import pyarrow as pa

    try:
        yield from records(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                        ) from None


READERS: dict[str, FileReader] = {
    **{suffix + compressed: FileReader(description + how, partial(_counting, opener, count),
                                       partial(_reading, opener, records))
       for suffix, (description, count, records) in _JSON_FORMATS.items()
       for compressed, (how, opener) in _COMPRESSIONS.items()},
    ".parquet": FileReader("Parquet", partial(_table_counting, _parquet_count),
                           partial(_table_reading, _parquet_records)),
    ".arrow": FileReader("Arrow IPC (file or stream)", partial(_table_counting, _arrow_count),
                         partial(_table_reading, _arrow_records)),
}
"""Record file suffix (lower case; matched in any case, the longest first) -> its reader. Table files
(Parquet, Arrow) are streamed a record batch at a time; their records are rows, named by row number."""


def reader_for(path: Path) -> FileReader | None:
    """The reader of a record file by its name's suffix, in any letter case; None for other files."""
    name = path.name.lower()
    return next((READERS[s] for s in sorted(READERS, key=len, reverse=True) if name.endswith(s)), None)


def supported_suffixes() -> str:
    return ", ".join(sorted(READERS, key=lambda s: (len(s.split(".")), s)))


# ---------------------------------------------------------------------------------------------------------------
# Task paths.

def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _dataset_sources(path: Path) -> list[Source]:
    index = path / "dataset_dict.json"
    if not index.is_file():
        return [Source(path, "")]
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{index}: not a datasets split index ({type(exc).__name__}: {exc})") from None
    return [Source(path, str(split)) for split in sorted(splits)]


def resolve_sources(task: str, path: Path) -> list[Source]:
    """The inputs behind ``--task task=path``, in a deterministic order (sorted relative paths).

    A directory is searched recursively for record files (:data:`READERS`) and ``save_to_disk``
    directories; what it reads and what it passes over, and why, is logged, so no file is left out unseen.
    """
    if is_hub(path):
        return [Source(path, hub=parse_hub(str(path)))]
    if not path.exists():
        raise UserError(f"{path}: task '{task}': no such file or directory")
    if path.is_file():
        if reader_for(path) is None:
            raise UserError(f"{path}: task '{task}': not a record file: expected {supported_suffixes()} (any "
                            "case), a directory of them, a datasets save_to_disk directory, or "
                            "hf:ORG/DATASET[:CONFIG][@SPLIT]")
        return [Source(path)]
    if _is_dataset_dir(path):
        return _dataset_sources(path)
    found: list[tuple[str, list[Source]]] = []
    skipped: list[str] = []
    for root, dirs, names in os.walk(path):
        here = Path(root)
        walk_on = []
        for name in sorted(dirs):
            relative = (here / name).relative_to(path).as_posix()
            if name.startswith("."):
                skipped.append(f"{relative}/ (hidden)")
            elif _is_dataset_dir(here / name):
                found.append((relative, _dataset_sources(here / name)))
            else:
                walk_on.append(name)
        dirs[:] = walk_on
        for name in sorted(names):
            file = here / name
            relative = file.relative_to(path).as_posix()
            if name.startswith("."):
                skipped.append(f"{relative} (hidden file)")
            elif reader_for(file) is None:
                skipped.append(f"{relative} (unknown extension)")
            elif not file.is_file():
                skipped.append(f"{relative} (not a regular file)")
            else:
                found.append((relative, [Source(file)]))
    found.sort(key=lambda entry: entry[0])
    passed_over = f"; skipped {len(skipped)}: {_listing(skipped)}" if skipped else ""
    if not found:
        raise UserError(f"{path}: task '{task}': directory holds no record files ({supported_suffixes()}, any "
                        f"case, or datasets save_to_disk directories){passed_over}")
    log.info("task '%s': %s: reading %d: %s%s", task, path, len(found), _listing([r for r, _ in found]),
             passed_over)
    return [source for _, sources in found for source in sources]


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_dataset(source: Source) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{source.path}: cannot load datasets directory: {first}") from None
    return loaded[source.split] if source.split else loaded


def _load_hub(hub: HubDataset) -> Any:
    """The Hub dataset from the network, or from the local Hugging Face cache when offline
    (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``); a dataset that is neither is one error line."""
    import datasets

    try:
        return datasets.load_dataset(hub.repo, hub.config, split=hub.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing or broken dataset
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"{hub.label}: not in the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE})"
                            " and offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): download it on a "
                            f"machine with network access or point --task at local files ({first})") from None
        raise UserError(f"{hub.label}: cannot load from the Hugging Face Hub or its local cache: {first}") from None


def _reader(source: Source) -> FileReader:
    reader = reader_for(source.path)
    if reader is None:
        raise UserError(f"{source.path}: not a record file: expected {supported_suffixes()}")
    return reader


def count_records(source: Source) -> int:
    """Number of records (non-blank lines, array elements, or dataset rows) without parsing them."""
    if source.hub is not None:
        return len(_load_hub(source.hub))
    if source.split is not None:
        return len(_load_dataset(source))
    return _reader(source).count(source.path)


def iter_raw(source: Source) -> Iterator[Item]:
    """The source's records as :data:`Item`: undecoded bytes for record files, dicts for datasets rows."""
    if source.hub is not None or source.split is not None:
        rows = _load_hub(source.hub) if source.hub is not None else _load_dataset(source)
        for i, row in enumerate(rows, 1):
            yield i, 1, _present(row)
        return
    yield from _reader(source).records(source.path)


# ---------------------------------------------------------------------------------------------------------------
# Records.

def place(label: str, line: int, column: int = 1) -> str:
    """How messages name a record: ``path:line``, and ``:column`` when it does not start its line."""
    return f"{label}:{line}" if column == 1 else f"{label}:{line}:{column}"


def _position(text: str | bytes, index: int, line: int, column: int) -> tuple[int, int]:
    """File line and column of ``text[index]``, for a record ``text`` that starts at ``line``:``column``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    newlines = text.count(newline, 0, index)  # type: ignore[arg-type]
    if not newlines:
        return line, column + index
    return line + newlines, index - text.rfind(newline, 0, index)  # type: ignore[arg-type]


TOO_DEEP = "nested too deeply to read (deeper than Python's recursion limit)"
"""Why a record (or a part of it) nested some thousand levels deep is refused: parsing, checking and
rendering it recurse once per level, and Python stops at its recursion limit."""


def decode(raw: Raw, label: str, line: int, column: int = 1) -> dict[str, Any]:
    """Parse one raw record, found at ``label:line:column``, into a JSON object.

    Errors name the line and column of the fault in the file, not in the record: a record spanning lines
    (a JSON array element) reports the line the fault is on, and a record cut off at the end of its line
    reports the end of that line (the line break is not part of the record).
    """
    if isinstance(raw, dict):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at_line, at_column = _position(raw, exc.start, line, column)
        raise BadRecord("not_utf8", f"{label}:{at_line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at "
                                    f"column {at_column})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        at_line, at_column = _position(text, min(exc.pos, len(text.rstrip("\r\n"))), line, column)
        raise BadRecord("invalid_json", f"{label}:{at_line}: malformed JSON: {exc.msg} at column {at_column}"
                        ) from None
    except RecursionError:
        raise BadRecord("too_deep", f"{place(label, line, column)}: {TOO_DEEP}") from None
    if not isinstance(record, dict):
        raise BadRecord("not_object", f"{place(label, line, column)}: expected a JSON object, got "
                                      f"{type(record).__name__}")
    return record


def _text_field(record: dict[str, Any], field: str, where: str, turn: tuple[str, int] | None = None) -> str:
    """A non-blank string field; ``turn`` (list field, index) names the chat turn it sits in, for messages.

    The common case returns after three cheap checks; messages are only formatted for a bad record.
    """
    value = record.get(field)
    if isinstance(value, str) and value and not value.isspace():
        return value
    place = where if turn is None else f"{where}: {turn[0]}[{turn[1]}]"
    if value is None:
        raise BadRecord("missing_field", f"{place}: field '{field}' missing")
    if not isinstance(value, str):
        raise BadRecord("bad_type", f"{place}: field '{field}' must be a string, got {type(value).__name__}")
    raise BadRecord("empty_field", f"{place}: field '{field}' is empty")


def _train_flag(turn: dict[str, Any], role: str, where: str) -> bool:
    """Whether an assistant turn carries the loss: ``"train": false`` or ``"weight": 0`` make it context only.

    LLaMA-Factory and axolotl mark earlier replies this way; any other value (a weight of 0.5, a flag on a
    user turn) is refused rather than silently read as one or the other.
    """
    train, weight = turn.get("train"), turn.get("weight")
    if train is None and weight is None:
        return True
    if role != "assistant":
        raise BadRecord("bad_train_flag", f"{where}: 'train'/'weight' may only mark assistant turns")
    if train is not None and not isinstance(train, bool):
        raise BadRecord("bad_train_flag", f"{where}: field 'train' must be true or false, got {train!r}")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise BadRecord("bad_train_flag", f"{where}: field 'weight' must be 0 or 1 (per-turn weights other than "
                                          f"all or nothing are not supported), got {weight!r}")
    return (train is not False) and weight != 0


def _tool_calls(turn: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """An assistant turn's OpenAI ``tool_calls``, arguments given as JSON text decoded into objects (the form
    chat templates render; OpenAI's files carry them as strings); None when the turn has none."""
    calls = turn.get("tool_calls")
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise BadRecord("bad_type", f"{where}: field 'tool_calls' must be a list of objects")
    out = []
    for call in calls:
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise BadRecord("bad_type", f"{where}: tool call arguments are not valid JSON") from None
            except RecursionError:
                raise BadRecord("too_deep", f"{where}: tool call arguments: {TOO_DEEP}") from None
            call = {**call, "function": {**function, "arguments": arguments}}
        out.append({k: v for k, v in call.items() if v is not None})
    return out


def _chat(rounds: Any, field: str, where: str, keys: tuple[str, str] = ("role", "content"),
          tools: Any = None, context_turns: int = 0, record_system: str | None = None) -> Chat:
    """A conversation from a list of turns whose role and text sit under ``keys``.

    Turns alternate user/assistant after an optional leading system turn; a conversation with tool turns
    or assistant ``tool_calls`` may also have tool turns after an assistant turn that called tools. The
    first ``context_turns`` turns (a prompt given apart from its completion) never carry the loss. Turns
    after the last assistant turn that carries the loss are dropped: no target reads them. A record-level
    ``system`` field (LLaMA-Factory's ShareGPT layout keeps it there) is the system prompt of turns without
    a system turn; a record with both, differing, is refused rather than one of them silently dropped.
    """
    role_key, content_key = keys
    if not isinstance(rounds, list):
        raise BadRecord("bad_type", f"{where}: field '{field}' must be a list of turns")
    if not rounds:
        raise BadRecord("empty_field", f"{where}: field '{field}' is empty")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    messages: list[dict[str, Any]] = []
    trained: list[bool] = []  # per assistant turn
    has_tools = tools is not None
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict):
            raise BadRecord("bad_type", f"{where}: {field}[{i}] must be an object with '{role_key}' and "
                                        f"'{content_key}'")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise BadRecord("missing_field", f"{where}: {field}[{i}]: field '{role_key}' missing")
        role = ROLE_ALIASES.get(raw_role) or ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise BadRecord("unknown_role", f"{where}: {field}[{i}]: unknown role '{raw_role}' "
                                            f"(known: {', '.join(ROLE_ALIASES)})")
        calls = _tool_calls(turn, f"{where}: {field}[{i}]") if role == "assistant" else None
        if calls is not None and turn.get(content_key) in (None, ""):
            content = ""
        else:
            content = _text_field(turn, content_key, where, (field, i))
        train = _train_flag(turn, role, f"{where}: {field}[{i}]") and i >= context_turns
        if role == "system":
            if i != 0:
                raise BadRecord("turn_order", f"{where}: {field}[{i}]: a system turn may only come first")
            system = content
            messages.append({"role": "system", "content": content})
            continue
        previous = turns[-1][0] if turns else None
        if role == "tool":
            if previous not in ("tool", "assistant") or (previous == "assistant" and "tool_calls" not in messages[-1]):
                raise BadRecord("turn_order", f"{where}: {field}[{i}]: a tool turn must follow an assistant turn "
                                              "with tool_calls (or another tool turn)")
            has_tools = True
            message = {"role": "tool", "content": content}
            message.update({k: turn[k] for k in ("tool_call_id", "name") if turn.get(k) is not None})
        else:
            expected = "assistant" if previous in ("user", "tool") else "user"
            if previous == "assistant" and "tool_calls" in messages[-1]:
                raise BadRecord("turn_order", f"{where}: {field}[{i}]: an assistant turn with tool_calls must be "
                                              "followed by tool turns")
            if role != expected:
                raise BadRecord("turn_order", f"{where}: {field}[{i}]: expected a {expected} turn, got "
                                              f"'{raw_role}' (turns must alternate user/assistant)")
            message = {"role": role, "content": content}
            if calls is not None:
                has_tools = True
                message["tool_calls"] = calls
            if role == "assistant":
                trained.append(train)
        turns.append((role, content))
        messages.append(message)
    if not turns:
        raise BadRecord("empty_field", f"{where}: field '{field}' has no user/assistant turns")
    if record_system is not None:
        if system is None:
            system = record_system
            messages.insert(0, {"role": "system", "content": system})
        elif system != record_system:
            raise BadRecord("two_system_prompts", f"{where}: field 'system' and the system turn of '{field}' "
                                                  "differ: give the system prompt once")
    if turns[-1][0] != "assistant":
        raise BadRecord("turn_order", f"{where}: field '{field}': the last turn must be from the assistant")
    if not any(trained):
        raise BadRecord("no_trained_turn", f"{where}: field '{field}': every assistant turn is marked context "
                                           "only ('train': false / 'weight': 0), so nothing would be learned")
    last = max(k for k, t in enumerate(trained) if t)  # the k-th assistant turn is the last one trained
    keep = [i for i, (role, _) in enumerate(turns) if role == "assistant"][last] + 1
    offset = int(system is not None)
    context_only = frozenset(k for k, t in enumerate(trained[: last + 1]) if not t)
    if not has_tools:
        return Chat(system, tuple(turns[:keep]), context_only)
    return Chat(system, tuple(turns[:keep]), context_only, tuple(messages[: offset + keep]),
                tuple(tools) if tools is not None else None, where)


def _history(record: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Alpaca's ``history``: earlier ``[instruction, response]`` rounds, as user/assistant turns."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)
            for pair in history):
        raise BadRecord("bad_type", f"{where}: field 'history' must be a list of [instruction, response] pairs of "
                                    "non-empty strings")
    return [turn for query, response in history for turn in (("user", query), ("assistant", response))]


def _prompt_completion(record: dict[str, Any], where: str, system: str | None) -> Chat | Completion:
    """TRL's prompt-completion: plain strings (trained as raw text on the completion, no template, as TRL
    does), or message lists (conversational: the prompt's turns are context, the completion's are learned)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return _chat(prompt + completion, "prompt+completion", where, tools=record.get("tools"),
                     context_turns=len(prompt), record_system=system)
    if isinstance(prompt, list) or isinstance(completion, list):
        raise BadRecord("bad_type", f"{where}: fields 'prompt' and 'completion' must both be strings or both "
                                    "message lists")
    return Completion(_text_field(record, "prompt", where), _text_field(record, "completion", where))


def normalise(record: dict[str, Any], where: str) -> Chat | Completion | Text:
    """Detect the record's format and return it as a :class:`Chat`, :class:`Completion` or :class:`Text`."""
    system = _text_field(record, "system", where) if record.get("system") is not None else None
    for field in CHAT_FIELDS:
        if field in record and (field == "chat_rounds" or isinstance(record[field], list)):
            return _chat(record[field], field, where, record_system=system)
    if record.get("messages") is not None:  # OpenAI / TRL
        return _chat(record["messages"], "messages", where, tools=record.get("tools"), record_system=system)
    if record.get("conversations") is not None:  # ShareGPT
        return _chat(record["conversations"], "conversations", where, keys=("from", "value"),
                     tools=record.get("tools"), record_system=system)
    if record.get("prompt") is not None and record.get("completion") is not None:
        return _prompt_completion(record, where, system)
    for prompt_field, answer_field in PROMPT_ANSWER_FIELDS:
        if prompt_field in record and answer_field in record:
            prompt = _text_field(record, prompt_field, where)
            answer = _text_field(record, answer_field, where)
            extra = record.get("input") if prompt_field == "instruction" else None
            if isinstance(extra, str) and extra.strip():  # Alpaca: instruction + input -> one user turn
                prompt = f"{prompt}\n\n{extra}"
            return Chat(system, (*_history(record, where), ("user", prompt), ("assistant", answer)))
    if "text" in record:
        return Text(_text_field(record, "text", where))
    for prompt_field, answer_field in PROMPT_ANSWER_FIELDS + (("prompt", "completion"),):
        if prompt_field in record:
            raise BadRecord("missing_field", f"{where}: field '{answer_field}' missing (found '{prompt_field}')")
    known = ", ".join(["chat_rounds", "messages", "conversations", "text", "prompt/completion"]
                      + [f"{p}/{a}" for p, a in PROMPT_ANSWER_FIELDS])
    raise BadRecord("unknown_format", f"{where}: no known fields (expected one of: {known})")
