"""The "1+N" export of a CGC-LoRA model: the frozen base once plus one plain peft LoRA adapter per task cluster.

The gate of :mod:`mftcoder_coba.models.cgc_lora` depends only on the cluster, so each cluster's gated
mixture of experts is a constant combination of low-rank updates, one LoRA whose rank is the cluster's
effective rank (:func:`cluster_lora_factors`). peft loads the adapters without this package.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mftcoder_coba.atomic import atomic_directory, check_replaceable, mark_output
from mftcoder_coba.errors import UserError
from mftcoder_coba.models.cgc_config import SAFE_NAME
from mftcoder_coba.models.cgc_lora import CgcLoraLinear, base_state_dict, cgc_layers, cgc_tasks, save_base_model

logger = logging.getLogger(__name__)

EXPORT_KIND = "export"
"""The :func:`~mftcoder_coba.atomic.mark_output` kind of an export directory (``--overwrite`` replaces only those)."""


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


def _copy_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """A tokenizer directory's files copied, or a loaded tokenizer saved (the export's, with the chat template
    and end tokens training used, see :mod:`mftcoder_coba.export`)."""
    if not isinstance(tokenizer, Path):
        tokenizer.save_pretrained(str(out_dir))
        return
    for item in tokenizer.iterdir():
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)


def _is_export(path: Path) -> bool:
    """An export made before output markers existed: its ``export.json`` beside ``base/``."""
    return (path / "export.json").is_file() and (path / "base" / "config.json").is_file()


def export_task_adapters(model: nn.Module, out_dir: str | Path, task_names: Sequence[str] | None = None,
                         tokenizer_dir: Any = None, merged: bool = False, *,
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

    ``tokenizer_dir``: a tokenizer directory to copy beside the base (and each merged model), or a loaded
    tokenizer to save there. ``task_names`` (task-id order) rename the model's tasks (and, with one cluster
    per task, the clusters).
    ``out_dir`` must not be, hold or lie inside one of ``inputs`` (e.g. the run directory exported from)
    or any run directory; an existing one is replaced only with ``overwrite``, only when it is an earlier
    export, and only once the new one is whole (:func:`mftcoder_coba.atomic.check_replaceable`).

    Each adapter reproduces the gated model for the tasks of its cluster exactly (up to floating point):
    see :func:`cluster_lora_factors`.
    """
    out_dir = Path(out_dir)
    slot = cgc_tasks(model)
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
        if not SAFE_NAME.match(name):
            raise UserError(f"export: cluster name {name!r} is not usable as a directory name")
    check_replaceable(out_dir, overwrite=overwrite, kind=EXPORT_KIND, inputs=inputs, owned=_is_export)
    tokenizer = Path(tokenizer_dir) if isinstance(tokenizer_dir, (str, Path)) else tokenizer_dir
    if isinstance(tokenizer, Path) and not tokenizer.is_dir():
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
