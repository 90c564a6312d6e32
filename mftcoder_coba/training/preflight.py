"""Every check a run can fail on because of its config, done before the process group, model or engine exist.

Order matters only for the message the user sees first: shards (their checksums too, see
:mod:`~mftcoder_coba.training.verified`), then balancer (and held-out rows for every task it measures), then
the ``eval:`` split and the metrics ``keep_best`` / ``early_stopping`` watch, then the trackers' packages,
then model/vocabulary, then batch shape against the world size, then the resume request (its checkpoint must
hold the same tasks). Each failure is one ``ConfigError`` line naming the field.

The eval split must come from the same tokenizer (vocabulary size and, where both manifests record them, the
tokenizer files' hashes) and ``seq_len`` as the training split, and its tasks must be training tasks; a subset
is allowed (a test set of some tasks), since each row is scored as the training task of its name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mftcoder_coba.balancers import Balancer, build_balancer
from mftcoder_coba.config import RunConfig
from mftcoder_coba.config_io import check
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models import check_model
from mftcoder_coba.models.config import concrete_dtype
from mftcoder_coba.training import checkpoint, ds_config, resume_policy, trackers, verified
from mftcoder_coba.training.best import check_metric_tasks
from mftcoder_coba.training.eval_split import EvalSplit
from mftcoder_coba.training.resolved import Resolved, resolve
from mftcoder_coba.training.tokenizer_match import check_run_tokenizer


@dataclass
class Plan:
    """What the checks established: the opened splits, the balancer, the resolved ``auto`` settings (the ZeRO
    stage among them), where to resume, and the verified tokenizer files to copy into the run."""

    train: PackedDataset
    valid: PackedDataset | None
    balancer: Balancer
    resolved: Resolved
    resume_from: Path | None
    tokenizer_files: list[Path]
    eval: EvalSplit | None = None

    @property
    def zero_stage(self) -> int:
        return self.resolved.zero_stage


def _open_split(path: Path, field: str) -> PackedDataset:
    check((path / "manifest.json").is_file(), field,
          f"{path}: no prepared split here (manifest.json missing; run 'mftcoder-coba prep')")
    try:
        dataset = PackedDataset(path)
        verified.verify_split(dataset)
        return dataset
    except UserError as exc:
        raise ConfigError(f"config field '{field}': {exc}") from None


def balancer_options(options: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Options with every task-keyed mapping turned into a list in task-id order (names checked)."""
    resolved = {}
    for key, value in options.items():
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(tasks))
            missing = [t for t in tasks if t not in value]
            check(not unknown, f"balancer.options.{key}",
                  f"task(s) {', '.join(unknown)} not in the shards (tasks: {', '.join(tasks)})")
            check(not missing, f"balancer.options.{key}",
                  f"no entry for task(s) {', '.join(missing)} of the shards")
            value = [value[t] for t in tasks]
        resolved[key] = value
    return resolved


