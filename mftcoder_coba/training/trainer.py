"""``train(cfg, resume)``: multitask fine-tuning with a DeepSpeed engine and a task balancer.

The trainer composes; the pieces hold the algorithms. One optimizer step ``s``:

1. the step's global batch (``sampling.GlobalBatches``), this rank's slice in micro-batches;
2. per-task loss-token counts of all its micro-batches, all-reduced once; with the balancer's current
   weights they give each task's per-token coefficient (``objective.task_scale``), the engine's own
   averaging over accumulation steps and ranks undone, so the summed gradient is exactly that of the spec's L;
3. forward + ``engine.backward`` per micro-batch (fused linear + per-task CE kernel), then ``engine.step``
   (clipping, AdamW, LR schedule);
4. per-task training sums all-reduced -> train losses; balancer observations as its ``Needs`` say (held-out
   sample every ``update_interval`` steps, post-step re-evaluation, head gradient norms);
5. metrics line, checkpoint every ``save_every`` steps and at the end.
"""
from __future__ import annotations

import gc
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from mftcoder_coba import config_io
from mftcoder_coba.config import RunConfig
from mftcoder_coba.models import build_model, save_base_model
from mftcoder_coba.training import checkpoint, distributed, ds_config, preflight
from mftcoder_coba.training.head_grads import HeadGradNorms
from mftcoder_coba.training.metrics import MetricsLog, flops_per_token, peak_flops
from mftcoder_coba.training.objective import (TaskLoss, accumulate_gradients, loss_token_counts,
                                              objective_value, per_task_mean)
from mftcoder_coba.training.sampling import DataPosition, GlobalBatches, HeldOutSample
from mftcoder_coba.training.validation import evaluate_per_task

log = logging.getLogger(__name__)


