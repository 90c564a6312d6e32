"""``train(cfg, resume)``: multitask fine-tuning with a DeepSpeed engine and a task balancer.

The trainer composes; the pieces hold the algorithms. One optimizer step ``s``:

1. the step's global batch (``sampling.GlobalBatches``), this rank's slice in micro-batches;
2. per-task loss-token counts of all its micro-batches, all-reduced once; with the balancer's current
   weights they give each task's per-token coefficient (``objective.task_scale``), the engine's own
   averaging over accumulation steps and ranks undone, so the summed gradient is exactly that of the spec's L;
3. forward + ``engine.backward`` per micro-batch (fused linear + per-task CE kernel), then ``engine.step``
   (clipping, AdamW, LR schedule);
4. per-task training sums all-reduced -> train losses; the held-out sample measured every ``update_interval``
   steps; the balancer fed by :mod:`mftcoder_coba.balancers.feeding` (the one protocol ``simulate`` uses too),
   which asks for the post-step re-evaluation and head gradient norms only when its ``Needs`` do;
5. the ``eval:`` split scored in full every ``eval.every`` steps and after the last (:mod:`eval_split`); the
   watched metrics of ``train.keep_best`` and ``train.early_stopping`` judged (:mod:`best`);
6. metrics line (and trackers, :mod:`trackers`), checkpoint every ``save_every`` steps, at every new best, at
   the end and when early stopping ends the run: :mod:`checkpoint` collects the state of each component
   (data position, balancer, held-out sample, watched metrics, RNGs); the trainer keeps only its counters.

Before the first step: every check of :mod:`preflight` (shard checksums included), then rank 0 locks the run
directory (:mod:`run_lock`) before writing anything in it. Non-finite losses, gradient norms and weights stop
the run or skip the step as ``train.nonfinite`` says (:mod:`divergence`). On CPU the intra-op thread count
per rank is chosen by :mod:`threads`. After each step all ranks agree whether a stop signal arrived or
``train.save_every_minutes`` have passed (:mod:`preemption`): a checkpoint, and for a signal the end of the run.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from mftcoder_coba import config_io
from mftcoder_coba.atomic import atomic_write_text, mark_output
from mftcoder_coba.balancers.feeding import StepObservations, feed_reference, feed_step, is_update
from mftcoder_coba.config import RunConfig
from mftcoder_coba.models import build_model, save_base_model
from mftcoder_coba.training import (
    checkpoint,
    distributed,
    divergence,
    ds_config,
    preemption,
    preflight,
    run_lock,
    threads,
)
from mftcoder_coba.training.best import MetricWatch, metric_value, write_best
from mftcoder_coba.training.checkpoint import Components
from mftcoder_coba.training.divergence import TrainingDiverged
from mftcoder_coba.training.head_grads import HeadGradNorms
from mftcoder_coba.training.loss_guard import check_own_loss
from mftcoder_coba.training.metrics import MetricsLog, flops_per_token, measurement_line, peak_flops, step_line
from mftcoder_coba.training.objective import (
    TaskLoss,
    accumulate_gradients,
    loss_token_counts,
    objective_value,
    per_task_mean,
)
from mftcoder_coba.training.rng import ProcessRNG
from mftcoder_coba.training.sampling import GlobalBatches, HeldOutSample
from mftcoder_coba.training.trackers import open_trackers
from mftcoder_coba.training.validation import evaluate_per_task

log = logging.getLogger(__name__)


def _prepare_run_dir(cfg: RunConfig, plan: preflight.Plan) -> None:
    """The run marker, config.yaml, resolved.yaml (what the ``auto`` settings became), the shards' tokenizer, no
    stale partial checkpoints (rank 0, lock held).

    Only the known tokenizer files of the prepared output's own copy are taken, checked against the manifest
    by preflight (:meth:`PackedDataset.tokenizer_files`), never a folder the manifest names."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    mark_output(cfg.run_dir, "run")
    text = yaml.safe_dump(config_io.to_dict(cfg), sort_keys=False)
    (cfg.run_dir / "config.yaml").write_text(text, encoding="utf-8")
    atomic_write_text(cfg.run_dir / "resolved.yaml", yaml.safe_dump(plan.resolved.to_dict(), sort_keys=False))
    if plan.tokenizer_files:
        (cfg.run_dir / "tokenizer").mkdir(exist_ok=True)
        for file in plan.tokenizer_files:
            shutil.copyfile(file, cfg.run_dir / "tokenizer" / file.name)
    checkpoint.remove_partial(cfg.run_dir)


