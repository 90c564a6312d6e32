"""ColD Fusion (Don-Yehiya et al. 2023, arXiv 2212.01378): collaborative descent by repeated fine-tune-then-average.

Each iteration, ``contributors_per_iteration`` contributors drawn from the pool (all by default; the paper
draws 8 of 36), each a task or a data owner with shards nobody else reads, fine-tune the current shared
model on their own data as independent training jobs; the repository then averages the contributors'
models (:func:`~mftcoder_coba.fusion.average.average_models`: full weights, or LoRA updates merged exactly
into the shared model) into the next shared model, uniformly by default as in the paper (weighting by
training tokens is an option). A contributor hands in its last checkpoint, or (``contributor_selection:
best_valid``, the paper's early stopping on the dev set) the one with the lowest loss on its own held-out
split. After every fusion (and for the base, iteration 0) the shared model's per-task held-out loss on
every contributor's held-out split is measured and written to ``fusion_metrics.jsonl`` and a PNG.

The paper's main claim is that the fused model is a better *starting point* for new tasks. ``unseen``
tasks (prepared splits kept out of the pool) measure that: after the last iteration the fused model and
the original base are each fine-tuned for ``unseen_steps`` steps on every unseen task, and the held-out
loss of both, before and after, goes on the last line of ``fusion_metrics.jsonl`` and in the printed table.

Contributors share weights, not data; that is all the paper claims. Shared weights can leak training data,
so this is no privacy guarantee. LoRA contributors (their updates averaged exactly) are this project's
extension; the paper fine-tunes the full model.

Layout of ``run_dir``::

    fusion_config.yaml              the resolved FusionConfig
    iteration-00/model/             the base, when built from the template's model_config (random init)
    iteration-00/metrics.json       held-out losses of the base
    iteration-01/<name>.yaml        contributor <name>'s run config for this iteration
    iteration-01/<name>/            its run directory (metrics.jsonl, checkpoints/, ...; see the trainer)
    iteration-01/<name>.log         its output when contributors run in parallel processes
    iteration-01/fused/             the fused shared model: a transformers model directory
    iteration-01/metrics.json       held-out losses of the fused model (the iteration's completion mark)
    iteration-NN/unseen/<u>/base/   the last iteration only: unseen task u's fine-tune of the base ...
    iteration-NN/unseen/<u>/fused/  ... and of the fused model (run directories)
    iteration-NN/unseen.json        their held-out losses (the unseen step's completion mark)
    fusion_metrics.jsonl            one line per complete iteration: {"iteration", "valid_loss": {task: loss},
                                    "model", "contributors", "selected_step", "weights"}, plus "unseen" on
                                    the line of each iteration that was the last one when unseen tasks
                                    were measured (a run continued with more iterations keeps the old one)
    plots/fusion_valid_loss.png     per-task held-out loss over iterations (``mftcoder-coba plot`` draws it)

An iteration counts as done once its ``metrics.json`` exists; running the same config again continues
after the last done iteration (contributor jobs resume from their own newest checkpoints). The contributors
of iteration i depend only on ``seed`` and i, so a continued run draws the same ones.

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
from typing import Any, Literal

import numpy as np
import yaml

from mftcoder_coba import config_io
from mftcoder_coba.atomic import atomic_directory, atomic_write_text
from mftcoder_coba.config_io import bounded, check, check_ranges
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.fusion.average import average_models, normalized_weights

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
    """Its held-out split (``valid/``): used by its own trainer (e.g. CoBa), by ``contributor_selection:
    best_valid`` and to score every shared model."""
    weight: float | None = None
    """Its weight in the average with ``fusion_weights: given`` (the weights of an iteration's contributors
    are rescaled to sum to 1); must be unset otherwise."""
    overrides: list[str] = field(default_factory=list)
    """``FIELD=VALUE`` run-config overrides for this contributor's jobs only, e.g. ``train.max_steps=200``."""


