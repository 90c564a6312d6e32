"""Per-step metrics: ``run_dir/metrics.jsonl`` (the contract plot/export/fusion read), TensorBoard, MFU.

One JSON object per optimizer step::

    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "train_loss": {task: float|null},
     "weights": {task: float}, "valid_loss": {task: float|null}, "valid_s": float}

``valid_loss`` appears only on lines where held-out losses were measured, with ``valid_s``, the seconds those
held-out forwards took (part of the step time; how CoBa's cost is read); the step-0 line holds L_k(0)
(and the initial weights; its step-only fields are null). Update lines (every ``balancer.update_interval``-th
step) also carry ``weight_change``, the L1 distance between the weights after this update and after the
previous one (step 0 for the first), and the balancer's diagnostics, each a ``{task: float|null}`` mapping:
CoBa's ``slope`` (alpha_k of the update's fit) and ``slope_se`` (its standard error from the OLS residuals,
null below three points) -- a slope_se near the gaps between the tasks' slopes means the weights follow
observation noise. ``mfu`` is null off GPU. Only rank 0 writes.

Lines of steps where the ``eval:`` split was scored carry ``eval_loss`` (``{task: float|null}``, null for a
training task without rows in that split), ``eval_mean`` (mean over the tasks with a loss), ``eval_worst``
(the largest) and ``eval_s`` (seconds). The line of the step where ``train.early_stopping`` stopped the
run carries ``early_stopped``, the reason. Every number of a line also goes to the trackers
(:mod:`~mftcoder_coba.training.trackers`) under the same name (``group/task`` inside per-task mappings).
A resumed run first drops the lines after its checkpoint, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.errors import UserError
from mftcoder_coba.training.best import metric_value
from mftcoder_coba.training.trackers import TensorBoardTracker, Tracker, scalars

log = logging.getLogger(__name__)

# Dense bf16 peak (no sparsity) by device-name fragment, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None off GPU / for an unlisted GPU (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + 12 x layers x hidden x seq_len (attention).

    The input embedding is a lookup, not a matmul, so it is left out (the LM head is counted even when tied).
    The attention term is the usual full-sequence count (PaLM/Megatron convention), also for packed rows.
    """
    from mftcoder_coba.models import causal_lm

    lm = causal_lm(model)
    params = sum(p.numel() for p in lm.parameters())
    params -= lm.get_input_embeddings().weight.numel()
    params += lm.get_output_embeddings().weight.numel() if lm.config.tie_word_embeddings else 0
    text = lm.config.get_text_config()
    return 6.0 * params + 12.0 * text.num_hidden_layers * text.hidden_size * seq_len


def _named(tasks: list[str], values: np.ndarray) -> dict[str, float | None]:
    return {t: (None if not math.isfinite(float(v)) else float(v)) for t, v in zip(tasks, values)}


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``path`` up to ``step`` (kept as written), for a run resumed from the checkpoint of ``step``.

    A run killed while appending leaves a torn last line: it is dropped, with a warning (it belongs to a
    step after the checkpoint anyway). Any other line that does not parse is an error naming path:line.
    """
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if line.strip()]
    kept = []
    for number, line in lines:
        try:
            before = json.loads(line)["step"] <= step
        except (ValueError, TypeError, KeyError) as exc:
            if number == lines[-1][0]:
                log.warning("%s:%d: dropping a torn last line (a run killed while writing it)", path, number)
                break
            raise UserError(f"{path}:{number}: not a metrics line ({type(exc).__name__}: {exc})") from None
        if before:
            kept.append(line)
    return kept


class MetricsLog:
    """Writes metrics.jsonl and the trackers' scalars on rank 0 (a no-op object elsewhere).

    ``tensorboard``: open a TensorBoard tracker here; ``trackers``: others already opened (closed with this)."""

    def __init__(self, run_dir: Path, tasks: list[str], *, enabled: bool, tensorboard: bool,
                 resume_step: int | None, trackers: list[Tracker] | None = None) -> None:
        self.tasks = tasks
        self.enabled = enabled
        self.trackers: list[Tracker] = []
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        kept = _lines_up_to(self.path, resume_step) if resume_step is not None and self.path.is_file() else []
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            self.trackers.append(TensorBoardTracker(Path(run_dir), resume_step))
        self.trackers.extend(trackers or [])

    def write(self, step: int, *, weights: np.ndarray, loss: float | None = None, lr: float | None = None,
              grad_norm: float | None = None, tokens_per_s: float | None = None, mfu: float | None = None,
              train_loss: np.ndarray | None = None, valid_loss: np.ndarray | None = None,
              valid_s: float | None = None, weight_change: float | None = None,
              diagnostics: dict[str, np.ndarray] | None = None, skipped_steps: int = 0,
              eval_loss: np.ndarray | None = None, eval_s: float | None = None,
              early_stopped: str | None = None) -> dict[str, Any]:
        """Append the line of ``step`` (and its scalars); returns the record."""
        record: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "train_loss": _named(self.tasks, train_loss) if train_loss is not None else {t: None for t in self.tasks},
            "weights": _named(self.tasks, weights),
        }
        if valid_loss is not None:
            record["valid_loss"] = _named(self.tasks, valid_loss)
            if valid_s is not None:
                record["valid_s"] = valid_s
        if weight_change is not None:
            record["weight_change"] = weight_change
        if skipped_steps:  # train.nonfinite: skip; steps not applied so far (this one included, if it was)
            record["skipped_steps"] = skipped_steps
        for name, values in (diagnostics or {}).items():
            record[name] = _named(self.tasks, values)
        if eval_loss is not None:
            record["eval_loss"] = _named(self.tasks, eval_loss)
            for name in ("mean", "worst"):
                value = metric_value(f"eval.{name}", self.tasks, eval_loss, None)
                record[f"eval_{name}"] = value if value is not None and math.isfinite(value) else None
            record["eval_s"] = eval_s
        if early_stopped is not None:
            record["early_stopped"] = early_stopped
        if not self.enabled:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step)
        return record

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            for tracker in self.trackers:
                tracker.close()



def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def step_line(record: dict[str, Any], max_steps: int, steps_per_epoch: float) -> str:
    """The console line of a logged step: epoch (passes over the training rows), loss, LR, gradient norm (4
    significant digits, not the 16 of a raw float), throughput and the task weights."""
    weights = " ".join(f"{t}={w:.3f}" for t, w in record["weights"].items())
    return (f"step {record['step']}/{max_steps} epoch {record['step'] / steps_per_epoch:.2f} "
            f"loss {_number(record.get('loss'), '.4f')} "
            f"lr {_number(record.get('lr'), '.3g')} grad_norm {_number(record.get('grad_norm'), '.4g')} "
            f"tokens/s {_number(record.get('tokens_per_s'), '.0f')} weights {weights}")


def measurement_line(record: dict[str, Any]) -> str | None:
    """The compact per-task line of a step that measured held-out (``valid``: the losses CoBa acts on) or eval
    losses, None on other steps: ``step 20 valid completion=1.2340 text2code=2.3450 | eval ... (mean, worst)``."""
    parts = []
    for source, key in (("valid", "valid_loss"), ("eval", "eval_loss")):
        losses = record.get(key)
        if losses:
            values = " ".join(f"{t}={_number(v, '.4f')}" for t, v in losses.items())
            if source == "eval":
                values += (f" (mean {_number(record.get('eval_mean'), '.4f')}, "
                           f"worst {_number(record.get('eval_worst'), '.4f')})")
            parts.append(f"{source} {values}")
    return f"step {record['step']} " + " | ".join(parts) if parts else None
