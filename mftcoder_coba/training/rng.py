"""The process's random number generators (python, numpy, torch CPU and CUDA) as one checkpointable component.

Why one object: seeding and checkpointing must cover the same generators, or a resumed run draws
differently from an uninterrupted one (dropout masks, anything a model or balancer samples). Each rank
saves its own state (``rng/rank-NNNNN.json`` in a checkpoint, :mod:`~mftcoder_coba.training.checkpoint`).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class ProcessRNG:
    """Seeds and snapshots every global generator of this process; the state is plain JSON data."""

    def seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a CUDA state is skipped on a machine without CUDA."""
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
