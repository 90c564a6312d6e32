"""Saving what a run trains, and loading a trained run back as one model (for export, evaluation, fusion).

A checkpoint's ``model/`` folder holds only what was trained: a full transformers model directory for full
fine-tuning, a peft adapter directory for LoRA/QLoRA, or CGC-LoRA's own format. The frozen base of an
adapter run is the ``model.path`` directory, or ``run_dir/base_model`` when the base was built from a
``model_config`` (the trainer writes it once with :func:`save_base_model`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM

from mftcoder_coba import config_io
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.file_manifest import has_manifest, manifest_problem
from mftcoder_coba.models import cgc_lora
from mftcoder_coba.models.attention import FLASH, flash_attn_available, resolve_attn_implementation
from mftcoder_coba.models.build import torch_dtype
from mftcoder_coba.models.config import ModelConfig
from mftcoder_coba.models.forward import causal_lm

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def save_trainable(model: nn.Module, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trained parameters of ``model`` to ``out_dir``.

    ``state_dict``: the model's full state dict when the live parameters are not complete on this rank (a
    ZeRO-3 consolidated state dict, keys as in ``model.state_dict()``); by default the model's own.
    """
    out_dir = Path(out_dir)
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    lm = causal_lm(model)
    if cgc_lora.cgc_layers(lm):
        cgc_lora.save_cgc(lm, out_dir, state_dict)
    elif lm is not model:  # peft: only the adapter weights, in peft's directory format
        model.save_pretrained(str(out_dir), state_dict=state_dict, save_embedding_layers=False)
    else:
        model.save_pretrained(str(out_dir), state_dict=state_dict)


def save_base_model(model: nn.Module, out_dir: str | Path) -> None:
    """Write the frozen base of an adapter model as a plain transformers directory (adapters left out)."""
    lm = causal_lm(model)
    if cgc_lora.cgc_layers(lm):
        cgc_lora.save_base_model(lm, out_dir)
        return
    state = {}
    for key, value in lm.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    lm.save_pretrained(str(out_dir), state_dict=state)


def run_model_config(run_dir: str | Path) -> ModelConfig:
    """The ``model`` section of ``run_dir/config.yaml`` as a :class:`ModelConfig`."""
    path = Path(run_dir) / "config.yaml"
    data = config_io.load_mapping(path)
    try:
        return config_io.build(ModelConfig, data.get("model"), prefix="model.")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint ``run_dir/checkpoints/step-N``: incomplete ones carry other names, and
    ones whose ``model/`` files differ from their ``files.json`` sizes are skipped with a warning."""
    folder = Path(run_dir) / "checkpoints"
    entries = folder.iterdir() if folder.is_dir() else []
    found = sorted((int(m.group(1)), p) for p in entries if (m := CHECKPOINT_NAME.match(p.name)))
    for _, path in reversed(found):
        problem = manifest_problem(path, checksums=False, under="model/") if has_manifest(path) else None
        if problem is None:
            return path
        log.warning("skipping the damaged checkpoint %s: %s", path, problem)
    raise UserError(f"{folder}: no complete checkpoint (step-N) found")


def model_dir_of(run_dir: str | Path, checkpoint_dir: str | Path | None = None) -> Path:
    """The saved-model folder of a checkpoint (``<checkpoint>/model``); the newest checkpoint by default.

    ``checkpoint_dir`` may name the checkpoint (``.../step-N``) or its ``model/`` folder itself.
    """
    checkpoint = latest_checkpoint(run_dir) if checkpoint_dir is None else Path(checkpoint_dir)
    for candidate in (checkpoint / "model", checkpoint):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    raise UserError(f"{checkpoint}: not a checkpoint (no saved model in it or in its model/ folder)")


def check_model_files(model_dir: Path) -> None:
    """Refuse (one :class:`UserError` line) a checkpoint whose ``model/`` files differ from its ``files.json``
    (presence, size, sha256). Checkpoints written before ``files.json`` are not checked here; a damaged one
    fails to load instead (also one line, from :func:`load_trained`)."""
    checkpoint = model_dir.parent
    if model_dir.name == "model" and has_manifest(checkpoint):
        problem = manifest_problem(checkpoint, under="model/")
        if problem is not None:
            raise UserError(f"{checkpoint}: damaged or incomplete checkpoint: {problem}")


def load_trained(run_dir: str | Path, checkpoint_dir: str | Path | None = None, *,
                 trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a run's model from ``run_dir/config.yaml`` and load a checkpoint's trained weights into it.

    Returns the model in eval mode, on the CPU, in the run's dtype: a transformers model (full fine-tuning),
    a ``peft.PeftModel`` (LoRA; for QLoRA the base is loaded unquantised, so the result merges exactly), or
    the base with CGC-LoRA layers. flash-attention runs load with ``sdpa`` where flash-attn is missing.

    ``trust_remote_code`` comes from the caller's command line only, never from the run's config.yaml: a run
    directory is a file being read, and letting it switch on remote code would let it run code here. The
    checkpoint is checked against its ``files.json`` first; one that does not load is one :class:`UserError`.
    """
    run_dir = Path(run_dir)
    cfg = run_model_config(run_dir)
    model_dir = model_dir_of(run_dir, checkpoint_dir)
    check_model_files(model_dir)
    options = {
        "dtype": torch_dtype(cfg),
        "attn_implementation": _loadable_attention(cfg),
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
    }
    try:
        model = _load(run_dir, cfg, model_dir, options)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{model_dir}: cannot load the trained model ({_first_line(exc)}); the checkpoint is "
                        "damaged or incomplete") from None
    log.info("loaded %s (%s) from %s", type(causal_lm(model)).__name__, cfg.adapter, model_dir)
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load(run_dir: Path, cfg: ModelConfig, model_dir: Path, options: dict) -> nn.Module:
    if cfg.adapter == "none":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **options)
    else:
        base_dir = Path(cfg.path) if cfg.path is not None else run_dir / "base_model"
        if not (base_dir / "config.json").is_file():
            named = f" (config field 'model.path' in {run_dir / 'config.yaml'})" if cfg.path is not None else ""
            raise UserError(f"{base_dir}: the base model of this {cfg.adapter} run is missing{named}")
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **options)
        if cfg.adapter == "cgc_lora":
            cgc_config, task_names = cgc_lora.load_cgc_config(model_dir)
            cgc_lora.apply_cgc_lora(model, cgc_config, len(task_names), task_names)
            cgc_lora.load_cgc(model, model_dir)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
    return model


def _loadable_attention(cfg: ModelConfig) -> str:
    requested = cfg.attn_implementation
    if requested == FLASH and not flash_attn_available():
        requested = "auto"
    return resolve_attn_implementation(requested, torch_dtype(cfg))
