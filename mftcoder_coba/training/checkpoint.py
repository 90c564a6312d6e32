"""Atomic, resumable checkpoints: model, DeepSpeed engine state, data position, balancer and RNG states.

Layout of one checkpoint (``run_dir/checkpoints/step-00000010``)::

    model/               save_trainable(): an HF dir (full), a peft adapter dir (lora) or E's cgc format
    engine/state/        DeepSpeed's engine.save_checkpoint(): optimizer, scheduler, trainable weights
    rng/rank-00000.json  python, numpy and torch (CPU and CUDA) RNG states of each rank
    trainer_state.json   step, data position, balancer.state_dict(), world size

Everything is written into ``checkpoints/.tmp-step-...`` first (a name every rank agrees on, hence not
:func:`mftcoder_coba.atomic.atomic_directory`'s per-process one) and published by rank 0 when every rank
has finished (:func:`mftcoder_coba.atomic.publish`), so only complete checkpoints carry the ``step-`` name;
checkpoints beyond ``keep_last`` vanish in one rename (:func:`mftcoder_coba.atomic.discard`). A run killed
while saving or pruning leaves hidden folders that the next start removes. Multi-node runs need ``run_dir``
on a filesystem all nodes share (each rank writes its own optimizer shard).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mftcoder_coba.atomic import discard, publish, remove_stale
from mftcoder_coba.models import save_trainable
from mftcoder_coba.training import distributed
from mftcoder_coba.training.distributed import World

_NAME = re.compile(r"^step-(\d{8})$")
TAG = "state"


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
         keep_last: int, consolidated_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint of ``step`` on every rank (collective), then publish it and prune old ones.

    ``consolidated_state``: under ZeRO-3 the full state dict gathered on rank 0 for ``save_trainable``.
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
        publish(tmp, final, overwrite=True)  # a re-saved step (resumed from an older one) keeps its old copy until then
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            discard(old)
    distributed.barrier(world)
    return final


def load(engine: Any, checkpoint: Path, world: World) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNGs; return trainer_state."""
    path, _ = engine.load_checkpoint(str(checkpoint / "engine"), tag=TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state in {checkpoint / 'engine'}")
    rng_file = checkpoint / "rng" / f"rank-{world.rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        _set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
