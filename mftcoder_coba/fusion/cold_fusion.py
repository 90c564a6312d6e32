"""ColD Fusion (Don-Yehiya et al. 2023): collaborative descent by repeated fine-tune-then-average.

Each iteration, every contributor (a task or a data owner, with shards nobody else reads) fine-tunes the
current shared model on its own data as an independent training job; the repository then averages the
contributors' models (:func:`~mftcoder_coba.fusion.average.average_models`: full weights, or LoRA updates
merged exactly into the shared model) into the next shared model. After every fusion (and for the base,
iteration 0) the shared model's per-task held-out loss on every contributor's held-out split is measured
and written to ``fusion_metrics.jsonl`` and a PNG.

Layout of ``run_dir``::

    fusion_config.yaml              the resolved FusionConfig
    iteration-00/model/             the base, when built from the template's model_config (random init)
    iteration-00/metrics.json       held-out losses of the base
    iteration-01/<name>.yaml        contributor <name>'s run config for this iteration
    iteration-01/<name>/            its run directory (metrics.jsonl, checkpoints/, ...; see the trainer)
    iteration-01/<name>.log         its output when contributors run in parallel processes
    iteration-01/fused/             the fused shared model: a transformers model directory
    iteration-01/metrics.json       held-out losses of the fused model (the iteration's completion mark)
    fusion_metrics.jsonl            one line per complete iteration: {"iteration", "valid_loss": {task: loss}, "model"}
    plots/fusion_valid_loss.png     per-task held-out loss over iterations (``mftcoder-coba plot`` draws it)

An iteration counts as done once its ``metrics.json`` exists; running the same config again continues
after the last done iteration (contributor jobs resume from their own newest checkpoints).

Contributors on other machines follow the same flow by hand: the repository publishes the shared model
directory; each contributor trains on it with the launchers (``model.path`` = the shared model,
``launch/single_node.sh`` / ``multi_node.sh`` / ``slurm.sbatch``) and hands in its run directory (or just
the newest ``checkpoints/step-N/model``); the repository runs ``mftcoder-coba fuse RUN_A RUN_B ... --out
NEXT [--base SHARED]`` (``--base`` for LoRA contributors) and publishes ``NEXT``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mftcoder_coba import config_io
from mftcoder_coba.atomic import atomic_directory, atomic_write_text
from mftcoder_coba.config_io import check
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.fusion.average import average_models

logger = logging.getLogger(__name__)

METRICS_FILE = "fusion_metrics.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Launcher variables a contributor subprocess must not inherit: each is its own single-process job.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Contributor:
    """One contributor: its own prepared shards, its share of the average, its own run-config tweaks."""

    name: str
    """Identifier (letters, digits, '_', '-', '.'); names its run folders."""
    train: Path
    """Its prepared training split (the ``train/`` folder of ``mftcoder-coba prep``); only its jobs read it."""
    valid: Path
    """Its held-out split (``valid/``): used by its own trainer (e.g. CoBa) and to score every shared model."""
    weight: float = 1.0
    """Its weight in the average (weights are rescaled to sum to 1), e.g. proportional to its data size."""
    overrides: list[str] = field(default_factory=list)
    """``FIELD=VALUE`` run-config overrides for this contributor's jobs only, e.g. ``train.max_steps=200``."""


