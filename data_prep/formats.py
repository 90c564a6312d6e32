"""Task inputs and record formats: where records come from and what a valid record is.

A task's PATH is a ``.jsonl`` / ``.jsonl.gz`` file, a directory searched recursively for them, or a
``datasets`` ``save_to_disk`` directory. Records are read lazily (one line at a time), so memory does not
depend on file size. Every record is normalised here into a :class:`Chat` (optional system prompt plus
alternating user/assistant turns) or a :class:`Text` (continued pretraining), the format being detected
per record as MFTCoder accepts them. A bad record raises :class:`BadRecord` carrying a reason key (counted in
the manifest under ``--skip-bad``) and a message that names ``path:line``.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mftcoder_coba.errors import UserError

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


@dataclass(frozen=True)
class Source:
    """One readable input of a task: a jsonl(.gz) file, or a split of a ``save_to_disk`` dataset."""

    path: Path
    split: str | None = None  # set for datasets directories

    @property
    def label(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else str(self.path)


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _is_jsonl(name: str) -> bool:
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def resolve_sources(task: str, path: Path) -> list[Source]:
    """The inputs behind ``--task task=path``, in a deterministic order (sorted relative paths)."""
    if not path.exists():
        raise UserError(f"{path}: task '{task}': no such file or directory")
    if path.is_file():
        if not _is_jsonl(path.name):
            raise UserError(f"{path}: task '{task}': expected a .jsonl or .jsonl.gz file, a directory of them, "
                            "or a datasets save_to_disk directory")
        return [Source(path)]
    if _is_dataset_dir(path):
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            return [Source(path, str(split)) for split in sorted(splits)]
        return [Source(path, "")]
    files: list[Path] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names) if _is_jsonl(n))
    if not files:
        raise UserError(f"{path}: task '{task}': directory holds no .jsonl or .jsonl.gz files")
    return [Source(f) for f in sorted(files, key=lambda p: p.relative_to(path).as_posix())]


def _open_binary(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def count_records(source: Source) -> int:
    """Number of records (non-blank lines, or dataset rows) without parsing them."""
    if source.split is not None:
        return len(_load_dataset(source))
    count = 0
    try:
        with _open_binary(source.path) as f:
            for line in f:
                if not line.isspace():  # iteration never yields an empty line
                    count += 1
    except (OSError, EOFError) as exc:
        raise UserError(f"{source.path}: cannot read: {exc}") from None
    return count


def _load_dataset(source: Source) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a broken directory
        raise UserError(f"{source.path}: cannot load datasets directory: {exc}") from None
    return loaded[source.split] if source.split else loaded


def iter_raw(source: Source) -> Iterator[tuple[int, bytes | dict[str, Any]]]:
    """``(line or row number, raw record)``: undecoded line bytes for jsonl, a dict for datasets rows."""
    if source.split is not None:
        for i, row in enumerate(_load_dataset(source)):
            yield i + 1, row
        return
    with _open_binary(source.path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.isspace():
                yield lineno, line


def decode(raw: bytes | dict[str, Any], where: str) -> dict[str, Any]:
    """Parse one raw record into a JSON object."""
    if isinstance(raw, dict):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("not_utf8", f"{where}: not valid UTF-8 (byte {exc.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord("invalid_json", f"{where}: malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord("not_object", f"{where}: expected a JSON object, got {type(record).__name__}")
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
