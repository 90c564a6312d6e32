"""Parameter averaging of fine-tuned models: the fusion step of ColD Fusion, also behind ``mftcoder-coba fuse``.

Full model directories are averaged tensor by tensor. LoRA adapters are averaged by their *updates*: each
adapter changes a weight by ``delta_i = s_i * B_i @ A_i`` (``s_i = alpha / r``), and the average of the
updates ``sum_i w_i delta_i`` is what fusion means. Averaging the A's and B's separately would give
``(sum w_i B_i)(sum w_j A_j)``, which mixes every adapter's B with every other's A and is not that. The
exact average is written either merged into a base model (``base_dir`` given: a full model directory) or as
one LoRA adapter of rank ``sum_i r_i`` whose A stacks the A's and whose B stacks the scaled ``w_i s_i B_i``
(no base needed, loads with peft). Modules an adapter trains in full (peft ``modules_to_save``) are plain
parameters and are averaged as such.

Tensors are streamed one at a time from the safetensors files and accumulated in float64, so memory stays
near one model; outputs are written in a temporary sibling directory and renamed when complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mftcoder_coba.atomic import (
    NEW_DIRECTORY_HINT,
    OUTPUT_MARKER,
    atomic_directory,
    check_replaceable,
    mark_output,
)
from mftcoder_coba.errors import UserError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FUSION_RECORD = "fusion.json"
FUSED_KIND = "fused-model"
"""The :func:`~mftcoder_coba.atomic.mark_output` kind of a fusion's output directory."""


@dataclass(frozen=True)
class ModelDir:
    """One input of a fusion: where its tensors are and what kind of directory it is."""

    path: Path
    kind: Literal["full", "lora"]
    weight_files: dict[str, str]
    """Tensor name -> file name inside ``path``."""
    config: dict
    """``config.json`` (full) or ``adapter_config.json`` (LoRA)."""


