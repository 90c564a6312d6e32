"""Does CoBa's held-out signal get better with ``balancer.held_out: fixed``? uniform / FAMO / CoBa-rotate /
CoBa-fixed on two corpora, several seeds, equal budgets (issue 13).

Why: the held-out loss CoBa fits its slopes to comes, under ``rotate``, from a different sample of rows at
every update, so part of each slope is the difference between samples. ``fixed`` measures the same rows
every time. This script trains the demo's small Llama with each method and reports what the choice does
to the tasks' held-out loss and to how much the weights move.

Corpora (the shipped demo corpus, 4 tasks): ``demo`` as shipped, and ``overfit``, every task cut
(``OVERFIT_TRAIN``) so that the run sees each training row several times, the small ``unit_tests`` task to
``--small-train`` samples, so it is memorised early and its held-out loss turns up. Before preparing,
``--test-samples`` records per task are set aside (seeded) as a **test** set the methods never see: the
numbers below are measured on it, not on the held-out split CoBa observes.

Every run: the demo's model, optimizer and CoBa scaling (``mftcoder_coba.demo.run_data``) with ``--steps``
steps; seeds change the model initialisation, the data order and the held-out sample. A checkpoint every
``--eval-every`` steps is scored on every test row, giving per task the loss at the end and at its best
step. The weight change per update is ``weight_change`` from metrics.jsonl (L1 distance between the
weights after consecutive updates, every ``update_interval`` steps, for every method).

    OMP_NUM_THREADS=1 python benchmarks/coba_signal/run.py       # results.json: both corpora, 60 steps (23 min)
    OMP_NUM_THREADS=1 python benchmarks/coba_signal/run.py --corpora overfit --steps 120 \
        --out benchmarks/coba_signal/results_overfit_120steps.json   # the small task overfits (19 min)
    OMP_NUM_THREADS=1 python benchmarks/coba_signal/run.py --steps 20 --seeds 1 --out /tmp/x.json  # smoke

(times on a 2-core machine shared with other work, 2026-11-30.) At 60 steps the overfit corpus does not yet
overfit (every task's best step is the last); at 120 its small task's best step is 50-70.

Writes ``--out`` (JSON: settings, device, date, versions, every run's numbers, the summary) and prints the
tables. Runs one at a time in this process (``train`` is callable repeatedly); the work folder is deleted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
METHODS = {  # label -> balancer section (besides the demo's update_interval / valid_rows_per_task / options)
    "uniform": {"name": "uniform", "options": {}},
    "famo": {"name": "famo", "options": {}},
    "coba-rotate": {"name": "coba", "held_out": "rotate"},
    "coba-fixed": {"name": "coba", "held_out": "fixed"},
}
SMALL_TASK = "unit_tests"
# Training records per task of the overfit corpus: every task cut so that an epoch is about 40 steps (the
# demo corpus needs about 190), and the small task to a handful, upsampled (repeated) as small tasks are in
# practice, so that the run sees each of its records dozens of times and memorises them.
OVERFIT_TRAIN = {"code_completion": 200, "text_to_code": 150, "code_to_text": 100, SMALL_TASK: 8}
SMALL_REPEAT = 20
PREP_SEED = 0


def split_corpus(work: Path, test_samples: int, train_records: dict[str, int] | None,
                 valid_samples: int) -> dict[str, Path]:
    """Per task: ``test_samples`` seeded records to ``work/test/`` and the rest to ``work/train/`` (cut to
    ``valid_samples + train_records[task]`` records when ``train_records`` is given, the small task's training
    records then repeated ``SMALL_REPEAT`` times). Returns the test files."""
    from mftcoder_coba.demo_data import DEMO_TASKS

    rng = np.random.default_rng(1234)
    for part in ("train", "test"):
        (work / part).mkdir(parents=True, exist_ok=True)
    test_files = {}
    for task, path in DEMO_TASKS.items():
        records = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        order = rng.permutation(len(records))
        test = [records[i] for i in order[:test_samples]]
        rest = [records[i] for i in order[test_samples:]]
        if train_records is not None:
            rest = rest[:valid_samples + train_records[task]]
            if task == SMALL_TASK:
                rest = _repeat_training_part(task, rest[:valid_samples], rest[valid_samples:] * SMALL_REPEAT)
        (work / "train" / f"{task}.jsonl").write_text("\n".join(rest) + "\n", encoding="utf-8")
        test_files[task] = work / "test" / f"{task}.jsonl"
        test_files[task].write_text("\n".join(test) + "\n", encoding="utf-8")
    return test_files


def _repeat_training_part(task: str, held_out: list[str], training: list[str]) -> list[str]:
    """The task's records ordered so that prep's seeded held-out choice picks exactly ``held_out``: no copy of
    a repeated training record can land in the held-out split."""
    from mftcoder_coba.data_prep.pipeline import PrepOptions, _held_out

    total = len(held_out) + len(training)
    mask = _held_out(task, total, PrepOptions(tasks={}, tokenizer="", seq_len=2, out="",
                                               valid_samples_per_task=len(held_out), seed=PREP_SEED))
    held, train = iter(held_out), iter(training)
    return [next(held) if chosen else next(train) for chosen in mask]


def prepare_corpus(work: Path, args: argparse.Namespace, train_records: dict[str, int] | None) -> tuple[Path, Path]:
    """``(data_dir with train/ + valid/, test shards dir)`` for one corpus."""
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo import SEQ_LEN, VALID_SAMPLES_PER_TASK
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    test_files = split_corpus(work / "jsonl", args.test_samples, train_records, VALID_SAMPLES_PER_TASK)
    tasks = {t: work / "jsonl" / "train" / f"{t}.jsonl" for t in DEMO_TASKS}
    prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN, out=work / "data",
                        valid_samples_per_task=VALID_SAMPLES_PER_TASK, seed=PREP_SEED, progress=False))
    # every test record lands in the test prep's train split (nothing held out), packed like training rows
    prepare(PrepOptions(tasks=test_files, tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN, out=work / "test",
                        valid_fraction=0.0, seed=0, progress=False))
    return work / "data", work / "test" / "train"


def run_one(data_dir: Path, test_dir: Path, run_dir: Path, method: str, seed: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train one method with one seed; score every checkpoint on the test rows."""
    from mftcoder_coba import config_io
    from mftcoder_coba.config import RunConfig
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.demo import run_data
    from mftcoder_coba.models import load_trained
    from mftcoder_coba.training import train
    from mftcoder_coba.training.validation import evaluate_per_task

    data = run_data(data_dir, run_dir, args.steps)
    data["balancer"] = {**data["balancer"], **METHODS[method]}
    data["model"]["init_seed"] = seed
    data["train"].update(seed=seed, save_every=args.eval_every, keep_last=args.steps // args.eval_every + 1,
                         tensorboard=False, log_every=args.steps)
    cfg = config_io.build(RunConfig, data)
    start = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - start
    test = PackedDataset(test_dir)
    rows = np.arange(len(test), dtype=np.int64)
    steps, losses = [], []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step-*")):
        sums, counts = evaluate_per_task(load_trained(run_dir, checkpoint), test, rows, micro_batch_size=8)
        steps.append(int(checkpoint.name.removeprefix("step-")))
        losses.append(sums / counts)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    changes = [r["weight_change"] for r in records if r.get("weight_change") is not None]
    ses = [[v for v in r["slope_se"].values() if v is not None] for r in records if "slope_se" in r]
    slopes = [[abs(v) for v in r["slope"].values() if v is not None] for r in records if "slope" in r]
    shutil.rmtree(run_dir)
    losses_arr = np.array(losses)
    best = losses_arr.argmin(axis=0)
    final = losses_arr[-1]
    weights = records[-1]["weights"]
    return {
        "method": method, "seed": seed, "train_s": round(train_s, 1), "eval_steps": steps,
        "test_loss": {t: [float(v) for v in losses_arr[:, k]] for k, t in enumerate(test.tasks)},
        "final": {t: float(final[k]) for k, t in enumerate(test.tasks)},
        "best": {t: float(losses_arr[best[k], k]) for k, t in enumerate(test.tasks)},
        "best_step": {t: steps[best[k]] for k, t in enumerate(test.tasks)},
        "final_mean": float(final.mean()), "final_worst": float(final.max()),
        "worst_task": test.tasks[int(final.argmax())],
        "best_mean": float(losses_arr.min(axis=0).mean()),
        "weight_change_mean": float(np.mean(changes)), "weight_change_max": float(np.max(changes)),
        "final_weights": weights,
        # CoBa: the mean over updates and tasks of the slope's standard error and of |slope| (post-fit lines)
        "slope_se_mean": float(np.mean([np.mean(s) for s in ses if s])) if any(ses) else None,
        "abs_slope_mean": float(np.mean([np.mean(s) for s in slopes if s])) if any(slopes) else None,
    }


