"""``mftcoder-coba plot RUN_DIR``: pictures of what the balancer did, from the run's metrics files.

Writes PNGs to ``RUN_DIR/plots`` (or ``--out``): held-out loss per task and task weight per task over the
optimizer steps, the training loss (total and per task) and, for CoBa, the standard error of each task's
slope fit (when it is as large as the gaps between the slopes, the weights follow observation noise: raise
``balancer.valid_rows_per_task`` or use ``balancer.held_out: fixed``) and the ``eval:`` split's loss per task (with
its mean over tasks dashed), from ``metrics.jsonl``; pass@k per checkpoint step of each benchmark from
``eval_code.jsonl`` (``eval-code RUN_DIR --all-checkpoints``); and, for a ColD Fusion
run, the fused model's held-out loss per task over the iterations from ``fusion_metrics.jsonl``. Rendering
uses matplotlib's Agg canvas (no display needed); each PNG is written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from mftcoder_coba.atomic import atomic_file
from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
FUSION_METRICS = "fusion_metrics.jsonl"
EVAL_CODE = "eval_code.jsonl"


# field of a metrics.jsonl line -> (PNG name, title, y label)
PLOTS = {
    "valid_loss": ("valid_loss.png", "held-out loss per task", "held-out loss"),
    "weights": ("weights.png", "task weight per task", "weight"),
    "train_loss": ("train_loss.png", "training loss per task (weighted objective dashed)", "training loss"),
    "slope_se": ("slope_se.png", "CoBa: standard error of each task's slope fit (per update)",
                 "slope standard error (loss ratio per step)"),
    "eval_loss": ("eval_loss.png", "eval split loss per task (mean over tasks dashed)", "eval loss"),
}
TOTALS = {"train_loss": ("loss", "objective"), "eval_loss": ("eval_mean", "mean over tasks")}
"""Per-task plots that also draw one line-level number (field, legend label), on the lines that carry the tasks."""


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for a run and return their paths; errors name the metrics file and line."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    metrics, fusion = run_dir / METRICS, run_dir / FUSION_METRICS
    if not metrics.is_file() and not fusion.is_file():
        raise UserError(f"{metrics}: not found (is {run_dir} a run directory?)")
    figures = []
    if metrics.is_file():
        records = read_jsonl(metrics, required={"step": "number"})
        for field, (name, title, ylabel) in PLOTS.items():
            steps, series = per_task_series(records, "step", field, metrics)
            if steps:
                total = None
                if field in TOTALS:
                    key, label = TOTALS[field]
                    lines = records if field == "train_loss" else [r for r in records if r.get(field) is not None]
                    total = ([float(r["step"]) for r in lines], [_number(r.get(key)) for r in lines], label)
                figures.append((name, _per_task_figure(steps, series, title, "optimizer step", ylabel, total)))
        if not figures:
            raise UserError(f"{metrics}: no line has per-task 'valid_loss', 'weights' or 'train_loss'")
    eval_code = run_dir / EVAL_CODE
    if eval_code.is_file():
        figures.append(("pass_at_k.png", _pass_at_k_figure(eval_code)))
    if fusion.is_file():
        records = read_jsonl(fusion, required={"iteration": "number", "valid_loss": "mapping"})
        iterations, series = per_task_series(records, "iteration", "valid_loss", fusion)
        figures.append(("fusion_valid_loss.png", _per_task_figure(
            iterations, series, "ColD Fusion: fused model's held-out loss per task", "iteration", "held-out loss")))
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(fig, out / name) for name, fig in figures]
    log.info("wrote %d plots to %s", len(written), out)
    return written


def read_jsonl(path: Path, required: dict[str, str]) -> list[dict[str, Any]]:
    """Parse a metrics JSONL file; every line must be an object with the ``required`` fields and kinds.

    A last line that is not valid JSON is dropped with a warning: it is what a run killed (or still running)
    while appending leaves, and the lines before it are whole. Anywhere else it is an error naming path:line.
    """
    records = []
    with path.open(encoding="utf-8") as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == lines[-1][0]:
                log.warning("%s:%d: ignoring a torn last line (not valid JSON: %s)", path, number, exc.msg)
                break
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        for field, kind in required.items():
            value = record.get(field)
            ok = isinstance(value, dict) if kind == "mapping" else _is_number(value)
            if not ok:
                problem = "missing" if field not in record else f"must be a {kind}, got {value!r}"
                raise UserError(f"{path}:{number}: field '{field}' {problem}")
        record["_line"] = number
        records.append(record)
    if not records:
        raise UserError(f"{path}: no metrics in the file (empty)")
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def per_task_series(records: list[dict[str, Any]], x: str, field: str,
                    path: Path) -> tuple[list[float], dict[str, list[float]]]:
    """The ``x`` values of the lines that carry ``field`` (a task -> number|null mapping) and, per task in
    order of first appearance, its values on those lines (null or absent -> NaN, a gap in the plot)."""
    lines = [r for r in records if r.get(field) is not None]
    tasks: list[str] = []
    for record in lines:
        values = record[field]
        if not isinstance(values, dict):
            raise UserError(f"{path}:{record['_line']}: field '{field}' must be a mapping of task -> number")
        for task, value in values.items():
            if value is not None and not _is_number(value):
                raise UserError(f"{path}:{record['_line']}: field '{field}.{task}' must be a number or null, "
                                f"got {value!r}")
            if task not in tasks:
                tasks.append(task)
    series = {task: [_number(record[field].get(task)) for record in lines] for task in tasks}
    return [float(record[x]) for record in lines], series


def pass_at_k_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``"benchmark pass@k" -> (steps, values)`` from an ``eval_code.jsonl`` (one line per step and benchmark)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in sorted(read_jsonl(path, required={"step": "number"}), key=lambda r: r["step"]):
        for key, value in record.items():
            if key.startswith("pass@"):
                if not _is_number(value):
                    raise UserError(f"{path}:{record['_line']}: field '{key}' must be a number, got {value!r}")
                steps, values = series.setdefault(f"{record.get('benchmark', '?')} {key}", ([], []))
                steps.append(float(record["step"]))
                values.append(float(value))
    if not series:
        raise UserError(f"{path}: no line has a pass@k value")
    return series


def _pass_at_k_figure(path: Path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    for label, (steps, values) in pass_at_k_series(path).items():
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_title("pass@k per checkpoint (eval-code --all-checkpoints)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


FEW_TASKS = 10
"""Up to this many tasks the legend sits inside the axes; more get it beside them, and the extreme lines named."""
LEGEND_ROWS = 22
"""Legend entries per column beside the axes (a 4.5-inch figure holds about this many in small type)."""
NAMED_EXTREMES = 3
"""With many tasks, the highest and lowest this many lines are named at their last point."""
_LINESTYLES = ("-", "--", ":", "-.")


def task_styles(n: int) -> list[dict[str, Any]]:
    """A distinct (colour, line style) per task: tab10 / tab20 colours while they last; past 20 tasks colours
    sampled evenly from a perceptually ordered map, with the line style cycling so neighbours stay apart."""
    from matplotlib import colormaps

    if n <= 10:
        return [{"color": colormaps["tab10"](i), "linestyle": "-"} for i in range(n)]
    if n <= 20:
        return [{"color": colormaps["tab20"](i), "linestyle": "-"} for i in range(n)]
    cmap = colormaps["turbo"]
    return [{"color": cmap(0.05 + 0.9 * i / (n - 1)), "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}
            for i in range(n)]


def _last_finite(values: list[float]) -> tuple[int, float] | None:
    for i in range(len(values) - 1, -1, -1):
        if math.isfinite(values[i]):
            return i, values[i]
    return None


def _name_extremes(ax, x: list[float], series: dict[str, list[float]], styles: list[dict[str, Any]]) -> None:
    """Name the lines that end highest and lowest beside their last point, each group stacked so the names
    never overlap (a thin leader line joins a moved name to its point)."""
    ends = {task: end for task, values in series.items() if (end := _last_finite(values)) is not None}
    ranked = sorted(ends, key=lambda task: ends[task][1])
    colour = {task: style["color"] for task, style in zip(series, styles)}
    ax.margins(x=0.14)  # room on the right for the names
    ax.autoscale_view()
    to_points = ax.figure.dpi / 72.0
    gap = 9.0  # points between stacked names (x-small type)
    low, high = ranked[:NAMED_EXTREMES], ranked[::-1][:NAMED_EXTREMES]
    for group, direction in ((high, -1.0), (low, 1.0)):
        previous = None
        for task in group:
            i, value = ends[task]
            own = y = ax.transData.transform((x[i], value))[1] / to_points
            if previous is not None and (y - previous) * direction < gap:
                y = previous + direction * gap
            ax.annotate(task, (x[i], value), xytext=(6, y - own), textcoords="offset points", fontsize="x-small",
                        color=colour[task], va="center", arrowprops={"arrowstyle": "-", "color": colour[task],
                                                                      "linewidth": 0.5, "shrinkA": 0, "shrinkB": 0})
            previous = y


def _per_task_figure(x: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
                     total: tuple[list[float], list[float], str] | None = None):
    """One line per task; with more than ``FEW_TASKS`` tasks the legend moves beside the axes (in as many
    columns as it needs, the figure widening to hold them) and the extreme lines are named on the plot."""
    from matplotlib.figure import Figure

    many = len(series) > FEW_TASKS
    entries = len(series) + (total is not None)
    columns = math.ceil(entries / LEGEND_ROWS) if many else 1
    fig = Figure(figsize=(7.5 + (1.9 * columns if many else 0), 4.5), dpi=110)
    ax = fig.add_subplot()
    styles = task_styles(len(series))
    for (task, values), style in zip(series.items(), styles):
        ax.plot(x, values, marker="o" if len(x) <= 30 and not many else None, markersize=3, label=task,
                linewidth=1.0 if many else 1.5, **style)
    if total is not None:
        ax.plot(total[0], total[1], color="black", linestyle="--", linewidth=1.2, label=total[2])
    if many:
        _name_extremes(ax, x, series, styles)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncols=columns, frameon=False)
        fig.tight_layout()  # counts the legend beside the axes, so the axes shrink to leave it room
    else:
        if series or total is not None:
            ax.legend(fontsize="small")
        fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