def inspect_model_dir(path: str | Path) -> ModelDir:
    """Classify ``path`` as a transformers model directory (``config.json`` + safetensors) or a peft LoRA
    adapter directory; any other folder is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: directory not found")
    if (path / ADAPTER_CONFIG).is_file():
        config = _read_json(path / ADAPTER_CONFIG)
        _check_plain_lora(path, config)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{path / ADAPTER_WEIGHTS}: not found (the adapter has a config but no weights)")
        return ModelDir(path, "lora", {k: ADAPTER_WEIGHTS for k in _keys(path / ADAPTER_WEIGHTS)}, config)
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if (path / INDEX_FILE).is_file():
            weight_map = _read_json(path / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{path / INDEX_FILE}: no 'weight_map'")
            for name in sorted(set(weight_map.values())):
                if not (path / name).is_file():
                    raise UserError(f"{path / name}: shard listed in {INDEX_FILE} not found")
            return ModelDir(path, "full", dict(weight_map), config)
        if (path / SINGLE_FILE).is_file():
            return ModelDir(path, "full", {k: SINGLE_FILE for k in _keys(path / SINGLE_FILE)}, config)
        raise UserError(f"{path}: a model config without safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                        "re-save it with save_pretrained (safetensors is the default)")
    if (path / "cgc_lora.json").is_file():
        raise UserError(f"{path}: a CGC-LoRA checkpoint cannot be fused by averaging (its task gate is not linear "
                        "in its parameters); fuse full or LoRA checkpoints, or export CGC-LoRA per task")
    raise UserError(f"{path}: neither a transformers model directory (config.json + safetensors) nor a peft "
                    f"LoRA adapter directory ({ADAPTER_CONFIG})")


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Fusion weights summing to 1: equal by default, otherwise the given non-negative numbers rescaled."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(f"--weights: {len(weights)} weights given for {count} models")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights: need finite non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def average_models(model_dirs: Sequence[str | Path], out_dir: str | Path, weights: Sequence[float] | None = None,
                   base_dir: str | Path | None = None) -> Path:
    """Write the weighted parameter average of ``model_dirs`` to ``out_dir``; returns ``out_dir``.

    All inputs are full model directories of one architecture, or all are LoRA adapters of one base with
    the same adapted modules. ``weights`` default to equal and are rescaled to sum to 1. ``base_dir`` is
    used for LoRA inputs only: the averaged update is merged into that base, giving a full model directory;
    without it the output is one exact LoRA adapter of rank ``sum r_i``. Other files of the first input (or
    of the base), such as the config and tokenizer, are copied. ``out_dir`` must not exist yet, and must not
    be, hold or lie inside an input (or the base) or lie inside a run directory: a fused model written
    there would be mistaken for, or mixed into, what it was made from.
    """
    if not model_dirs:
        raise UserError("fuse: no models given")
    sources = [*model_dirs, *([base_dir] if base_dir is not None else [])]
    check_replaceable(out_dir, overwrite=False, kind=FUSED_KIND, inputs=sources, hint=NEW_DIRECTORY_HINT)
    inputs = [inspect_model_dir(p) for p in model_dirs]
    kinds = {m.kind for m in inputs}
    if len(kinds) > 1:
        listing = ", ".join(f"{m.path} ({m.kind})" for m in inputs)
        raise UserError(f"fuse: cannot mix full models and LoRA adapters: {listing}")
    fractions = normalized_weights(weights, len(inputs))
    out_dir = Path(out_dir)
    base = inspect_model_dir(base_dir) if base_dir is not None and inputs[0].kind == "lora" else None
    if base is not None and base.kind != "full":
        raise UserError(f"{base.path}: the base must be a full transformers model directory")
    with atomic_directory(out_dir, hint=NEW_DIRECTORY_HINT) as tmp:
        mark_output(tmp, FUSED_KIND)
        if inputs[0].kind == "full":
            _check_same_architecture(inputs)
            _average_full(inputs, fractions, tmp)
            _copy_other_files(inputs[0].path, tmp, skip=set(inputs[0].weight_files.values()) | {INDEX_FILE})
        elif base is not None:
            _check_same_architecture([base])
            _merge_lora_into_base(inputs, fractions, base, tmp)
            _copy_other_files(base.path, tmp, skip=set(base.weight_files.values()) | {INDEX_FILE})
        else:
            _stack_lora(inputs, fractions, tmp)
            _copy_other_files(inputs[0].path, tmp, skip={ADAPTER_WEIGHTS, ADAPTER_CONFIG})
        record = {"inputs": [str(m.path) for m in inputs], "weights": fractions, "kind": inputs[0].kind,
                  "base": str(base.path) if base is not None else None}
        (tmp / FUSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("fused %d %s models into %s (weights %s)", len(inputs), inputs[0].kind, out_dir,
                [round(w, 4) for w in fractions])
    return out_dir


# ---------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: cannot read safetensors file ({exc})") from None


def _check_plain_lora(path: Path, config: dict) -> None:
    where = path / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise UserError(f"{where}: '{key}: true' adapters are not supported by fusion")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UserError(f"{where}: per-module '{key}' is not supported by fusion")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: adapters that train biases (bias={config['bias']!r}) are not supported")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or not config.get("lora_alpha"):
        raise UserError(f"{where}: needs a positive integer 'r' and 'lora_alpha'")


def _lora_scale(config: dict) -> float:
    r, alpha = config["r"], float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_same_architecture(inputs: Sequence[ModelDir]) -> None:
    first = inputs[0]
    for m in inputs[1:]:
        for key in ("model_type", "architectures"):
            if m.config.get(key) != first.config.get(key):
                raise UserError(f"fuse: different architectures: {first.path} has {key} {first.config.get(key)!r}, "
                                f"{m.path} has {m.config.get(key)!r}")


@contextlib.contextmanager
def _readers(inputs: Sequence[ModelDir]):
    """Open every safetensors file of every input once; yields ``get(i, name) -> tensor``."""
    with contextlib.ExitStack() as stack:
        handles: dict[tuple[int, str], object] = {}

        def get(i: int, name: str) -> torch.Tensor:
            file = inputs[i].weight_files[name]
            if (i, file) not in handles:
                handles[(i, file)] = stack.enter_context(safe_open(str(inputs[i].path / file), framework="pt"))
            return handles[(i, file)].get_tensor(name)

        yield get


def _same_keys(inputs: Sequence[ModelDir]) -> None:
    first = set(inputs[0].weight_files)
    for m in inputs[1:]:
        names = set(m.weight_files)
        if names != first:
            missing, extra = sorted(first - names), sorted(names - first)
            raise UserError(f"fuse: {m.path} does not have the tensors of {inputs[0].path} "
                            f"(missing {missing[:3]}, extra {extra[:3]}): different architectures")


def _weighted_sum(tensors: Sequence[torch.Tensor], fractions: Sequence[float], names: Sequence[str],
                  key: str) -> torch.Tensor:
    first = tensors[0]
    for t, where in zip(tensors[1:], names[1:]):
        if t.shape != first.shape:
            raise UserError(f"fuse: tensor '{key}' has shape {tuple(t.shape)} in {where} but "
                            f"{tuple(first.shape)} in {names[0]}")
    if not first.is_floating_point():
        return first
    total = torch.zeros(first.shape, dtype=torch.float64)
    for t, w in zip(tensors, fractions):
        total += w * t.to(torch.float64)
    return total.to(first.dtype)


def _files_in_order(model: ModelDir) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for name, file in model.weight_files.items():
        files.setdefault(file, []).append(name)
    return files


def _write_like(template: ModelDir, tensors_for, out: Path) -> None:
    """Write tensors with ``template``'s file layout (same shards and index), one file at a time."""
    for file, names in _files_in_order(template).items():
        save_file({name: tensors_for(name).contiguous() for name in names}, str(out / file), metadata={"format": "pt"})
    if (template.path / INDEX_FILE).is_file():
        shutil.copy2(template.path / INDEX_FILE, out / INDEX_FILE)


