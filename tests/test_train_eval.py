"""In-training evaluation (``eval:``), ``train.keep_best`` and ``train.early_stopping``: the eval numbers equal a
float64 reference on the saved model, a subset test split is scored as the training tasks of its names, the best
checkpoint survives pruning and is what ``export --best`` takes, and a run killed with SIGKILL and resumed with
``--resume auto`` makes the same keep-best and stopping decisions as an uninterrupted one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    SEQ_LEN,
    STOP_STEP_MOVED,
    assert_close_or_none,
    assert_same_run,
    cli,
    float64_token_ce,
    kill_once_written,
    read_metrics,
    run_config,
    run_data,
    single_thread,
    write_config,
)

from mftcoder_coba.cli import main as cli_main
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models import load_trained
from mftcoder_coba.training import train
from mftcoder_coba.training.best import MetricWatch, metric_value, read_best

NO_TB = {"report_to": []}


def _reference(model: torch.nn.Module, dataset: PackedDataset, train_tasks: list[str]) -> dict[str, float | None]:
    """Per training task: the float64 token-mean CE over every row of ``dataset`` (tasks matched by name)."""
    with torch.no_grad():
        ce, tasks, counted = float64_token_ce(model, dataset, np.arange(len(dataset)))
    out: dict[str, float | None] = {task: None for task in train_tasks}
    for k, task in enumerate(dataset.tasks):
        mine = (tasks == k) & counted
        if mine.any():
            out[task] = ce[mine].mean().item()
    return out


@pytest.mark.slow
def test_eval_split_every_n_steps_and_at_the_end_equals_a_float64_reference(prepared: Path,
                                                                           tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", eval={"data": str(prepared / "valid"), "every": 3},
                     train={"max_steps": 4, **NO_TB})
    run_dir = train(cfg)
    lines = read_metrics(run_dir)
    assert [r["step"] for r in lines if "eval_loss" in r] == [3, 4]  # every 3 steps, and the last one
    valid = PackedDataset(prepared / "valid")
    reference = _reference(load_trained(run_dir, run_dir / "checkpoints" / "step-00000004"), valid, valid.tasks)
    last = lines[-1]
    assert list(last["eval_loss"]) == valid.tasks
    for task in valid.tasks:
        assert last["eval_loss"][task] == pytest.approx(reference[task], rel=1e-5)
    assert last["eval_mean"] == pytest.approx(np.mean(list(reference.values())), rel=1e-5)
    assert last["eval_worst"] == pytest.approx(max(reference.values()), rel=1e-5)
    assert last["eval_s"] > 0

    # scoring the eval split leaves training untouched: the same losses as a run without it
    plain = train(run_config(prepared, tmp_path / "plain", train={"max_steps": 4, **NO_TB}))
    assert_same_run(read_metrics(plain), lines, rel=1e-6)
    assert not any("eval_loss" in r for r in read_metrics(plain))


@pytest.fixture(scope="module")
def subset(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two of the four demo tasks, in another order than training's (so their task ids differ)."""
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    out = tmp_path_factory.mktemp("subset") / "prep"
    tasks = {name: DEMO_TASKS[name] for name in ("unit_tests", "code_completion")}
    prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN, out=out, valid_samples_per_task=4,
                        seed=0))
    return out


