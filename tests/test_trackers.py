"""``train.report_to``: TensorBoard, W&B (offline) and MLflow (local SQLite store) get the scalars of every
metrics.jsonl line and the run config; a resumed run continues the same tracker run; a tracker whose package
is missing is one line before training starts; ``train.tensorboard`` keeps working.

The W&B and MLflow tests need ``pip install wandb mlflow`` (extras ``mftcoder-coba[wandb]`` /
``[mlflow]``); they are skipped when a package is missing (installing both takes about a minute and a half,
so they are not in the ``test`` extra)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from train_helpers import read_metrics, run_config

from mftcoder_coba.cli import main as cli_main
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import trackers, train
from mftcoder_coba.training.trackers import flat_params, scalars


def _eval(prepared: Path) -> dict:
    return {"data": str(prepared / "valid"), "every": 2}


def _expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the scalars of its metrics.jsonl line."""
    return {r["step"]: scalars(r) for r in read_metrics(run_dir)}


def test_scalars_and_params_are_the_metrics_line_and_the_config() -> None:
    line = {"step": 4, "loss": 2.5, "mfu": None, "train_loss": {"a": 1.0, "b": None}, "eval_mean": 3.0,
            "eval_loss": {"a": 3.0}, "early_stopped": "eval.mean has not improved"}
    assert scalars(line) == {"loss": 2.5, "train_loss/a": 1.0, "eval_mean": 3.0, "eval_loss/a": 3.0}
    assert flat_params({"train": {"max_steps": 4, "report_to": ["wandb"], "keep_best": None}, "run_dir": "r"}) == {
        "train.max_steps": "4", "train.report_to": '["wandb"]', "train.keep_best": "null", "run_dir": "r"}


def test_tensorboard_flag_keeps_working_and_contradictions_are_refused(prepared: Path,
                                                                       tmp_path: Path) -> None:
    assert run_config(prepared, tmp_path / "r").train.trackers == ["tensorboard"]
    assert run_config(prepared, tmp_path / "r", train={"tensorboard": False}).train.trackers == []
    assert run_config(prepared, tmp_path / "r", train={"tensorboard": True, "report_to": ["tensorboard", "mlflow"]}
                      ).train.trackers == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="'train.tensorboard': False disagrees with train.report_to"):
        run_config(prepared, tmp_path / "r", train={"tensorboard": False, "report_to": ["tensorboard"]})
    with pytest.raises(ConfigError, match="'train.report_to\\[0\\]': 'comet' is not one of"):
        run_config(prepared, tmp_path / "r", train={"report_to": ["comet"]})


def test_tensorboard_gets_the_eval_scalars(prepared: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(run_config(prepared, tmp_path / "run", eval=_eval(prepared), train={"max_steps": 4}))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    expected = _expected(run_dir)
    for key in ("eval_mean", "eval_worst", "eval_loss/unit_tests", "loss", "weights/code_completion"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({s: v[key] for s, v in expected.items() if key in v}, rel=1e-6), key
    assert sorted(logged) == [0, 1, 2, 3, 4] and sorted(e.step for e in events.Scalars("eval_mean")) == [2, 4]


def test_a_missing_tracker_package_is_one_line_before_training(prepared: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    config = tmp_path / "run.json"
    from train_helpers import run_data, write_config

    write_config(config, run_data(prepared, tmp_path / "run", train={"report_to": ["tensorboard", "wandb"]}))
    assert cli_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "'train.report_to': 'wandb' needs the wandb package" in err
    assert "pip install 'mftcoder-coba[wandb]'" in err
    assert not (tmp_path / "run").exists()


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (``run-ID.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log style chunks in 32 KiB blocks (crc32, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_gets_every_scalar_and_resumes_the_same_run(prepared: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'mftcoder-coba[wandb]')")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    for steps, resume in ((2, None), (4, "auto")):
        run_dir = train(run_config(prepared, tmp_path / "run", eval=_eval(prepared),
                                   train={"max_steps": steps, "report_to": ["wandb"]}), resume=resume)
    assert not (run_dir / "tensorboard").exists()
    run_id = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["trackers"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id['wandb']}.wandb"}

    logged: dict[int, dict[str, float]] = {}
    config = {}
    for file in files:
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                logged[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    expected = _expected(run_dir)
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values, rel=1e-9), step
    assert "eval_mean" in logged[4] and "eval_loss/code_to_text" in logged[2]
    assert config["train"]["max_steps"] == 4 and config["eval"]["every"] == 2  # the resumed run's config


@pytest.mark.slow
def test_mlflow_local_store_gets_every_scalar_and_the_config(prepared: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'mftcoder-coba[mlflow]')")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for steps, resume in ((2, None), (4, "auto")):
        run_dir = train(run_config(prepared, tmp_path / "run", eval=_eval(prepared),
                                   train={"max_steps": steps, "report_to": ["mlflow", "tensorboard"]}), resume=resume)
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    run = client.get_run(state["trackers"]["mlflow"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "mftcoder-coba"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "2"  # params of its creation
    assert run.data.params["eval.data"] == str(prepared / "valid")
    expected = _expected(run_dir)
    for key in {k for values in expected.values() for k in values}:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({s: v[key] for s, v in expected.items() if key in v}, rel=1e-9), key
    assert (run_dir / "tensorboard").is_dir()

    # MLFLOW_TRACKING_URI wins over the run-local store
    elsewhere = tmp_path / "shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    other = train(run_config(prepared, tmp_path / "other", train={"max_steps": 1, "report_to": ["mlflow"]}))
    assert elsewhere.is_file() and not (other / "mlflow.db").exists()
