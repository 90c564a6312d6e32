"""Code evaluation of a model, an export or every checkpoint of a run: generate, execute in the sandbox, score.

What ``mftcoder-coba eval-code`` runs (:mod:`mftcoder_coba.commands.eval_code` says what it reports). Torch and
transformers are imported only when generating, so ``--self-check`` and the command's ``--help`` stay light.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mftcoder_coba.atomic import atomic_write_text, is_run_dir
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.code_eval import execute, format_summary, records, summarize
from mftcoder_coba.evaluation.model_options import ModelOptions
from mftcoder_coba.evaluation.problems import Problem
from mftcoder_coba.evaluation.prompts import Sampling
from mftcoder_coba.evaluation.sandbox import Limits

if TYPE_CHECKING:
    from mftcoder_coba.evaluation.generation import Engine
    from mftcoder_coba.evaluation.targets import Target

log = logging.getLogger(__name__)

RUN_RESULTS = "eval_code.jsonl"
"""Per-run file of ``--all-checkpoints``: one JSON line per (checkpoint step, benchmark) with its pass@k."""
RUN_SAMPLES = "eval_code"
"""Folder of a run holding ``--all-checkpoints``' per-sample files."""


def evaluate_target(target: Target, problems: list[Problem], n: int, ks: list[int], sampling: Sampling,
                    limits: Limits, settings: dict, options: ModelOptions) -> tuple[dict, list]:
    """Generate ``n`` completions per problem with ``target``'s model and score them: (summary, per-sample results)."""
    from transformers import AutoTokenizer

    from mftcoder_coba.evaluation.generation import generate_completions
    from mftcoder_coba.evaluation.targets import first_line
    from mftcoder_coba.evaluation.vllm_engine import choose_engine, vllm_engine

    engine_name = choose_engine(options.engine, target, options)
    if target.tokenizer is None:
        raise UserError(f"{target.path}: no tokenizer found beside the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer), local_files_only=True,
                                                  trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{target.tokenizer}: cannot load the tokenizer ({first_line(exc)})") from None
    start = time.monotonic()
    try:
        engine = (vllm_engine if engine_name == "vllm" else transformers_engine)(target, tokenizer, sampling, options)
        completions = generate_completions(engine, problems, n, sampling)
    except UserError as exc:
        if engine_name != "vllm" or options.engine == "vllm":
            raise
        # vLLM lacks the architecture, or its kernels this head size on this device: transformers may not
        log.warning("%s; generating with transformers (--engine auto)", exc)
        engine_name, start = "transformers", time.monotonic()
        engine = transformers_engine(target, tokenizer, sampling, options)
        completions = generate_completions(engine, problems, n, sampling)
    generation_seconds = time.monotonic() - start
    del engine  # and the model it holds, before the samples run
    return score(problems, completions, ks, limits, options.workers,
                 {**settings, "target": target.describe(), "task": options.task, "engine": engine_name,
                  "generation_seconds": round(generation_seconds, 2)})


def transformers_engine(target: Target, tokenizer, sampling: Sampling, options: ModelOptions) -> Engine:
    """An engine generating with transformers ``generate`` on ``target``'s model (loaded now, for ``--task``)."""
    from mftcoder_coba.evaluation.generation import generate
    from mftcoder_coba.evaluation.targets import load_model, pick_device

    model = load_model(target, dtype=options.dtype, device=pick_device(options.device), for_generation=True,
                       trust_remote_code=options.trust_remote_code)
    task_id = select_task(model, target, options.task)

    def engine(prompts: list[str], progress: Callable[[int], None]) -> list[str]:
        return generate(model, tokenizer, prompts, sampling, task_id=task_id, progress=progress)

    return engine


def select_task(model, target: Target, task: str | None) -> int | None:
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


def score(problems: list[Problem], completions: list[list[str]], ks: list[int], limits: Limits, workers: int,
          settings: dict) -> tuple[dict, list]:
    """Run every completion in the sandbox: (``settings`` with pass@k and timings, per-sample results)."""
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            log.info("executed %d/%d samples", done, total)

    results = execute(problems, completions, limits, workers, progress)
    summary = {**settings, "sandbox": limits.sandbox, **summarize(results, ks),
               "execution_seconds": round(time.monotonic() - start, 2)}
    return summary, results


def report(summary: dict, results: list, out: Path | None, samples: Path | None) -> None:
    """Print ``summary``; write the per-sample records to ``samples`` and the summary to ``out`` (each if given)."""
    print(format_summary(summary))
    if samples is not None:
        atomic_write_text(samples, "".join(json.dumps(r) + "\n" for r in records(results)))
        log.info("wrote %s", samples)
    if out is not None:
        atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
        log.info("wrote %s", out)


def evaluate_checkpoints(run_dir: Path, problems: list[Problem], n: int, ks: list[int], sampling: Sampling,
                         limits: Limits, settings: dict, options: ModelOptions) -> list[dict]:
    """Score every complete checkpoint of ``run_dir`` (a damaged one is skipped with a warning), each summary added
    to ``RUN_DIR/eval_code.jsonl`` and its samples under ``RUN_DIR/eval_code/``; returns the summaries."""
    from mftcoder_coba.evaluation.targets import resolve_target
    from mftcoder_coba.models.persist import CHECKPOINT_NAME

    if not is_run_dir(run_dir):
        raise UserError(f"--all-checkpoints: {run_dir} is not a run directory")
    folder = run_dir / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if (m := CHECKPOINT_NAME.match(p.name)))
    if not steps:
        raise UserError(f"{folder}: no complete checkpoint (step-N) found")
    summaries = []
    for step, checkpoint in steps:
        try:
            target = resolve_target(run_dir, checkpoint=checkpoint)
            summary, results = evaluate_target(target, problems, n, ks, sampling, limits, settings, options)
        except UserError as exc:  # a damaged checkpoint: the others are still worth scoring
            log.warning("skipping %s: %s", checkpoint, exc)
            continue
        summary["step"] = step
        samples = run_dir / RUN_SAMPLES / f"{summary['benchmark']}-step-{step:08d}.samples.jsonl"
        samples.parent.mkdir(exist_ok=True)
        report(summary, results, None, samples)
        record_in_run(run_dir / RUN_RESULTS, summary)
        summaries.append(summary)
    if not summaries:
        raise UserError(f"{folder}: no checkpoint could be evaluated")
    return summaries


def record_in_run(path: Path, summary: dict) -> None:
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