def test_a_test_split_of_some_tasks_is_scored_as_the_training_tasks_of_its_names(prepared: Path,
                                                                                subset: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", eval={"data": str(subset / "valid")}, train={"max_steps": 2, **NO_TB})
    run_dir = train(cfg)
    split = PackedDataset(subset / "valid")
    assert split.tasks == ["unit_tests", "code_completion"]
    train_tasks = PackedDataset(prepared / "train").tasks
    reference = _reference(load_trained(run_dir, run_dir / "checkpoints" / "step-00000002"), split, train_tasks)
    logged = read_metrics(run_dir)[-1]["eval_loss"]
    assert logged["code_to_text"] is None and logged["text_to_code"] is None
    for task in ("unit_tests", "code_completion"):
        assert logged[task] == pytest.approx(reference[task], rel=1e-5)


def test_preflight_refuses_eval_splits_and_metrics_it_cannot_measure(prepared: Path, subset: Path,
                                                                    tmp_path: Path) -> None:
    # eval tasks that are not training tasks (training on the 2-task split, evaluating all 4)
    cfg = run_config(prepared, tmp_path / "a", data={"train": str(subset / "train"), "valid": str(subset / "valid")},
                     eval={"data": str(prepared / "valid")}, balancer={"name": "uniform", "options": {}})
    with pytest.raises(ConfigError, match=r"'eval.data': task\(s\) text_to_code, code_to_text of .* are not training"):
        train(cfg)
    # a metric naming a task the eval split has no rows of, or no task at all
    cfg = run_config(prepared, tmp_path / "b", eval={"data": str(subset / "valid")},
                     train={"keep_best": "eval.code_to_text"})
    with pytest.raises(ConfigError, match="'train.keep_best': 'eval.code_to_text': .* has no rows of task"):
        train(cfg)
    cfg = run_config(prepared, tmp_path / "c", train={"early_stopping": {"metric": "valid.nope"}})
    with pytest.raises(ConfigError, match="'train.early_stopping.metric': 'valid.nope': no task 'nope'"):
        train(cfg)
    with pytest.raises(ConfigError, match="'train.keep_best': 'eval.mean' needs an eval split"):
        run_config(prepared, tmp_path / "d", train={"keep_best": "eval.mean"})
    with pytest.raises(ConfigError, match="'train.keep_best': 'loss' is not a metric"):
        run_config(prepared, tmp_path / "e", train={"keep_best": "loss"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_metric_values_and_the_watch() -> None:
    tasks = ["a", "b", "c"]
    losses = np.array([1.0, np.nan, 3.0])  # b: no rows in the split
    assert metric_value("eval.mean", tasks, losses, None) == 2.0
    assert metric_value("eval.worst", tasks, losses, None) == 3.0
    assert metric_value("valid.c", tasks, None, np.array([0.5, 0.6, 0.7])) == 0.7
    assert metric_value("valid.mean", tasks, losses, None) is None  # not measured at this step
    watch = MetricWatch("eval.mean", min_delta=0.1)
    assert watch.observe(2, 5.0) and (watch.best, watch.best_step, watch.since_best) == (5.0, 2, 0)
    assert not watch.observe(4, 4.95)  # better, but not by more than min_delta
    assert not watch.observe(6, float("nan"))
    assert watch.observe(8, 4.8) and watch.since_best == 0
    assert not watch.observe(10, 4.85) and watch.since_best == 1
    same, other = MetricWatch("eval.mean", 0.1), MetricWatch("eval.worst", 0.1)
    same.load_state_dict(watch.state_dict())
    other.load_state_dict(watch.state_dict())  # a watch of another metric starts fresh
    assert same == watch and other == MetricWatch("eval.worst", 0.1)


# lr 0.03 makes the tiny model's eval loss turn: best at step 6, two evaluations without improvement stop at 10
# (uniform weights: the trajectory does not depend on how a balancer samples the held-out split)
STOPPING = {"optim": {"lr": 0.03, "warmup_steps": 1}, "balancer": {"name": "uniform", "options": {}},
            "train": {"max_steps": 30, "save_every": 4, "keep_last": 1, "keep_best": "eval.mean",
                      "early_stopping": {"metric": "eval.mean", "patience": 2}, **NO_TB}}


def _stopping(prepared: Path, **train: object) -> dict:
    """Sections of the stopping run (``train`` fields changed as given)."""
    return {**STOPPING, "train": {**STOPPING["train"], **train}, "eval": {"data": str(prepared / "valid"), "every": 2}}


def _decisions(run_dir: Path) -> dict:
    """What keep_best and early stopping left in a run directory."""
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    state = json.loads((run_dir / "checkpoints" / checkpoints[-1] / "trainer_state.json").read_text())
    return {"checkpoints": checkpoints, "best": json.loads((run_dir / "checkpoints" / "best.json").read_text()),
            "state": {k: state[k] for k in ("step", "keep_best", "early_stopping", "early_stopped")},
            "stopped_line": [(r["step"], r["early_stopped"]) for r in read_metrics(run_dir) if "early_stopped" in r]}


def _rounded(value: object) -> object:
    """``value`` with every float to 6 significant digits (runs compared to rel 1e-6, as their metrics)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


@pytest.mark.slow
@STOP_STEP_MOVED
def test_keep_best_and_early_stopping_survive_sigkill_and_resume(prepared: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.json", run_data(prepared, tmp_path / "killed", **_stopping(prepared)))
    first = tmp_path / "killed" / "checkpoints" / "step-00000004"
    kill_once_written(cli("train", "--config", str(config)), first)
    assert not (tmp_path / "killed" / "checkpoints" / "step-00000010").exists()

    resumed = cli("train", "--config", str(config), "--resume", "auto")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-2000:]
    assert "resumed from" in output and "early stopping at step 10: eval.mean has not improved" in output

    with single_thread():
        straight = train(run_config(prepared, tmp_path / "straight", **_stopping(prepared)))
    killed, whole = read_metrics(tmp_path / "killed"), read_metrics(straight)
    assert_same_run(killed, whole, rel=1e-6)
    for k, w in zip(killed, whole):
        assert_close_or_none(w.get("eval_mean"), k.get("eval_mean"), (w["step"], "eval_mean"))
    decisions = _decisions(straight)
    assert _rounded(_decisions(tmp_path / "killed")) == _rounded(decisions)

    # the best (step 6) outlived keep_last 1; the run stopped at 10 of 30 with a final checkpoint
    assert decisions["checkpoints"] == ["best.json", "step-00000006", "step-00000010"]
    assert decisions["best"]["step"] == 6 and decisions["best"]["checkpoint"] == "checkpoints/step-00000006"
    assert decisions["state"]["step"] == 10 and decisions["state"]["early_stopping"]["since_best"] == 2
    assert decisions["stopped_line"] == [(10, decisions["state"]["early_stopped"])]
    assert [r["step"] for r in whole][-1] == 10
    evals = {r["step"]: r["eval_mean"] for r in whole if "eval_mean" in r}
    assert min(evals, key=evals.get) == 6 and decisions["best"]["value"] == evals[6]

    # a stopped run resumed again has nothing to do
    again = cli("train", "--config", str(config), "--resume", "auto")
    output, _ = again.communicate(timeout=240)
    assert again.returncode == 0 and "stopped early at step 10" in output, output[-2000:]
    assert read_metrics(tmp_path / "killed") == killed


@pytest.mark.slow
@STOP_STEP_MOVED
def test_resume_between_evaluations_without_improvement_stops_at_the_same_step(prepared: Path,
                                                                              tmp_path: Path) -> None:
    """Resumed from step 8 (one evaluation since the best, the best at 6 kept): the state carries the count."""
    sections = _stopping(prepared, keep_last=3)
    whole = train(run_config(prepared, tmp_path / "whole", **sections))
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-00000010")
    (part / "checkpoints" / "best.json").unlink()  # a run killed before it wrote the record: resume restores it
    state = json.loads((part / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["early_stopping"]["since_best"] == 1 and state["keep_best"]["best_step"] == 6
    train(run_config(prepared, part, **sections), resume="auto")
    assert_same_run(read_metrics(part), read_metrics(whole), rel=1e-6)
    for name in ("best.json", "step-00000010/trainer_state.json"):
        assert json.loads((part / "checkpoints" / name).read_text()) == json.loads(
            (whole / "checkpoints" / name).read_text())


def test_export_best_takes_the_best_checkpoint(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", train={"max_steps": 4, "keep_best": "valid.mean", **NO_TB},
                     balancer={"update_interval": 2})
    run_dir = train(cfg)
    best = read_best(run_dir)
    record = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    means = {r["step"]: float(np.mean(list(r["valid_loss"].values()))) for r in read_metrics(run_dir)
             if "valid_loss" in r and r["step"] > 0}
    assert set(means) == {2, 4} and record["step"] == min(means, key=means.get)
    assert record["value"] == pytest.approx(means[record["step"]], rel=1e-9)
    assert best == run_dir / "checkpoints" / f"step-{record['step']:08d}"
    out = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--best", "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    trained = load_trained(run_dir, best)
    for (name, a), (_, b) in zip(model.state_dict().items(), trained.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_export_best_without_a_best_checkpoint_is_one_line(prepared: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run_dir = train(run_config(prepared, tmp_path / "run", train={"max_steps": 1, **NO_TB},
                               balancer={"name": "uniform", "options": {}}))
    capsys.readouterr()
    assert cli_main(["export", str(run_dir), "--best", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best.json: not found" in err and "train.keep_best" in err
    (run_dir / "checkpoints" / "best.json").write_text('{"step": "../../x"}')
    with pytest.raises(UserError, match="not a best-checkpoint record"):
        read_best(run_dir)
