"""What every task balancer shares: the interface the trainer drives, what each one needs fed, the registry.

A balancer turns per-task observations (held-out losses, training losses, gradient norms) into one weight
per task. The trainer never branches on the method: it reads :attr:`Balancer.needs` once and feeds exactly
those observations, so methods are swapped by name in the run config (``balancer.name``,
``balancer.options``). Balancers that learn (FAMO, uncertainty weighting, GradNorm) hold their parameters
and their small optimiser themselves, and every balancer's whole state is a plain, JSON-serialisable dict
(NaN written as ``null``), so it goes into ``trainer_state.json`` and a resumed run computes exactly the
weights an uninterrupted one would.

Observations are vectors of K floats (list, NumPy array or tensor). NaN means "this task was not measured"
(absent from the batch or from the validation sample); any non-finite value is read that way, so one
diverged measurement cannot turn the weights into NaN. Negative values are refused (one ValueError): no loss
or norm of this project is negative, and the balancers' ratios and logarithms of losses assume it.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mftcoder_coba.config_io import build, check, check_ranges
from mftcoder_coba.errors import ConfigError

OPTIONS_PREFIX = "balancer.options."


@dataclass(frozen=True)
class Needs:
    """What the trainer must feed a balancer, and when.

    Every optimizer step the trainer first applies :meth:`Balancer.weights` to the step's objective; the
    observations below are then fed for that step ``s`` in one :meth:`Balancer.observe` call carrying every
    field that is asked for. The rules live in :mod:`mftcoder_coba.balancers.feeding`, which the trainer and
    ``simulate`` both call.
    """

    validation: bool = False
    """``observe(0, losses=L(0))`` before step 1 (per-task held-out loss over the held-out rows), then
    ``observe(s, losses=...)`` after every ``update_interval``-th step with the per-task token-mean loss of
    a fresh validation sample (forward only, NaN for a task without tokens in it)."""
    train_losses: bool = False
    """``observe(s, train_losses=...)`` after every step: the per-task token-mean training loss of the
    step's whole global batch (all micro-batches and ranks), measured at the parameters the step started
    from (the losses the backward passes used); NaN for tasks absent from the batch."""
    post_step_losses: bool = False
    """``observe_post_step(s, train_losses=...)`` after the optimizer step: the same global batch
    re-evaluated, forward only, at the updated parameters (one extra forward pass per step)."""
    grad_norms: bool = False
    """With ``train_losses``: ``grad_norms`` = per-task ``||dL_k/dW||`` of each task's *unweighted* loss
    with respect to the weight ``W`` of the last shared layer (one extra partial backward per task)."""


class Balancer(ABC):
    """Per-task loss weights from observations; subclasses register under ``name`` (``class X(Balancer, name=...)``).

    The trainer's objective for a step is ``sum_k w_k L_k / sum_{k present} w_k`` with ``w = weights()``
    read before the step (see ``docs/coba.md``, "The objective the weights are applied to"), so only the relative
    weights of the tasks present in a batch matter.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    """Frozen dataclass of the method's hyperparameters (``balancer.options``): numeric ranges declared on the
    fields (:func:`mftcoder_coba.config_io.bounded`), other rules in an optional ``validate()``."""
    needs: Needs

    def __init_subclass__(cls, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        BALANCERS[name] = cls

    def __init__(self, num_tasks: int, options: Any) -> None:
        if int(num_tasks) != num_tasks or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.num_tasks = int(num_tasks)
        check_ranges(options, OPTIONS_PREFIX)  # again here: a balancer may be built directly, not from a config
        validate = getattr(options, "validate", None)
        if validate is not None:
            validate()
        self.options = options

    def observe(self, step: int, losses: Any = None, *, train_losses: Any = None, grad_norms: Any = None) -> None:
        """Feed the observations of optimizer step ``step`` (see :class:`Needs` for which and when)."""
        given = {
            "losses": self._vector(losses, "losses"),
            "train_losses": self._vector(train_losses, "train_losses"),
            "grad_norms": self._vector(grad_norms, "grad_norms"),
        }
        wanted = {"losses": self.needs.validation, "train_losses": self.needs.train_losses,
                  "grad_norms": self.needs.grad_norms}
        missing = [key for key, needed in wanted.items() if needed and given[key] is None]
        if missing:
            raise ValueError(f"balancer '{self.name}' observes {', '.join(missing)} (see its needs: {self.needs})")
        self._observe(int(step), given["losses"], given["train_losses"], given["grad_norms"])

    def observe_post_step(self, step: int, train_losses: Any) -> None:
        """Feed the losses of step ``step``'s batch at the updated parameters (only if ``needs.post_step_losses``)."""
        if not self.needs.post_step_losses:
            raise ValueError(f"balancer '{self.name}' takes no post-step losses (needs: {self.needs})")
        vector = self._vector(train_losses, "train_losses")
        if vector is None:
            raise ValueError(f"balancer '{self.name}': observe_post_step needs train_losses")
        self._observe_post_step(int(step), vector)

    def _observe_post_step(self, step: int, train_losses: np.ndarray) -> None:
        raise NotImplementedError(f"balancer '{self.name}' declares post_step_losses but does not read them")

    @abstractmethod
    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        """One observation, already converted to float64 vectors of length K (NaN = not measured)."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Weights for the next step: float64 array (K,), finite and >= 0."""

    def diagnostics(self) -> dict[str, np.ndarray]:
        """Named per-task float vectors (K,) describing the latest update, logged beside the weights (NaN =
        not available); none by default. CoBa reports its slope fit (see ``CoBa.diagnostics``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON-serialisable data (NaN stored as None)."""
        return {"name": self.name, "num_tasks": self.num_tasks, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` of the same method and task count."""
        if state.get("name") != self.name:
            raise ConfigError(f"config field 'balancer.name': the checkpoint holds the state of balancer "
                              f"{state.get('name')!r}, the config asks for {self.name!r}")
        if state.get("num_tasks") != self.num_tasks:
            raise ConfigError(f"the checkpoint's balancer state has {state.get('num_tasks')} tasks, "
                              f"the data has {self.num_tasks}")
        self._load(state)

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Method-specific part of :meth:`state_dict`."""

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None:
        """Restore the method-specific part."""

    def _vector(self, values: Any, what: str) -> np.ndarray | None:
        if values is None:
            return None
        if hasattr(values, "detach"):  # torch tensor, any dtype or device
            values = values.detach().cpu().double().numpy()
        vector = np.array(values, dtype=np.float64).reshape(-1) if np.ndim(values) <= 1 else None
        if vector is None or vector.shape != (self.num_tasks,):
            raise ValueError(f"balancer '{self.name}': {what} must hold {self.num_tasks} values "
                             f"(one per task), got shape {np.shape(values)}")
        vector[~np.isfinite(vector)] = np.nan
        negative = np.flatnonzero(vector < 0)  # NaN compares false
        if negative.size:
            k = int(negative[0])
            raise ValueError(f"balancer '{self.name}': {what} must be >= 0 (they are cross-entropies or norms), "
                             f"got {float(vector[k])!r} for task {k}")
        return vector


BALANCERS: dict[str, type[Balancer]] = {}
"""Every balancer by its config name; filled as the modules of this package are imported."""


def build_balancer(name: str, num_tasks: int, options: dict[str, Any] | None = None) -> Balancer:
    """The balancer called ``name`` for ``num_tasks`` tasks with hyperparameters ``options`` (config data).

    Unknown names, unknown options and bad values raise :class:`ConfigError` naming ``balancer.name`` or
    ``balancer.options.<key>``.
    """
    if name not in BALANCERS:
        raise ConfigError(f"config field 'balancer.name': unknown balancer {name!r} "
                          f"(known: {', '.join(sorted(BALANCERS))})")
    cls = BALANCERS[name]
    parsed = build(cls.Options, options, prefix=OPTIONS_PREFIX)
    return cls(num_tasks, **{f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)})


def check_option(condition: bool, key: str, message: str) -> None:
    """:func:`config_io.check` for ``balancer.options.<key>``."""
    check(condition, OPTIONS_PREFIX + key, message)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a 1-D float64 array."""
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()


def to_json(values: Sequence[float] | np.ndarray) -> list[Any]:
    """A float vector or matrix as nested lists with NaN as None (strict JSON)."""
    array = np.asarray(values, dtype=np.float64)
    return [to_json(row) for row in array] if array.ndim > 1 else [None if np.isnan(v) else float(v) for v in array]


def from_json(values: Sequence[Any], columns: int | None = None) -> np.ndarray:
    """Inverse of :func:`to_json`; ``columns`` gives the width of an empty matrix."""
    array = np.array(values, dtype=np.float64)  # None -> nan
    if columns is not None and array.size == 0:
        array = array.reshape(0, columns)
    return array


def update_reference(reference: np.ndarray, losses: np.ndarray) -> None:
    """Set the reference loss of every task that has none yet from its first finite, positive observation."""
    fresh = np.isnan(reference) & (losses > 0)
    reference[fresh] = losses[fresh]
