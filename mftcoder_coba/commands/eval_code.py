"""``mftcoder-coba eval-code TARGET --benchmark humaneval|FILE.jsonl``: pass@k of generated code, run in a sandbox.

Generates ``--n`` completions per problem (transformers ``generate``, KV cache, batched), runs each as
``prompt + completion + test`` in its own sandboxed interpreter (:mod:`mftcoder_coba.evaluation.sandbox`:
not a security boundary, see there) and reports unbiased pass@k. ``--self-check`` runs the benchmark's
canonical solutions instead of a model (HumanEval must give pass@1 = 1.0). ``--all-checkpoints`` scores
every complete checkpoint of a run and writes ``RUN_DIR/eval_code.jsonl`` (one line per step and benchmark).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mftcoder_coba.atomic import atomic_write_text, is_run_dir
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.cli_options import add_model_arguments
from mftcoder_coba.evaluation.code_eval import canonical_completions, execute, format_summary, records, summarize
from mftcoder_coba.evaluation.problems import HUMANEVAL, Problem, load_benchmark
from mftcoder_coba.evaluation.prompts import CHAT_INSTRUCTION, Sampling
from mftcoder_coba.evaluation.sandbox import Limits

if TYPE_CHECKING:
    from mftcoder_coba.evaluation.targets import Target

log = logging.getLogger(__name__)

RUN_RESULTS = "eval_code.jsonl"
"""Per-run file of ``--all-checkpoints``: one JSON line per (checkpoint step, benchmark) with its pass@k."""
RUN_SAMPLES = "eval_code"
"""Folder of a run holding ``--all-checkpoints``' per-sample files."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, nargs="?", default=None,
                        help="run directory, export, transformers model or adapter directory (not with --self-check)")
    parser.add_argument("--benchmark", default=HUMANEVAL, help="'humaneval' or a JSONL file of problems")
    parser.add_argument("--n", type=int, default=10, help="samples per problem")
    parser.add_argument("--k", default=None, help="comma-separated k of pass@k, each <= n; unset: 1,10,100 up to n")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling probability mass")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per completion at most")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--prompt-format", choices=("raw", "chat"), default="raw",
                        help="raw: continue the prompt; chat: the tokenizer's chat template")
    parser.add_argument("--instruction", default=None,
                        help="chat format: text before each prompt in the user message ('' for none; default asks "
                             "for the whole function in a python code block)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--workers", type=int, default=2, help="samples executed in parallel")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per sample")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample")
    parser.add_argument("--task", default=None,
                        help="CGC-LoRA runs and exports: the task whose adapter/gates generate")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run targets: this checkpoint instead of the newest")
    parser.add_argument("--all-checkpoints", action="store_true",
                        help=f"score every complete checkpoint of the run TARGET into TARGET/{RUN_RESULTS}")
    parser.add_argument("--self-check", action="store_true",
                        help="execute the benchmark's canonical solutions instead of generating (harness check)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary (pass@k) as JSON here")
    parser.add_argument("--samples", type=Path, default=None,
                        help="write every sample as JSONL here; unset with --out: OUT's name + .samples.jsonl")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    try:
        limits.validate()
    except ValueError as exc:
        raise UserError(f"--timeout/--memory-mb: {exc}") from None
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    n = 1 if args.self_check else args.n
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    ks = parse_ks(args.k, n)
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.batch_size, args.prompt_format,
                        args.seed, CHAT_INSTRUCTION if args.instruction is None else args.instruction)
    sampling.validate()
    bench, problems = load_benchmark(args.benchmark)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        problems = problems[:args.limit]
    settings = {"benchmark": bench, "benchmark_source": args.benchmark, "k": ks,
                "timeout": limits.timeout, "memory_mb": limits.memory_mb}
    if args.self_check:
        if args.target is not None or args.all_checkpoints:
            raise UserError("--self-check runs the benchmark's own solutions; give no TARGET / --all-checkpoints")
        summary, results = _score(problems, canonical_completions(problems), ks, limits, args.workers,
                                  {**settings, "self_check": True})
        _report(summary, results, args.out, _samples_path(args))
        return 0
    if args.target is None:
        raise UserError("TARGET is required (a run directory, an export or a model directory), or pass --self-check")
    settings["sampling"] = vars(sampling).copy()
    if args.all_checkpoints:
        return _all_checkpoints(args, problems, n, ks, sampling, limits, settings)
    from mftcoder_coba.evaluation.targets import resolve_target  # torch and transformers: only when generating

    target = resolve_target(args.target, checkpoint=args.checkpoint, adapter=args.adapter)
    summary, results = _evaluate(target, args, problems, n, ks, sampling, limits, settings)
    _report(summary, results, args.out, _samples_path(args))
    return 0


def parse_ks(text: str | None, n: int) -> list[int]:
    """``--k`` as sorted unique ints, each in [1, n]; default 1, 10, 100 where <= n."""
    if text is None:
        return [k for k in (1, 10, 100) if k <= n]
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--k {text!r}: expected comma-separated integers like 1,10") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise UserError(f"--k {text!r}: pass@k needs 1 <= k <= n = {n} samples per problem (raise --n)")
    return ks