def train(cfg: RunConfig, resume: str | None = None) -> Path:
    """Train ``cfg`` to ``train.max_steps``; return the run directory.

    ``resume``: ``None`` (a fresh run; refused if run_dir already has checkpoints), ``"auto"`` (continue
    from the newest complete checkpoint, or start fresh if there is none) or a checkpoint path. Works in a
    plain process (world size 1, process group created here) and under torchrun / the deepspeed launcher;
    may be called repeatedly in one process. Another run holding ``run_dir`` is refused (:mod:`run_lock`).
    """
    launched = distributed.world_from_env()
    if resume is None and distributed.restart_count() > 0:  # torchrun restarted the workers after a failure
        log.info("restart %d of the worker group: resuming from the newest verified checkpoint (--resume auto)",
                 distributed.restart_count())
        resume = "auto"
    with contextlib.ExitStack() as held:
        signals = held.enter_context(preemption.StopSignals())  # a stop request from here on is not lost
        plan = preflight.run(cfg, launched.size, resume, on_cuda=launched.device.type == "cuda")
        held.callback(torch.set_num_threads, torch.get_num_threads())
        if launched.is_main:
            held.callback(run_lock.acquire(cfg.run_dir).release)
        return _train_locked(cfg, plan, signals)


def _train_locked(cfg: RunConfig, plan: preflight.Plan, signals: preemption.StopSignals) -> Path:
    world = distributed.init()
    resolved = plan.resolved
    if resolved.cpu_threads is not None:
        torch.set_num_threads(resolved.cpu_threads)
    if world.is_main:
        log.info(resolved.line())
        if resolved.cpu_threads is not None:
            log.info(threads.CpuThreads(resolved.cpu_threads, resolved.cpu_threads_from or "").describe())
        _prepare_run_dir(cfg, plan)
    distributed.barrier(world)
    ProcessRNG().seed(cfg.train.seed)
    num_tasks = len(plan.train.tasks)
    model = build_model(cfg.model, plan.train.vocab_size, num_tasks, plan.train.tasks, attention=resolved.attention)
    if cfg.train.check_model_loss:
        check_own_loss(model, fused_linear=resolved.fused_linear_ce, impl=resolved.kernel_impl,
                       override="train.check_model_loss: false")
    if world.is_main and cfg.model.adapter != "none" and cfg.model.path is None \
            and not (cfg.run_dir / "base_model" / "config.json").is_file():
        save_base_model(model, cfg.run_dir / "base_model")
    trainer = _Trainer(cfg, plan, world, model, signals)
    try:
        trainer.run()
    finally:
        trainer.close()
    return cfg.run_dir


