"""CGC-LoRA: task-common and task-specific LoRA experts mixed by a task-motivated gate.

Song et al. 2024 ("1+N multi-task fine-tuning", arXiv 2402.01684) adapt one frozen base model to N tasks
at once. Every targeted linear layer gets ``C`` LoRA experts shared by all tasks and ``S`` experts owned by
each task; a token of task ``t`` uses the common experts plus task ``t``'s own experts, mixed by a gate
whose input is the task id (a learned task embedding through a linear map and a softmax), not the hidden
state. Because the gate depends only on the task, the mixture is a constant per task and folds into one
plain LoRA adapter per task: the "1+N" export (one base model plus N adapters) that peft loads.
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
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mftcoder_coba.atomic import NEW_DIRECTORY_HINT, atomic_directory, refuse_existing
from mftcoder_coba.config_io import build, check, to_dict
from mftcoder_coba.errors import UserError

logger = logging.getLogger(__name__)

_FIELD = "model.cgc_lora."
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class CgcLoraConfig:
    """Expert layout, ranks and gate of CGC-LoRA (``model.cgc_lora`` in a run config).

    Parameter parity with plain LoRA: a plain LoRA of rank ``R`` on a linear layer ``in -> out`` trains
    ``R * (in + out)`` parameters. CGC-LoRA with ``N`` tasks has ``E = C + N * S`` experts; with
    ``expert_rank`` unset the budget ``R = rank_budget`` is split over them as evenly as possible
    (ranks differ by at most one, the common experts take the remainder first), so the experts' A and B
    matrices hold exactly ``R * (in + out)`` parameters, the same as plain LoRA of rank ``R``. The gate
    adds ``N * d + (C + S) * (d + 1)`` parameters per layer (``d = task_embedding_dim``), a few thousand,
    negligible next to the experts. Setting ``expert_rank`` gives every expert that rank instead
    (``E * expert_rank * (in + out)`` parameters).
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
    """d: size of the learned task embedding that feeds each layer's gate."""

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

    def expert_ranks(self, num_tasks: int) -> list[int]:
        """Rank of each expert, common experts first, then task 0's S experts, task 1's, ..."""
        num_experts = self.num_common_experts + num_tasks * self.num_task_experts
        if self.expert_rank is not None:
            return [self.expert_rank] * num_experts
        check(self.rank_budget >= num_experts, _FIELD + "rank_budget",
              f"{self.rank_budget} is below the number of experts {num_experts} "
              f"(num_common_experts + {num_tasks} tasks * num_task_experts); raise it or set expert_rank")
        base, extra = divmod(self.rank_budget, num_experts)
        return [base + (1 if e < extra else 0) for e in range(num_experts)]


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

class _TaskIds:
    """Per-token task ids shared by every CGC layer of one model (set once per forward, read by each layer).

    ``index`` holds the ids with padding (-1) mapped to row ``num_tasks`` of the layers' weight tables, so a
    layer turns ids into per-token gate weights with one gather.
    """

    def __init__(self, cfg: CgcLoraConfig, num_tasks: int) -> None:
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.index: torch.Tensor | None = None


class CgcExperts(nn.Module):
    """The experts and gate of one adapted linear layer; computes the gated low-rank update.

    All experts' A matrices are stacked into one ``(R_total, in)`` matrix and their B matrices into one
    ``(out, R_total)`` matrix, so the update for a batch is two matmuls whatever the number of experts:
    ``delta = ((dropout(x) @ A^T) * s) @ B^T`` where ``s[token, j]`` is the gate weight of column j's expert
    for the token's task times that expert's scaling ``alpha / rank``. A token's columns of other tasks'
    experts get weight 0, so those experts neither contribute to it nor receive its gradient.

    Padding rule: a token with task id -1 carries no task, so it gets only the task-common experts, each
    with weight 1 / C (and the base layer alone when C = 0). Padding never reaches the loss; the rule just
    keeps its output defined and task-agnostic.
    """

    def __init__(self, in_features: int, out_features: int, cfg: CgcLoraConfig, num_tasks: int,
                 ranks: Sequence[int], device: torch.device, dtype: torch.dtype, task_ids: _TaskIds) -> None:
        super().__init__()
        common, per_task = cfg.num_common_experts, cfg.num_task_experts
        total = sum(ranks)
        self.num_tasks = num_tasks
        self.num_experts = len(ranks)
        self.lora_A = nn.Parameter(torch.empty(total, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, total, device=device, dtype=dtype))
        # Same init as peft's LoRA: the stacked A has the fan-in of each expert's A, B starts at zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.task_embedding = nn.Embedding(num_tasks, cfg.task_embedding_dim, device=device, dtype=dtype)
        self.gate = nn.Linear(cfg.task_embedding_dim, common + per_task, device=device, dtype=dtype)
        # A zero gate map starts every task at a uniform mixture of its experts.
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

        column_expert = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(list(ranks)))
        column_scale = torch.tensor([cfg.alpha / ranks[e] for e in column_expert.tolist()], dtype=torch.float64)
        allowed = torch.tensor([list(range(common)) + [common + t * per_task + j for j in range(per_task)]
                                for t in range(num_tasks)], dtype=torch.long)
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
        """(num_tasks + 1, num_experts) gate weights: row t for task t, the last row for padding (-1)."""
        logits = self.gate(self.task_embedding.weight)                     # (N, C + S)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        probs = probs.to(logits.dtype)
        tasks = torch.zeros(self.num_tasks, self.num_experts, device=probs.device, dtype=probs.dtype)
        tasks = tasks.scatter(1, self.allowed, probs)
        return torch.cat([tasks, self.padding_weights.to(probs.dtype)[None]], dim=0)

    def column_scales(self) -> torch.Tensor:
        """(num_tasks + 1, R_total): per task, each rank column's gate weight times alpha / rank."""
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


