"""CGC-LoRA: task-common and task-specific LoRA experts mixed by a task-motivated gate.

Song et al. 2024 ("1+N multi-task fine-tuning", arXiv 2402.01684) adapt one frozen base model to many tasks
at once. The tasks are grouped into N task *clusters* (by prior knowledge or task affinity; the paper's N
counts clusters, not tasks). Every targeted linear layer gets ``C`` LoRA experts shared by all tasks and
``S`` experts owned by each cluster; a token of a task in cluster ``k`` uses the common experts plus
cluster ``k``'s own experts, mixed by a gate whose input is the cluster (a learned cluster embedding through
a linear map and a softmax), not the hidden state. Because the gate depends only on the cluster, the mixture
is a constant per cluster and folds into one plain LoRA adapter per cluster: the "1+N" export (one base
model plus N adapters) that peft loads. Without a ``clusters`` mapping every task is its own cluster (N =
number of tasks), the reading in which the paper's clusters are single tasks.

A task sees only C + S of the C + N*S experts of a layer, so its adapter's rank (the *effective rank*, the
sum of those experts' ranks) is well below ``rank_budget`` when N is large; it is logged when the model is
built and written to ``export.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mftcoder_coba.atomic import atomic_directory, check_replaceable, mark_output
from mftcoder_coba.config_io import build, check, to_dict
from mftcoder_coba.errors import UserError

logger = logging.getLogger(__name__)

_FIELD = "model.cgc_lora."
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
EXPORT_KIND = "export"
"""The :func:`~mftcoder_coba.atomic.mark_output` kind of an export directory (``--overwrite`` replaces only those)."""


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

    num_common_experts: int = 2
    """C: LoRA experts shared by all tasks (the task-common knowledge)."""
    num_task_experts: int = 1
    """S: LoRA experts owned by each task; a token of task t never uses another task's experts."""
    rank_budget: int = 16
    """R: total rank over all experts of a layer, matching a plain LoRA of rank R in trainable parameters.
    Must be at least the number of experts C + N*S (every expert needs rank >= 1)."""
    expert_rank: int | None = None
    """Rank of every expert; when set it replaces the even split of ``rank_budget``."""
    alpha: float = 16.0
    """LoRA alpha: expert e's update is scaled by alpha / rank_e (the peft convention, per expert)."""
    dropout: float = 0.05
    """Dropout on the layer input before the experts' A matrices (training only)."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names of the nn.Linear modules to adapt; a module matches when its dotted name equals an entry or
    ends with ``.entry`` (the peft rule, so exported adapters target exactly the same layers)."""
    task_embedding_dim: int = 16
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
        check(self.num_common_experts >= 0, _FIELD + "num_common_experts", "must be >= 0")
        check(self.num_task_experts >= 0, _FIELD + "num_task_experts", "must be >= 0")
        check(self.num_common_experts + self.num_task_experts >= 1, _FIELD + "num_task_experts",
              "a task needs at least one expert (num_common_experts + num_task_experts >= 1)")
        check(self.rank_budget >= 1, _FIELD + "rank_budget", "must be >= 1")
        check(self.expert_rank is None or self.expert_rank >= 1, _FIELD + "expert_rank", "must be >= 1 when set")
        check(self.alpha > 0, _FIELD + "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, _FIELD + "dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, _FIELD + "target_modules", "must name at least one module")
        check(all(isinstance(t, str) and t for t in self.target_modules), _FIELD + "target_modules",
              "entries must be non-empty module names")
        check(self.task_embedding_dim >= 1, _FIELD + "task_embedding_dim", "must be >= 1")
        if self.clusters is not None:
            check(len(self.clusters) > 0, _FIELD + "clusters", "must map at least one task (or be null)")
            bad = sorted({c for c in self.clusters.values() if not (isinstance(c, str) and _SAFE_NAME.match(c))})
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


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

