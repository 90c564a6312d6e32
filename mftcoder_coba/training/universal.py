"""Resume on another number of ranks under ZeRO 1-3, with DeepSpeed's universal checkpoints.

Why: ZeRO 1-3 partition the optimizer state (and under ZeRO-3 the weights) by data-parallel rank, and
DeepSpeed refuses to load such a checkpoint on another world size ("The checkpoint being loaded used a DP
world size of 2 but the current world size is 1"). A job that lost a node, or came back from a requeue with
fewer or more GPUs, could not continue. Everything else a checkpoint holds is already independent of the world
size (the data order is one seeded global order, sliced per step; the balancer and held-out states are global).

DeepSpeed ships the conversion: ``deepspeed.checkpoint.ds_to_universal`` turns the per-rank shards into one
folder per parameter (fp32 weights, Adam moments, step), and an engine whose config says
``checkpoint.load_universal`` loads that on any world size. The converter requires
``universal_checkpoint_info`` in the saved model states; :func:`mark` gives the engine's module the attribute
from which DeepSpeed's own ``save_checkpoint`` writes it (DeepSpeed sets it only for its tensor-parallel
paths). Checkpoints saved before carry none; the converter's ``--inject_missing_state`` adds the same minimal
record for them.

The conversion runs once, on rank 0, into ``step-N/universal/`` beside the engine state (written under a
hidden name, with its own ``files.json``, published by rename), and is reused, after verifying, by every
later resume from that checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from mftcoder_coba.atomic import make_temp_dir, publish
from mftcoder_coba.errors import UserError
from mftcoder_coba.file_manifest import has_manifest, manifest_problem, write_manifest
from mftcoder_coba.training import distributed
from mftcoder_coba.training.distributed import World

log = logging.getLogger(__name__)

FOLDER = "universal"
"""The converted engine state inside a checkpoint (also the tag ``engine.load_checkpoint`` reads it by)."""


def mark(engine: Any) -> None:
    """Have DeepSpeed's ``save_checkpoint`` record ``universal_checkpoint_info`` (what the converter needs)."""
    if getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def needed(saved_world_size: int | None, world: World, zero_stage: int) -> bool:
    """Whether the engine state saved on ``saved_world_size`` ranks must be converted to load on ``world``
    (ZeRO-0 keeps whole optimizer state in one file, which any world size loads)."""
    return zero_stage >= 1 and saved_world_size is not None and int(saved_world_size) != world.size


def prepare(checkpoint: Path, engine_tag: str, saved_world_size: int, world: World) -> Path:
    """The verified universal folder of ``checkpoint``, converted by rank 0 if not cached (collective)."""
    folder = checkpoint / FOLDER
    failure = ""
    if world.is_main:
        problem = manifest_problem(folder) if has_manifest(folder) else "not converted yet"
        if problem is None:
            log.info("resuming %d-rank ZeRO state on %d ranks: universal checkpoint %s (cached)",
                     saved_world_size, world.size, folder)
        else:
            try:
                _convert(checkpoint / "engine" / engine_tag, folder)
            except Exception as exc:  # noqa: BLE001 -- the converter's failure travels to every rank as one line
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                log.info("resuming %d-rank ZeRO state on %d ranks: converted with DeepSpeed's ds_to_universal "
                         "into %s (kept for later resumes)", saved_world_size, world.size, folder)
    failed = distributed.all_reduce_sum([1.0 if failure else 0.0], world)[0] > 0  # also the barrier
    if failed:
        raise UserError(f"{checkpoint}: saved on {saved_world_size} ranks, cannot convert its engine state for "
                        f"{world.size} ranks with DeepSpeed's ds_to_universal ({failure or 'failed on rank 0'}); "
                        f"resume on {saved_world_size} ranks")
    problem = manifest_problem(folder, checksums=False)
    if problem is not None:
        raise UserError(f"{folder}: universal checkpoint damaged ({problem}); delete the folder to convert again")
    return folder


def _convert(engine_state: Path, folder: Path) -> None:
    """``ds_to_universal`` of ``engine_state`` into ``folder``, published whole with its ``files.json``."""
    start = time.perf_counter()
    temp = make_temp_dir(folder)
    args = argparse.Namespace(input_folder=str(engine_state), output_folder=str(temp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # its progress bars
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())
    write_manifest(temp)
    publish(temp, folder, overwrite=True)
    log.debug("converted %s in %.1f s", engine_state, time.perf_counter() - start)


@contextlib.contextmanager
def loading(engine: Any) -> Any:
    """The engine reads a universal checkpoint meanwhile (DeepSpeed's ``checkpoint.load_universal`` switch,
    read by ``load_checkpoint``; set only for this load, so later saves stay ordinary).

    Each optimizer parameter group keeps its own hyperparameters (all but the learning rate, which the loaded
    state carries): DeepSpeed 0.19's ZeRO-3 universal loader copies the first group's hyperparameters into
    every group, so the group without weight decay (norms, biases) got ``optim.weight_decay`` after the
    resume; and it gives every partition the same ``step`` tensor object, which torch's AdamW increments in
    place, once per partition, so the bias corrections ran ahead. Either made the run drift from an
    uninterrupted one (held-out losses 1e-3 apart two steps after the resume)."""
    config = engine._config
    before = config.load_universal_checkpoint
    groups = engine.optimizer.param_groups
    kept = [{key: value for key, value in group.items() if key not in ("params", "lr")} for group in groups]
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
    for group, own in zip(engine.optimizer.param_groups, kept):
        group.update(own)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():  # one step counter per parameter partition again
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