def apply_cgc_lora(model: nn.Module, cfg: CgcLoraConfig, num_tasks: int) -> nn.Module:
    """Freeze every base parameter and replace each targeted ``nn.Linear`` with a CGC-LoRA layer (in place).

    Expert parameters are created on the base weight's device, in float32 when the base is in a 16-bit
    dtype (stable adapter optimisation, as peft does) and in the base dtype otherwise; their values come
    from torch's global RNG, so seed it for reproducible runs. Returns ``model``.
    """
    if num_tasks < 1:
        raise ValueError(f"apply_cgc_lora needs num_tasks >= 1, got {num_tasks}")
    if cgc_layers(model):
        raise ValueError("CGC-LoRA is already applied to this model")
    cfg.validate()
    ranks = cfg.expert_ranks(num_tasks)
    task_ids = _TaskIds(cfg, num_tasks)
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
        experts = CgcExperts(base.in_features, base.out_features, cfg, num_tasks, ranks,
                             base.weight.device, dtype, task_ids)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CgcLoraLinear(base, experts))
    logger.info("CGC-LoRA: %d layers, %d tasks, expert ranks %s, %d trainable parameters", len(targets),
                num_tasks, ranks, sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model


def _task_ids_slot(model: nn.Module) -> _TaskIds:
    for m in model.modules():
        if isinstance(m, CgcExperts):
            return m._task_ids
    raise ValueError("the model has no CGC-LoRA layers (apply_cgc_lora was not called)")


def _to_index(slot: _TaskIds, task_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Task ids as row indices of the layers' weight tables (-1 -> the padding row ``num_tasks``).

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
    return torch.where(task_ids < 0, torch.full_like(task_ids, slot.num_tasks), task_ids)


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
    return {"config": to_dict(slot.cfg), "num_tasks": slot.num_tasks,
            "expert_ranks": slot.cfg.expert_ranks(slot.num_tasks), "layers": sorted(cgc_layers(model))}


def save_cgc(model: nn.Module, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the CGC parameters to ``out_dir/cgc_lora.safetensors`` and the layout to ``cgc_lora.json``.

    The JSON (config, number of tasks, expert ranks, adapted layers) lets :func:`load_cgc` refuse weights
    made for a different layout with a clear message instead of a shape error deep in torch.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in cgc_state_dict(model, state_dict).items()}
    save_file(tensors, str(out_dir / CGC_WEIGHTS), metadata={"format": "pt"})
    (out_dir / CGC_CONFIG).write_text(json.dumps(_layout(model), indent=2) + "\n", encoding="utf-8")


def load_cgc_config(in_dir: str | Path) -> tuple[CgcLoraConfig, int]:
    """The config and number of tasks a :func:`save_cgc` directory was written with."""
    path = Path(in_dir) / CGC_CONFIG
    if not path.is_file():
        raise UserError(f"{path}: not found (not a CGC-LoRA checkpoint directory)")
    layout = json.loads(path.read_text(encoding="utf-8"))
    return build(CgcLoraConfig, layout["config"]), int(layout["num_tasks"])


def load_cgc(model: nn.Module, in_dir: str | Path) -> nn.Module:
    """Load CGC parameters written by :func:`save_cgc` into a model with the same CGC layout (in place)."""
    in_dir = Path(in_dir)
    config_path, weights_path = in_dir / CGC_CONFIG, in_dir / CGC_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path}: not found (not a CGC-LoRA checkpoint directory)")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    mine = _layout(model)
    for key in ("num_tasks", "expert_ranks", "layers"):
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

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@torch.no_grad()
def task_lora_factors(layer: CgcLoraLinear, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s gated update of one layer as plain LoRA factors ``(A_t, B_t)`` with ``B_t @ A_t``
    equal to the layer's update for that task.

    The gate weights are constants per task, so ``sum_e g_e (alpha/r_e) B_e A_e`` is one LoRA whose rank is
    the sum of the ranks of the experts the task uses: A_t stacks their A's, B_t their scaled B's.
    """
    experts = layer.cgc
    scales = experts.column_scales()[task]
    columns = torch.isin(experts.column_expert, experts.allowed[task]).nonzero().squeeze(1)
    return experts.lora_A[columns].clone(), experts.lora_B[:, columns] * scales[columns]


def _write_adapter(layers: dict[str, CgcLoraLinear], task: int, out_dir: Path) -> int:
    from peft import LoraConfig

    tensors: dict[str, torch.Tensor] = {}
    rank = 0
    for name, layer in layers.items():
        a, b = task_lora_factors(layer, task)
        rank = a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    # lora_alpha = r makes peft's scaling 1: the gate weights and alpha/r_e already sit inside B_t.
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(layers))
    out_dir.mkdir(parents=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank


def _write_merged(model: nn.Module, layers: dict[str, CgcLoraLinear], task: int, out_dir: Path) -> None:
    state = base_state_dict(model)
    for name, layer in layers.items():
        a, b = task_lora_factors(layer, task)
        weight = layer.weight
        delta = (b.to(torch.float64) @ a.to(torch.float64)).to(device=weight.device, dtype=weight.dtype)
        state[f"{name}.weight"] = weight.detach() + delta
    model.save_pretrained(str(out_dir), state_dict=state)


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)


def export_task_adapters(model: nn.Module, out_dir: str | Path, task_names: Sequence[str] | None = None,
                         tokenizer_dir: str | Path | None = None, merged: bool = False, *,
                         overwrite: bool = False) -> Path:
    """Write the "1+N" form of a CGC-LoRA model: the base once plus one plain peft LoRA adapter per task.

    Layout of ``out_dir`` (written in a temporary sibling directory, renamed when complete; an existing
    ``out_dir`` is refused unless ``overwrite``, and then replaced only once the new one is whole)::

        base/                  transformers model dir of the frozen base (+ tokenizer files when given)
        adapters/<task>/       peft LoRA adapter: PeftModel.from_pretrained(base_model, "adapters/<task>")
        merged/<task>/         with merged=True: base + that task's update, a plain transformers model dir
        export.json            task names, ranks, paths and each task's mean gate weight on the common experts

    Each adapter reproduces the gated model for its task exactly (up to floating point): see
    :func:`task_lora_factors`.
    """
    out_dir = Path(out_dir)
    slot = _task_ids_slot(model)
    layers = cgc_layers(model)
    names = [f"task{t}" for t in range(slot.num_tasks)] if task_names is None else list(task_names)
    if len(names) != slot.num_tasks:
        raise UserError(f"export: {len(names)} task names given for a model with {slot.num_tasks} tasks")
    for name in names:
        if not _SAFE_NAME.match(name):
            raise UserError(f"export: task name {name!r} is not usable as a directory name")
    if len(set(names)) != len(names):
        raise UserError(f"export: task names must be unique, got {names}")
    refuse_existing(out_dir, overwrite=overwrite, hint=NEW_DIRECTORY_HINT)
    tokenizer = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None and not tokenizer.is_dir():
        raise UserError(f"{tokenizer}: tokenizer directory not found")
    training_cache = model.config.use_cache
    model.config.use_cache = True        # the exported models are for inference: KV cache on
    try:
        with atomic_directory(out_dir, overwrite=overwrite, hint=NEW_DIRECTORY_HINT) as tmp:
            save_base_model(model, tmp / "base")
            if tokenizer is not None:
                _copy_tokenizer(tokenizer, tmp / "base")
            summary = []
            for task, name in enumerate(names):
                rank = _write_adapter(layers, task, tmp / "adapters" / name)
                entry = {"task_id": task, "name": name, "rank": rank, "adapter": f"adapters/{name}"}
                common = slot.cfg.num_common_experts
                with torch.no_grad():
                    entry["common_gate_weight_mean"] = float(sum(
                        layer.cgc.expert_weights()[task, :common].sum().item() for layer in layers.values()
                    ) / len(layers))
                if merged:
                    _write_merged(model, layers, task, tmp / "merged" / name)
                    if tokenizer is not None:
                        _copy_tokenizer(tokenizer, tmp / "merged" / name)
                    entry["merged"] = f"merged/{name}"
                summary.append(entry)
            (tmp / "export.json").write_text(json.dumps({"base": "base", "tasks": summary}, indent=2) + "\n",
                                             encoding="utf-8")
    finally:
        model.config.use_cache = training_cache
    logger.info("exported base + %d task adapters to %s", len(names), out_dir)
    return out_dir
