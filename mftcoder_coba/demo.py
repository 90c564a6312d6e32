"""``mftcoder-coba demo``: the whole flow on the shipped corpus, offline, on a CPU, in about two minutes.

Steps: prepare the shipped multitask corpus (4 code tasks of very different size) with the shipped tokenizer
into packed shards; train a small Llama from scratch with CoBa in this process (DeepSpeed on CPU/gloo);
measure every task's held-out loss on all held-out rows before and after; print a per-task table; write
the plots and export the model. ``--mode cgc-lora`` trains CGC-LoRA adapters (task-gated LoRA experts) on a
frozen base instead; ``--mode cold-fusion`` runs ColD Fusion with one contributor per task.

Everything goes under ``--out`` (default ``./demo_out``)::

    data/            packed shards (train/, valid/, tokenizer/); cold-fusion: one folder per task
    run/             the training run: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, plots/
    model/           the exported model (transformers directory; CGC-LoRA: base + one adapter per task)

A rerun replaces its own earlier demo folder (recognised by a marker file) and refuses any other
non-empty folder.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mftcoder_coba import config_io
from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".mftcoder-coba-demo"
SEQ_LEN = 256
VALID_SAMPLES_PER_TASK = 16
# A small Llama: 0.56M parameters with the demo tokenizer's 1268-token vocabulary (tied head); a step of
# 8 rows of 256 tokens takes about half a second on two CPU cores.
DEMO_MODEL: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": SEQ_LEN,
    "tie_word_embeddings": True,
}
MODES = ("coba", "cgc-lora", "cold-fusion")
# Optimizer steps per run (cold-fusion: per contributor job and iteration).
DEFAULT_STEPS = {"coba": 300, "cgc-lora": 300, "cold-fusion": 15}
FUSION_ITERATIONS = 2
UPDATE_INTERVAL = 2


@dataclass
class TaskRow:
    """One line of the final table."""

    task: str
    train_tokens: int
    initial_loss: float | None
    final_loss: float | None
    weight: float | None


@dataclass
class DemoResult:
    """What the demo made, and the numbers of its final table."""

    mode: str
    rows: list[TaskRow]
    weight_label: str
    metrics: Path
    tensorboard: Path | None
    plots: list[Path]
    model: Path

    def summary(self) -> str:
        lines = [format_table(self.rows, self.weight_label), ""]
        lines.append(f"metrics:     {self.metrics}")
        if self.tensorboard is not None:
            lines.append(f"tensorboard: {self.tensorboard}   (tensorboard --logdir {self.tensorboard})")
        lines.extend(f"plot:        {p}" for p in self.plots)
        lines.append(f"model:       {self.model}")
        return "\n".join(lines)


def format_table(rows: list[TaskRow], weight_label: str) -> str:
    """Per-task table: training tokens, held-out loss before and after, change, and the final weight."""
    def number(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    header = f"{'task':<18}{'train tokens':>13}{'held-out loss: start':>22}{'end':>8}{'change':>9}{weight_label:>14}"
    out = [header, "-" * len(header)]
    for r in rows:
        change = (r.final_loss - r.initial_loss) if r.final_loss is not None and r.initial_loss is not None else None
        out.append(f"{r.task:<18}{r.train_tokens:>13,}{number(r.initial_loss, '.3f'):>22}"
                   f"{number(r.final_loss, '.3f'):>8}{number(change, '+.3f'):>9}{number(r.weight, '.3f'):>14}")
    return "\n".join(out)


def run_demo(out: str | Path, steps: int | None = None, mode: str = "coba") -> DemoResult:
    """Run the demo into ``out`` and return what it made (the CLI prints :meth:`DemoResult.summary`)."""
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    steps = DEFAULT_STEPS[mode] if steps is None else steps
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    out = Path(out)
    _claim(out)
    if mode == "cold-fusion":
        return _cold_fusion(out, steps)
    return _train(out, steps, adapter="cgc_lora" if mode == "cgc-lora" else "none")


def _claim(out: Path) -> None:
    """Make ``out`` this demo's folder: empty or absent, or an earlier demo's (whose outputs are cleared)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: a non-empty folder that is not a demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by mftcoder-coba demo; a rerun replaces this folder's contents\n")
    for name in ("data", "run", "model"):
        shutil.rmtree(out / name, ignore_errors=True)


def _prepare(tasks: dict[str, Path], out: Path) -> Path:
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import TOKENIZER_DIR

    prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN, out=out,
                        valid_samples_per_task=VALID_SAMPLES_PER_TASK, seed=0))
    return out


