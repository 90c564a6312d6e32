"""``mftcoder-coba simulate``: every balancer on a small synthetic multitask problem, as a table and a picture.

Why: CoBa exists for two failure modes of multitask fine-tuning — tasks that converge at different speeds,
and a small task that overfits (its held-out loss turns up while its training loss keeps falling) while
the others still learn. This command builds a problem with exactly those features, small enough to train
eight times in seconds on a CPU, and shows what each balancer does with it.

The problem: three regression tasks on shared inputs ``x ~ N(0, I_8)``, one model with a shared trunk
(``8 -> 32 -> 32``, tanh) and one linear head per task, trained by SGD with momentum on the trainer's
objective ``sum_k w_k L_k / sum_k w_k`` (mean squared error per task, 32 training rows per task per step):

- ``fast``: a linear target, 4000 training rows, noise 0.1 — learned in about a hundred steps;
- ``slow``: ``sin(2.5 a.x)``, 4000 rows, noise 0.1 — still learning at the end;
- ``small``: a linear target with only 48 rows and noise 0.7 — fits its noise and overfits.

Every balancer sees the same data, initialisation and batch order, and is fed by the trainer's own protocol
(:mod:`.feeding`) what its :class:`Needs` ask for: held-out losses on a validation sample every
``update_interval`` steps (CoBa, LBTW on ``valid``), the step's per-task training losses, the same batch
re-evaluated after the step (FAMO) and the per-task gradient norms at the trunk's last layer (GradNorm).
Reported losses come from a separate test set, so no balancer is scored on the rows it looked at. The
targets have unit variance, so the losses of the tasks are on one scale and the noise floors are
``noise ** 2``.

Held-out observations, as the trainer's ``balancer.held_out`` takes them: ``rotate`` draws a fresh sample of
``valid_rows`` rows per task at every update, ``fixed`` draws one sample once and measures it at every
update, ``all`` measures the whole validation pool; L(0) comes from the same rows as the updates (the whole
pool for ``rotate``, whose samples it averages). Observation noise (``obs_noise``) gives every validation
row a fixed difficulty offset, as real held-out rows differ in difficulty: a sample's measured loss is its
loss times ``exp(mean offset of its rows)``, scaled so that the log-offset of a ``valid_rows``-row sample has
standard deviation ``obs_noise`` (0.05: about 5 %). Under ``rotate`` every observation gets an independent
offset; under ``fixed`` one constant factor per task, which cancels in ``L(s) / L(0)``; under ``all`` a
constant factor ``sqrt(valid_rows / valid_pool)`` times closer to 1, which cancels too. The table reports
how far the weights move per update (L1), which noisy slopes inflate.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mftcoder_coba.atomic import atomic_file, atomic_write_text
from mftcoder_coba.balancers.base import build_balancer
from mftcoder_coba.balancers.coba import CoBa
from mftcoder_coba.balancers.feeding import StepObservations, feed_reference, feed_step, is_update

log = logging.getLogger(__name__)

INPUT_DIM = 8
HIDDEN = 32


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    train_rows: int
    noise: float
    """Standard deviation of the label noise (the target itself has unit variance)."""
    wave: bool
    """``sin(2.5 a.x)`` (slow to learn) instead of the linear ``a.x``."""


TASKS = (
    SyntheticTask("fast", 4000, 0.1, wave=False),
    SyntheticTask("slow", 4000, 0.1, wave=True),
    SyntheticTask("small", 48, 0.7, wave=False),
)
_WAVE_STD = 0.69  # std of sin(2.5 z), z ~ N(0, 1): scales the wave target to unit variance


@dataclass(frozen=True)
class SimulationConfig:
    steps: int = 800
    lr: float = 0.01
    momentum: float = 0.9
    batch_rows: int = 32
    """Training rows per task per step."""
    valid_pool: int = 1024
    """Held-out rows per task the balancers draw validation samples from (and measure L(0) on)."""
    valid_rows: int = 256
    """Rows per task in each validation sample (``valid_rows_per_task``)."""
    test_rows: int = 2000
    """Rows per task of the separate test set the table reports."""
    update_interval: int = 2
    eval_every: int = 5
    seed: int = 0
    held_out: str = "rotate"
    """Which validation rows each update measures: ``rotate``, ``fixed`` or ``all`` (module docstring)."""
    obs_noise: float = 0.05
    """Standard deviation of the log-offset of one ``valid_rows``-row sample's measured loss (row difficulty)."""
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        # The LLM defaults (N=200, W=100) suit runs of thousands of updates; this run has 400.
        "coba": {"history_length": 100, "warmup_steps": 25, "tau": 5.0},
        "static": {"weights": [float(t.train_rows) for t in TASKS]},  # proportional to data size
    })