def _prepare_run_dir(cfg: RunConfig, plan: preflight.Plan) -> None:
    """config.yaml, the shards' tokenizer, no stale partial checkpoints (rank 0)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_io.to_dict(cfg), sort_keys=False)
    (cfg.run_dir / "config.yaml").write_text(text, encoding="utf-8")
    if plan.train.tokenizer_dir is not None:
        shutil.copytree(plan.train.tokenizer_dir, cfg.run_dir / "tokenizer", dirs_exist_ok=True)
    checkpoint.remove_partial(cfg.run_dir)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, resume: str | None = None) -> Path:
    """Train ``cfg`` to ``train.max_steps``; return the run directory.

    ``resume``: ``None`` (a fresh run; refused if run_dir already has checkpoints), ``"auto"`` (continue
    from the newest complete checkpoint, or start fresh if there is none) or a checkpoint path. Works in a
    plain process (world size 1, process group created here) and under torchrun / the deepspeed launcher;
    may be called repeatedly in one process.
    """
    plan = preflight.run(cfg, distributed.world_from_env().size, resume)
    world = distributed.init()
    if world.is_main:
        _prepare_run_dir(cfg, plan)
    distributed.barrier(world)
    _seed(cfg.train.seed)
    num_tasks = len(plan.train.tasks)
    model = build_model(cfg.model, plan.train.vocab_size, num_tasks)
    if world.is_main and cfg.model.adapter != "none" and cfg.model.path is None \
            and not (cfg.run_dir / "base_model" / "config.json").is_file():
        save_base_model(model, cfg.run_dir / "base_model")
    trainer = _Trainer(cfg, plan, world, model)
    try:
        trainer.run()
    finally:
        trainer.close()
    return cfg.run_dir


class _Trainer:
    """The state of one run between steps (engine, balancer, data position, metrics)."""

    def __init__(self, cfg: RunConfig, plan: preflight.Plan, world: distributed.World,
                 model: torch.nn.Module) -> None:
        self.cfg, self.plan, self.world = cfg, plan, world
        self.balancer = plan.balancer
        self.tasks = plan.train.tasks
        self.num_tasks = len(self.tasks)
        fused = cfg.train.fused_linear_ce
        self.impl = cfg.train.kernel_impl
        self.engine, self.scheduler = ds_config.initialize(
            cfg, TaskLoss(model, fused_linear=plan.zero_stage != 3 if fused == "auto" else fused, impl=self.impl),
            world.size, on_cuda=world.device.type == "cuda")
        self.model = self.engine.module.module
        self.step = 0
        position = DataPosition()
        b = cfg.balancer
        self.held_out = (HeldOutSample(plan.valid, cfg.train.seed, b.held_out, b.valid_rows_per_task,
                                       b.initial_rows_per_task) if plan.valid is not None else None)
        self.update_weights = self.balancer.weights()  # after the latest update: its L1 change is logged
        if plan.resume_from is not None:
            state = checkpoint.load(self.engine, plan.resume_from, world)
            self.step = int(state["step"])
            position = DataPosition(**state["data_position"])
            self.balancer.load_state_dict(state["balancer"])
            if self.held_out is not None:
                self.held_out.load_state_dict(state.get("held_out"))
            self.update_weights = np.array(state.get("update_weights") or self.balancer.weights(), dtype=np.float64)
            log.info("resumed from %s (step %d)", plan.resume_from, self.step)
        self.batches = GlobalBatches(plan.train, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                     world.rank, world.size, cfg.train.seed, position)
        self.head_grads = (HeadGradNorms(self.model, self.num_tasks, self.impl)
                           if self.balancer.needs.grad_norms else None)
        self.metrics = MetricsLog(cfg.run_dir, self.tasks, enabled=world.is_main, tensorboard=cfg.train.tensorboard,
                                  resume_step=self.step if plan.resume_from is not None else None)
        peak = peak_flops(world.device)
        self.flops_per_token = flops_per_token(self.model, plan.train.seq_len) if peak else None
        self.peak = peak

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
        if self.balancer.needs.validation:
            self.balancer.observe(0, losses=valid)
        self.update_weights = self.balancer.weights()
        self.metrics.write(0, weights=self.balancer.weights(), valid_loss=valid)

    # --- one optimizer step -------------------------------------------------------------------------
    def _train_step(self) -> None:
        start = time.perf_counter()
        step = self.step + 1
        needs = self.balancer.needs
        global_rows = self.batches.next_global_batch()
        micro = [self.plan.train.rows(rows) for rows in self.batches.micro_batches(global_rows)]
        counts = distributed.all_reduce_sum(loss_token_counts(micro, self.num_tasks), self.world)
        weights = self.balancer.weights()
        on_hidden = (lambda hidden, batch: self.head_grads.add(hidden, batch, counts)) if self.head_grads else None
        sums = accumulate_gradients(self.engine, micro, weights, counts, self.world.device, on_hidden=on_hidden)
        grad_norm = self._local_grad_norm()
        lr = float(self.scheduler.get_last_lr()[0])
        self.engine.step()
        engine_norm = self.engine.get_global_grad_norm()
        if engine_norm is not None:
            grad_norm = float(engine_norm)
        sums = distributed.all_reduce_sum(sums, self.world)
        train_losses = per_task_mean(sums, counts)
        self.step = step

        observed: dict = {}
        if needs.train_losses:
            observed["train_losses"] = train_losses
        if needs.grad_norms:
            observed["grad_norms"] = self.head_grads.norms(self.world.size)
        valid = valid_s = None
        if self.held_out is not None and step % self.cfg.balancer.update_interval == 0:
            update = step // self.cfg.balancer.update_interval
            valid_start = time.perf_counter()
            valid = self._held_out_losses(self.held_out.sample(update))
            valid_s = time.perf_counter() - valid_start  # the losses came back to the host: device work is done
            if needs.validation:
                observed["losses"] = valid
        if observed and (not needs.validation or "losses" in observed):
            self.balancer.observe(step, **observed)
        if needs.post_step_losses:
            post_sums, post_counts = evaluate_per_task(self.model, self.plan.train, global_rows,
                                                       self.cfg.train.micro_batch_size, impl=self.impl)
            self.balancer.observe_post_step(step, per_task_mean(post_sums, post_counts))
        weight_change = diagnostics = None
        if step % self.cfg.balancer.update_interval == 0:
            updated = self.balancer.weights()
            weight_change = float(np.abs(updated - self.update_weights).sum())
            self.update_weights, diagnostics = updated, self.balancer.diagnostics()

        elapsed = time.perf_counter() - start
        tokens_per_s = self.cfg.train.global_batch_size * self.plan.train.seq_len / elapsed
        mfu = (tokens_per_s * self.flops_per_token / (self.peak * self.world.size)) if self.peak else None
        record = self.metrics.write(step, weights=weights, loss=objective_value(weights, sums, counts), lr=lr,
                                    grad_norm=grad_norm, tokens_per_s=tokens_per_s, mfu=mfu,
                                    train_loss=train_losses, valid_loss=valid, valid_s=valid_s,
                                    weight_change=weight_change, diagnostics=diagnostics)
        if self.world.is_main and (step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps):
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %s tokens/s %.0f weights %s", step,
                     self.cfg.train.max_steps, record["loss"], lr, grad_norm, tokens_per_s,
                     " ".join(f"{t}={w:.3f}" for t, w in record["weights"].items()))

    def _local_grad_norm(self) -> float | None:
        """Global gradient norm where the engine reports none (ZeRO-0 in fp32 keeps full grads on each rank)."""
        if self.plan.zero_stage != 0 or self.cfg.model.dtype == "bf16":
            return None
        squares = [p.grad.detach().double().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    # --- checkpoints --------------------------------------------------------------------------------
    def _save(self) -> None:
        consolidated = None
        if self.plan.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()  # keys of the TaskLoss wrapper
            consolidated = None if full is None else {k.removeprefix("module."): v for k, v in full.items()}
        state = {
            "step": self.step,
            "data_position": {"epoch": self.batches.position.epoch, "index": self.batches.position.index},
            "balancer": self.balancer.state_dict(),
            "held_out": None if self.held_out is None else self.held_out.state_dict(),
            "update_weights": self.update_weights.tolist(),
            "world_size": self.world.size,
            "tasks": self.tasks,
        }
        path = checkpoint.save(self.engine, self.cfg.run_dir, self.step, state, self.world,
                               self.cfg.train.keep_last, consolidated)
        log.info("checkpoint %s", path)

    def run(self) -> None:
        t = self.cfg.train
        if self.step == 0:
            self._initial_reference()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.world.is_main, desc="train",
                   unit="step", dynamic_ncols=True)
        with bar:
            while self.step < t.max_steps:
                self._train_step()
                bar.update(1)
                if (t.save_every and self.step % t.save_every == 0) or (t.save_final and self.step == t.max_steps):
                    self._save()

    def close(self) -> None:
        self.metrics.close()
        self.engine.destroy()
        del self.engine, self.model
        gc.collect()