@dataclass
class UnseenTask:
    """Prepared splits kept out of the pool, to measure the fused model as a starting point for new tasks."""

    name: str
    """Identifier (letters, digits, '_', '-', '.'); names its run folders."""
    train: Path
    """Its prepared training split, read by the ``unseen_steps`` fine-tunes only."""
    valid: Path
    """Its held-out split: the loss reported for the fine-tuned base and fused model."""
    overrides: list[str] = field(default_factory=list)
    """``FIELD=VALUE`` run-config overrides for its fine-tunes (both starting points get the same)."""


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
    iterations: int = bounded(3, ge=1)
    """Fine-tune-then-fuse rounds."""
    contributors_per_iteration: int | None = None
    """How many contributors of the pool fine-tune in each iteration, drawn without replacement (the paper
    draws 8 of 36); null = all of them every iteration. The draw of iteration i depends only on ``seed`` and
    i, so a continued run draws the same contributors."""
    seed: int = 0
    """Seed of the contributor draws."""
    fusion_weights: Literal["uniform", "tokens", "given"] = "uniform"
    """How the contributors' models are weighted in the average. ``uniform`` (the paper's; it leaves weighted
    averages to future work); ``tokens``: by the tokens of each contributor's training split (manifest
    ``totals.tokens``); ``given``: by each contributor's ``weight``."""
    contributor_selection: Literal["last", "best_valid"] = "last"
    """Which checkpoint a contributor hands in. ``last``: its final one. ``best_valid``: the checkpoint whose
    held-out loss (the mean over the contributor's tasks of ``valid_loss`` on that step's line of its
    ``metrics.jsonl``) is lowest, the paper's early stopping on the dev set. Needs, in each job's run config,
    ``train.save_every`` a multiple of ``balancer.update_interval`` (every checkpoint has a measurement),
    ``train.keep_last`` large enough to keep every checkpoint, and ``balancer.held_out`` ``fixed`` or ``all``
    (every measurement reads the same rows, so the losses compare)."""
    unseen: list[UnseenTask] = field(default_factory=list)
    """Tasks kept out of the pool: after the last iteration the fused model and the original base are each
    fine-tuned for ``unseen_steps`` steps on each (the same run config, seed and batches), and their
    held-out losses are reported."""
    unseen_steps: int = bounded(50, ge=1)
    """Optimizer steps of each unseen-task fine-tune (a fixed, short budget)."""
    base_model: Path | None = None
    """Transformers model directory of the initial shared model. Default: the template's ``model.path``, or
    a model built from its ``model.model_config`` (random init, saved under ``iteration-00/model``)."""
    parallel: bool = False
    """Run an iteration's contributor jobs as parallel processes (``python -m mftcoder_coba train``; with
    CUDA each gets one visible GPU, round robin) instead of one after the other in this process."""
    eval_rows_per_task: int | None = bounded(None, ge=1)
    """Held-out rows per task used to score each shared model (the first ones of each task); null = all."""
    eval_micro_batch_size: int = bounded(4, ge=1)
    """Rows per forward when scoring."""

    def validate(self) -> None:
        """The ranges again (:func:`run_cold_fusion` validates a config built in code, not by the loader), then
        the rules between fields."""
        check_ranges(self)
        check(len(self.contributors) >= 1, "contributors", "name at least one contributor")
        names = [c.name for c in self.contributors]
        for i, c in enumerate(self.contributors):
            check(bool(_NAME.match(c.name)), f"contributors[{i}].name",
                  f"{c.name!r}: use letters, digits, '_', '-', '.' (it names folders)")
            check(len(set(names)) == len(names), "contributors", f"names must be unique, got {names}")
        if self.fusion_weights == "given":
            for i, c in enumerate(self.contributors):
                check(c.weight is not None, f"contributors[{i}].weight", "required with fusion_weights 'given'")
                check(c.weight > 0, f"contributors[{i}].weight", f"must be > 0, got {c.weight}")
        else:
            for i, c in enumerate(self.contributors):
                check(c.weight is None, f"contributors[{i}].weight",
                      f"is used only with fusion_weights 'given' (now {self.fusion_weights!r}); remove it or set that")
        k = self.contributors_per_iteration
        check(k is None or 1 <= k <= len(self.contributors), "contributors_per_iteration",
              f"must be between 1 and the {len(self.contributors)} contributors, or null; got {k}")
        unseen = [u.name for u in self.unseen]
        for i, u in enumerate(self.unseen):
            check(bool(_NAME.match(u.name)), f"unseen[{i}].name",
                  f"{u.name!r}: use letters, digits, '_', '-', '.' (it names folders)")
        check(len(set(unseen)) == len(unseen), "unseen", f"names must be unique, got {unseen}")


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


