"""Atomic, verifiable, resumable checkpoints: model, DeepSpeed engine state, data position, balancer and RNG states.

Layout of one checkpoint (``run_dir/checkpoints/step-00000010``)::

    model/               save_trainable(): an HF dir (full), a peft adapter dir (lora) or E's cgc format
                         (safetensors + JSON)
    engine/state/*.pt    DeepSpeed's engine.save_checkpoint(): optimizer, scheduler, trainable weights (pickles)
    engine/zero_to_*.py  scripts DeepSpeed copies beside its state (never run by this package)
    rng/rank-00000.json  each rank's ProcessRNG state: python, numpy and torch (CPU and CUDA) generators
    trainer_state.json   step and the trainer's counters, and each component's state_dict() under its name
                         (data_position, balancer, held_out, keep_best, early_stopping)
    files.json           every other file's relative path, size and sha256, written last (file_manifest)

The components own their state: each one that a resumed run must continue (the data position, the
balancer, the held-out sample, the watched metrics) gives ``state_dict()`` / ``load_state_dict()``
(:class:`Stateful`), and :func:`save` / :func:`load` collect and restore them by name; the trainer names
them and keeps only its own counters. ``load_state_dict`` gets ``None`` for a component that a checkpoint
written before it existed lacks, and continues as such a run did (e.g. ``held_out`` -> ``rotate``).

Everything is written into ``checkpoints/.tmp-step-...`` first (a name every rank agrees on, hence not
:func:`mftcoder_coba.atomic.atomic_directory`'s per-process one) and published by rank 0 when every rank
has finished (:func:`mftcoder_coba.atomic.publish`), so only complete checkpoints carry the ``step-`` name;
checkpoints beyond ``keep_last`` vanish in one rename (:func:`mftcoder_coba.atomic.discard`), except the
best one of ``train.keep_best`` (named by ``checkpoints/best.json``, :mod:`~mftcoder_coba.training.best`),
which is never pruned while it is the best. A run killed
while saving or pruning leaves hidden folders that the next start removes. Multi-node runs need ``run_dir``
on a filesystem all nodes share (each rank writes its own optimizer shard).

A ``step-`` name is not proof of intact bytes (a full disk, a cut copy, a later truncation), so resuming
checks the checkpoint against ``files.json`` first (:func:`checkpoint_problem`): ``--resume auto`` takes the
newest checkpoint that verifies and logs the ones it skips. The engine state files are pickles; they are
loaded with ``torch.load(weights_only=True)`` semantics and only the DeepSpeed classes a real checkpoint
holds allowed (:func:`weights_only_loads`), so a crafted file cannot run code on resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from mftcoder_coba.atomic import discard, publish, remove_stale
from mftcoder_coba.errors import UserError
from mftcoder_coba.file_manifest import has_manifest, manifest_problem, write_manifest
from mftcoder_coba.models import save_trainable
from mftcoder_coba.training import distributed, universal
from mftcoder_coba.training.best import MetricWatch, write_best
from mftcoder_coba.training.distributed import World
from mftcoder_coba.training.rng import ProcessRNG

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
TAG = "state"
ENGINE_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)
"""The only non-tensor classes DeepSpeed 0.19 pickles into the engine state of this trainer's checkpoints
(ZeRO 0-3, fp32 and bf16, checked on real checkpoints): its ZeRO optimizer state's loss scaler, stage enum
and fragment addresses. Allowing them lets ``weights_only`` loading read real checkpoints and nothing else."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial(run_dir: Path) -> None:
    """Delete ``.tmp-`` folders left by a run killed while saving (rank 0, before training starts), and the
    leftovers of a killed re-save of an existing step (:func:`mftcoder_coba.atomic.remove_stale`)."""
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for stale in folder.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        remove_stale(folder)