class _Trainer:
    """The state of one run between steps (engine, balancer, data position, metrics)."""

    def __init__(self, cfg: RunConfig, plan: preflight.Plan, world: distributed.World,
                 model: torch.nn.Module, signals: preemption.StopSignals) -> None:
        self.cfg, self.plan, self.world = cfg, plan, world
        self.boundary = preemption.StepBoundary(signals, cfg.train.save_every_minutes)
        self.balancer = plan.balancer
        self.tasks = plan.train.tasks
        self.num_tasks = len(self.tasks)
        self.impl = plan.resolved.kernel_impl
        self.engine, self.scheduler = ds_config.initialize(
            cfg, TaskLoss(model, fused_linear=plan.resolved.fused_linear_ce, impl=self.impl),
            world.size, on_cuda=world.device.type == "cuda", resolved=plan.resolved)
        self.model = self.engine.module.module
        self.step = 0
        self.skipped_steps = self.consecutive_skips = 0  # train.nonfinite: skip
        b = cfg.balancer
        self.held_out = (HeldOutSample(plan.valid, cfg.train.seed, b.held_out, b.valid_rows_per_task,
                                       b.initial_rows_per_task) if plan.valid is not None else None)
        self.update_weights = self.balancer.weights()  # after the latest update: its L1 change is logged
        t = cfg.train
        self.keep_best = MetricWatch(t.keep_best) if t.keep_best else None
        self.early = MetricWatch(t.early_stopping.metric, t.early_stopping.min_delta) if t.early_stopping else None
        self.new_best = False  # this step measured a new best of train.keep_best
        self.stop_reason: str | None = None  # set when train.early_stopping ends the run
        self.batches = GlobalBatches(plan.train, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                     world.rank, world.size, cfg.train.seed)
        tracker_ids = None
        if plan.resume_from is not None:
            state = checkpoint.load(self.engine, plan.resume_from, world, self._components())
            self.step = int(state["step"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            self.update_weights = np.array(state.get("update_weights") or self.balancer.weights(), dtype=np.float64)
            self._after_resume()
            tracker_ids = state.get("trackers")
            log.info("resumed from %s (step %d)", plan.resume_from, self.step)
        self.head_grads = (HeadGradNorms(self.model, self.num_tasks, self.impl)
                           if self.balancer.needs.grad_norms else None)
        resume_step = self.step if plan.resume_from is not None else None
        others = [name for name in t.trackers if name != "tensorboard"]
        self.metrics = MetricsLog(cfg.run_dir, self.tasks, enabled=world.is_main,
                                  tensorboard="tensorboard" in t.trackers, resume_step=resume_step,
                                  trackers=open_trackers(others, cfg.run_dir, config_io.to_dict(cfg), tracker_ids,
                                                         resume_step) if world.is_main else None)
        peak = peak_flops(world.device)
        self.flops_per_token = flops_per_token(self.model, plan.train.seq_len) if peak else None
        self.peak = peak

    def _components(self) -> Components:
        """What a checkpoint carries besides the engine, the RNGs and the trainer's counters, by its name in
        trainer_state.json (the names are the format: checkpoints of older versions use them too)."""
        return {"data_position": self.batches, "balancer": self.balancer, "held_out": self.held_out,
                "keep_best": self.keep_best, "early_stopping": self.early}

    def _counters(self) -> dict:
        """The trainer's own part of trainer_state.json (``world_size`` and ``tasks`` are for readers)."""
        return {
            "update_weights": self.update_weights.tolist(),
            "world_size": self.world.size,
            "tasks": self.tasks,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "early_stopped": self.stop_reason,
            "trackers": {tracker.name: tracker.run_id for tracker in self.metrics.trackers if tracker.run_id},
        }

    def _after_resume(self) -> None:
        """``best.json`` naming the best checkpoint again (a run killed between publishing it and the record),
        and whether the restored early-stopping watch has already ended the run."""
        if self.keep_best is not None:
            best = self.keep_best.best_step
            if best is not None and self.world.is_main:
                path = checkpoint.checkpoints_dir(self.cfg.run_dir) / f"step-{best:08d}"
                if path.is_dir():
                    write_best(self.cfg.run_dir, self.keep_best, path)
                else:
                    log.warning("the best checkpoint %s (train.keep_best) is gone; the next best measured replaces it",
                                path)
        if self.early is not None:
            self.stop_reason = self._stop_reason()

    # --- measurements -------------------------------------------------------------------------------
    def _held_out_losses(self, rows: np.ndarray) -> np.ndarray:
        sums, counts = evaluate_per_task(self.model, self.plan.valid, rows, self.cfg.train.micro_batch_size,
                                         impl=self.impl)
        return per_task_mean(sums, counts)

    def _initial_reference(self) -> None:
        """Held-out losses before step 1 (the step-0 metrics line): L_k(0) for balancers that read them.

        Measured whenever there is a held-out split, so runs of every balancer have comparable curves."""
        valid = None
        if self.held_out is not None:
            valid = self._held_out_losses(self.held_out.initial())
        feed_reference(self.balancer, lambda: valid)
        self.update_weights = self.balancer.weights()
        measured = measurement_line(self.metrics.write(0, weights=self.balancer.weights(), valid_loss=valid))
        if self.world.is_main and measured is not None:
            log.info("%s", measured)

    # --- one optimizer step -------------------------------------------------------------------------
    def _train_step(self) -> None:
        start = time.perf_counter()
        step = self.step + 1
        global_rows = self.batches.next_global_batch()
        micro = [self.plan.train.rows(rows) for rows in self.batches.micro_batches(global_rows)]
        counts = distributed.all_reduce_sum(loss_token_counts(micro, self.num_tasks), self.world)
        weights = self.balancer.weights()
        on_hidden = (lambda hidden, batch: self.head_grads.add(hidden, batch, counts)) if self.head_grads else None
        sums = accumulate_gradients(self.engine, micro, weights, counts, self.world.device, on_hidden=on_hidden)
        sums = distributed.all_reduce_sum(sums, self.world)  # before the step: every rank judges the same losses
        grad_norm = self._local_grad_norm()
        lr = float(self.scheduler.get_last_lr()[0])
        problem = divergence.step_problem(sums, counts, grad_norm, self.tasks)
        if problem is not None:
            self._non_finite(step, problem)  # raises unless the step is to be skipped
        with divergence.update_disabled(self.engine) if problem else contextlib.nullcontext():
            self.engine.step()
        engine_norm = self.engine.get_global_grad_norm()
        if engine_norm is not None:
            grad_norm = float(engine_norm)
        if problem is None:  # DeepSpeed's own norm (ZeRO 1-3, bf16); a non-finite one it did not apply
            problem = divergence.step_problem(sums, counts, grad_norm, self.tasks)
            if problem is not None:
                self._non_finite(step, problem)
        if problem is None:
            self.consecutive_skips = 0
        train_losses = per_task_mean(sums, counts)
        self.step = step

        valid = valid_s = None
        update_due = is_update(step, self.cfg.balancer.update_interval)
        if self.held_out is not None and update_due:
            valid_start = time.perf_counter()
            valid = self._held_out_losses(self.held_out.sample(step // self.cfg.balancer.update_interval))
            valid_s = time.perf_counter() - valid_start  # the losses came back to the host: device work is done
        feed_step(self.balancer, step, StepObservations(
            train_losses=lambda: train_losses,
            held_out_losses=None if valid is None else lambda: valid,
            grad_norms=(lambda: self.head_grads.norms(self.world.size)) if self.head_grads is not None else None,
            post_step_losses=lambda: self._post_step_losses(global_rows)))
        evaluated = eval_s = None
        if self._eval_due(step):
            eval_start = time.perf_counter()
            micro = self.cfg.eval.micro_batch_size or self.cfg.train.micro_batch_size
            evaluated = self.plan.eval.losses(self.model, micro, self.impl)
            eval_s = time.perf_counter() - eval_start
        self._judge(step, evaluated, valid)
        weight_change = diagnostics = None
        if update_due:
            updated = self.balancer.weights()
            weight_change = float(np.abs(updated - self.update_weights).sum())
            self.update_weights, diagnostics = updated, self.balancer.diagnostics()

        elapsed = time.perf_counter() - start
        tokens_per_s = self.cfg.train.global_batch_size * self.plan.train.seq_len / elapsed
        mfu = (tokens_per_s * self.flops_per_token / (self.peak * self.world.size)) if self.peak else None
        loss = objective_value(weights, sums, counts)
        record = self.metrics.write(step, weights=weights, loss=loss if np.isfinite(loss) else None, lr=lr,
                                    grad_norm=grad_norm if problem is None else None, tokens_per_s=tokens_per_s,
                                    mfu=mfu, train_loss=train_losses, valid_loss=valid, valid_s=valid_s,
                                    weight_change=weight_change, diagnostics=diagnostics,
                                    skipped_steps=self.skipped_steps, eval_loss=evaluated, eval_s=eval_s,
                                    early_stopped=self.stop_reason)
        if problem is None and self.world.is_main and (step % self.cfg.train.log_every == 0
                                                       or step == self.cfg.train.max_steps):
            log.info("%s", step_line(record, self.cfg.train.max_steps,
                                       len(self.plan.train) / self.cfg.train.global_batch_size))
        measured = measurement_line(record) if self.world.is_main else None
        if measured is not None:
            log.info("%s", measured)

    def _post_step_losses(self, global_rows: np.ndarray) -> np.ndarray:
        """The step's global batch re-evaluated at the updated parameters (forward only)."""
        sums, counts = evaluate_per_task(self.model, self.plan.train, global_rows, self.cfg.train.micro_batch_size,
                                         impl=self.impl)
        return per_task_mean(sums, counts)

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return self.plan.eval is not None and (step == self.cfg.train.max_steps or (every > 0 and step % every == 0))

    def _judge(self, step: int, evaluated: np.ndarray | None, valid: np.ndarray | None) -> None:
        """Feed this step's measurements to keep_best and early stopping (every rank: the values are all-reduced,
        so all ranks decide alike and save together)."""
        self.new_best = False
        if self.keep_best is not None:
            value = metric_value(self.keep_best.metric, self.tasks, evaluated, valid)
            if value is not None:
                self.new_best = self.keep_best.observe(step, value)
        if self.early is not None:
            value = metric_value(self.early.metric, self.tasks, evaluated, valid)
            if value is not None:
                self.early.observe(step, value)
                self.stop_reason = self._stop_reason()

    def _stop_reason(self) -> str | None:
        """Why early stopping ends the run now, or None (never at or after max_steps: that is the plain end)."""
        es = self.cfg.train.early_stopping
        if self.early.since_best < es.patience or self.step >= self.cfg.train.max_steps:
            return None
        best = "no finite value" if self.early.best is None else f"{self.early.best:.6g} (step {self.early.best_step})"
        return (f"{es.metric} has not improved on {best} by more than min_delta {es.min_delta:g} for "
                f"{self.early.since_best} measurements (patience {es.patience})")

    def _non_finite(self, step: int, problem: str) -> None:
        """Stop (``train.nonfinite: stop``, or too many consecutive skips) or count a skipped step."""
        t = self.cfg.train
        if t.nonfinite == "stop":
            raise TrainingDiverged(f"training diverged at step {step}: {problem}; stopped before applying the step "
                                   "(train.nonfinite: stop), no checkpoint written for it; lower optim.lr or check "
                                   "the data, then resume from the last checkpoint")
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= t.max_skipped_steps:
            raise TrainingDiverged(f"training diverged at step {step}: {problem}; {self.consecutive_skips} steps in a "
                                   f"row skipped (train.max_skipped_steps), stopping; lower optim.lr or check the data")
        if self.world.is_main:
            log.warning("step %d not applied (train.nonfinite: skip): %s", step, problem)

    def _local_grad_norm(self) -> float | None:
        """Global gradient norm where the engine reports none (ZeRO-0 in fp32 keeps full grads on each rank)."""
        if self.plan.zero_stage != 0 or self.cfg.model.dtype == "bf16":
            return None
        squares = [p.grad.detach().double().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    # --- checkpoints --------------------------------------------------------------------------------
    def _save(self) -> Path:
        bad = distributed.all_reduce_sum(np.array([divergence.nonfinite_weights(self.engine)]), self.world)[0]
        if bad:  # every rank sums the same count: all refuse together, before any of them writes
            raise TrainingDiverged(f"training diverged by step {self.step}: {int(bad)} trainable weight tensor(s) hold "
                                   "inf or NaN; the checkpoint was not written; lower optim.lr, then resume from the "
                                   "last checkpoint")
        consolidated = None
        if self.plan.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()  # keys of the TaskLoss wrapper
            consolidated = None if full is None else {k.removeprefix("module."): v for k, v in full.items()}
        path = checkpoint.save(self.engine, self.cfg.run_dir, self.step, self._components(), self._counters(),
                               self.world, self.cfg.train.keep_last, consolidated, best=self.keep_best)
        log.info("checkpoint %s", path)
        self.boundary.saved()
        return path

    def run(self) -> None:
        t = self.cfg.train
        if self.step == 0:
            self._initial_reference()
        if self.stop_reason is not None:  # resumed from the checkpoint written when early stopping ended the run
            log.info("the run stopped early at step %d (%s); nothing to do", self.step, self.stop_reason)
            return
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.world.is_main, desc="train",
                   unit="step", dynamic_ncols=True)
        with bar:
            while self.step < t.max_steps and self.stop_reason is None:
                self._train_step()
                bar.update(1)
                last = self.step == t.max_steps or self.stop_reason is not None
                stop, save_due = self.boundary.agree(self.world)  # a signal to any rank stops all after this step
                if (t.save_every and self.step % t.save_every == 0) or (t.save_final and last) or self.new_best \
                        or save_due or stop:
                    path = self._save()
                if stop and not last:
                    raise self.boundary.stopped(self.step, path)
        if self.stop_reason is not None and self.world.is_main:
            log.info("early stopping at step %d: %s", self.step, self.stop_reason)
        if self.keep_best is not None and self.keep_best.best_step is not None and self.world.is_main:
            log.info("best checkpoint: step %d, %s %.6g (checkpoints/best.json)", self.keep_best.best_step,
                     self.keep_best.metric, self.keep_best.best)

    def close(self) -> None:
        self.metrics.close()
        self.engine.destroy()
        del self.engine, self.model
        gc.collect()