def _average_full(inputs: Sequence[ModelDir], fractions: Sequence[float], out: Path) -> None:
    _same_keys(inputs)
    where = [str(m.path) for m in inputs]
    with _readers(inputs) as get:
        _write_like(inputs[0], lambda name: _weighted_sum([get(i, name) for i in range(len(inputs))],
                                                          fractions, where, name), out)


def _lora_modules(adapter: ModelDir) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """module path -> (A key, B key), and the keys of fully trained modules (modules_to_save)."""
    modules: dict[str, tuple[str, str]] = {}
    full: list[str] = []
    for key in adapter.weight_files:
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b_key = path + ".lora_B.weight"
            if b_key not in adapter.weight_files:
                raise UserError(f"{adapter.path / ADAPTER_WEIGHTS}: '{key}' has no matching '{b_key}'")
            modules[path] = (key, b_key)
        elif key.endswith(".lora_B.weight"):
            continue
        elif ".lora_" in key:
            raise UserError(f"{adapter.path / ADAPTER_WEIGHTS}: '{key}' (LoRA on embeddings or other layer "
                            "types) is not supported by fusion")
        else:
            full.append(key)
    return modules, full


def _check_same_lora_modules(inputs: Sequence[ModelDir]) -> tuple[list[str], list[str]]:
    modules, full = _lora_modules(inputs[0])
    for m in inputs[1:]:
        other, other_full = _lora_modules(m)
        if set(other) != set(modules) or set(other_full) != set(full):
            raise UserError(f"fuse: {m.path} adapts other modules than {inputs[0].path}; "
                            "LoRA adapters must target the same modules of the same base")
    return sorted(modules), sorted(full)


