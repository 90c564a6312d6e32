"""Scoring completions: every (problem, sample) program runs in the sandbox; pass@k per problem, averaged.

Completions come from :func:`mftcoder_coba.evaluation.generation.generate_completions` or, for ``--self-check``, from
the benchmark's own canonical solutions (which must all pass: that checks the harness, not a model).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.passk import mean_pass_at_k
from mftcoder_coba.evaluation.problems import Problem
from mftcoder_coba.evaluation.sandbox import KINDS, Limits, run_programs


@dataclass(frozen=True)
class SampleResult:
    """One executed sample (a line of the per-sample JSONL)."""

    task_id: str
    sample: int
    completion: str
    passed: bool
    status: str
    """How it ended, one of :data:`mftcoder_coba.evaluation.sandbox.KINDS`."""
    detail: str
    seconds: float
    output: str


def canonical_completions(problems: Sequence[Problem]) -> list[list[str]]:
    """Each problem's canonical solution as its single sample (``--self-check``)."""
    missing = [p.task_id for p in problems if p.canonical_solution is None]
    if missing:
        raise UserError(f"--self-check: no canonical_solution for {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    return [[p.canonical_solution] for p in problems]


def execute(problems: Sequence[Problem], completions: Sequence[Sequence[str]], limits: Limits, workers: int,
            progress: Callable[[int, int], None] | None = None) -> list[SampleResult]:
    """Run every completion's program in the sandbox, ``workers`` at a time."""
    jobs = [(p, i, c) for p, samples in zip(problems, completions) for i, c in enumerate(samples)]
    done = 0

    def count(_index: int, _outcome: object) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(jobs))

    outcomes = run_programs([p.program(c) for p, _, c in jobs], limits, workers, progress=count)
    return [SampleResult(p.task_id, i, c, o.passed, o.status, o.detail, o.seconds, o.output)
            for (p, i, c), o in zip(jobs, outcomes)]


def summarize(results: Sequence[SampleResult], ks: Sequence[int]) -> dict:
    """pass@k over problems (each problem's n samples), the count of each outcome, and the samples per problem."""
    per_problem: dict[str, list[bool]] = {}
    for r in results:
        per_problem.setdefault(r.task_id, []).append(r.passed)
    sizes = {len(v) for v in per_problem.values()}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(sizes)}")
    n = sizes.pop()
    statuses = Counter(r.status for r in results)
    return {"problems": len(per_problem), "n": n,
            **mean_pass_at_k([(len(v), sum(v)) for v in per_problem.values()], [k for k in ks if k <= n]),
            "outcomes": {kind: statuses[kind] for kind in KINDS if statuses[kind]}}


def records(results: Sequence[SampleResult]) -> list[dict]:
    """The per-sample JSONL lines."""
    return [asdict(r) for r in results]


def format_summary(summary: dict) -> str:
    """Summary lines ``eval-code`` prints: pass@k and how the samples ended."""
    scores = "  ".join(f"{key} {value:.4f}" for key, value in summary.items() if key.startswith("pass@"))
    outcomes = ", ".join(f"{kind} {count}" for kind, count in summary["outcomes"].items())
    head = f"{summary.get('benchmark', '')} step {summary['step']}" if summary.get("step") is not None \
        else summary.get("benchmark", "")
    return (f"{head}: {summary['problems']} problems x {summary['n']} samples  {scores}\n"
            f"  outcomes: {outcomes}")
