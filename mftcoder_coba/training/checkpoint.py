"""Atomic, verifiable, resumable checkpoints: model, DeepSpeed engine state, data position, balancer and RNG states.

Layout of one checkpoint (``run_dir/checkpoints/step-00000010``)::

    model/               save_trainable(): an HF dir (full), a peft adapter dir (lora) or E's cgc format
                         (safetensors + JSON)
    engine/state/*.pt    DeepSpeed's engine.save_checkpoint(): optimizer, scheduler, trainable weights (pickles)
    engine/zero_to_*.py  scripts DeepSpeed copies beside its state (never run by this package)
    rng/rank-00000.json  python, numpy and torch (CPU and CUDA) RNG states of each rank
    trainer_state.json   step, data position, balancer.state_dict(), world size
    files.json           every other file's relative path, size and sha256, written last (file_manifest)

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
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from mftcoder_coba.atomic import discard, publish, remove_stale
from mftcoder_coba.errors import UserError
from mftcoder_coba.file_manifest import has_manifest, manifest_problem, write_manifest
from mftcoder_coba.models import save_trainable
from mftcoder_coba.training import distributed
from mftcoder_coba.training.best import MetricWatch, write_best
from mftcoder_coba.training.distributed import World

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


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(v) if isinstance(v, float) else int(v)
                                                       for v in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(engine: Any, run_dir: Path, step: int, trainer_state: dict[str, Any], world: World,
         keep_last: int, consolidated_state: dict[str, torch.Tensor] | None = None,
         best: MetricWatch | None = None) -> Path:
    """Write the checkpoint of ``step`` on every rank (collective), then publish it and prune old ones.

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
    engine.save_checkpoint(str(tmp / "engine"), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
    (tmp / "rng" / f"rank-{world.rank:05d}.json").write_text(json.dumps(_rng_state()), encoding="utf-8")
    if world.is_main:
        save_trainable(engine.module, tmp / "model", state_dict=consolidated_state)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
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


def load(engine: Any, checkpoint: Path, world: World) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNGs; return trainer_state."""
    with weights_only_loads(engine):
        path, _ = engine.load_checkpoint(str(checkpoint / "engine"), tag=TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{checkpoint / 'engine'}: DeepSpeed found no engine state to load; the checkpoint is damaged")
    rng_file = checkpoint / "rng" / f"rank-{world.rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        _set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