def _lora_delta(get, inputs: Sequence[ModelDir], fractions: Sequence[float], module: str) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i in float64."""
    total = None
    for i, (m, w) in enumerate(zip(inputs, fractions)):
        a = get(i, f"{module}.lora_A.weight").to(torch.float64)
        b = get(i, f"{module}.lora_B.weight").to(torch.float64)
        if a.shape[0] != b.shape[1]:
            raise UserError(f"{m.path / ADAPTER_WEIGHTS}: '{module}' has A of shape {tuple(a.shape)} and B of "
                            f"shape {tuple(b.shape)}")
        delta = (w * _lora_scale(m.config)) * (b @ a)
        if total is not None and delta.shape != total.shape:
            raise UserError(f"fuse: '{module}' updates a weight of shape {tuple(delta.shape)} in {m.path} but "
                            f"{tuple(total.shape)} in {inputs[0].path}: adapters of different base models")
        total = delta if total is None else total + delta
    return total


def _merge_lora_into_base(inputs: Sequence[ModelDir], fractions: Sequence[float], base: ModelDir,
                          out: Path) -> None:
    modules, full = _check_same_lora_modules(inputs)
    targets: dict[str, tuple[str, str]] = {}      # base tensor name -> ("lora", module) | ("full", adapter key)
    for module in modules:
        name = module[len(PEFT_PREFIX):] + ".weight" if module.startswith(PEFT_PREFIX) else module + ".weight"
        targets[name] = ("lora", module)
    for key in full:
        targets[key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key] = ("full", key)
    for name in targets:
        if name not in base.weight_files:
            raise UserError(f"fuse: the adapters change '{name}', which {base.path} does not have: "
                            "not the base these adapters were trained on")
    where = [str(m.path) for m in inputs]
    with _readers(list(inputs) + [base]) as get:
        base_index = len(inputs)

        def tensor(name: str) -> torch.Tensor:
            weight = get(base_index, name)
            if name not in targets:
                return weight
            kind, key = targets[name]
            if kind == "full":
                value = _weighted_sum([get(i, key) for i in range(len(inputs))], fractions, where, key)
                if value.shape != weight.shape:
                    raise UserError(f"fuse: '{key}' has shape {tuple(value.shape)} but {base.path} has "
                                    f"{tuple(weight.shape)}")
                return value.to(weight.dtype)
            delta = _lora_delta(get, inputs, fractions, key)
            if delta.shape != weight.shape:
                raise UserError(f"fuse: the adapters update '{name}' with shape {tuple(delta.shape)} but {base.path} "
                                f"has {tuple(weight.shape)}: not the base these adapters were trained on")
            return (weight.to(torch.float64) + delta).to(weight.dtype)

        _write_like(base, tensor, out)


def _stack_lora(inputs: Sequence[ModelDir], fractions: Sequence[float], out: Path) -> None:
    modules, full = _check_same_lora_modules(inputs)
    rank = sum(m.config["r"] for m in inputs)
    where = [str(m.path) for m in inputs]
    tensors: dict[str, torch.Tensor] = {}
    with _readers(inputs) as get:
        for module in modules:
            a_parts, b_parts = [], []
            for i, (m, w) in enumerate(zip(inputs, fractions)):
                a = get(i, f"{module}.lora_A.weight")
                b = get(i, f"{module}.lora_B.weight")
                a_parts.append(a.to(torch.float64))
                b_parts.append((w * _lora_scale(m.config)) * b.to(torch.float64))
            for part, where_i in zip(a_parts[1:], where[1:]):
                if part.shape[1] != a_parts[0].shape[1]:
                    raise UserError(f"fuse: '{module}' has input size {part.shape[1]} in {where_i} but "
                                    f"{a_parts[0].shape[1]} in {where[0]}: adapters of different base models")
            for part, where_i in zip(b_parts[1:], where[1:]):
                if part.shape[0] != b_parts[0].shape[0]:
                    raise UserError(f"fuse: '{module}' has output size {part.shape[0]} in {where_i} but "
                                    f"{b_parts[0].shape[0]} in {where[0]}: adapters of different base models")
            dtype = get(0, f"{module}.lora_A.weight").dtype
            tensors[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
            tensors[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).to(dtype).contiguous()
        for key in full:
            tensors[key] = _weighted_sum([get(i, key) for i in range(len(inputs))], fractions, where, key).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # scaling 1 (lora_alpha = r): each adapter's alpha/r and fusion weight already sit inside the stacked B
    config = dict(inputs[0].config, r=rank, lora_alpha=rank, use_rslora=False)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _copy_other_files(source: Path, out: Path, skip: set[str]) -> None:
    """Config, generation config, tokenizer and other small files beside the weights (not the source's own
    fusion record or output marker: the output gets its own)."""
    for item in source.iterdir():
        if item.is_file() and item.name not in skip and item.name not in (FUSION_RECORD, OUTPUT_MARKER):
            shutil.copy2(item, out / item.name)