def _job_data(cfg: FusionConfig, run_dir: Path, train: Path, valid: Path, shared: Path, seed_offset: int,
              overrides: list[str], train_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain run-config data of one fine-tune of the ``shared`` model: the template with this job's run
    directory, data and model, ``train.seed`` plus ``seed_offset``, then ``train_fields``, then ``overrides``."""
    data = _template(cfg)
    data["run_dir"] = str(run_dir.absolute())
    data["data"] = {"train": str(train.absolute()), "valid": str(valid.absolute())}
    model = dict(data.get("model") or {})
    model.pop("model_config", None)
    model["path"] = str(Path(shared).absolute())
    data["model"] = model
    fields = dict(data.get("train") or {})
    fields["seed"] = int(fields.get("seed", 0)) + seed_offset
    fields.update(train_fields or {})
    data["train"] = fields
    return config_io.apply_overrides(data, overrides)


def contributor_run_data(cfg: FusionConfig, contributor: Contributor, iteration: int, shared: Path) -> dict[str, Any]:
    """Plain run-config data of ``contributor``'s job in ``iteration``, fine-tuning the ``shared`` model."""
    return _job_data(cfg, _iteration_dir(cfg, iteration) / contributor.name, contributor.train, contributor.valid,
                     shared, iteration - 1, contributor.overrides)


def unseen_run_data(cfg: FusionConfig, task: UnseenTask, folder: Path, start: Path) -> dict[str, Any]:
    """Plain run-config data of the ``unseen_steps`` fine-tune of ``start`` on ``task`` (into ``folder``): the
    template's seed for both starting points, so both read the same batches; one checkpoint, at the end."""
    return _job_data(cfg, folder, task.train, task.valid, start, 0, task.overrides,
                     {"max_steps": cfg.unseen_steps, "save_every": 0, "save_final": True})


def _build_job(data: dict[str, Any], who: str) -> Any:
    from mftcoder_coba.config import RunConfig

    try:
        return config_io.build(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"template for {who}: {exc}") from None


def _check_selection(run: Any, field_name: str) -> None:
    """``contributor_selection: best_valid`` needs a held-out measurement on the same rows at every checkpoint
    step, and every checkpoint kept."""
    t, b = run.train, run.balancer
    check(t.save_every > 0 and t.save_every % b.update_interval == 0, field_name,
          f"'best_valid' needs train.save_every a positive multiple of balancer.update_interval "
          f"({b.update_interval}), got {t.save_every}")
    check(not t.save_final or t.max_steps % b.update_interval == 0, field_name,
          f"'best_valid' needs train.max_steps ({t.max_steps}) a multiple of balancer.update_interval "
          f"({b.update_interval}): the final checkpoint needs a held-out measurement too")
    saves = -(-t.max_steps // t.save_every)
    check(t.keep_last >= saves, field_name,
          f"'best_valid' needs train.keep_last >= {saves} (every checkpoint of {t.max_steps} steps kept), "
          f"got {t.keep_last}")
    check(b.held_out in ("fixed", "all"), field_name,
          f"'best_valid' needs balancer.held_out 'fixed' or 'all' (the same rows at every checkpoint), "
          f"got {b.held_out!r}")


def _check_jobs(cfg: FusionConfig) -> Any:
    """Build every contributor's and unseen task's run config once (with a stand-in shared model) so field
    errors stop the run before any training; returns the first one (its model section drives building and
    scoring)."""
    first = None
    stand_in = cfg.run_dir / "shared"
    for i, c in enumerate(cfg.contributors):
        run = _build_job(contributor_run_data(cfg, c, 1, stand_in), f"contributor '{c.name}'")
        check(run.model.adapter != "cgc_lora", "template.model.adapter",
              "cgc_lora cannot be fused by parameter averaging (its task gate is not linear in its parameters); "
              "use none, lora or qlora")
        if first is not None:
            check(run.model.adapter == first.model.adapter, f"contributors[{i}].overrides",
                  "every contributor must use the same model.adapter (their models are averaged)")
        if cfg.contributor_selection == "best_valid":
            _check_selection(run, f"contributor_selection (contributor '{c.name}')")
        first = first or run
    for u in cfg.unseen:
        _build_job(unseen_run_data(cfg, u, stand_in, stand_in), f"unseen task '{u.name}'")
    return first


def _open_datasets(cfg: FusionConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out splits of the contributors and of the unseen tasks, by name (one tokenizer checked)."""
    from mftcoder_coba.data import PackedDataset

    opened: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    vocab = None
    for group, (field_name, entries) in enumerate((("contributors", cfg.contributors), ("unseen", cfg.unseen))):
        for i, c in enumerate(entries):
            for split, path in (("train", c.train), ("valid", c.valid)):
                check((path / "manifest.json").is_file(), f"{field_name}[{i}].{split}",
                      f"{path}: no prepared split here (manifest.json missing; run 'mftcoder-coba prep')")
            ds = PackedDataset(c.valid)
            if vocab is None:
                vocab = (ds.vocab_size, c.name)
            check(ds.vocab_size == vocab[0], f"{field_name}[{i}].valid",
                  f"prepared with a vocabulary of {ds.vocab_size} tokens, '{vocab[1]}' with {vocab[0]}: "
                  "all contributors and unseen tasks must use the same tokenizer")
            _check_same_tokenizer(ds, opened[0].get(vocab[1], ds), f"{field_name}[{i}].valid", vocab[1])
            opened[group][c.name] = ds
    seen = {t for ds in opened[0].values() for t in ds.tasks}
    for i, u in enumerate(cfg.unseen):
        shared = sorted(seen & set(opened[1][u.name].tasks))
        check(not shared, f"unseen[{i}]", f"task(s) {', '.join(shared)} are also in the pool: an unseen task "
              "must not be one the contributors train on")
    return opened


def _check_same_tokenizer(ds: Any, first: Any, field_name: str, first_name: str) -> None:
    """One tokenizer for every contributor and unseen task (the same ids mean the same tokens in every model
    averaged), checked as ``train`` checks shards against a model's own (:mod:`~mftcoder_coba.training.
    tokenizer_match`); each contributor's run still checks its shards against the shared model's tokenizer."""
    from mftcoder_coba.training.tokenizer_match import tokenizer_mismatch

    if ds is first or ds.tokenizer_dir is None or first.tokenizer_dir is None:
        return
    problem = tokenizer_mismatch(ds.tokenizer_dir, first.tokenizer_dir)
    check(problem is None, field_name, f"prepared with another tokenizer than '{first_name}' ({problem}): all "
          "contributors and unseen tasks must use the same tokenizer")


def sampled_contributors(cfg: FusionConfig, iteration: int) -> list[Contributor]:
    """The contributors of ``iteration`` (pool order): all, or ``contributors_per_iteration`` of them drawn
    without replacement by a generator seeded with (``seed``, ``iteration``) alone."""
    k = cfg.contributors_per_iteration
    if k is None or k == len(cfg.contributors):
        return list(cfg.contributors)
    drawn = np.random.default_rng([cfg.seed, iteration]).choice(len(cfg.contributors), size=k, replace=False)
    return [cfg.contributors[i] for i in sorted(drawn.tolist())]


def _train_tokens(split: Path) -> float:
    manifest = json.loads((split / "manifest.json").read_text(encoding="utf-8"))
    return float(manifest["totals"]["tokens"])


def fusion_weights(cfg: FusionConfig, contributors: list[Contributor]) -> list[float]:
    """The weights (summing to 1) of these contributors' models in the average, per ``cfg.fusion_weights``."""
    if cfg.fusion_weights == "uniform":
        return normalized_weights(None, len(contributors))
    if cfg.fusion_weights == "tokens":
        return normalized_weights([_train_tokens(c.train) for c in contributors], len(contributors))
    return normalized_weights([c.weight for c in contributors], len(contributors))


def select_checkpoint(run_dir: Path, selection: str) -> tuple[Path, int]:
    """The model folder a contributor hands in and its step: the newest checkpoint (``last``) or the one with
    the lowest mean held-out loss over the contributor's tasks on its step's ``metrics.jsonl`` line
    (``best_valid``; the earliest on ties)."""
    from mftcoder_coba.models.persist import model_dir_of
    from mftcoder_coba.training.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: the contributor's run left no complete checkpoint")
    steps = [int(p.name.split("-")[1]) for p in found]
    if selection == "last":
        return model_dir_of(run_dir, found[-1]), steps[-1]
    from mftcoder_coba.plots import read_jsonl  # the one metrics reader: path:line errors, a torn tail tolerated

    losses: dict[int, float] = {}
    for record in read_jsonl(run_dir / "metrics.jsonl", {"step": "number"}):
        values = [v for v in (record.get("valid_loss") or {}).values() if v is not None]
        if values:
            losses[int(record["step"])] = float(np.mean(values))   # a resumed run's later line wins
    missing = [s for s in steps if s not in losses]
    if missing:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no held-out loss at checkpoint step(s) {missing}; "
                        "contributor_selection 'best_valid' needs one at every checkpoint")
    best = min(steps, key=lambda s: (losses[s], s))
    return model_dir_of(run_dir, found[steps.index(best)]), best


def _base_model(cfg: FusionConfig, datasets: dict[str, Any]) -> Path:
    """The initial shared model (built and saved under ``iteration-00/model`` for a ``model_config``)."""
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
        _copy_tokenizer(first, tmp)
    logger.info("ColD Fusion base: random-init %s saved to %s", model_cfg.model_config.get("model_type"), out)
    return out


def _copy_tokenizer(dataset: Any, out: Path) -> None:
    """Make a shared model directory self-contained (exports and chat tools find the tokenizer beside it).

    Only the known tokenizer files of the prepared output's own copy, each checked against the manifest
    (:meth:`PackedDataset.tokenizer_files`), as ``train`` takes them: never whatever else lies in that folder."""
    for item in dataset.tokenizer_files():
        if not (out / item.name).exists():
            shutil.copy2(item, out / item.name)


def evaluate_model(model_dir: Path, job: Any, datasets: dict[str, Any], rows_per_task: int | None,
                   micro_batch_size: int) -> dict[str, float | None]:
    """Token-mean held-out loss per task of the model in ``model_dir`` over every given valid split
    (tasks of the same name in several splits are pooled)."""
    from mftcoder_coba.models import build_model

    model_cfg = dataclasses.replace(job.model, path=str(model_dir), model_config=None, adapter="none",
                                    gradient_checkpointing=False)
    first = next(iter(datasets.values()))
    return _losses(build_model(model_cfg, first.vocab_size, len(first.tasks)), datasets, rows_per_task,
                   micro_batch_size)


def _losses(model: Any, datasets: dict[str, Any], rows_per_task: int | None,
            micro_batch_size: int) -> dict[str, float | None]:
    import torch

    from mftcoder_coba.training.validation import evaluate_per_task

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
        logger.info("%s: training (%s)", name, config_path)
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
        logger.info("%s: training in a subprocess (log %s)", name, log_path)
        with open(log_path, "w", encoding="utf-8") as log:
            procs.append((name, log_path, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
    failed = [(name, log_path, proc.wait()) for name, log_path, proc in procs]
    failed = [(name, log_path, rc) for name, log_path, rc in failed if rc != 0]
    if failed:
        name, log_path, rc = failed[0]
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        raise UserError(f"{name} training failed (exit {rc}; log {log_path}): "
                        f"{lines[-1] if lines else 'no output'}")


def _load_records(cfg: FusionConfig) -> list[dict[str, Any]]:
    """The done iterations' records; the one whose unseen-task step is done carries its ``unseen`` results."""
    records = []
    for i in range(cfg.iterations + 1):
        path = _iteration_dir(cfg, i) / "metrics.json"
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            unseen = _iteration_dir(cfg, i) / UNSEEN_FILE
            if unseen.is_file():
                record["unseen"] = json.loads(unseen.read_text(encoding="utf-8"))
            records.append(record)
    return records


def _write_metrics(cfg: FusionConfig) -> None:
    """Rewrite fusion_metrics.jsonl and the plot from the done iterations, so both always describe exactly
    those, also after an interrupted run was continued."""
    from mftcoder_coba.plots import plot_run

    atomic_write_text(cfg.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in _load_records(cfg)))
    plot_run(cfg.run_dir)


def _finish_iteration(cfg: FusionConfig, record: dict[str, Any]) -> None:
    """Mark the iteration done (its metrics.json), then rewrite fusion_metrics.jsonl and the plot."""
    atomic_write_text(_iteration_dir(cfg, record["iteration"]) / "metrics.json", json.dumps(record, indent=2) + "\n")
    _write_metrics(cfg)
    losses = ", ".join(f"{task} {loss:.4f}" if loss is not None else f"{task} -"
                       for task, loss in record["valid_loss"].items())
    logger.info("ColD Fusion iteration %d: held-out loss %s", record["iteration"], losses)


UNSEEN_FILE = "unseen.json"
STARTS = ("base", "fused")


def _unseen_step(cfg: FusionConfig, iteration: int, starts: dict[str, Path], job: Any,
                 unseen: dict[str, Any]) -> None:
    """Fine-tune each starting point (the original base, the fused model) for ``unseen_steps`` on each unseen
    task, score the held-out loss before and after, and record it in ``iteration-NN/unseen.json``."""
    from mftcoder_coba.models import load_trained

    folder = _iteration_dir(cfg, iteration) / "unseen"
    jobs, runs = [], {}
    for u in cfg.unseen:
        (folder / u.name).mkdir(parents=True, exist_ok=True)
        for start, model in starts.items():
            run_dir = folder / u.name / start
            config_path = folder / u.name / f"{start}.yaml"
            config_path.write_text(yaml.safe_dump(unseen_run_data(cfg, u, run_dir, model), sort_keys=False),
                                   encoding="utf-8")
            label = f"unseen task '{u.name}' from the {start} model"
            jobs.append((label, config_path, folder / u.name / f"{start}.log"))
            runs[(u.name, start)] = run_dir
    logger.info("ColD Fusion: fine-tuning the base and the fused model for %d steps on %d unseen task(s)",
                cfg.unseen_steps, len(cfg.unseen))
    (_run_parallel if cfg.parallel else _run_in_turn)(jobs)
    result: dict[str, Any] = {"steps": cfg.unseen_steps, "models": {k: str(v) for k, v in starts.items()},
                              "start_loss": {s: {} for s in STARTS}, "valid_loss": {s: {} for s in STARTS}}
    for u in cfg.unseen:
        one = {u.name: unseen[u.name]}
        for start, model in starts.items():
            result["start_loss"][start].update(
                evaluate_model(model, job, one, cfg.eval_rows_per_task, cfg.eval_micro_batch_size))
            result["valid_loss"][start].update(
                _losses(load_trained(runs[(u.name, start)]), one, cfg.eval_rows_per_task, cfg.eval_micro_batch_size))
    atomic_write_text(_iteration_dir(cfg, iteration) / UNSEEN_FILE, json.dumps(result, indent=2) + "\n")
    _write_metrics(cfg)


def run_cold_fusion(cfg: FusionConfig) -> Path:
    """Run (or continue) the ColD Fusion loop of ``cfg``; returns ``cfg.run_dir``.

    The shared model after the last iteration is ``run_dir/iteration-NN/fused`` (also the ``model`` of the
    last line of ``fusion_metrics.jsonl``).
    """
    cfg.validate()
    job = _check_jobs(cfg)
    datasets, unseen = _open_datasets(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "fusion_config.yaml").write_text(yaml.safe_dump(config_io.to_dict(cfg), sort_keys=False),
                                                    encoding="utf-8")
    base_model = shared = _base_model(cfg, datasets)

    def evaluate(model_dir: Path) -> dict[str, float | None]:
        return evaluate_model(model_dir, job, datasets, cfg.eval_rows_per_task, cfg.eval_micro_batch_size)

    if not (_iteration_dir(cfg, 0) / "metrics.json").is_file():
        _finish_iteration(cfg, {"iteration": 0, "valid_loss": evaluate(shared), "model": str(shared)})
    for iteration in range(1, cfg.iterations + 1):
        folder = _iteration_dir(cfg, iteration)
        fused = folder / "fused"
        if (folder / "metrics.json").is_file():
            shared = fused
            continue
        folder.mkdir(parents=True, exist_ok=True)
        drawn = sampled_contributors(cfg, iteration)
        jobs = []
        for c in drawn:
            config_path = folder / f"{c.name}.yaml"
            data = contributor_run_data(cfg, c, iteration, shared)
            config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            jobs.append((f"contributor '{c.name}'", config_path, folder / f"{c.name}.log"))
        logger.info("ColD Fusion iteration %d/%d: %d of %d contributors (%s) fine-tune %s", iteration,
                    cfg.iterations, len(drawn), len(cfg.contributors), ", ".join(c.name for c in drawn), shared)
        (_run_parallel if cfg.parallel else _run_in_turn)(jobs)
        selected = {c.name: select_checkpoint(folder / c.name, cfg.contributor_selection) for c in drawn}
        weights = fusion_weights(cfg, drawn)
        shutil.rmtree(fused, ignore_errors=True)   # a fusion left by an interrupted iteration is redone
        base = shared if job.model.adapter != "none" else None
        average_models([path for path, _ in selected.values()], fused, weights=weights, base_dir=base)
        _copy_tokenizer(next(iter(datasets.values())), fused)
        _finish_iteration(cfg, {"iteration": iteration, "valid_loss": evaluate(fused), "model": str(fused),
                                "contributors": {name: str(path) for name, (path, _) in selected.items()},
                                "selected_step": {name: step for name, (_, step) in selected.items()},
                                "weights": {c.name: w for c, w in zip(drawn, weights)}})
        shared = fused
    last = _iteration_dir(cfg, cfg.iterations)
    if cfg.unseen and not (last / UNSEEN_FILE).is_file():
        _unseen_step(cfg, cfg.iterations, {"base": base_model, "fused": shared}, job, unseen)
    return cfg.run_dir


def format_summary(records: list[dict[str, Any]]) -> str:
    """The printed table of a ColD Fusion run: each seen task's held-out loss of the base and the last fused
    model; each unseen task's held-out loss of both before and after the ``unseen_steps`` fine-tune."""
    first, last = records[0], records[-1]
    lines = [f"{'seen task':<20}{'base':>10}{'fused (it ' + str(last['iteration']) + ')':>16}{'change':>9}"]
    for task, base in first["valid_loss"].items():
        fused = last["valid_loss"].get(task)
        change = f"{fused - base:+.3f}" if fused is not None and base is not None else "-"
        lines.append(f"{task:<20}{_number(base):>10}{_number(fused):>16}{change:>9}")
    unseen = last.get("unseen")
    if unseen:
        steps = unseen["steps"]
        header = (f"{'unseen task':<20}{'base':>10}{'fused':>10}{'base+' + str(steps):>12}"
                  f"{'fused+' + str(steps):>12}{'fused-base':>12}")
        lines += ["", header]
        for task, base_tuned in unseen["valid_loss"]["base"].items():
            fused_tuned = unseen["valid_loss"]["fused"].get(task)
            gain = (f"{fused_tuned - base_tuned:+.3f}" if fused_tuned is not None and base_tuned is not None else "-")
            lines.append(f"{task:<20}{_number(unseen['start_loss']['base'].get(task)):>10}"
                         f"{_number(unseen['start_loss']['fused'].get(task)):>10}{_number(base_tuned):>12}"
                         f"{_number(fused_tuned):>12}{gain:>12}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"
