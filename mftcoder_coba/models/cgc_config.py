"""CGC-LoRA's configuration (``model.cgc_lora`` in a run config): expert layout, ranks, clusters and gate.

Song et al. 2024 ("1+N multi-task fine-tuning", arXiv 2402.01684) adapt one frozen base model to many tasks
at once. The tasks are grouped into N task *clusters* (by prior knowledge or task affinity; the paper's N
counts clusters, not tasks). Every targeted linear layer gets ``C`` LoRA experts shared by all tasks and
``S`` experts owned by each cluster; a token of a task in cluster ``k`` uses the common experts plus
cluster ``k``'s own experts, mixed by a gate whose input is the cluster. Without a ``clusters`` mapping
every task is its own cluster (N = number of tasks), the reading in which the paper's clusters are single
tasks. The layers are in :mod:`mftcoder_coba.models.cgc_lora`, the "1+N" export in
:mod:`mftcoder_coba.models.cgc_export`.

A task sees only C + S of the C + N*S experts of a layer, so its adapter's rank (the *effective rank*, the
sum of those experts' ranks) is well below ``rank_budget`` when N is large; :func:`rank_summary` says so
in one line, logged when the model is built;
the export writes each cluster's rank to ``export.json``.

This module imports neither torch nor transformers: loading a run config needs only it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mftcoder_coba.config_io import bounded, check, check_ranges

_FIELD = "model.cgc_lora."
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
"""A cluster name usable as a directory name (the export writes ``adapters/<cluster>/``)."""


@dataclass
class CgcLoraConfig:
    """Expert layout, ranks and gate of CGC-LoRA (``model.cgc_lora`` in a run config).

    Parameter parity with plain LoRA: a plain LoRA of rank ``R`` on a linear layer ``in -> out`` trains
    ``R * (in + out)`` parameters. CGC-LoRA with ``N`` task clusters has ``E = C + N * S`` experts; with
    ``expert_rank`` unset the budget ``R = rank_budget`` is split over them as evenly as possible
    (ranks differ by at most one, the common experts take the remainder first), so the experts' A and B
    matrices hold exactly ``R * (in + out)`` parameters, the same as plain LoRA of rank ``R``. The gate
    adds ``N * d + (C + S) * (d + 1)`` parameters per layer (``d = task_embedding_dim``), a few thousand,
    negligible next to the experts. Setting ``expert_rank`` gives every expert that rank instead
    (``E * expert_rank * (in + out)`` parameters).

    Effective rank: a task uses only the C common experts and its cluster's S experts, so its update has
    rank ``r_t`` = the sum of those C + S ranks, about ``R * (C + S) / E`` (R = 16, C = 2, S = 1 and 8
    clusters: 5 or 6, not 16). Clustering related tasks (fewer, larger clusters) raises it at the same R.
    """

    num_common_experts: int = bounded(2, ge=0)
    """C: LoRA experts shared by all tasks (the task-common knowledge)."""
    num_task_experts: int = bounded(1, ge=0)
    """S: LoRA experts owned by each task; a token of task t never uses another task's experts."""
    rank_budget: int = bounded(16, ge=1)
    """R: total rank over all experts of a layer, matching a plain LoRA of rank R in trainable parameters.
    Must be at least the number of experts C + N*S (every expert needs rank >= 1)."""
    expert_rank: int | None = bounded(None, ge=1)
    """Rank of every expert; when set it replaces the even split of ``rank_budget``."""
    alpha: float = bounded(16.0, gt=0)
    """LoRA alpha: expert e's update is scaled by alpha / rank_e (the peft convention, per expert)."""
    dropout: float = bounded(0.05, ge=0, lt=1)
    """Dropout on the layer input before the experts' A matrices (training only)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names of the nn.Linear modules to adapt; a module matches when its dotted name equals an entry or
    ends with ``.entry`` (the peft rule, so exported adapters target exactly the same layers)."""
    task_embedding_dim: int = bounded(16, ge=1)
    """d: size of the learned cluster embedding that feeds each layer's gate."""
    clusters: dict[str, str] | None = None
    """Task name -> task-cluster name. The paper's N counts task clusters (tasks grouped by prior knowledge
    or affinity): each cluster owns S experts and one gate input, every task of a cluster uses them, and the
    "1+N" export writes one adapter per cluster (``adapters/<cluster>/``). Every task of the data must be
    named, and only those (checked against the shards at the start of a run). Default (null): one cluster
    per task, named after the task."""
    scaling: Literal["expert", "total"] = "expert"
    """How an expert's update ``B_e A_e`` is scaled. ``expert``: by alpha / r_e, its own rank (peft's
    convention applied to each expert alone). ``total``: by alpha / R with R the total rank of the layer's
    experts (``rank_budget``, or E * ``expert_rank``), as MOELoRA does (its experts are slices of one rank-R
    LoRA). ``expert`` is larger by the factor R / r_e, about the number of experts E; with Adam that acts
    like an E times larger learning rate on the update, so ``total`` usually wants a larger ``alpha`` or
    learning rate."""

    def validate(self) -> None:
        """The ranges again (``apply_cgc_lora`` validates a config built in code, not by the loader), then the
        rules between fields."""
        check_ranges(self, _FIELD)
        check(self.num_common_experts + self.num_task_experts >= 1, _FIELD + "num_task_experts",
              "a task needs at least one expert (num_common_experts + num_task_experts >= 1)")
        check(len(self.target_modules) > 0, _FIELD + "target_modules", "must name at least one module")
        check(all(isinstance(t, str) and t for t in self.target_modules), _FIELD + "target_modules",
              "entries must be non-empty module names")
        if self.clusters is not None:
            check(len(self.clusters) > 0, _FIELD + "clusters", "must map at least one task (or be null)")
            bad = sorted({c for c in self.clusters.values() if not (isinstance(c, str) and SAFE_NAME.match(c))})
            check(not bad, _FIELD + "clusters", f"cluster names {bad} are not usable as directory names "
                  "(letters, digits, '_', '-', '.')")

    def cluster_layout(self, task_names: Sequence[str]) -> tuple[list[int], list[str]]:
        """(cluster index of each task, in task-id order; cluster names, in order of their first task).

        With ``clusters`` unset every task is its own cluster. A mapping must name exactly the tasks of the
        data: unknown or missing tasks are one :class:`ConfigError` naming ``model.cgc_lora.clusters``.
        """
        if self.clusters is None:
            return list(range(len(task_names))), list(task_names)
        unknown = sorted(set(self.clusters) - set(task_names))
        missing = [t for t in task_names if t not in self.clusters]
        problems = ([f"task(s) {', '.join(unknown)} not in the data"] if unknown else []) + \
                   ([f"no cluster for task(s) {', '.join(missing)}"] if missing else [])
        check(not problems, _FIELD + "clusters", f"{'; '.join(problems)} (the data's tasks: {', '.join(task_names)})")
        names = list(dict.fromkeys(self.clusters[t] for t in task_names))
        return [names.index(self.clusters[t]) for t in task_names], names

    def expert_ranks(self, num_clusters: int) -> list[int]:
        """Rank of each expert, common experts first, then cluster 0's S experts, cluster 1's, ..."""
        num_experts = self.num_common_experts + num_clusters * self.num_task_experts
        if self.expert_rank is not None:
            return [self.expert_rank] * num_experts
        check(self.rank_budget >= num_experts, _FIELD + "rank_budget",
              f"{self.rank_budget} is below the number of experts {num_experts} "
              f"(num_common_experts + {num_clusters} task clusters * num_task_experts); raise it, "
              "group tasks into clusters or set expert_rank")
        base, extra = divmod(self.rank_budget, num_experts)
        return [base + (1 if e < extra else 0) for e in range(num_experts)]

    def effective_ranks(self, num_clusters: int) -> list[int]:
        """Per cluster, the rank of the update a task of that cluster gets: the C common experts' ranks plus
        the cluster's S experts' ranks (the rank of its exported adapter)."""
        ranks = self.expert_ranks(num_clusters)
        common, per = self.num_common_experts, self.num_task_experts
        return [sum(ranks[:common]) + sum(ranks[common + k * per: common + (k + 1) * per])
                for k in range(num_clusters)]

    def expert_scales(self, ranks: Sequence[int]) -> list[float]:
        """The factor each expert's ``B_e A_e`` is multiplied by (before its gate weight): alpha / r_e
        (``scaling: expert``) or alpha / sum(ranks) (``scaling: total``)."""
        if self.scaling == "total":
            return [self.alpha / sum(ranks)] * len(ranks)
        return [self.alpha / r for r in ranks]


def rank_summary(cfg: CgcLoraConfig, num_clusters: int) -> str:
    """One line on what a task's adapter is: how many experts it uses and their total (effective) rank."""
    ranks = cfg.expert_ranks(num_clusters)
    effective = sorted(set(cfg.effective_ranks(num_clusters)))
    rank = str(effective[0]) if len(effective) == 1 else f"{effective[0]}-{effective[-1]}"
    scale = cfg.expert_scales(ranks)
    scales = sorted({round(s, 6) for s in scale})
    scale_text = f"alpha/r_e = {scales[0]:g}" + (f"-{scales[-1]:g}" if len(scales) > 1 else "") \
        if cfg.scaling == "expert" else f"alpha/R = {scales[0]:g}"
    return (f"each task uses {cfg.num_common_experts}+{cfg.num_task_experts} experts of total rank {rank} "
            f"(budget {sum(ranks)} over {len(ranks)} experts: {cfg.num_common_experts} common + {num_clusters} "
            f"clusters x {cfg.num_task_experts}); scaling {cfg.scaling}: {scale_text}")