def run(cfg: RunConfig, world_size: int, resume: str | None, on_cuda: bool | None = None) -> Plan:
    """All checks; returns the :class:`Plan` the trainer starts from. ``on_cuda``: whether the run trains on
    a GPU (default: CUDA is available, as :func:`distributed.world_from_env` decides)."""
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    cfg.model.dtype = concrete_dtype(cfg.model.dtype, on_cuda)  # config.yaml then records what the run used
    check(cfg.model.dtype != "fp16" or on_cuda, "model.dtype",
          "'fp16' needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); use fp32 on CPU")
    train = _open_split(cfg.data.train, "data.train")
    try:
        tokenizer_files = train.tokenizer_files()
    except UserError as exc:
        raise ConfigError(f"config field 'data.train': {exc}") from None
    balancer = build_balancer(cfg.balancer.name, len(train.tasks), balancer_options(cfg.balancer.options, train.tasks))
    valid = None
    if cfg.data.valid is not None:
        valid = _open_split(cfg.data.valid, "data.valid")
        check(valid.tasks == train.tasks, "data.valid",
              f"tasks {valid.tasks} differ from the training split's {train.tasks}")
        check(valid.vocab_size == train.vocab_size and valid.seq_len == train.seq_len, "data.valid",
              "was prepared with another tokenizer or sequence length than data.train")
    check(valid is not None or not balancer.needs.validation, "data.valid",
          f"balancer '{cfg.balancer.name}' measures held-out loss: set data.valid to the prepared valid/ split")
    if balancer.needs.validation:
        # A task without held-out rows has no measured loss: CoBa gave such a task the largest weight (0.88).
        unmeasured = [task for task in valid.tasks if valid.task_rows(task).size == 0]
        check(not unmeasured, "data.valid",
              f"task(s) {', '.join(unmeasured)} have no held-out rows, so balancer '{cfg.balancer.name}' cannot "
              "measure them; prepare the data again holding records out of every task (prep "
              "--valid-samples-per-task N, or a --valid-fraction that leaves each task at least one record)")
    eval_split = _eval_split(cfg, train)
    _check_watched_metrics(cfg, train.tasks, eval_split)
    for name in cfg.train.trackers:
        missing = trackers.missing_package(name)
        check(missing is None, "train.report_to",
              f"{name!r} needs the {missing} package, which is not installed: pip install 'mftcoder-coba[{name}]' "
              f"(or drop {name} from train.report_to)")
    check_model(cfg.model, train.vocab_size, train.seq_len)
    check_run_tokenizer(cfg.model, train.tokenizer_dir)
    if cfg.model.adapter == "cgc_lora":  # the clusters name the shards' tasks; the rank budget covers their experts
        cgc = cfg.model.cgc_lora
        cgc.expert_ranks(len(cgc.cluster_layout(train.tasks)[1]))
    stage = ds_config.zero_stage(cfg)
    check(not (balancer.needs.grad_norms and stage == 3), "balancer.name",
          f"'{cfg.balancer.name}' needs per-task gradients of the LM head, which ZeRO-3 partitions; "
          "use zero_stage <= 2")
    check(not (cfg.model.compile and stage == 3), "model.compile",
          "not supported with ZeRO-3 (its parameter gathering hooks run inside each compiled layer); "
          "use zero_stage <= 2")
    check(cfg.optim.master_weights == "fp32" or (cfg.model.dtype == "bf16" and stage in (1, 2, 3)),
          "optim.master_weights", "'bf16' needs model.dtype 'bf16' and ZeRO stage 1, 2 or 3 (DeepSpeed's rule)")
    if cfg.model.dtype == "bf16" and cfg.train.grad_accum_dtype == "fp32":
        check(cfg.optim.master_weights == "fp32", "train.grad_accum_dtype",
              "'fp32' cannot go with optim.master_weights 'bf16' (bf16 masters keep bf16 gradients)")
        check(stage >= 1, "train.grad_accum_dtype", "'fp32' needs ZeRO stage 1-3 for a bf16 model (DeepSpeed 0.19); "
              "on one GPU zero_stage 1 partitions nothing")
    t = cfg.train
    check(t.global_batch_size % (t.micro_batch_size * world_size) == 0, "train.global_batch_size",
          f"{t.global_batch_size} rows do not split over {world_size} ranks x micro_batch_size {t.micro_batch_size}")
    check(len(train) >= t.global_batch_size, "train.global_batch_size",
          f"{t.global_batch_size} is more than the {len(train)} training rows")
    if t.num_epochs is not None:  # config.yaml then records the steps the epochs came to
        t.max_steps = max(1, math.ceil(t.num_epochs * len(train) / t.global_batch_size))
    resume_from = checkpoint.resolve_resume(cfg.run_dir, resume)
    if resume_from is not None:
        resume_policy.check(cfg, resume_from)
        saved = checkpoint.read_trainer_state(resume_from)
        check(saved.get("tasks") == train.tasks, "data.train",
              f"tasks {train.tasks} differ from those of checkpoint {resume_from} ({saved.get('tasks')})")
    return Plan(train=train, valid=valid, balancer=balancer, resolved=resolve(cfg, stage, on_cuda),
                resume_from=resume_from,
                tokenizer_files=tokenizer_files, eval=eval_split)


def _eval_split(cfg: RunConfig, train: PackedDataset) -> EvalSplit | None:
    if cfg.eval.data is None:
        return None
    split = _open_split(cfg.eval.data, "eval.data")
    check(split.vocab_size == train.vocab_size and split.seq_len == train.seq_len, "eval.data",
          f"{cfg.eval.data} was prepared with another tokenizer or sequence length than data.train "
          f"(vocab {split.vocab_size} vs {train.vocab_size}, seq_len {split.seq_len} vs {train.seq_len})")
    ours, theirs = split.manifest["tokenizer"].get("files"), train.manifest["tokenizer"].get("files")
    check(not (isinstance(ours, dict) and isinstance(theirs, dict)) or ours == theirs, "eval.data",
          f"{cfg.eval.data} was prepared with other tokenizer files than data.train (their sha256 differ)")
    unknown = [task for task in split.tasks if task not in train.tasks]
    check(not unknown, "eval.data", f"task(s) {', '.join(unknown)} of {cfg.eval.data} are not training tasks "
          f"({', '.join(train.tasks)}); the model has no task id for them")
    check(len(split) > 0, "eval.data", f"{cfg.eval.data} holds no rows")
    return EvalSplit(split, train.tasks)


def _check_watched_metrics(cfg: RunConfig, tasks: list[str], eval_split: EvalSplit | None) -> None:
    """``train.keep_best`` and ``train.early_stopping.metric`` name tasks that their split measures."""
    watched = [("train.keep_best", cfg.train.keep_best)]
    if cfg.train.early_stopping is not None:
        watched.append(("train.early_stopping.metric", cfg.train.early_stopping.metric))
    for field, metric in watched:
        if metric is None:
            continue
        problem = check_metric_tasks(metric, field, tasks)
        if problem is not None:
            raise ConfigError(problem)
        source, _, name = metric.partition(".")
        if source == "eval" and name not in ("mean", "worst"):
            check(name in eval_split.dataset.tasks and eval_split.dataset.task_rows(name).size > 0, field,
                  f"{metric!r}: {cfg.eval.data} has no rows of task {name!r}")