class _TaskIds:
    """Per-token task ids shared by every CGC layer of one model (set once per forward, read by each layer),
    and the model's tasks and clusters.

    ``index`` holds each token's row of the layers' weight tables: its task's cluster, and row
    ``num_clusters`` for padding (-1), so a layer turns ids into per-token gate weights with one gather.
    """

    def __init__(self, cfg: CgcLoraConfig, task_names: Sequence[str], task_cluster: Sequence[int],
                 cluster_names: Sequence[str]) -> None:
        self.cfg = cfg
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.task_cluster = list(task_cluster)
        self.cluster_names = list(cluster_names)
        self.num_clusters = len(self.cluster_names)
        # task id -> weight-table row; id -1 reads the last entry, the padding row
        self._rows = {torch.device("cpu"): torch.tensor(self.task_cluster + [self.num_clusters], dtype=torch.long)}
        self.index: torch.Tensor | None = None

    def rows(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Weight-table rows of ``task_ids`` (long, values in [-1, num_tasks - 1]), on their device."""
        if task_ids.device not in self._rows:
            self._rows[task_ids.device] = self._rows[torch.device("cpu")].to(task_ids.device)
        return self._rows[task_ids.device][task_ids]


class CgcExperts(nn.Module):
    """The experts and gate of one adapted linear layer; computes the gated low-rank update.

    All experts' A matrices are stacked into one ``(R_total, in)`` matrix and their B matrices into one
    ``(out, R_total)`` matrix, so the update for a batch is two matmuls whatever the number of experts:
    ``delta = ((dropout(x) @ A^T) * s) @ B^T`` where ``s[token, j]`` is the gate weight of column j's expert
    for the token's cluster times that expert's scaling (:meth:`CgcLoraConfig.expert_scales`). A token's
    columns of other clusters' experts get weight 0, so those experts neither contribute to it nor receive
    its gradient.

    Padding rule: a token with task id -1 carries no task, so it gets only the task-common experts, each
    with weight 1 / C (and the base layer alone when C = 0). Padding never reaches the loss; the rule just
    keeps its output defined and task-agnostic.
    """

    def __init__(self, in_features: int, out_features: int, cfg: CgcLoraConfig, num_clusters: int,
                 ranks: Sequence[int], device: torch.device, dtype: torch.dtype, task_ids: _TaskIds) -> None:
        super().__init__()
        common, per_task = cfg.num_common_experts, cfg.num_task_experts
        total = sum(ranks)
        self.num_clusters = num_clusters
        self.num_experts = len(ranks)
        self.lora_A = nn.Parameter(torch.empty(total, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, total, device=device, dtype=dtype))
        # Same init as peft's LoRA: the stacked A has the fan-in of each expert's A, B starts at zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # one row per cluster (the name is kept from when clusters were single tasks: same state-dict keys)
        self.task_embedding = nn.Embedding(num_clusters, cfg.task_embedding_dim, device=device, dtype=dtype)
        self.gate = nn.Linear(cfg.task_embedding_dim, common + per_task, device=device, dtype=dtype)
        # A zero gate map starts every cluster at a uniform mixture of its experts.
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

        column_expert = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(list(ranks)))
        expert_scale = cfg.expert_scales(ranks)
        column_scale = torch.tensor([expert_scale[e] for e in column_expert.tolist()], dtype=torch.float64)
        allowed = torch.tensor([list(range(common)) + [common + k * per_task + j for j in range(per_task)]
                                for k in range(num_clusters)], dtype=torch.long)
        padding = torch.zeros(len(ranks), dtype=torch.float64)
        if common:
            padding[:common] = 1.0 / common
        self.register_buffer("column_expert", column_expert.to(device), persistent=False)
        self.register_buffer("column_scale", column_scale.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("allowed", allowed.to(device), persistent=False)
        self.register_buffer("padding_weights", padding.to(device=device, dtype=dtype), persistent=False)
        # A plain attribute (not a submodule): one object shared by all layers of the model.
        self._task_ids = task_ids

    def expert_weights(self) -> torch.Tensor:
        """(num_clusters + 1, num_experts) gate weights: row k for cluster k, the last row for padding (-1)."""
        logits = self.gate(self.task_embedding.weight)                     # (N, C + S)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        probs = probs.to(logits.dtype)
        clusters = torch.zeros(self.num_clusters, self.num_experts, device=probs.device, dtype=probs.dtype)
        clusters = clusters.scatter(1, self.allowed, probs)
        return torch.cat([clusters, self.padding_weights.to(probs.dtype)[None]], dim=0)

    def column_scales(self) -> torch.Tensor:
        """(num_clusters + 1, R_total): per cluster, each rank column's gate weight times its expert's scale."""
        return self.expert_weights()[:, self.column_expert] * self.column_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._task_ids.index
        if index is None:
            raise RuntimeError("CGC-LoRA layer called without task ids: wrap the forward in "
                               "task_ids_context(model, task_ids) or call set_task_ids(model, task_ids) first")
        lead = x.shape[:-1]
        if index.numel() == lead.numel():
            # the same tokens in the same order, also when packed rows are flattened into one (varlen attention)
            index = index.reshape(lead)
        elif index.dim() == 1 and len(lead) >= 1 and lead[0] == index.shape[0]:
            # one task per row (generation): broadcast over the row's positions
            index = index.view(index.shape[0], *([1] * (len(lead) - 1))).expand(lead)
        else:
            raise RuntimeError(f"CGC-LoRA task ids of shape {tuple(index.shape)} do not match the layer "
                               f"input of shape {tuple(x.shape)}; set this batch's task ids before the forward")
        scales = self.column_scales()[index.to(x.device)]                 # (..., R_total)
        hidden = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(hidden * scales, self.lora_B)


class CgcLoraLinear(nn.Linear):
    """A frozen base ``nn.Linear`` plus its :class:`CgcExperts` update.

    It subclasses ``nn.Linear`` and keeps the base's own weight and bias parameters, so the base keys of
    the model's state dict are unchanged (``...q_proj.weight``) and the experts live under ``...q_proj.cgc.``.
    """

    def __init__(self, base: nn.Linear, experts: CgcExperts) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.cgc = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        return result + self.cgc(x).to(result.dtype)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def cgc_layers(model: nn.Module) -> dict[str, CgcLoraLinear]:
    """The model's CGC-adapted linears by dotted module name (empty when CGC-LoRA was not applied)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CgcLoraLinear)}


def apply_cgc_lora(model: nn.Module, cfg: CgcLoraConfig, num_tasks: int,
                   task_names: Sequence[str] | None = None) -> nn.Module:
    """Freeze every base parameter and replace each targeted ``nn.Linear`` with a CGC-LoRA layer (in place).

    ``task_names`` (task-id order) resolve ``cfg.clusters``; without them the tasks are called ``task0``,
    ``task1``, ... (enough when every task is its own cluster). Expert parameters are created on the base
    weight's device, in float32 when the base is in a 16-bit dtype (stable adapter optimisation, as peft
    does) and in the base dtype otherwise; their values come from torch's global RNG, so seed it for
    reproducible runs. Returns ``model``.
    """
    if num_tasks < 1:
        raise ValueError(f"apply_cgc_lora needs num_tasks >= 1, got {num_tasks}")
    if cgc_layers(model):
        raise ValueError("CGC-LoRA is already applied to this model")
    if task_names is None:
        if cfg.clusters is not None:
            raise ValueError("apply_cgc_lora needs the task names to resolve model.cgc_lora.clusters")
        task_names = [f"task{t}" for t in range(num_tasks)]
    if len(task_names) != num_tasks:
        raise ValueError(f"apply_cgc_lora: {len(task_names)} task names for {num_tasks} tasks")
    cfg.validate()
    task_cluster, cluster_names = cfg.cluster_layout(task_names)
    ranks = cfg.expert_ranks(len(cluster_names))
    task_ids = _TaskIds(cfg, task_names, task_cluster, cluster_names)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and _matches(name, cfg.target_modules)]
    if not targets:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"config field 'model.cgc_lora.target_modules': {cfg.target_modules} match no linear "
                        f"layer of the model (its linear layers are named {linears})")
    for name, base in targets:
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        experts = CgcExperts(base.in_features, base.out_features, cfg, len(cluster_names), ranks,
                             base.weight.device, dtype, task_ids)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CgcLoraLinear(base, experts))
    logger.info("CGC-LoRA: %d layers, %d tasks in %d clusters, expert ranks %s, %d trainable parameters",
                len(targets), num_tasks, len(cluster_names), ranks,
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    logger.info("CGC-LoRA: %s", rank_summary(cfg, len(cluster_names)))
    return model


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


def _task_ids_slot(model: nn.Module) -> _TaskIds:
    for m in model.modules():
        if isinstance(m, CgcExperts):
            return m._task_ids
    raise ValueError("the model has no CGC-LoRA layers (apply_cgc_lora was not called)")


def _to_index(slot: _TaskIds, task_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Task ids as row indices of the layers' weight tables (each task's cluster; -1 -> the padding row).

    The range is checked on CPU tensors; on an accelerator that check would stall the host once per
    micro-batch, so there an out-of-range id surfaces as the gather's own index error instead (the data
    reader has checked the ids against the manifest's tasks already).
    """
    if task_ids is None:
        return None
    if task_ids.dim() not in (1, 2) or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ValueError(f"task ids must be an integer tensor of shape (B, L) or (B,), got "
                         f"{task_ids.dtype} {tuple(task_ids.shape)}")
    task_ids = task_ids.long()
    if task_ids.device.type == "cpu" and task_ids.numel():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < -1 or high >= slot.num_tasks:
            raise ValueError(f"task ids must be in [-1, {slot.num_tasks - 1}] (the model was built for "
                             f"{slot.num_tasks} tasks), got values in [{low}, {high}]")
    return slot.rows(task_ids)


def set_task_ids(model: nn.Module, task_ids: torch.Tensor | None) -> None:
    """Set the per-token task ids ``(B, L)`` (or per-row ``(B,)``) every CGC layer uses until the next call.

    Unlike :func:`task_ids_context`, the ids stay set after the forward returns; gradient checkpointing needs
    that, because it re-runs the layers during backward, after a ``with`` block would have ended.
    """
    slot = _task_ids_slot(model)
    slot.index = _to_index(slot, task_ids)


@contextlib.contextmanager
def task_ids_context(model: nn.Module, task_ids: torch.Tensor) -> Iterator[None]:
    """Run the forwards inside the block with these per-token task ids; the previous ids come back after.

    ``task_ids``: long ``(B, L)`` matching the input ids (packed rows may hold several tasks), or ``(B,)``
    for one task per row (generation); -1 marks padding (common experts only, see :class:`CgcExperts`).
    """
    slot = _task_ids_slot(model)
    previous = slot.index
    slot.index = _to_index(slot, task_ids)
    try:
        yield
    finally:
        slot.index = previous


# ---------------------------------------------------------------------------------------------------------
# Saving and loading the CGC parameters
# ---------------------------------------------------------------------------------------------------------

CGC_WEIGHTS = "cgc_lora.safetensors"
CGC_CONFIG = "cgc_lora.json"


def _is_cgc_key(key: str) -> bool:
    return ".cgc." in key or key.startswith("cgc.")


def cgc_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The CGC parameters (experts and gates) by state-dict key, from ``state_dict`` when given (e.g. a
    consolidated ZeRO-3 state dict) or from the model."""
    source = model.state_dict() if state_dict is None else state_dict
    return {k: v for k, v in source.items() if _is_cgc_key(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base parameters under their original keys (the CGC parameters left out)."""
    return {k: v for k, v in model.state_dict().items() if not _is_cgc_key(k)}


def save_base_model(model: nn.Module, out_dir: str | Path) -> None:
    """Write the frozen base as a plain transformers model directory (what ``from_pretrained`` loads)."""
    model.save_pretrained(str(out_dir), state_dict=base_state_dict(model))


def _layout(model: nn.Module) -> dict:
    slot = _task_ids_slot(model)
    return {"config": to_dict(slot.cfg), "num_tasks": slot.num_tasks, "task_names": slot.task_names,
            "task_clusters": slot.task_cluster, "clusters": slot.cluster_names,
            "expert_ranks": slot.cfg.expert_ranks(slot.num_clusters), "layers": sorted(cgc_layers(model))}


def save_cgc(model: nn.Module, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the CGC parameters to ``out_dir/cgc_lora.safetensors`` and the layout to ``cgc_lora.json``.

    The JSON (config, tasks and their clusters, expert ranks, adapted layers) lets :func:`load_cgc` refuse
    weights made for a different layout with a clear message instead of a shape error deep in torch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in cgc_state_dict(model, state_dict).items()}
    save_file(tensors, str(out_dir / CGC_WEIGHTS), metadata={"format": "pt"})
    (out_dir / CGC_CONFIG).write_text(json.dumps(_layout(model), indent=2) + "\n", encoding="utf-8")


def load_cgc_config(in_dir: str | Path) -> tuple[CgcLoraConfig, list[str]]:
    """The config and task names (task-id order) a :func:`save_cgc` directory was written with; directories
    written before task names were recorded give ``task0``, ``task1``, ... (one cluster per task)."""
    path = Path(in_dir) / CGC_CONFIG
    if not path.is_file():
        raise UserError(f"{path}: not found (not a CGC-LoRA checkpoint directory)")
    layout = json.loads(path.read_text(encoding="utf-8"))
    names = layout.get("task_names") or [f"task{t}" for t in range(int(layout["num_tasks"]))]
    return build(CgcLoraConfig, layout["config"]), [str(n) for n in names]


def load_cgc(model: nn.Module, in_dir: str | Path) -> nn.Module:
    """Load CGC parameters written by :func:`save_cgc` into a model with the same CGC layout (in place)."""
    in_dir = Path(in_dir)
    config_path, weights_path = in_dir / CGC_CONFIG, in_dir / CGC_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path}: not found (not a CGC-LoRA checkpoint directory)")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    mine = _layout(model)
    saved.setdefault("task_clusters", list(range(int(saved.get("num_tasks", 0)))))  # before clusters: one per task
    for key in ("num_tasks", "task_clusters", "expert_ranks", "layers"):
        if saved.get(key) != mine[key]:
            raise UserError(f"{config_path}: '{key}' is {saved.get(key)!r} but the model was built with "
                            f"{mine[key]!r}")
    tensors = load_file(str(weights_path))
    params = cgc_state_dict(model, model.state_dict(keep_vars=True))
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise UserError(f"{weights_path}: CGC parameters do not match the model (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != params[key].shape:
                raise UserError(f"{weights_path}: '{key}' has shape {tuple(value.shape)}, the model expects "
                                f"{tuple(params[key].shape)}")
            params[key].copy_(value)
    return model


# ---------------------------------------------------------------------------------------------------------
# "1+N" export
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def cluster_lora_factors(layer: CgcLoraLinear, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``cluster``'s gated update of one layer as plain LoRA factors ``(A_k, B_k)`` with ``B_k @ A_k``
    equal to the layer's update for every task of that cluster.

    The gate weights are constants per cluster, so ``sum_e g_e s_e B_e A_e`` (``s_e`` the expert's scale) is
    one LoRA whose rank is the sum of the ranks of the experts the cluster uses: A_k stacks their A's, B_k
    their scaled B's.
    """
    experts = layer.cgc
    scales = experts.column_scales()[cluster]
    columns = torch.isin(experts.column_expert, experts.allowed[cluster]).nonzero().squeeze(1)
    return experts.lora_A[columns].clone(), experts.lora_B[:, columns] * scales[columns]


def _write_adapter(layers: dict[str, CgcLoraLinear], cluster: int, out_dir: Path) -> int:
    from peft import LoraConfig

    tensors: dict[str, torch.Tensor] = {}
    rank = 0
    for name, layer in layers.items():
        a, b = cluster_lora_factors(layer, cluster)
        rank = a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    # lora_alpha = r makes peft's scaling 1: the gate weights and expert scales already sit inside B_k.
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(layers))
    out_dir.mkdir(parents=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank


def _write_merged(model: nn.Module, layers: dict[str, CgcLoraLinear], cluster: int, out_dir: Path) -> None:
    state = base_state_dict(model)
    for name, layer in layers.items():
        a, b = cluster_lora_factors(layer, cluster)
        weight = layer.weight
        delta = (b.to(torch.float64) @ a.to(torch.float64)).to(device=weight.device, dtype=weight.dtype)
        state[f"{name}.weight"] = weight.detach() + delta
    model.save_pretrained(str(out_dir), state_dict=state)


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)


def _is_export(path: Path) -> bool:
    """An export made before output markers existed: its ``export.json`` beside ``base/``."""
    return (path / "export.json").is_file() and (path / "base" / "config.json").is_file()


def export_task_adapters(model: nn.Module, out_dir: str | Path, task_names: Sequence[str] | None = None,
                         tokenizer_dir: str | Path | None = None, merged: bool = False, *,
                         overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the "1+N" form of a CGC-LoRA model: the base once plus one plain peft LoRA adapter per task
    cluster (per task when every task is its own cluster, the default).

    Layout of ``out_dir`` (written in a temporary sibling directory, renamed when complete)::

        base/                  transformers model dir of the frozen base (+ tokenizer files when given)
        adapters/<cluster>/    peft LoRA adapter: PeftModel.from_pretrained(base_model, "adapters/<cluster>")
        merged/<cluster>/      with merged=True: base + that cluster's update, a plain transformers model dir
        export.json            the rank budget and scaling; per cluster its tasks, effective rank (the
                               adapter's rank), path and mean gate weight on the common experts; per task
                               its cluster and that cluster's adapter

    ``task_names`` (task-id order) rename the model's tasks (and, with one cluster per task, the clusters).
    ``out_dir`` must not be, hold or lie inside one of ``inputs`` (e.g. the run directory exported from)
    or any run directory; an existing one is replaced only with ``overwrite``, only when it is an earlier
    export, and only once the new one is whole (:func:`mftcoder_coba.atomic.check_replaceable`).

    Each adapter reproduces the gated model for the tasks of its cluster exactly (up to floating point):
    see :func:`cluster_lora_factors`.
    """
    out_dir = Path(out_dir)
    slot = _task_ids_slot(model)
    layers = cgc_layers(model)
    names = slot.task_names if task_names is None else list(task_names)
    if len(names) != slot.num_tasks:
        raise UserError(f"export: {len(names)} task names given for a model with {slot.num_tasks} tasks")
    if len(set(names)) != len(names):
        raise UserError(f"export: task names must be unique, got {names}")
    if slot.cfg.clusters is not None and names != slot.task_names:
        raise UserError(f"export: task names {names} differ from the model's {slot.task_names}, which "
                        "model.cgc_lora.clusters groups")
    clusters = slot.cluster_names if slot.cfg.clusters is not None else names
    for name in clusters:
        if not _SAFE_NAME.match(name):
            raise UserError(f"export: cluster name {name!r} is not usable as a directory name")
    check_replaceable(out_dir, overwrite=overwrite, kind=EXPORT_KIND, inputs=inputs, owned=_is_export)
    tokenizer = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None and not tokenizer.is_dir():
        raise UserError(f"{tokenizer}: tokenizer directory not found")
    cfg = slot.cfg
    ranks = cfg.expert_ranks(slot.num_clusters)
    summary = {"base": "base", "rank_budget": sum(ranks), "num_experts": len(ranks),
               "experts_per_task": cfg.num_common_experts + cfg.num_task_experts, "scaling": cfg.scaling,
               "clusters": [], "tasks": []}
    training_cache = model.config.use_cache
    model.config.use_cache = True        # the exported models are for inference: KV cache on
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            mark_output(tmp, EXPORT_KIND)
            save_base_model(model, tmp / "base")
            if tokenizer is not None:
                _copy_tokenizer(tokenizer, tmp / "base")
            entries = []
            for k, cluster in enumerate(clusters):
                rank = _write_adapter(layers, k, tmp / "adapters" / cluster)
                entry = {"cluster": cluster, "tasks": [n for n, c in zip(names, slot.task_cluster) if c == k],
                         "rank": rank, "adapter": f"adapters/{cluster}"}
                with torch.no_grad():
                    entry["common_gate_weight_mean"] = float(sum(
                        layer.cgc.expert_weights()[k, :cfg.num_common_experts].sum().item()
                        for layer in layers.values()) / len(layers))
                if merged:
                    _write_merged(model, layers, k, tmp / "merged" / cluster)
                    if tokenizer is not None:
                        _copy_tokenizer(tokenizer, tmp / "merged" / cluster)
                    entry["merged"] = f"merged/{cluster}"
                entries.append(entry)
            summary["clusters"] = entries
            summary["tasks"] = [{"task_id": t, "name": name, "cluster": clusters[k], "rank": entries[k]["rank"],
                                 "adapter": entries[k]["adapter"],
                                 **({"merged": entries[k]["merged"]} if merged else {})}
                                for t, (name, k) in enumerate(zip(names, slot.task_cluster))]
            (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    finally:
        model.config.use_cache = training_cache
    logger.info("exported base + %d cluster adapters (%d tasks) to %s", len(clusters), len(names), out_dir)
    return out_dir