def summarise(runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per method: mean and seed-to-seed standard deviation of each number; CoBa-fixed minus CoBa-rotate per
    seed (paired: same seed = same initialisation and data order)."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: dict[str, Any] = {"methods": {}}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row = {key: stats([r[key] for r in mine]) for key in
               ("final_mean", "final_worst", "best_mean", "weight_change_mean", "weight_change_max")}
        row["final"] = {t: stats([r["final"][t] for r in mine]) for t in tasks}
        row["best"] = {t: stats([r["best"][t] for r in mine]) for t in tasks}
        row["best_step"] = {t: [r["best_step"][t] for r in mine] for t in tasks}
        for key in ("slope_se_mean", "abs_slope_mean"):
            if mine[0][key] is not None:
                row[key] = stats([r[key] for r in mine])
        out["methods"][method] = row
    by_seed = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    if all(("coba-fixed", s) in by_seed and ("coba-rotate", s) in by_seed for s in seeds):
        out["fixed_minus_rotate"] = {
            key: stats([by_seed["coba-fixed", s][key] - by_seed["coba-rotate", s][key] for s in seeds])
            for key in ("final_mean", "final_worst", "best_mean", "weight_change_mean")}
    return out


def format_tables(corpus: str, summary: dict[str, Any], tasks: list[str], seeds: int) -> str:
    def cell(s: dict[str, float], spec: str = ".3f") -> str:
        return f"{s['mean']:{spec}} ± {s['sd']:{spec}}"

    short = {t: t.replace("code_", "c_").replace("_to_", "2").replace("unit_tests", "tests") for t in tasks}
    header = ["method"] + [f"end {short[t]}" for t in tasks] + ["end mean", "end worst", "best mean",
                                                                "w L1/update", "w L1 max"]
    lines = [header]
    for method, row in summary["methods"].items():
        lines.append([method] + [cell(row["final"][t]) for t in tasks]
                     + [cell(row["final_mean"]), cell(row["final_worst"]), cell(row["best_mean"]),
                        cell(row["weight_change_mean"]), cell(row["weight_change_max"])])
    lines.append([""] * len(header))
    lines.append(["best step"] + [""] * (len(header) - 1))
    for method, row in summary["methods"].items():
        lines.append([f"  {method}"] + [",".join(str(s) for s in row["best_step"][t]) for t in tasks]
                     + [""] * 5)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [(f"corpus {corpus}: test loss per task (mean ± sd over {seeds} seeds), end of run; "
             f"weight L1 change per update")]
    for i, line in enumerate(lines):
        text.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    if "fixed_minus_rotate" in summary:
        d = summary["fixed_minus_rotate"]
        text.append("coba-fixed minus coba-rotate, paired by seed (mean ± sd): "
                    + ", ".join(f"{k} {d[k]['mean']:+.4f} ± {d[k]['sd']:.4f}" for k in d))
    return "\n".join(text)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    from mftcoder_coba import __version__ as ours

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "mftcoder_coba": ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method and corpus (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between test evaluations")
    parser.add_argument("--test-samples", type=int, default=16, help="records per task set aside as the test set")
    parser.add_argument("--small-train", type=int, default=OVERFIT_TRAIN[SMALL_TASK],
                        help=f"training records of '{SMALL_TASK}' in the overfit corpus (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--corpora", default="demo,overfit", help="comma-separated subset of demo,overfit")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON report (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}")
    corpora = {"demo": None, "overfit": {**OVERFIT_TRAIN, SMALL_TASK: args.small_train}}
    chosen = [c for c in args.corpora.split(",") if c]
    if any(c not in corpora for c in chosen):
        parser.error(f"--corpora: choose from {list(corpora)}")
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    import torch

    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.demo import UPDATE_INTERVAL

    report: dict[str, Any] = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "update_interval": UPDATE_INTERVAL, "model": "demo (mftcoder_coba.demo.DEMO_MODEL)"},
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(), "corpora": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="coba_signal_") as tmp:
        for corpus in chosen:
            work = Path(tmp) / corpus
            data_dir, test_dir = prepare_corpus(work, args, corpora[corpus])
            tasks = PackedDataset(data_dir / "valid").tasks
            runs = []
            for seed in range(args.seeds):
                for method in methods:
                    runs.append(run_one(data_dir, test_dir, work / "run", method, seed, args))
                    print(f"[{time.perf_counter() - start:6.0f}s] {corpus} seed {seed} {method}: end mean "
                          f"{runs[-1]['final_mean']:.4f} worst {runs[-1]['final_worst']:.4f} "
                          f"w L1/update {runs[-1]['weight_change_mean']:.4f}", file=sys.stderr, flush=True)
            summary = summarise(runs, tasks)
            manifest = json.loads((data_dir / "train" / "manifest.json").read_text())
            report["corpora"][corpus] = {"train_samples": manifest.get("task_stats"), "summary": summary,
                                         "runs": runs}
            print(format_tables(corpus, summary, tasks, args.seeds))
            print()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
