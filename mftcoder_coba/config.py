"""The run configuration: one typed tree that drives ``mftcoder-coba train`` (YAML or JSON plus overrides).

Every field has a docstring (the string literal under it). A numeric range is declared on the field itself
(``bounded(default, ge=...)``) and enforced by :func:`mftcoder_coba.config_io.build` with a message naming the
dotted field; ``validate()`` holds the rules that involve several fields. So a bad value stops the run with one
line before any shard is read or model built.
Checks that need the data (shards present, tokenizer/model vocabulary, task names, world size) live in
:mod:`mftcoder_coba.training.preflight`, which ``train`` runs before anything expensive.

A minimal ``run.yaml``::

    run_dir: runs/demo
    data: {train: prepared/train, valid: prepared/valid}
    model: {model_config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}}
    train: {max_steps: 200, micro_batch_size: 4, global_batch_size: 16}
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mftcoder_coba import config_io
from mftcoder_coba.config_io import bounded, check
from mftcoder_coba.models import ModelConfig


@dataclass
class DataConfig:
    """Where the prepared shards are (the ``train/`` and ``valid/`` folders written by ``mftcoder-coba prep``)."""

    train: Path
    """Training split: a folder holding ``manifest.json`` and its shards."""
    valid: Path | None = None
    """Held-out split (one task per row). Required by balancers that measure held-out loss (``coba``)."""


@dataclass
class EvalConfig:
    """A prepared shard set scored in full during training (per-task token loss), apart from the balancer's
    held-out sample: the test numbers ``train.keep_best`` and ``train.early_stopping`` can follow."""

    data: Path | None = None
    """A prepared split (e.g. a test split: a folder holding ``manifest.json``); ``null`` = no evaluation.
    Prepared with the training split's tokenizer and ``seq_len``; its tasks must be training tasks (a
    subset is fine: each row is scored as the training task of the same name; the others log null)."""
    every: int = bounded(0, ge=0)
    """Optimizer steps between evaluations (0 = only after the last step). The last step is always evaluated."""
    micro_batch_size: int | None = bounded(None, ge=1)
    """Rows per evaluation forward on one rank; ``null`` = ``train.micro_batch_size``."""


METRIC_SOURCES = ("eval", "valid")
"""Where a watched metric comes from: ``eval`` = the ``eval:`` split, ``valid`` = the balancer's held-out sample."""


def check_metric(metric: str, field: str) -> None:
    """``eval.mean``, ``eval.worst``, ``eval.<task>``, ``valid.mean``, ``valid.worst`` or ``valid.<task>``
    (task names are checked against the shards by preflight)."""
    source, _, name = metric.partition(".")
    check(source in METRIC_SOURCES and bool(name), field,
          f"{metric!r} is not a metric: use eval.mean, eval.worst, eval.<task>, valid.mean, valid.worst or "
          "valid.<task> (lower is better)")


@dataclass
class EarlyStoppingConfig:
    """Stop a run whose watched metric has stopped improving."""

    metric: str
    """The metric (``eval.mean``, ``eval.worst``, ``eval.<task>``, ``valid.mean``, ``valid.worst``,
    ``valid.<task>``; lower is better), judged each time it is measured (``eval.every`` /
    ``balancer.update_interval`` steps)."""
    patience: int = bounded(3, ge=1)
    """Measurements in a row without improvement that stop the run (after a final checkpoint, exit 0)."""
    min_delta: float = bounded(0.0, ge=0)
    """An improvement is a value below the best so far by more than this."""

    def validate(self) -> None:
        check_metric(self.metric, "train.early_stopping.metric")


