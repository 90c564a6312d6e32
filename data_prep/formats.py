"""Task inputs and record formats: where records come from and what a valid record is.

A task's PATH is a record file, a directory searched recursively for them, or a ``datasets``
``save_to_disk`` directory. Record files are recognised by their suffix, in any letter case, through one
table, :data:`READERS`: ``.jsonl`` (JSON lines) and ``.json`` (a top-level JSON array, or JSON lines), each
also compressed as ``.gz`` or ``.bz2``; a new file format is one more entry there. Records are read lazily
(a line or an array element at a time), so memory does not depend on file size. Every record is normalised
here into a :class:`Chat` (optional system prompt plus alternating user/assistant turns) or a :class:`Text`
(continued pretraining), the format being detected per record as MFTCoder accepts them. A bad record raises
:class:`BadRecord` carrying a reason key (counted in the manifest under ``--skip-bad``) and a message that
names ``path:line`` (``path:line:column`` for a record that does not start a line, as in a JSON array).
"""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "bot": "assistant", "assistant": "assistant",
                "gpt": "assistant"}
# (prompt field, answer field) pairs, tried in this order; an optional "system" field applies to all of them.
PROMPT_ANSWER_FIELDS = (("prompt", "answer"), ("prompt", "response"), ("instruction", "output"),
                        ("input", "output"), ("question", "answer"), ("query", "answer"))
CHAT_FIELDS = ("chat_rounds", "data")  # MFTCoder writes "chat_rounds"; its older ChatML files use "data"


@dataclass(frozen=True)
class Chat:
    """A conversation: optional system prompt, then (role, content) turns alternating user/assistant."""

    system: str | None
    turns: tuple[tuple[str, str], ...]


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


@dataclass(frozen=True)
class Source:
    """One readable input of a task: a record file, or a split of a ``save_to_disk`` dataset."""

    path: Path
    split: str | None = None  # set for datasets directories

    @property
    def label(self) -> str:
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

READERS: dict[str, FileReader] = {
    suffix + compressed: FileReader(description + how, partial(_counting, opener, count),
                                    partial(_reading, opener, records))
    for suffix, (description, count, records) in _JSON_FORMATS.items()
    for compressed, (how, opener) in _COMPRESSIONS.items()
}
"""Record file suffix (lower case; matched in any case, the longest first) -> its reader."""


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
    if not path.exists():
        raise UserError(f"{path}: task '{task}': no such file or directory")
    if path.is_file():
        if reader_for(path) is None:
            raise UserError(f"{path}: task '{task}': not a record file: expected {supported_suffixes()} (any "
                            "case), a directory of them, or a datasets save_to_disk directory")
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


def _reader(source: Source) -> FileReader:
    reader = reader_for(source.path)
    if reader is None:
        raise UserError(f"{source.path}: not a record file: expected {supported_suffixes()}")
    return reader


def count_records(source: Source) -> int:
    """Number of records (non-blank lines, array elements, or dataset rows) without parsing them."""
    if source.split is not None:
        return len(_load_dataset(source))
    return _reader(source).count(source.path)


def iter_raw(source: Source) -> Iterator[Item]:
    """The source's records as :data:`Item`: undecoded bytes for record files, dicts for datasets rows."""
    if source.split is not None:
        for i, row in enumerate(_load_dataset(source), 1):
            yield i, 1, row
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


def _chat(rounds: Any, field: str, where: str) -> Chat:
    if not isinstance(rounds, list):
        raise BadRecord("bad_type", f"{where}: field '{field}' must be a list of turns")
    if not rounds:
        raise BadRecord("empty_field", f"{where}: field '{field}' is empty")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict):
            raise BadRecord("bad_type", f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        raw_role = turn.get("role")
        if not isinstance(raw_role, str):
            raise BadRecord("missing_field", f"{where}: {field}[{i}]: field 'role' missing")
        role = ROLE_ALIASES.get(raw_role) or ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise BadRecord("unknown_role", f"{where}: {field}[{i}]: unknown role '{raw_role}' "
                                            f"(known: {', '.join(ROLE_ALIASES)})")
        content = _text_field(turn, "content", where, (field, i))
        if role == "system":
            if i != 0:
                raise BadRecord("turn_order", f"{where}: {field}[{i}]: a system turn may only come first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecord("turn_order", f"{where}: {field}[{i}]: expected a {expected} turn, got '{raw_role}' "
                                          "(turns must alternate user/assistant)")
        turns.append((role, content))
    if not turns:
        raise BadRecord("empty_field", f"{where}: field '{field}' has no user/assistant turns")
    if turns[-1][0] != "assistant":
        raise BadRecord("turn_order", f"{where}: field '{field}': the last turn must be from the assistant")
    return Chat(system, tuple(turns))


def normalise(record: dict[str, Any], where: str) -> Chat | Text:
    """Detect the record's format and return it as a :class:`Chat` or :class:`Text`."""
    for field in CHAT_FIELDS:
        if field in record and (field == "chat_rounds" or isinstance(record[field], list)):
            return _chat(record[field], field, where)
    system = _text_field(record, "system", where) if record.get("system") is not None else None
    for prompt_field, answer_field in PROMPT_ANSWER_FIELDS:
        if prompt_field in record and answer_field in record:
            prompt = _text_field(record, prompt_field, where)
            answer = _text_field(record, answer_field, where)
            extra = record.get("input") if prompt_field == "instruction" else None
            if isinstance(extra, str) and extra.strip():  # Alpaca: instruction + input -> one user turn
                prompt = f"{prompt}\n\n{extra}"
            return Chat(system, (("user", prompt), ("assistant", answer)))
    if "text" in record:
        return Text(_text_field(record, "text", where))
    for prompt_field, answer_field in PROMPT_ANSWER_FIELDS:
        if prompt_field in record:
            raise BadRecord("missing_field", f"{where}: field '{answer_field}' missing (found '{prompt_field}')")
    known = ", ".join(["chat_rounds", "text"] + [f"{p}/{a}" for p, a in PROMPT_ANSWER_FIELDS])
    raise BadRecord("unknown_format", f"{where}: no known fields (expected one of: {known})")
