"""``mftcoder-coba plot``: PNGs from metrics.jsonl / fusion_metrics.jsonl, and errors that name path:line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mftcoder_coba.cli import main as cli
from mftcoder_coba.errors import UserError
from mftcoder_coba.plots import per_task_series, plot_run, read_jsonl

TASKS = ["code_completion", "text_to_code", "unit_tests"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(run: Path, steps: int = 6) -> None:
    """metrics.jsonl as the trainer writes it: a step-0 line with L_k(0), held-out losses every 2 steps."""
    lines = [{"step": 0, "weights": {t: 1 / 3 for t in TASKS}, "valid_loss": {t: 5.0 + i for i, t in enumerate(TASKS)}}]
    for step in range(1, steps + 1):
        line = {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
                "mfu": None, "train_loss": {"code_completion": 4.0, "text_to_code": None, "unit_tests": 3.0},
                "weights": {"code_completion": 0.5, "text_to_code": 0.25, "unit_tests": 0.25}}
        if step % 2 == 0:
            line["valid_loss"] = {t: 5.0 - 0.2 * step + i for i, t in enumerate(TASKS)}
        lines.append(line)
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_series_follow_the_metrics_lines(tmp_path: Path) -> None:
    _metrics(tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl", {"step": "number"})
    steps, valid = per_task_series(records, "step", "valid_loss", tmp_path / "metrics.jsonl")
    assert steps == [0.0, 2.0, 4.0, 6.0]
    assert list(valid) == TASKS
    assert valid["unit_tests"] == pytest.approx([7.0, 6.6, 6.2, 5.8])
    steps, train = per_task_series(records, "step", "train_loss", tmp_path / "metrics.jsonl")
    assert steps == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert all(math.isnan(v) for v in train["text_to_code"])  # null = the task was absent from the batch
    _, weights = per_task_series(records, "step", "weights", tmp_path / "metrics.jsonl")
    assert weights["code_completion"] == pytest.approx([1 / 3] + [0.5] * 6)


@pytest.mark.slow
def test_cli_writes_the_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _metrics(run)
    (run / "fusion_metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "valid_loss": {t: 3.0 - 0.1 * i for t in TASKS}}) + "\n" for i in range(3)))
    assert cli(["plot", str(run)]) == 0
    names = {"valid_loss.png", "weights.png", "train_loss.png", "fusion_valid_loss.png"}
    assert {p.name for p in (run / "plots").iterdir()} == names
    for name in names:
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert set(capsys.readouterr().out.split()) == {str(run / "plots" / n) for n in names}
    assert [p.name for p in plot_run(run, tmp_path / "elsewhere")] == [
        "valid_loss.png", "weights.png", "train_loss.png", "fusion_valid_loss.png"]


@pytest.mark.parametrize("content,message", [
    ("", r"metrics.jsonl: no metrics in the file \(empty\)"),
    ('{"step": 1, "weights": {"a": 1.0}}\n{"step": 2, "weights"\n{"step": 3, "weights": {"a": 1.0}}\n',
     r"metrics.jsonl:2: not valid JSON"),
    ('{"step": 1, "weights"', r"metrics.jsonl: no metrics in the file \(empty\)"),
    ('{"step": 1, "weights": {"a": 1.0}}\n[1, 2]\n', r"metrics.jsonl:2: expected a JSON object"),
    ('{"weights": {"a": 1.0}}\n', r"metrics.jsonl:1: field 'step' missing"),
    ('{"step": "one", "weights": {"a": 1.0}}\n', r"metrics.jsonl:1: field 'step' must be a number"),
    ('{"step": 1, "weights": {"a": 1.0}}\n\n{"step": 2, "weights": {"a": "x"}}\n',
     r"metrics.jsonl:3: field 'weights.a' must be a number or null"),
    ('{"step": 1, "weights": [1.0]}\n', r"metrics.jsonl:1: field 'weights' must be a mapping"),
    ('{"step": 1, "loss": 2.0}\n', r"metrics.jsonl: no line has per-task"),
])
def test_bad_metrics_name_path_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_a_torn_last_line_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run killed (or still running) while appending leaves a torn last line; the whole lines still plot."""
    _metrics(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "loss": 4.2, "weights": {"code_completion": 0.')
    records = read_jsonl(tmp_path / "metrics.jsonl", {"step": "number"})
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert "metrics.jsonl:8: ignoring a torn last line" in caplog.text
    assert [p.name for p in plot_run(tmp_path)] == ["valid_loss.png", "weights.png", "train_loss.png"]


def test_missing_metrics_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mftcoder-coba: error:") and "metrics.jsonl: not found" in err and "\n" not in err


@pytest.mark.parametrize("n_tasks", [4, 16, 32])
def test_many_tasks_stay_readable(n_tasks: int) -> None:
    """MFTCoder users train 10-30 tasks: every line keeps its own colour and style, and the legend never covers
    the curves or runs off the picture."""
    from mftcoder_coba.plots import _per_task_figure, task_styles

    styles = task_styles(n_tasks)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == n_tasks
    steps = [float(s) for s in range(50)]
    series = {f"task_{k:02d}": [7.0 - 0.1 * k - 0.05 * s for s in steps] for k in range(n_tasks)}
    fig = _per_task_figure(steps, series, "held-out loss per task", "optimizer step", "loss",
                           total=(steps, [5.0] * len(steps), "mean"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert len(legend.get_texts()) == n_tasks + 1
    box, axes_box, figure_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer), fig.bbox
    assert figure_box.x0 - 1 <= box.x0 and box.x1 <= figure_box.x1 + 1
    assert figure_box.y0 - 1 <= box.y0 and box.y1 <= figure_box.y1 + 1
    if n_tasks > 10:
        assert not box.overlaps(axes_box)
        named = [t.get_text() for t in ax.texts]
        assert set(named) == {"task_00", "task_01", "task_02"} | {f"task_{k:02d}" for k in range(n_tasks - 3, n_tasks)}
