"""Typed configuration from YAML/JSON files and ``a.b=value`` overrides, with errors naming the field.

Every run configuration in the project is a tree of dataclasses whose fields carry docstrings. This
module turns a parsed file (plus command-line overrides) into such a tree, refusing unknown fields,
wrong types and missing required fields with a :class:`ConfigError` that names the dotted field path,
before any expensive work starts. A field's numeric range is declared once, where the field is defined
(:func:`bounded`), and enforced here for every config class alike; ``validate(self) -> None`` is left with
the rules that involve several fields, and runs after the fields are filled and in range (use
:func:`check` there to name the field in the message).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mftcoder_coba.errors import ConfigError

T = TypeVar("T")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file whose top level is a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse config: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.field=value`` set (value parsed as YAML)."""
    result = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected FIELD=VALUE, e.g. train.lr=2e-5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: field '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def check(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("config field 'FIELD': MESSAGE")`` when ``condition`` is false."""
    if not condition:
        raise ConfigError(f"config field '{field}': {message}")


RANGE = "range"
"""The key of a field's ``metadata`` that :func:`bounded` sets: ``{"ge"|"gt"|"le"|"lt": bound}``."""


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose numbers must lie in a range, checked by :func:`build` (:func:`check_ranges`).

    ``max_steps: int = bounded(100, ge=1)``. ``None`` and strings (``null``, ``"auto"``) pass, so a field may
    allow them through its type; a list or tuple has each item checked. Why here: the range is read once,
    where the field and its docstring are, and every config class gets the same one-line message."""
    limits = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    if not limits:
        raise TypeError("bounded(): give at least one of ge, gt, le, lt")
    return dataclasses.field(default=default, metadata={RANGE: limits})


def _in_range(value: Any, limits: dict[str, float]) -> bool:
    """Whether ``value`` is within ``limits``; a non-finite number never is (a dataclass may be built directly,
    past the loader's refusal of inf and NaN)."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, (list, tuple)):
        return all(_in_range(item, limits) for item in value)
    if not math.isfinite(value):
        return False
    return (("ge" not in limits or value >= limits["ge"]) and ("gt" not in limits or value > limits["gt"])
            and ("le" not in limits or value <= limits["le"]) and ("lt" not in limits or value < limits["lt"]))


def _range_text(limits: dict[str, float], hint: Any) -> str:
    """``>= 1``, ``in [0, 1)``, ... plus what else the field's type allows (``or null``, ``or 'auto'``)."""
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = ("]", limits["le"]) if "le" in limits else (")", limits["lt"]) if "lt" in limits else None
    if low and high:
        text = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
        text = f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    else:
        text = f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()
    for option in options:
        if option is type(None):
            text += " or null"
        elif typing.get_origin(option) is Literal:
            text += "".join(f" or {choice!r}" for choice in typing.get_args(option))
    return text


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every :func:`bounded` field of dataclass ``obj`` in its range, else one :class:`ConfigError` naming the
    dotted field: ``config field 'train.max_steps': must be >= 1, got 0``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        limits = f.metadata.get(RANGE)
        value = getattr(obj, f.name)
        if limits and not _in_range(value, limits):
            each = "each " if isinstance(value, (list, tuple)) else ""
            check(False, f"{prefix}{f.name}", f"{each}must be {_range_text(limits, hints[f.name])}, got {value}")


def build(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from plain ``data``; nested dataclasses are built recursively."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"config field '{prefix}{key}': unknown field (known: {known})")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field '{path}': required field missing")
    obj = cls(**kwargs)
    check_ranges(obj, prefix)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (for saving beside a run and printing)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        _refuse_non_finite(value, path)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"config field '{path}': invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config field '{path}': {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{path}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}': expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}': expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}': expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config field '{path}': expected a number, got {value!r}")
        _refuse_non_finite(number, path)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{path}': expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config field '{path}': expected a path, got {value!r}")
    return value


def _refuse_non_finite(value: Any, path: str) -> None:
    """No inf or NaN anywhere in a config value (free-form ones like ``balancer.options`` included).

    Why: YAML's ``.inf`` / ``.nan`` and JSON's ``Infinity`` parse as floats, and ``optim.lr: .inf`` used to be
    accepted: the loss was NaN from step 2 and an all-NaN checkpoint was published with exit status 0. No
    setting of this project means anything when infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config field '{path}': must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_non_finite(item, f"{path}[{i}]")