def run_data(data_dir: Path, run_dir: Path, steps: int, adapter: str = "none") -> dict[str, Any]:
    """The demo's run configuration (plain data for ``RunConfig``).

    CoBa is scaled to the short run: with a held-out sample every ``UPDATE_INTERVAL`` steps there are
    ``steps / UPDATE_INTERVAL`` updates; the first tenth of them are warm-up (uniform weights, the
    default is 100 updates) and each slope is fitted over the last quarter of them (default 200).
    """
    updates = max(1, steps // UPDATE_INTERVAL)
    adapter_lr = adapter != "none"
    return {
        "run_dir": str(run_dir),
        "data": {"train": str(data_dir / "train"), "valid": str(data_dir / "valid")},
        "model": {"model_config": dict(DEMO_MODEL), "init_seed": 0, "dtype": "fp32",
                  "attn_implementation": "sdpa", "adapter": adapter,
                  "cgc_lora": {"dropout": 0.0, "rank_budget": 32, "alpha": 32.0}},
        "balancer": {"name": "coba", "update_interval": UPDATE_INTERVAL, "valid_rows_per_task": 4,
                     "options": {"warmup_steps": max(1, updates // 10), "history_length": max(2, updates // 4),
                                 "tau": 5.0}},
        "optim": {"lr": 1e-2 if adapter_lr else 3e-3, "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1,
                  "weight_decay": 0.0 if adapter_lr else 0.1},
        "train": {"max_steps": steps, "micro_batch_size": 8, "global_batch_size": 8, "seed": 0,
                  "save_every": 0, "keep_last": 1, "log_every": 10},
    }


def _train(out: Path, steps: int, adapter: str) -> DemoResult:
    from mftcoder_coba.config import RunConfig
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.demo_data import DEMO_TASKS
    from mftcoder_coba.export import export_run
    from mftcoder_coba.models import load_trained
    from mftcoder_coba.plots import plot_run
    from mftcoder_coba.training import train
    from mftcoder_coba.training.validation import evaluate_per_task

    log.info("demo [1/5] preparing the shipped corpus into %s", out / "data")
    data_dir = _prepare(dict(DEMO_TASKS), out / "data")
    cfg = config_io.build(RunConfig, run_data(data_dir, out / "run", steps, adapter))
    what = "CGC-LoRA adapters on a frozen random-init Llama" if adapter == "cgc_lora" else "a small Llama from scratch"
    log.info("demo [2/5] training %s with CoBa for %d steps", what, steps)
    run_dir = train(cfg)

    log.info("demo [3/5] measuring held-out loss per task on all held-out rows")
    valid = PackedDataset(data_dir / "valid")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    every_row = np.arange(len(valid), dtype=np.int64)
    sums, counts = evaluate_per_task(load_trained(run_dir), valid, every_row, micro_batch_size=8)
    final = {t: (float(s / c) if c > 0 else None) for t, s, c in zip(valid.tasks, sums, counts)}
    initial = records[0].get("valid_loss") or {}
    weights = records[-1].get("weights") or {}
    tokens = _train_tokens(data_dir / "train")
    rows = [TaskRow(t, tokens.get(t, 0), initial.get(t), final[t], weights.get(t)) for t in valid.tasks]

    log.info("demo [4/5] plotting %s", run_dir / "plots")
    plots = plot_run(run_dir)
    log.info("demo [5/5] exporting the model to %s", out / "model")
    model = export_run(run_dir, out / "model", overwrite=True)
    tensorboard = run_dir / "tensorboard"
    return DemoResult("cgc-lora" if adapter == "cgc_lora" else "coba", rows, "final weight",
                      run_dir / "metrics.jsonl", tensorboard if tensorboard.is_dir() else None, plots, model)


def _train_tokens(train_dir: Path) -> dict[str, int]:
    manifest = json.loads((train_dir / "manifest.json").read_text(encoding="utf-8"))
    return {t: int(s.get("tokens", 0)) for t, s in manifest.get("task_stats", {}).items()}


def _cold_fusion(out: Path, steps: int) -> DemoResult:
    """ColD Fusion as in the paper: every task's contributor fine-tunes, the models are averaged uniformly."""
    from mftcoder_coba.demo_data import DEMO_TASKS
    from mftcoder_coba.fusion import FusionConfig, run_cold_fusion
    from mftcoder_coba.plots import plot_run

    log.info("demo [1/3] preparing one contributor's shards per task under %s", out / "data")
    contributors, tokens = [], {}
    for task, path in DEMO_TASKS.items():
        data_dir = _prepare({task: path}, out / "data" / task)
        tokens.update(_train_tokens(data_dir / "train"))
        contributors.append({"name": task, "train": str(data_dir / "train"), "valid": str(data_dir / "valid")})
    template = run_data(out / "data", out / "run", steps)
    template["balancer"] = {"name": "uniform"}  # each contributor holds one task
    template["train"]["log_every"] = max(1, steps)
    cfg = config_io.build(FusionConfig, {"run_dir": str(out / "run"), "template": template,
                                         "contributors": contributors, "iterations": FUSION_ITERATIONS,
                                         "fusion_weights": "uniform"})
    log.info("demo [2/3] ColD Fusion: %d iterations x %d contributors x %d steps, uniform average",
             FUSION_ITERATIONS, len(contributors), steps)
    run_dir = run_cold_fusion(cfg)
    records = [json.loads(line) for line in (run_dir / "fusion_metrics.jsonl").read_text().splitlines() if line]
    weights = records[-1]["weights"]
    rows = [TaskRow(task, tokens[task], records[0]["valid_loss"].get(task), records[-1]["valid_loss"].get(task),
                    weights.get(task)) for task in DEMO_TASKS]
    log.info("demo [3/3] plotting %s", run_dir / "plots")
    plots = plot_run(run_dir)
    model = Path(records[-1]["model"])
    return DemoResult("cold-fusion", rows, "fusion weight", run_dir / "fusion_metrics.jsonl", None, plots, model)