class Stateful(Protocol):
    """A component whose state a checkpoint carries: plain JSON data out, the same data back in."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


Components = Mapping[str, Stateful | None]
"""The components of a run by their name in trainer_state.json; ``None``: the run has no such component
(saved as ``null``, nothing restored)."""


def trainer_state(step: int, components: Components, counters: Mapping[str, Any]) -> dict[str, Any]:
    """trainer_state.json's object: ``step``, each component's ``state_dict()`` under its name, the counters."""
    state: dict[str, Any] = {"step": step}
    state.update({name: None if part is None else part.state_dict() for name, part in components.items()})
    state.update(counters)
    return state


def restore(state: Mapping[str, Any], components: Components) -> None:
    """Load each component's state from a trainer_state.json object (``None`` where the checkpoint has none)."""
    for name, part in components.items():
        if part is not None:
            part.load_state_dict(state.get(name))


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer_state.json object of a checkpoint that verified (:func:`checkpoint_problem`)."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def save(engine: Any, run_dir: Path, step: int, components: Components, counters: Mapping[str, Any],
         world: World, keep_last: int, consolidated_state: dict[str, torch.Tensor] | None = None,
         best: MetricWatch | None = None) -> Path:
    """Write the checkpoint of ``step`` on every rank (collective), then publish it and prune old ones.

    trainer_state.json is :func:`trainer_state` of ``components`` and ``counters`` (rank 0's); every rank
    writes its :class:`ProcessRNG` state.
    ``consolidated_state``: under ZeRO-3 the full state dict gathered on rank 0 for ``save_trainable``.
    ``best``: ``train.keep_best``'s watch; its best checkpoint is kept besides the ``keep_last`` newest, and
    when that is this step, ``best.json`` names it before any older best can be pruned.
    """
    folder = checkpoints_dir(run_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    distributed.barrier(world)
    universal.mark(engine)  # the record DeepSpeed's converter needs to resume on another world size
    engine.save_checkpoint(str(tmp / "engine"), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
    rng_state = json.dumps(ProcessRNG().state_dict())
    (tmp / "rng" / f"rank-{world.rank:05d}.json").write_text(rng_state, encoding="utf-8")
    if world.is_main:
        save_trainable(engine.module, tmp / "model", state_dict=consolidated_state)
        state = trainer_state(step, components, counters)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    distributed.barrier(world)
    if world.is_main:
        write_manifest(tmp)  # the last file: a folder whose files.json verifies was written whole
        publish(tmp, final, overwrite=True)  # a re-saved step (resumed from an older one) keeps its old copy until then
        kept = None
        if best is not None and best.best_step is not None:
            kept = f"step-{best.best_step:08d}"
            if best.best_step == step:
                write_best(run_dir, best, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            if old.name != kept:
                discard(old)
    distributed.barrier(world)
    return final


def checkpoint_problem(path: Path, *, checksums: bool = True) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (one phrase), or None when it verifies.

    With ``files.json``: every file it lists is there with its size (and sha256 with ``checksums``).
    Checkpoints written before ``files.json`` existed count as complete when their trainer_state.json loads.
    """
    if has_manifest(path):
        return manifest_problem(path, checksums=checksums)
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"trainer_state.json does not load ({str(exc).splitlines()[0]})"
    return None if isinstance(state, dict) else "trainer_state.json is not a JSON object"


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from: ``auto`` = the newest that verifies (None when the run has none),
    or a path, which must verify; a fresh run (``None``) is refused when ``run_dir`` holds checkpoints."""
    folder = checkpoints_dir(run_dir)
    named = sorted(p for p in folder.iterdir() if _NAME.match(p.name)) if folder.is_dir() else []
    if resume is None:
        if named:
            raise UserError(f"{run_dir} already holds checkpoints ({named[-1].name}); pass --resume auto to "
                            "continue it or choose another run_dir")
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint directory")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserError(f"--resume {resume}: damaged or incomplete checkpoint: {problem}")
        return path
    skipped = []
    for path in reversed(named):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("--resume auto: skipping %s: %s", path, problem)
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        raise UserError(f"{folder}: no checkpoint verifies, refusing to start over from step 0: {'; '.join(skipped)}")
    return None


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` unpickle like ``torch.load(weights_only=True)`` with only
    :data:`ENGINE_GLOBALS` allowed; a file that needs anything else is one :class:`UserError` naming it.

    Why: DeepSpeed 0.19 reads its engine state with ``torch.load(..., weights_only=False)`` (its
    ``TorchCheckpointEngine.load``), i.e. plain pickle, so a crafted ``.pt`` in a checkpoint ran any code on
    resume. torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch overrides that explicit argument in
    every ``torch.load`` made meanwhile (a process-wide setting, restored on exit; nothing else loads while
    the engine does); the engine's loader is wrapped so that a refusal or an unreadable file names the file.
    """
    loader = engine.checkpoint_engine
    plain_load = loader.load

    def load(path: str, map_location: Any = None) -> Any:
        try:
            return plain_load(path, map_location=map_location)
        except pickle.UnpicklingError as exc:
            lines = str(exc).splitlines()
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise UserError(f"{path}: refused to unpickle ({reason.strip()}); load engine state only from a "
                            "trusted source") from None
        except (OSError, EOFError, RuntimeError) as exc:
            raise UserError(f"{path}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                            "); the checkpoint is damaged") from None

    saved = {name: os.environ.get(name) for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(_FORCE_NO_WEIGHTS_ONLY, None)
    loader.load = load
    try:
        with torch.serialization.safe_globals(list(ENGINE_GLOBALS)):
            yield
    finally:
        del loader.load
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load(engine: Any, checkpoint: Path, world: World, components: Components) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, scheduler), this rank's RNGs and ``components``; return the
    trainer_state.json object (for the trainer's counters).

    ZeRO 1-3 state saved on another number of ranks is loaded through DeepSpeed's universal checkpoint
    (:mod:`~mftcoder_coba.training.universal`, converted once and cached in the checkpoint)."""
    state = read_trainer_state(checkpoint)
    saved_size = state.get("world_size")
    load_dir, tag, switch = checkpoint / "engine", TAG, contextlib.nullcontext()
    if universal.needed(saved_size, world, engine.zero_optimization_stage()):
        load_dir, tag = checkpoint, universal.FOLDER
        universal.prepare(checkpoint, TAG, int(saved_size), world)
        switch = universal.loading(engine)
    with weights_only_loads(engine), switch:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{checkpoint / 'engine'}: DeepSpeed found no engine state to load; the checkpoint is damaged")
    rng_file = checkpoint / "rng" / f"rank-{world.rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        ProcessRNG().load_state_dict(json.loads(rng_file.read_text(encoding="utf-8")))
    restore(state, components)
    return state