@dataclass
class FusionConfig:
    """A ColD Fusion run (``mftcoder-coba cold-fusion --config fusion.yaml``)."""

    run_dir: Path
    """Output folder (layout in the module documentation)."""
    template: dict[str, Any] | Path
    """The run configuration of every contributor job, inline or as the path of a run YAML. Per job the loop
    sets ``run_dir``, ``data`` (the contributor's splits), ``model.path`` (the current shared model, replacing
    ``model.model_config``) and adds the iteration number minus one to ``train.seed`` (so iterations draw
    different batches); then the contributor's overrides apply. ``model.adapter`` may be ``none`` or
    ``lora``/``qlora`` (updates merged into the shared model); ``cgc_lora`` cannot be averaged."""
    contributors: list[Contributor]
    """The contributors, each with its own data."""
    iterations: int = 3
    """Fine-tune-then-fuse rounds."""
    base_model: Path | None = None
    """Transformers model directory of the initial shared model. Default: the template's ``model.path``, or
    a model built from its ``model.model_config`` (random init, saved under ``iteration-00/model``)."""
    parallel: bool = False
    """Run an iteration's contributor jobs as parallel processes (``python -m mftcoder_coba train``; with
    CUDA each gets one visible GPU, round robin) instead of one after the other in this process."""
    eval_rows_per_task: int | None = None
    """Held-out rows per task used to score each shared model (the first ones of each task); null = all."""
    eval_micro_batch_size: int = 4
    """Rows per forward when scoring."""

    def validate(self) -> None:
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(len(self.contributors) >= 1, "contributors", "name at least one contributor")
        names = [c.name for c in self.contributors]
        for i, c in enumerate(self.contributors):
            check(bool(_NAME.match(c.name)), f"contributors[{i}].name",
                  f"{c.name!r}: use letters, digits, '_', '-', '.' (it names folders)")
            check(c.weight >= 0, f"contributors[{i}].weight", f"must be >= 0, got {c.weight}")
        check(len(set(names)) == len(names), "contributors", f"names must be unique, got {names}")
        check(sum(c.weight for c in self.contributors) > 0, "contributors", "the weights must not all be 0")
        check(self.eval_rows_per_task is None or self.eval_rows_per_task >= 1, "eval_rows_per_task",
              f"must be >= 1 or null, got {self.eval_rows_per_task}")
        check(self.eval_micro_batch_size >= 1, "eval_micro_batch_size",
              f"must be >= 1, got {self.eval_micro_batch_size}")


def load_fusion_config(path: str | Path, overrides: list[str] | None = None) -> FusionConfig:
    """Read ``fusion.yaml`` (or JSON), apply ``a.b=value`` overrides, build and validate it."""
    data = config_io.apply_overrides(config_io.load_mapping(path), list(overrides or []))
    try:
        return config_io.build(FusionConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _iteration_dir(cfg: FusionConfig, iteration: int) -> Path:
    return cfg.run_dir / f"iteration-{iteration:02d}"


def _template(cfg: FusionConfig) -> dict[str, Any]:
    if isinstance(cfg.template, Path):
        return config_io.load_mapping(cfg.template)
    return copy.deepcopy(cfg.template)


def contributor_run_data(cfg: FusionConfig, contributor: Contributor, iteration: int, shared: Path) -> dict[str, Any]:
    """Plain run-config data of ``contributor``'s job in ``iteration``, fine-tuning the ``shared`` model."""
    data = _template(cfg)
    data["run_dir"] = str((_iteration_dir(cfg, iteration) / contributor.name).absolute())
    data["data"] = {"train": str(contributor.train.absolute()), "valid": str(contributor.valid.absolute())}
    model = dict(data.get("model") or {})
    model.pop("model_config", None)
    model["path"] = str(Path(shared).absolute())
    data["model"] = model
    train = dict(data.get("train") or {})
    train["seed"] = int(train.get("seed", 0)) + iteration - 1
    data["train"] = train
    return config_io.apply_overrides(data, contributor.overrides)


def _check_jobs(cfg: FusionConfig) -> Any:
    """Build every contributor's run config once (with a stand-in shared model) so field errors stop the run
    before any training; returns the first one (its model section drives building and scoring)."""
    from mftcoder_coba.config import RunConfig

    first = None
    for i, c in enumerate(cfg.contributors):
        try:
            run = config_io.build(RunConfig, contributor_run_data(cfg, c, 1, cfg.run_dir / "shared"))
        except ConfigError as exc:
            raise ConfigError(f"template for contributor '{c.name}': {exc}") from None
        check(run.model.adapter != "cgc_lora", "template.model.adapter",
              "cgc_lora cannot be fused by parameter averaging (its task gate is not linear in its parameters); "
              "use none, lora or qlora")
        if first is not None:
            check(run.model.adapter == first.model.adapter, f"contributors[{i}].overrides",
                  "every contributor must use the same model.adapter (their models are averaged)")
        first = first or run
    return first


def _open_datasets(cfg: FusionConfig) -> dict[str, Any]:
    from mftcoder_coba.data import PackedDataset

    datasets = {}
    vocab = None
    for i, c in enumerate(cfg.contributors):
        for split, path in (("train", c.train), ("valid", c.valid)):
            check((path / "manifest.json").is_file(), f"contributors[{i}].{split}",
                  f"{path}: no prepared split here (manifest.json missing; run 'mftcoder-coba prep')")
        ds = PackedDataset(c.valid)
        if vocab is None:
            vocab = (ds.vocab_size, c.name)
        check(ds.vocab_size == vocab[0], f"contributors[{i}].valid",
              f"prepared with a vocabulary of {ds.vocab_size} tokens, contributor '{vocab[1]}' with {vocab[0]}: "
              "all contributors must use the same tokenizer")
        datasets[c.name] = ds
    return datasets


def _base_model(cfg: FusionConfig, datasets: dict[str, Any]) -> Path:
    if cfg.base_model is not None:
        check((cfg.base_model / "config.json").is_file(), "base_model",
              f"{cfg.base_model}: not a transformers model directory (no config.json)")
        return cfg.base_model
    template_model = _template(cfg).get("model") or {}
    if template_model.get("path"):
        return Path(template_model["path"])
    out = _iteration_dir(cfg, 0) / "model"
    if (out / "config.json").is_file():
        return out
    from mftcoder_coba.models import ModelConfig, build_model

    model_cfg = config_io.build(ModelConfig, template_model, prefix="template.model.")
    model_cfg = dataclasses.replace(model_cfg, adapter="none", gradient_checkpointing=False)
    first = next(iter(datasets.values()))
    model = build_model(model_cfg, first.vocab_size, len(first.tasks))
    with atomic_directory(out, overwrite=True) as tmp:  # an incomplete leftover (no config.json) is replaced
        model.save_pretrained(str(tmp))
        _copy_tokenizer(first.tokenizer_dir, tmp)
    logger.info("ColD Fusion base: random-init %s saved to %s", model_cfg.model_config.get("model_type"), out)
    return out


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    """Make a shared model directory self-contained (exports and chat tools find the tokenizer beside it)."""
    if tokenizer_dir is None:
        return
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)