def _evaluate(target: Target, args: argparse.Namespace, problems: list[Problem], n: int, ks: list[int],
              sampling: Sampling, limits: Limits, settings: dict) -> tuple[dict, list]:
    from transformers import AutoTokenizer

    from mftcoder_coba.evaluation.generation import generate_completions
    from mftcoder_coba.evaluation.targets import first_line, load_model, pick_device

    if target.tokenizer is None:
        raise UserError(f"{target.path}: no tokenizer found beside the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer), local_files_only=True,
                                                  trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{target.tokenizer}: cannot load the tokenizer ({first_line(exc)})") from None
    model = load_model(target, dtype=args.dtype, device=pick_device(args.device), for_generation=True,
                       trust_remote_code=args.trust_remote_code)
    task_id = _select_task(model, target, args.task)
    start = time.monotonic()
    completions = generate_completions(model, tokenizer, problems, n, sampling, task_id=task_id)
    generation_seconds = time.monotonic() - start
    del model
    return _score(problems, completions, ks, limits, args.workers,
                  {**settings, "target": target.describe(), "task": args.task,
                   "generation_seconds": round(generation_seconds, 2)})


def _select_task(model, target: Target, task: str | None) -> int | None:
    """Point a per-task model at ``--task``; the task id for a CGC-LoRA run's gates (None otherwise)."""
    from mftcoder_coba.evaluation.targets import is_cgc, run_tasks, use_task

    if target.task_adapters:
        if task not in target.task_adapters:
            raise UserError(f"{target.path}: one adapter per task; choose one with --task "
                            f"({', '.join(target.task_adapters)})")
        use_task(model, target, task)
        return None
    if is_cgc(model):
        tasks = run_tasks(target) or []
        if task not in tasks:
            raise UserError(f"{target.path}: a CGC-LoRA run generates per task; choose one with --task "
                            f"({', '.join(tasks) or 'task names unknown: export the run first'})")
        return tasks.index(task)
    if task is not None:
        raise UserError(f"--task {task}: only CGC-LoRA runs and exports have per-task models")
    return None


def _score(problems: list[Problem], completions: list[list[str]], ks: list[int], limits: Limits, workers: int,
           settings: dict) -> tuple[dict, list]:
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            log.info("executed %d/%d samples", done, total)

    results = execute(problems, completions, limits, workers, progress)
    summary = {**settings, **summarize(results, ks), "execution_seconds": round(time.monotonic() - start, 2)}
    return summary, results


def _samples_path(args: argparse.Namespace) -> Path | None:
    if args.samples is not None:
        return args.samples
    return None if args.out is None else args.out.with_name(args.out.stem + ".samples.jsonl")


def _report(summary: dict, results: list, out: Path | None, samples: Path | None) -> None:
    print(format_summary(summary))
    if samples is not None:
        atomic_write_text(samples, "".join(json.dumps(r) + "\n" for r in records(results)))
        log.info("wrote %s", samples)
    if out is not None:
        atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
        log.info("wrote %s", out)


def _all_checkpoints(args: argparse.Namespace, problems: list[Problem], n: int, ks: list[int], sampling: Sampling,
                     limits: Limits, settings: dict) -> int:
    from mftcoder_coba.evaluation.targets import resolve_target
    from mftcoder_coba.models.persist import CHECKPOINT_NAME

    run_dir = args.target
    if not is_run_dir(run_dir):
        raise UserError(f"--all-checkpoints: {run_dir} is not a run directory")
    if args.checkpoint is not None or args.adapter is not None:
        raise UserError("--all-checkpoints scores every checkpoint of the run; drop --checkpoint/--adapter")
    folder = run_dir / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if (m := CHECKPOINT_NAME.match(p.name)))
    if not steps:
        raise UserError(f"{folder}: no complete checkpoint (step-N) found")
    summaries = []
    for step, checkpoint in steps:
        try:
            target = resolve_target(run_dir, checkpoint=checkpoint)
            summary, results = _evaluate(target, args, problems, n, ks, sampling, limits, settings)
        except UserError as exc:  # a damaged checkpoint: the others are still worth scoring
            log.warning("skipping %s: %s", checkpoint, exc)
            continue
        summary["step"] = step
        samples = run_dir / RUN_SAMPLES / f"{summary['benchmark']}-step-{step:08d}.samples.jsonl"
        samples.parent.mkdir(exist_ok=True)
        _report(summary, results, None, samples)
        _record_in_run(run_dir / RUN_RESULTS, summary)
        summaries.append(summary)
    if not summaries:
        raise UserError(f"{folder}: no checkpoint could be evaluated")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(summaries, indent=2) + "\n")
    return 0


def _record_in_run(path: Path, summary: dict) -> None:
    """Add ``summary`` to the run's results file, replacing an earlier line of the same step and benchmark."""
    lines = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                old = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (old.get("step"), old.get("benchmark")) != (summary["step"], summary["benchmark"]):
                lines.append(old)
    lines.append(summary)
    lines.sort(key=lambda item: (str(item.get("benchmark")), item.get("step") or 0))
    atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in lines))
