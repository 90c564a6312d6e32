"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, through their own clients.

Each tracker gets, at every step, the scalars of that step's metrics.jsonl line (:func:`scalars`: top-level
numbers by name, per-task mappings as ``group/task``), so a tracker shows exactly what the file holds. Only
rank 0 opens trackers. Network is never needed:

* ``wandb``: ``WANDB_MODE`` if set, else ``offline``; files under ``run_dir/wandb`` (``wandb sync`` uploads
  them later). The run config is the W&B config. A resumed run calls ``wandb.init(id=..., resume="allow")``
  with the id kept in the checkpoint; W&B refuses steps at or below the last one it has seen online, so steps
  re-done after a kill (between the checkpoint and the kill) keep their first values there.
* ``mlflow``: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``run_dir/mlflow.db`` (MLflow 3 keeps its
  plain-file store in maintenance mode and refuses it by default) with artifacts under ``run_dir/mlartifacts``;
  experiment ``MLFLOW_EXPERIMENT_NAME`` or ``mftcoder-coba``. The run config goes in as params (dotted names)
  when the MLflow run is created; a resumed run continues the same MLflow run id (MLflow keeps every logged
  value, so re-done steps appear twice in its history).
* ``tensorboard``: ``run_dir/tensorboard``; a resumed run purges the events after its checkpoint's step.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker -> the module it needs (and the pip extra of this package that installs it)."""


def missing_package(tracker: str) -> str | None:
    """The module ``tracker`` needs when it is not installed, else None."""
    module = PACKAGES[tracker]
    return module if importlib.util.find_spec(module) is None else None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line: ``name`` for top-level numbers, ``group/task`` inside per-task
    mappings; nulls (unmeasured) are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            for task, item in value.items():
                if _is_number(item):
                    out[f"{key}/{task}"] = float(item)
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested run config as ``dotted.name -> text`` (lists and null as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class Tracker(Protocol):
    name: str
    run_id: str | None
    """The tracker's own run id, kept in trainer_state.json so a resumed run continues it (None: none)."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    name = "tensorboard"
    run_id = None

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mftcoder-coba"), name=Path(run_dir).name,
                              id=run_id, resume="allow" if run_id else None, dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=config,
                              settings=wandb.Settings(console="off"))
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_KEY = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in metric and param names
_MLFLOW_BATCH = 100  # MLflow's limit of params per log_batch call


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        run_dir = Path(run_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir / 'mlflow.db'}")
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mftcoder-coba")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            name, artifact_location=None if uri else (run_dir / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(_MLFLOW_KEY.sub("_", key), value) for key, value in flat_params(config).items()]
        for start in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_MLFLOW_KEY.sub("_", key), value, now, step)
                                                    for key, value in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any], run_ids: dict[str, str] | None,
                  resume_step: int | None) -> list[Tracker]:
    """Open the trackers ``names`` (rank 0); ``run_ids``: the tracker run ids of the checkpoint resumed from."""
    run_ids = run_ids or {}
    opened: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            opened.append(TensorBoardTracker(run_dir, resume_step))
        elif name == "wandb":
            opened.append(WandbTracker(run_dir, config, run_ids.get(name)))
        elif name == "mlflow":
            opened.append(MlflowTracker(run_dir, config, run_ids.get(name)))
        if opened and opened[-1].run_id is not None:
            log.info("%s run %s", name, opened[-1].run_id)
    return opened
