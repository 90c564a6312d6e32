"""``mftcoder-coba plot``: the eval split's loss per task (eval_loss.png, its mean dashed) from metrics.jsonl and
pass@k per checkpoint from eval_code.jsonl (``eval-code RUN_DIR --all-checkpoints``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftcoder_coba.errors import UserError
from mftcoder_coba.plots import pass_at_k_series, per_task_series, plot_run, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(run: Path) -> None:
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 7):
        line = {"step": step, "loss": 5.0 - 0.1 * step, "train_loss": {"a": 4.0, "b": 3.0},
                "weights": {"a": 0.5, "b": 0.5}}
        if step % 3 == 0:
            line.update(eval_loss={"a": 4.0 - 0.1 * step, "b": None}, eval_mean=4.0 - 0.1 * step,
                        eval_worst=4.0 - 0.1 * step, eval_s=0.1)
        lines.append(line)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summaries = [{"benchmark": "humaneval", "step": step, "n": 10, "problems": 164, "pass@1": p1, "pass@10": p10,
                  "outcomes": {"passed": 1}} for step, p1, p10 in ((6, 0.05, 0.2), (3, 0.01, 0.1))]
    (run / "eval_code.jsonl").write_text("".join(json.dumps(x) + "\n" for x in summaries))


def test_eval_loss_and_pass_at_k_are_plotted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    records = read_jsonl(run / "metrics.jsonl", {"step": "number"})
    steps, series = per_task_series(records, "step", "eval_loss", run / "metrics.jsonl")
    assert steps == [3.0, 6.0] and series["a"] == pytest.approx([3.7, 3.4])
    assert pass_at_k_series(run / "eval_code.jsonl") == {"humaneval pass@1": ([3.0, 6.0], [0.01, 0.05]),
                                                         "humaneval pass@10": ([3.0, 6.0], [0.1, 0.2])}
    written = plot_run(run)
    assert [p.name for p in written] == ["weights.png", "train_loss.png", "eval_loss.png", "pass_at_k.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_a_pass_at_k_that_is_not_a_number_names_the_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run)
    with (run / "eval_code.jsonl").open("a") as handle:
        handle.write(json.dumps({"benchmark": "humaneval", "step": 9, "pass@1": "high"}) + "\n")
    with pytest.raises(UserError, match=r"eval_code.jsonl:3: field 'pass@1' must be a number"):
        plot_run(run)