@dataclass
class Trace:
    """What one balancer's run left behind, sampled every ``eval_every`` steps."""

    steps: np.ndarray
    test_losses: np.ndarray  # (E, K)
    weights: np.ndarray  # (E, K), normalised to sum 1 (the objective only sees their ratios)
    divergence: np.ndarray | None  # CoBa's DF, (E,)
    weight_changes: np.ndarray  # (U,) L1 change of the normalised weights over each update interval


class _Split:
    """All tasks' rows of one split, concatenated, with their task ids."""

    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        self.x = torch.cat(xs)
        self.y = torch.cat(ys)
        self.task = torch.cat([torch.full((len(y),), k, dtype=torch.long) for k, y in enumerate(ys)])
        self.offsets = np.cumsum([0] + [len(y) for y in ys])

    def rows(self, per_task: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.cat([idx + int(self.offsets[k]) for k, idx in enumerate(per_task)])
        return self.x[index], self.y[index], self.task[index]

    def sizes(self) -> list[int]:
        return [int(n) for n in np.diff(self.offsets)]


Problem = tuple[_Split, _Split, _Split]
"""Train split, validation pool and test split."""


def make_problem(cfg: SimulationConfig) -> Problem:
    """Train, validation-pool and test splits of the three tasks, deterministic in ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    xs: list[list[torch.Tensor]] = [[], [], []]
    ys: list[list[torch.Tensor]] = [[], [], []]
    for task in TASKS:
        direction = torch.randn(INPUT_DIM, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        for split, rows in enumerate((task.train_rows, cfg.valid_pool, cfg.test_rows)):
            x = torch.randn(rows, INPUT_DIM, generator=gen, dtype=torch.float64)
            z = x @ direction
            target = torch.sin(2.5 * z) / _WAVE_STD if task.wave else z
            xs[split].append(x.float())
            ys[split].append((target + task.noise * torch.randn(rows, generator=gen, dtype=torch.float64)).float())
    return _Split(xs[0], ys[0]), _Split(xs[1], ys[1]), _Split(xs[2], ys[2])


class _SharedTrunk(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.first = nn.Linear(INPUT_DIM, HIDDEN)
        self.last_shared = nn.Linear(HIDDEN, HIDDEN)
        self.head_weight = nn.Parameter(torch.zeros(num_tasks, HIDDEN))
        self.head_bias = nn.Parameter(torch.zeros(num_tasks))
        self.num_tasks = num_tasks

    def task_losses(self, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Per-task mean squared error, (K,); NaN for a task without rows."""
        hidden = torch.tanh(self.last_shared(torch.tanh(self.first(x))))
        pred = (hidden * self.head_weight[task]).sum(-1) + self.head_bias[task]
        sums = torch.zeros(self.num_tasks).index_add(0, task, (pred - y) ** 2)
        counts = torch.bincount(task, minlength=self.num_tasks)
        return sums / counts


def run_balancer(name: str, cfg: SimulationConfig, problem: Problem | None = None) -> Trace:
    """Train the synthetic problem once with balancer ``name``, feeding it what its needs say."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only lose time to threading (badly, on a busy machine)
    try:
        return _train(name, cfg, problem if problem is not None else make_problem(cfg))
    finally:
        torch.set_num_threads(threads)


class _HeldOut:
    """The validation rows each update measures under ``cfg.held_out``, and the offsets of observation noise."""

    def __init__(self, valid: _Split, cfg: SimulationConfig) -> None:
        self.valid, self.cfg = valid, cfg
        self.samples = torch.Generator().manual_seed(cfg.seed + 3)
        noise = torch.Generator().manual_seed(cfg.seed + 4)
        self.offsets = cfg.obs_noise * math.sqrt(cfg.valid_rows) * torch.randn(len(valid.y), generator=noise,
                                                                                dtype=torch.float64)
        everything = [torch.arange(n) for n in valid.sizes()]
        self.fixed = everything if cfg.held_out == "all" else self._draw() if cfg.held_out == "fixed" else None
        self.initial_rows = everything if self.fixed is None else self.fixed

    def _draw(self) -> list[torch.Tensor]:
        return [torch.randint(0, n, (self.cfg.valid_rows,), generator=self.samples) for n in self.valid.sizes()]

    def losses(self, model: _SharedTrunk, per_task: list[torch.Tensor]) -> torch.Tensor:
        """Per-task loss of the rows ``per_task`` (indices within each task), times their difficulty factor."""
        x, y, task = self.valid.rows(per_task)
        index = torch.cat([idx + int(self.valid.offsets[k]) for k, idx in enumerate(per_task)])
        offsets = torch.zeros(model.num_tasks, dtype=torch.float64).index_add(0, task, self.offsets[index])
        counts = torch.bincount(task, minlength=model.num_tasks)
        return model.task_losses(x, y, task).double() * torch.exp(offsets / counts)

    def initial(self, model: _SharedTrunk) -> torch.Tensor:
        return self.losses(model, self.initial_rows)

    def update(self, model: _SharedTrunk) -> torch.Tensor:
        return self.losses(model, self.fixed if self.fixed is not None else self._draw())


def _train(name: str, cfg: SimulationConfig, problem: Problem) -> Trace:
    train, valid, test = problem
    num_tasks = len(TASKS)
    with torch.random.fork_rng():  # the same initialisation for every balancer, global RNG left as it was
        torch.manual_seed(cfg.seed + 1)
        model = _SharedTrunk(num_tasks)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    balancer = build_balancer(name, num_tasks, cfg.options.get(name, {}))
    needs = balancer.needs
    batches = torch.Generator().manual_seed(cfg.seed + 2)
    held_out = _HeldOut(valid, cfg)
    train_sizes = train.sizes()
    steps, test_losses, weights, divergence = [], [], [], []
    with torch.no_grad():
        feed_reference(balancer, lambda: held_out.initial(model))
    previous, changes = _normalised(balancer.weights()), []
    for step in range(1, cfg.steps + 1):
        w = torch.tensor(balancer.weights(), dtype=torch.float32)
        batch = train.rows([torch.randint(0, n, (min(cfg.batch_rows, n),), generator=batches) for n in train_sizes])
        losses = model.task_losses(*batch)
        objective = (w * losses).sum() / w.sum()
        grad_norms = None
        if needs.grad_norms:
            grad_norms = [torch.autograd.grad(losses[k], model.last_shared.weight, retain_graph=True)[0].norm()
                          for k in range(num_tasks)]
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        update = is_update(step, cfg.update_interval)
        with torch.no_grad():
            feed_step(balancer, step, StepObservations(
                train_losses=losses.detach,
                held_out_losses=partial(held_out.update, model) if update else None,
                grad_norms=None if grad_norms is None else partial(torch.stack, grad_norms),
                post_step_losses=partial(model.task_losses, *batch)))
            if update:
                current = _normalised(balancer.weights())
                changes.append(float(np.abs(current - previous).sum()))
                previous = current
            if step % cfg.eval_every == 0:
                steps.append(step)
                weights.append(_normalised(balancer.weights()))
                test_losses.append(model.task_losses(test.x, test.y, test.task).double().numpy())
                if isinstance(balancer, CoBa):
                    divergence.append(balancer.divergence_factor())
    return Trace(np.array(steps), np.array(test_losses), np.array(weights),
                 np.array(divergence) if divergence else None, np.array(changes))


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def summarise(trace: Trace) -> dict[str, Any]:
    """The table row of one run: final and best test loss per task, worst task, step of each best."""
    final = trace.test_losses[-1]
    worst = int(np.argmax(final))
    best_index = trace.test_losses.argmin(axis=0)
    return {
        "final_heldout": {t.name: float(v) for t, v in zip(TASKS, final)},
        "worst_task": TASKS[worst].name,
        "worst_loss": float(final[worst]),
        "best_heldout": {t.name: float(trace.test_losses[i, k]) for k, (t, i) in enumerate(zip(TASKS, best_index))},
        "best_step": {t.name: int(trace.steps[i]) for t, i in zip(TASKS, best_index)},
        "weight_change_per_update": float(trace.weight_changes.mean()),
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    names = [t.name for t in TASKS]
    header = (["balancer"] + [f"final {n}" for n in names] + ["worst task"]
              + [f"best@ {n}" for n in names] + ["w L1/update"])
    lines = [header]
    for balancer, row in rows.items():
        lines.append([balancer] + [f"{row['final_heldout'][n]:.3f}" for n in names]
                     + [f"{row['worst_task']} {row['worst_loss']:.3f}"]
                     + [str(row["best_step"][n]) for n in names]
                     + [f"{row['weight_change_per_update']:.4f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in
                      enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def plot(traces: dict[str, Trace], path: Path, cfg: SimulationConfig) -> None:
    """One PNG: per balancer, its weights and the tasks' test losses over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = math.ceil(len(traces) / columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(18, 3.1 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max(float(np.max(t.test_losses[len(t.steps) // 20:])) for t in traces.values())
    for axis in axes.flat[len(traces) * 2:]:
        axis.set_visible(False)
    for i, (name, trace) in enumerate(traces.items()):
        ax_w, ax_l = axes[i // columns, 2 * (i % columns)], axes[i // columns, 2 * (i % columns) + 1]
        for k, task in enumerate(TASKS):
            ax_w.plot(trace.steps, trace.weights[:, k], color=colors[k], label=task.name)
            ax_l.plot(trace.steps, trace.test_losses[:, k], color=colors[k], label=task.name)
            ax_l.axhline(task.noise ** 2, color=colors[k], linestyle=":", linewidth=0.8)
        if trace.divergence is not None:
            ax_w.plot(trace.steps, trace.divergence, color="black", linestyle="--", linewidth=0.9, label="DF")
        ax_w.set_ylim(0, 1)
        ax_w.set_title(f"{name}: task weights")
        ax_l.set_ylim(0, top * 1.05)
        ax_l.set_title(f"{name}: held-out loss (dotted: noise floor)")
        for axis in (ax_w, ax_l):
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        ax_w.legend(fontsize=7, loc="upper right")
    knobs = cfg.options["coba"]
    fig.suptitle(f"Synthetic multitask problem, seed {cfg.seed}: fast / slow / small (overfitting) task; CoBa "
                 f"N={knobs['history_length']}, W={knobs['warmup_steps']}, tau={knobs['tau']}, "
                 f"update every {cfg.update_interval} steps, observation noise {cfg.obs_noise:g}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def run_all(names: list[str], modes: list[str], cfg: SimulationConfig) -> dict[str, Trace]:
    """Every balancer of ``names`` on one problem (same data, initialisation and batches for all); a balancer that
    reads held-out loss runs once per held-out mode of ``modes``, labelled ``NAME/MODE``, the others once."""
    problem = make_problem(cfg)
    traces: dict[str, Trace] = {}
    for name in names:
        reads_held_out = build_balancer(name, len(TASKS), cfg.options.get(name, {})).needs.validation
        for mode in modes if reads_held_out else [None]:
            label = f"{name}/{mode}" if mode else name
            log.info("simulate: running %s", label)
            traces[label] = run_balancer(name, replace(cfg, held_out=mode) if mode else cfg, problem)
    return traces


def write_report(traces: dict[str, Trace], rows: dict[str, dict[str, Any]], cfg: SimulationConfig, png: Path,
                 json_path: Path) -> None:
    """The picture of ``traces`` to ``png`` and the table ``rows`` (with the config and tasks) to ``json_path``."""
    report = {"config": asdict(cfg), "tasks": [asdict(t) for t in TASKS], "balancers": rows}
    plot(traces, png, cfg)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
