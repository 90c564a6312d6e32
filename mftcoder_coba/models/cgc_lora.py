"""CGC-LoRA layers: task-common and task-specific LoRA experts mixed by a task-motivated gate, applied to a
model, plus saving and loading their parameters.

Every targeted linear layer gets the common experts and each task cluster's own experts
(:class:`~mftcoder_coba.models.cgc_config.CgcLoraConfig` holds the layout and explains the parameter
budget). The gate's input is the cluster (a learned cluster embedding through a linear map and a softmax),
not the hidden state, so the mixture is a constant per cluster and folds into one plain LoRA adapter per
cluster: the "1+N" export of :mod:`mftcoder_coba.models.cgc_export`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mftcoder_coba.config_io import build, to_dict
from mftcoder_coba.errors import UserError
from mftcoder_coba.models.cgc_config import CgcLoraConfig, rank_summary

logger = logging.getLogger(__name__)


class CgcTasks:
    """The model's tasks and clusters, and the per-token task ids shared by every CGC layer of one model
    (set once per forward, read by each layer); :func:`cgc_tasks` finds it.

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
                 ranks: Sequence[int], device: torch.device, dtype: torch.dtype, task_ids: CgcTasks) -> None:
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
    task_ids = CgcTasks(cfg, task_names, task_cluster, cluster_names)
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


def cgc_tasks(model: nn.Module) -> CgcTasks:
    """The :class:`CgcTasks` all CGC layers of ``model`` share (its config, tasks and clusters)."""
    for m in model.modules():
        if isinstance(m, CgcExperts):
            return m._task_ids
    raise ValueError("the model has no CGC-LoRA layers (apply_cgc_lora was not called)")


def _to_index(slot: CgcTasks, task_ids: torch.Tensor | None) -> torch.Tensor | None:
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
    slot = cgc_tasks(model)
    slot.index = _to_index(slot, task_ids)


@contextlib.contextmanager
def task_ids_context(model: nn.Module, task_ids: torch.Tensor) -> Iterator[None]:
    """Run the forwards inside the block with these per-token task ids; the previous ids come back after.

    ``task_ids``: long ``(B, L)`` matching the input ids (packed rows may hold several tasks), or ``(B,)``
    for one task per row (generation); -1 marks padding (common experts only, see :class:`CgcExperts`).
    """
    slot = cgc_tasks(model)
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
    slot = cgc_tasks(model)
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