@dataclass
class BalancerConfig:
    """Which task balancer weights the per-task losses, and the trainer's side of feeding it."""

    name: str = "coba"
    """Balancer name, one of ``mftcoder_coba.balancers.BALANCERS`` (coba, uniform, static, lbtw, famo, ...)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of that balancer (e.g. ``history_length``, ``warmup_steps``, ``tau`` for CoBa).
    An option given as a mapping from task name to value (e.g. static ``weights``) must name exactly the
    tasks of the shards; it is passed on as a list in task-id order."""
    update_interval: int = bounded(1, ge=1)
    """Optimizer steps between held-out measurements (each one is a balancer update)."""
    held_out: Literal["rotate", "fixed", "all"] = "fixed"
    """Which held-out rows each measurement reads (stratified per task, seeded by ``train.seed``). ``fixed``:
    the same ``valid_rows_per_task`` rows of each task at every update (drawn once, kept in the checkpoint), so
    a change in the measured loss is the model's change and not the difference between samples; ``rotate``:
    the next ``valid_rows_per_task`` rows of each task, in rotation (over time every row); ``all``: every
    held-out row (for small held-out sets). L_k(0) is measured on the rows the updates read (see
    ``initial_rows_per_task``). ``fixed`` is the default because in ``benchmarks/coba_signal`` it moved CoBa's
    weights 1.8-3.6x less per update than ``rotate`` at the same test loss (within a fifth of the
    seed-to-seed spread); give it enough rows per task to stand for the task."""
    valid_rows_per_task: int = bounded(1, ge=1)
    """Held-out rows per task in each measurement (``rotate`` and ``fixed``; ``all`` reads every row)."""
    initial_rows_per_task: int | None = bounded(None, ge=1)
    """``rotate`` only: held-out rows per task for the reference losses L_k(0) before step 1, the first ones of
    each task's rotation order; ``null`` = all of them (the mean the rotation samples). ``fixed`` and ``all``
    measure L_k(0) on exactly the rows of their updates, so setting it with them is refused."""

    def validate(self) -> None:
        check(self.initial_rows_per_task is None or self.held_out == "rotate", "balancer.initial_rows_per_task",
              f"applies to balancer.held_out=rotate only; with {self.held_out!r} L_k(0) is measured on the "
              f"rows of the updates (set it to null)")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warm-up, then a decay to a floor, or none)."""

    lr: float = bounded(1e-4, gt=0)
    """Peak learning rate, reached at the end of warm-up."""
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    """AdamW (beta1, beta2)."""
    eps: float = bounded(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = bounded(0.1, ge=0)
    """Decoupled weight decay."""
    warmup_steps: int = bounded(0, ge=0)
    """Optimizer steps of linear warm-up from lr/warmup_steps to lr."""
    warmup_ratio: float = bounded(0.0, ge=0, lt=1)
    """Warm-up as a fraction of ``train.max_steps`` (rounded to whole steps), instead of ``warmup_steps``."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """After warm-up: ``cosine`` or ``linear`` decay from lr to min_lr_ratio * lr at max_steps; ``wsd``
    (warmup-stable-decay): constant lr, then a linear decay to min_lr_ratio * lr over the last ``decay_ratio``
    of the steps; ``constant``: lr throughout."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Floor of the decaying schedules as a fraction of lr."""
    decay_ratio: float = bounded(0.1, gt=0, le=1)
    """``wsd`` only: the fraction of ``train.max_steps`` at the end over which the LR decays."""
    max_grad_norm: float = bounded(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    master_weights: Literal["fp32", "bf16"] = "fp32"
    """Precision of the optimizer's own copy of the weights, of its gradients and of Adam's moments when
    ``model.dtype`` is bf16. ``fp32``: DeepSpeed's usual mixed precision (12 bytes per parameter beyond the bf16
    weights and gradients). ``bf16``: DeepSpeed's ``bf16_master_weights_and_grads`` + ``bf16_optimizer_states``
    (6 bytes per parameter; ZeRO stage 1-3 only): 7 GB less for a 1.2B model; see ``stochastic_rounding``."""
    stochastic_rounding: bool = True
    """With ``master_weights: bf16``: update with this project's AdamW that rounds weights and moments
    stochastically (``training/bf16_adamw.py``), so updates below a bf16 weight's rounding step survive in
    expectation. ``false``: PyTorch's AdamW, rounding to nearest, which drops them. Ignored with fp32 masters."""
    fused: bool | Literal["auto"] = "auto"
    """torch.optim.AdamW(fused=True) (CUDA only); ``auto`` = on CUDA. The optimizer is PyTorch's AdamW passed
    through DeepSpeed (``torch_adam``, so no DeepSpeed C++ optimizer op is compiled), or with bf16 masters and
    stochastic rounding this project's own, which this setting does not affect."""

    def validate(self) -> None:
        check(self.warmup_steps == 0 or self.warmup_ratio == 0, "optim.warmup_ratio",
              f"set either warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both")

    def warmup(self, max_steps: int) -> int:
        """Warm-up steps of a run of ``max_steps``: ``warmup_steps``, or ``warmup_ratio`` of the run rounded."""
        return self.warmup_steps or round(self.warmup_ratio * max_steps)


@dataclass
class TrainConfig:
    """Steps, batch shape, DeepSpeed engine, checkpoints and logging."""

    max_steps: int = bounded(100, ge=1)
    """Optimizer steps to train (a resumed run continues up to this number)."""
    num_epochs: float | None = bounded(None, gt=0)
    """Passes over the training rows instead of ``max_steps``: ``max_steps = ceil(num_epochs x rows /
    global_batch_size)``, decided when the run starts (the rows are counted then) and recorded in config.yaml."""
    micro_batch_size: int = bounded(1, ge=1)
    """Rows per forward/backward on one rank."""
    global_batch_size: int = 8
    """Rows per optimizer step over all ranks and accumulation steps; must be a multiple of
    micro_batch_size x world size (the quotient is the number of gradient-accumulation steps)."""
    zero_stage: int | None = bounded(None, ge=0, le=3)
    """DeepSpeed ZeRO stage 0-3; ``null`` = the stage in ``deepspeed_config``, or 0 without one."""
    deepspeed_config: Path | None = None
    """A DeepSpeed JSON for engine details (bucket sizes, overlap, offload): a path, or the name of one that
    ships with the package, ``zero0`` ... ``zero3`` (``mftcoder_coba/ds_configs/``, found from any folder).
    The batch sizes, gradient clipping, bf16, optimizer and scheduler always come from this RunConfig."""
    seed: int = 0
    """Seed of the data order and of python/numpy/torch RNGs."""
    save_every: int = bounded(500, ge=0)
    """Write a checkpoint every this many steps (0 = only at the end, if ``save_final``). The default bounds what
    a crash loses to 500 steps; ``keep_last`` bounds the disk they take."""
    save_every_minutes: float = bounded(0.0, ge=0)
    """Also write a checkpoint when this many minutes of wall-clock time have passed since the last one (or the
    start), decided at a step boundary by all ranks together (0 = off). Bounds the work a crash can lose when
    step times vary or are unknown in advance."""
    save_final: bool = True
    """Write a checkpoint after the last step (off only for throughput benchmarks, where a 1B model's
    optimizer state would cost minutes of disk writes and nothing is kept)."""
    keep_last: int = bounded(2, ge=1)
    """Keep this many newest checkpoints; older ones are deleted after a new one is complete."""
    log_every: int = bounded(10, ge=1)
    """Steps between log lines (metrics.jsonl and TensorBoard get every step)."""
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision in which a bf16 model's gradients are summed over micro-batches. ``auto``: fp32 with ZeRO 1-3
    and fp32 master weights, else bf16 (DeepSpeed 0.19 has no fp32 accumulation for bf16 models at ZeRO-0, and
    bf16 masters keep bf16 gradients). fp32 keeps the sum of many micro-batches exact to fp32 and costs 2 bytes
    per parameter (summed into the fp32 copy as backward produces each gradient); bf16 rounds after every
    micro-batch. On one GPU ZeRO-1 partitions nothing, so ``zero_stage: 1`` is the way to fp32 accumulation
    there. Ignored for fp32 models."""
    fused_linear_ce: bool | Literal["auto"] = "auto"
    """Compute the loss from the last hidden state and the LM head weight without materialising logits.
    ``auto`` = on unless ZeRO-3 partitions the LM head weight (then the head module runs and the per-task
    kernel reads its logits)."""
    check_model_loss: bool = True
    """Before the first step, compare this project's loss with the model's own ``forward(labels=...)`` loss on a
    probe row and refuse the run when they differ beyond rounding (``training.loss_guard``): a logit transform
    or loss term of the model's forward that training would drop. ``false`` trains anyway."""
    kernel_impl: Literal["auto", "triton", "torch"] = "auto"
    """Implementation of the per-task loss kernels (``auto``: Triton on CUDA, PyTorch otherwise)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = None
    """Trackers that get every metrics.jsonl scalar (rank 0): ``tensorboard`` (run_dir/tensorboard), ``wandb``
    (offline unless ``WANDB_MODE`` says otherwise, files under run_dir/wandb), ``mlflow`` (a local SQLite store,
    run_dir/mlflow.db, unless ``MLFLOW_TRACKING_URI`` is set). ``null`` = ``[tensorboard]`` (``[]`` with
    ``tensorboard: false``). W&B and MLflow also get the run config; a resumed run continues their run."""
    tensorboard: bool | None = None
    """The older switch for TensorBoard: ``false`` = no TensorBoard (``report_to`` then defaults to ``[]``).
    Prefer ``report_to``; giving both is refused when they disagree."""
    keep_best: str | None = None
    """Keep the checkpoint with the lowest value of this metric (``eval.mean``, ``eval.worst``, ``eval.<task>``,
    ``valid.mean``, ``valid.worst``, ``valid.<task>``) besides the ``keep_last`` newest, never pruned while it
    is the best. A checkpoint is written at every step where a new best is measured (so the best is a
    checkpoint of the exact step it was measured at); ``checkpoints/best.json`` names it, ``export --best``
    exports it. Step-0 measurements (the untrained model) do not count."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when a metric has not improved for ``patience`` measurements (``null`` = never)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """What a non-finite training loss or gradient norm does. ``stop``: the run ends at once with one line
    naming the step and the tasks whose losses were non-finite (``TrainingDiverged``, exit status 2), before
    the optimizer applies that step, and no checkpoint is written for it. ``skip``: the step is not applied
    (neither the optimizer nor the LR schedule move; the batch is consumed and the step counted), metrics
    count it as ``skipped_steps``, and the run stops anyway after ``max_skipped_steps`` consecutive skips."""
    max_skipped_steps: int = bounded(10, ge=1)
    """With ``nonfinite: skip``: this many consecutive skipped steps stop the run (a diverged model does
    not recover by skipping)."""
    cpu_threads: int | Literal["auto"] = bounded("auto", ge=1)
    """PyTorch intra-op threads per rank on CPU. ``auto``: the cores this process may run on
    (``os.sched_getaffinity``) divided by the ranks on this host (``LOCAL_WORLD_SIZE``), at least 1, unless
    ``OMP_NUM_THREADS`` is set, which then wins. PyTorch's own default (every core of the host) oversubscribes
    a shared or multi-rank machine: single-process CPU training ran ~30x slower than with one thread on a busy
    host. Ignored on GPU."""

    def validate(self) -> None:
        if self.deepspeed_config is not None:
            self.deepspeed_config = deepspeed_config_path(self.deepspeed_config)
        check(self.global_batch_size % self.micro_batch_size == 0 and self.global_batch_size > 0,
              "train.global_batch_size",
              f"{self.global_batch_size} is not a positive multiple of train.micro_batch_size={self.micro_batch_size}")
        check(self.deepspeed_config is None or self.deepspeed_config.is_file(), "train.deepspeed_config",
              f"file not found: {self.deepspeed_config}")
        if self.report_to is not None:
            check(len(set(self.report_to)) == len(self.report_to), "train.report_to",
                  f"names a tracker twice: {self.report_to}")
            check(self.tensorboard is None or self.tensorboard == ("tensorboard" in self.report_to),
                  "train.tensorboard", f"{self.tensorboard} disagrees with train.report_to {self.report_to}; "
                  "drop train.tensorboard (report_to decides)")
        if self.keep_best is not None:
            check_metric(self.keep_best, "train.keep_best")

    @property
    def trackers(self) -> list[str]:
        """The trackers to write to: ``report_to``, or its default from ``tensorboard``."""
        if self.report_to is not None:
            return list(self.report_to)
        return [] if self.tensorboard is False else ["tensorboard"]


DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"
"""The DeepSpeed configs that ship with the package, named by stem (``zero2`` -> ``zero2.json``)."""


def deepspeed_config_path(value: Path) -> Path:
    """``train.deepspeed_config`` as an absolute path: a packaged config's name (``zero2``) maps to its file, so
    the README's ``deepspeed_config: zero2`` works outside a checkout; anything else is a path from the current
    directory."""
    packaged = DS_CONFIGS / f"{value}.json"
    if value.parent == Path(".") and not value.suffix and packaged.is_file():
        return packaged
    return value.absolute()


@dataclass
class RunConfig:
    """One training run: data, model, balancer, optimizer and loop settings, and where it all goes."""

    run_dir: Path
    """Output folder: config.yaml, tokenizer/, metrics.jsonl, tensorboard/, checkpoints/ (see the README)."""
    data: DataConfig
    """Prepared shards."""
    model: ModelConfig
    """The model (``mftcoder_coba.models.ModelConfig``): a local HF directory or a config for random init."""
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    """Task weighting."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, engine, checkpoint and logging settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """A split scored in full during training (off unless ``eval.data`` is set)."""

    def validate(self) -> None:
        self._make_paths_absolute()
        for field_name, metric in (("train.keep_best", self.train.keep_best),
                                   ("train.early_stopping.metric",
                                    self.train.early_stopping.metric if self.train.early_stopping else None)):
            if metric is None:
                continue
            check(not metric.startswith("eval.") or self.eval.data is not None, field_name,
                  f"{metric!r} needs an eval split: set eval.data")
            check(not metric.startswith("valid.") or self.data.valid is not None, field_name,
                  f"{metric!r} needs the held-out split: set data.valid")


    def _make_paths_absolute(self) -> None:
        """Every input and output path, relative to the current directory as typed, made absolute here: the run's
        config.yaml then names the files that were used, and export, eval and resume of the run work from any
        folder (a relative ``model.path`` was later looked up from wherever the user happened to be)."""
        self.run_dir = self.run_dir.absolute()
        self.data.train = self.data.train.absolute()
        if self.data.valid is not None:
            self.data.valid = self.data.valid.absolute()
        if self.eval.data is not None:
            self.eval.data = self.eval.data.absolute()
        if self.model.path is not None:
            self.model.path = os.path.abspath(self.model.path)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML/JSON), apply ``a.b=value`` overrides, build and validate the typed tree.

    Relative paths in the file are taken relative to the current directory, as a user types them, and made
    absolute (:meth:`RunConfig.validate`).
    """
    data = config_io.apply_overrides(config_io.load_mapping(path), list(overrides or []))
    return config_io.build(RunConfig, data)

