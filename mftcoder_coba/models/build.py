"""Build the model a run trains: a transformers causal LM, optionally with LoRA, QLoRA or CGC-LoRA adapters.

:func:`check_model` does every check that can fail because of the user's config or machine (model
directory, model type, tokenizer/embedding vocabulary, CUDA and bitsandbytes for QLoRA, flash-attn) from
the config alone, so the trainer can call it before any expensive work; :func:`build_model` runs it again
and then loads or initialises the weights.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models.attention import resolve_attn_implementation
from mftcoder_coba.models.config import LoraOptions, ModelConfig, concrete_dtype
from mftcoder_coba.models.forward import causal_lm
from mftcoder_coba.models.layers import checkpointing_kwargs, compile_layers, enable_checkpointing
from mftcoder_coba.models.neftune import add_neftune

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    """The ``torch.dtype`` named by ``cfg.dtype``."""
    return DTYPES[concrete_dtype(cfg.dtype, torch.cuda.is_available())]


def check_model(cfg: ModelConfig, vocab_size: int, seq_len: int | None = None) -> PretrainedConfig:
    """The transformers config ``cfg`` describes, after checking everything a build would need.

    ``vocab_size`` is the tokenizer's (the shards' token ids are below it): the model's embedding table must
    have at least that many rows. For a ``model_config`` without ``vocab_size``, the tokenizer's is used.
    ``seq_len`` (the shards' row length) must not exceed the model's ``max_position_embeddings``: positions
    past what the model was built for trained without a word before (learned position tables index out of
    range, rotary models silently extrapolate).
    """
    if cfg.adapter == "qlora":
        _require_qlora()
    hf_config = _load_hf_config(cfg, vocab_size)
    rows = hf_config.get_text_config().vocab_size
    if rows < vocab_size:
        where = "model.path" if cfg.path is not None else "model.model_config.vocab_size"
        raise ConfigError(
            f"config field '{where}': the tokenizer has {vocab_size} tokens but the model's embeddings have only "
            f"{rows} rows; use the model's own tokenizer to prepare the data (or a model_config with "
            f"vocab_size >= {vocab_size})"
        )
    limit = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if seq_len is not None and isinstance(limit, int) and 0 < limit < seq_len:
        where = "model.path" if cfg.path is not None else "model.model_config.max_position_embeddings"
        raise ConfigError(
            f"config field '{where}': the shards' rows are {seq_len} tokens but the model takes at most "
            f"max_position_embeddings = {limit} positions; prepare the data with --seq-len <= {limit}, or use a "
            "model configured for longer context"
        )
    resolve_attn_implementation(cfg.attn_implementation, torch_dtype(cfg))
    return hf_config


def build_model(cfg: ModelConfig, vocab_size: int, num_tasks: int, task_names: list[str] | None = None, *,
                attention: str | None = None) -> nn.Module:
    """The model to train, in training mode, with exactly the parameters to train marked ``requires_grad``.

    Full fine-tuning trains every parameter; ``lora``/``qlora``/``cgc_lora`` freeze the base and train the
    adapters only. The model stays on the CPU except for QLoRA, whose 4-bit weights live on the current CUDA
    device; the trainer (DeepSpeed) places the rest. ``task_names`` (task-id order) resolve CGC-LoRA's
    ``clusters`` mapping. ``attention``: the implementation the trainer's preflight resolved
    (:class:`~mftcoder_coba.training.preflight.Resolved`); without it ``model.attn_implementation`` is resolved
    here (evaluation, fusion, benchmarks).
    """
    if attention == "auto":
        raise ValueError("build_model(attention=...) takes a resolved implementation, not 'auto'")
    hf_config = check_model(cfg, vocab_size)
    dtype = torch_dtype(cfg)
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype) if attention is None else attention
    checkpointing = checkpointing_kwargs(cfg.gradient_checkpointing)
    if cfg.path is not None:
        model = _load_pretrained(cfg, hf_config, dtype, attn, checkpointing)
    else:
        log.info("building a random-init %s model (seed %d, %s, attention %s)", hf_config.model_type, cfg.init_seed,
                 cfg.dtype, attn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
            )
    model.config.use_cache = False
    if checkpointing is not None and cfg.adapter != "qlora":  # QLoRA's preparation turns it on itself
        enable_checkpointing(model, checkpointing)
    model = _add_adapter(model, cfg, num_tasks, task_names)
    if cfg.compile:
        log.info("compiling %d decoder layers with torch.compile (on the first step)",
                 compile_layers(model, checkpointed=checkpointing is not None))
    if cfg.neftune_alpha > 0:
        add_neftune(causal_lm(model).get_input_embeddings(), cfg.neftune_alpha)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters, %s trainable (%.3g%%, %s)", readable_count(total), readable_count(trainable),
             100.0 * trainable / max(total, 1), cfg.adapter)
    return model


def readable_count(n: int) -> str:
    """``1.23B``, ``4.56M``, ``12.3K`` or ``512``: three significant digits at any size (a LoRA run's 20K trainable
    parameters printed as ``0.00M`` before)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _peft_lora_config(options: LoraOptions):
    """peft's ``LoraConfig`` for ``options`` (the causal-LM task type)."""
    from peft import LoraConfig

    targets: str | list[str] = options.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=list(options.modules_to_save) or None,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
    )