def evaluate_model(model_dir: Path, job: Any, datasets: dict[str, Any], rows_per_task: int | None,
                   micro_batch_size: int) -> dict[str, float | None]:
    """Token-mean held-out loss per task of the model in ``model_dir`` over every contributor's valid split
    (tasks of the same name in several splits are pooled)."""
    import torch

    from mftcoder_coba.models import build_model
    from mftcoder_coba.training.validation import evaluate_per_task

    model_cfg = dataclasses.replace(job.model, path=str(model_dir), model_config=None, adapter="none",
                                    gradient_checkpointing=False)
    first = next(iter(datasets.values()))
    model = build_model(model_cfg, first.vocab_size, len(first.tasks))
    if torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for ds in datasets.values():
        rows = np.concatenate([ds.task_rows(t)[:rows_per_task] for t in range(len(ds.tasks))])
        task_sum, task_count = evaluate_per_task(model, ds, rows, micro_batch_size)
        for t, name in enumerate(ds.tasks):
            sums[name] = sums.get(name, 0.0) + float(task_sum[t])
            counts[name] = counts.get(name, 0.0) + float(task_count[t])
    del model
    return {name: (sums[name] / counts[name] if counts[name] > 0 else None) for name in sorted(sums)}


def _run_in_turn(jobs: list[tuple[str, Path, Path]]) -> None:
    from mftcoder_coba.config import load_run_config
    from mftcoder_coba.training import train

    for name, config_path, _ in jobs:
        logger.info("contributor '%s': training (%s)", name, config_path)
        train(load_run_config(config_path), resume="auto")


def _run_parallel(jobs: list[tuple[str, Path, Path]]) -> None:
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for k, (name, config_path, log_path) in enumerate(jobs):
        env = {key: value for key, value in os.environ.items() if key not in _LAUNCH_ENV}
        if gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
        command = [sys.executable, "-m", "mftcoder_coba", "train", "--config", str(config_path), "--resume", "auto"]
        logger.info("contributor '%s': training in a subprocess (log %s)", name, log_path)
        with open(log_path, "w", encoding="utf-8") as log:
            procs.append((name, log_path, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
    failed = [(name, log_path, proc.wait()) for name, log_path, proc in procs]
    failed = [(name, log_path, rc) for name, log_path, rc in failed if rc != 0]
    if failed:
        name, log_path, rc = failed[0]
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        raise UserError(f"contributor '{name}' training failed (exit {rc}; log {log_path}): "
                        f"{lines[-1] if lines else 'no output'}")


def _load_records(cfg: FusionConfig) -> list[dict[str, Any]]:
    records = []
    for i in range(cfg.iterations + 1):
        path = _iteration_dir(cfg, i) / "metrics.json"
        if path.is_file():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return records


def _finish_iteration(cfg: FusionConfig, record: dict[str, Any]) -> None:
    """Mark the iteration done (its metrics.json), then rewrite fusion_metrics.jsonl and the plot from the
    done iterations, so both always describe exactly those, also after an interrupted run was continued."""
    from mftcoder_coba.plot_cmd import plot_run

    atomic_write_text(_iteration_dir(cfg, record["iteration"]) / "metrics.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(cfg.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in _load_records(cfg)))
    plot_run(cfg.run_dir)
    losses = ", ".join(f"{task} {loss:.4f}" if loss is not None else f"{task} -"
                       for task, loss in record["valid_loss"].items())
    logger.info("ColD Fusion iteration %d: held-out loss %s", record["iteration"], losses)


def run_cold_fusion(cfg: FusionConfig) -> Path:
    """Run (or continue) the ColD Fusion loop of ``cfg``; returns ``cfg.run_dir``.

    The shared model after the last iteration is ``run_dir/iteration-NN/fused`` (also the ``model`` of the
    last line of ``fusion_metrics.jsonl``).
    """
    cfg.validate()
    job = _check_jobs(cfg)
    datasets = _open_datasets(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "fusion_config.yaml").write_text(yaml.safe_dump(config_io.to_dict(cfg), sort_keys=False),
                                                    encoding="utf-8")
    shared = _base_model(cfg, datasets)

    def evaluate(model_dir: Path) -> dict[str, float | None]:
        return evaluate_model(model_dir, job, datasets, cfg.eval_rows_per_task, cfg.eval_micro_batch_size)

    if not (_iteration_dir(cfg, 0) / "metrics.json").is_file():
        _finish_iteration(cfg, {"iteration": 0, "valid_loss": evaluate(shared), "model": str(shared)})
    weights = [c.weight for c in cfg.contributors]
    for iteration in range(1, cfg.iterations + 1):
        folder = _iteration_dir(cfg, iteration)
        fused = folder / "fused"
        if (folder / "metrics.json").is_file():
            shared = fused
            continue
        folder.mkdir(parents=True, exist_ok=True)
        jobs = []
        for c in cfg.contributors:
            config_path = folder / f"{c.name}.yaml"
            data = contributor_run_data(cfg, c, iteration, shared)
            config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            jobs.append((c.name, config_path, folder / f"{c.name}.log"))
        logger.info("ColD Fusion iteration %d/%d: %d contributors fine-tune %s", iteration, cfg.iterations,
                    len(jobs), shared)
        (_run_parallel if cfg.parallel else _run_in_turn)(jobs)
        from mftcoder_coba.models.persist import model_dir_of

        contributed = {c.name: model_dir_of(folder / c.name) for c in cfg.contributors}
        shutil.rmtree(fused, ignore_errors=True)   # a fusion left by an interrupted iteration is redone
        base = shared if job.model.adapter != "none" else None
        average_models(list(contributed.values()), fused, weights=weights, base_dir=base)
        _copy_tokenizer(next(iter(datasets.values())).tokenizer_dir, fused)
        _finish_iteration(cfg, {"iteration": iteration, "valid_loss": evaluate(fused), "model": str(fused),
                                "contributors": {name: str(path) for name, path in contributed.items()},
                                "weights": dict(zip([c.name for c in cfg.contributors], weights))})
        shared = fused
    return cfg.run_dir