def _add_adapter(model: nn.Module, cfg: ModelConfig, num_tasks: int, task_names: list[str] | None) -> nn.Module:
    if cfg.adapter == "none":
        return model
    if cfg.adapter == "cgc_lora":
        from mftcoder_coba.models.cgc_lora import apply_cgc_lora

        return apply_cgc_lora(model, cfg.cgc_lora, num_tasks, task_names)
    from peft import get_peft_model

    try:
        # Adapters keep the base's dtype: one dtype per engine, DeepSpeed keeps fp32 master weights itself.
        return get_peft_model(model, _peft_lora_config(cfg.lora), autocast_adapter_dtype=False)
    except ValueError as exc:
        raise ConfigError(f"config field 'model.lora.target_modules': {exc}") from None


def _load_hf_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"config field 'model.path': {path}: not a model directory (no config.json)")
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"config field 'model.path': {path}/config.json: {str(exc).splitlines()[0]}") from None
    data = dict(cfg.model_config or {})
    model_type = data.pop("model_type")
    data.setdefault("vocab_size", vocab_size)
    try:
        hf_config = AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ConfigError(f"config field 'model.model_config.model_type': {str(exc).splitlines()[0]}") from None
    if type(hf_config) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"config field 'model.model_config.model_type': {model_type!r} has no causal-LM class")
    return hf_config


def _require_qlora() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "config field 'model.adapter': 'qlora' needs a CUDA device (bitsandbytes' 4-bit kernels); "
            "use 'lora' on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "config field 'model.adapter': 'qlora' needs bitsandbytes: pip install 'mftcoder-coba[qlora]'"
        )


def _load_pretrained(cfg: ModelConfig, hf_config: PretrainedConfig, dtype: torch.dtype, attn: str,
                     checkpointing: dict | None) -> nn.Module:
    """The weights of ``cfg.path``; for QLoRA in 4-bit NF4 (double quantisation, compute in ``dtype``) on the
    current CUDA device, prepared for k-bit training."""
    quantized: dict = {}
    if cfg.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        quantized = {
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": torch.cuda.current_device()},
        }
    log.info("loading %s (%s%s, attention %s)", cfg.path, cfg.dtype, ", 4-bit NF4" if quantized else "", attn)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path,
        config=hf_config,
        dtype=dtype,
        attn_implementation=attn,
        local_files_only=True,
        trust_remote_code=cfg.trust_remote_code,
        **quantized,
    )
    if not quantized:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_kwargs=checkpointing,
    )
