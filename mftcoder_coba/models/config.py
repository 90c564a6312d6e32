"""The ``model`` section of a run configuration: which causal LM to train and how (adapters, dtype, attention).

Checks here are pure config checks (field ranges, one model source); checks that need the file system or
the machine (the model directory exists, its vocabulary covers the tokenizer, CUDA and bitsandbytes for
QLoRA) run in :func:`mftcoder_coba.models.build.check_model`, still before any weights are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mftcoder_coba.config_io import bounded, check
from mftcoder_coba.models.cgc_config import CgcLoraConfig

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
AttnImplementation = Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"]
Adapter = Literal["none", "lora", "qlora", "cgc_lora"]


@dataclass
class LoraOptions:
    """LoRA hyper-parameters, used by ``adapter: lora`` and ``adapter: qlora`` (peft's ``LoraConfig``)."""

    r: int = bounded(16, gt=0)
    """Rank of each low-rank update ``B @ A``."""
    alpha: float = bounded(32.0, gt=0)
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = bounded(0.05, ge=0, lt=1)
    """Dropout applied to the adapter's input during training (0 disables it and keeps runs deterministic)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (suffixes) to adapt, e.g. ``[q_proj, v_proj]``; ``[all-linear]`` adapts every linear layer
    of the decoder except the output head (peft's rule), which fits any architecture."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters and saved with them (e.g. ``[embed_tokens, lm_head]``
    when new tokens were added)."""
    use_dora: bool = False
    """DoRA (peft): each adapted weight split into a magnitude vector and a direction the low-rank update
    trains; closer to full fine-tuning at low ranks, at some speed and memory (a magnitude per output row)."""
    use_rslora: bool = False
    """rsLoRA (peft): scale the update by ``alpha / sqrt(r)`` instead of ``alpha / r``, so higher ranks keep
    learning instead of being scaled down."""

    def validate(self) -> None:
        check(len(self.target_modules) > 0, "model.lora.target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    """Which transformers causal LM to train, in which precision, with which attention and adapter."""

    path: str | None = None
    """Local Hugging Face model directory (``config.json`` + weights). Loaded offline. Exclusive with
    ``model_config``."""
    model_config: dict[str, Any] | None = None
    """A transformers config as a mapping including ``model_type`` (e.g. ``{model_type: llama,
    hidden_size: 256, ...}``): the model is built from it with random weights (demo, tests, benchmarks).
    ``vocab_size`` defaults to the tokenizer's. Exclusive with ``path``."""
    init_seed: int = 0
    """Seed of the random initialisation of a ``model_config`` model (the same seed gives the same weights)."""
    neftune_alpha: float = bounded(0.0, ge=0)
    """NEFTune: uniform noise of scale ``alpha / sqrt(seq_len * hidden)`` on the input embeddings while training
    (``models/neftune.py``; the paper used 5). 0 = off."""
    dtype: Dtype = "auto"
    """Parameter dtype. ``auto``: ``bf16`` on a GPU that computes in it (CUDA, Ampere or newer), else ``fp32``
    (CPU runs: bf16 matmuls there are slow and lose precision for nothing); ``train`` records the choice in the
    run's config.yaml. ``fp16``: for GPUs without bf16 (V100, T4), with DeepSpeed's dynamic loss scaling and
    fp32 master weights. ``fp32`` for exact tests."""
    attn_implementation: AttnImplementation = "auto"
    """Attention kernel. ``auto``: ``flash_attention_2`` (varlen over the packed samples) when flash-attn is
    installed and CUDA is present, else ``flex_attention`` (a document-causal BlockMask) on a GPU, else
    ``sdpa`` with a block-diagonal causal mask (FlexAttention has no CPU backward). Every choice confines
    attention to each packed sample, derived from the position ids."""
    gradient_checkpointing: bool | Literal["full", "selective"] = False
    """Recompute activations in the backward pass instead of keeping them. ``full`` (or ``true``): keep each
    decoder layer's input only, recompute the layer (about a third more compute). ``selective``: keep matrix
    product and attention outputs, recompute the element-wise work between them (norms, rotary, SwiGLU): about
    half the activation memory of no checkpointing at little cost, least with ``compile``."""
    compile: bool = False
    """``torch.compile`` each decoder layer (regional: one graph for all layers, compiled on the first step):
    fused element-wise kernels and fewer saved activations. Not with ZeRO-3 or QLoRA."""
    adapter: Adapter = "none"
    """``none``: full fine-tuning. ``lora``: peft LoRA on a frozen base. ``qlora``: LoRA on a 4-bit NF4 base
    (bitsandbytes, CUDA, needs ``path``). ``cgc_lora``: task-gated LoRA experts (CGC-LoRA, section ``cgc_lora``)."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA options for ``adapter: lora`` and ``adapter: qlora``."""
    cgc_lora: CgcLoraConfig = field(default_factory=CgcLoraConfig)
    """CGC-LoRA options for ``adapter: cgc_lora``."""
    trust_remote_code: bool = False
    """Allow a local model directory's own modelling code (``auto_map`` in its config) to run."""
    allow_other_tokenizer: bool = False
    """Train on shards whose tokenizer differs from the one in ``path`` (a deliberate vocabulary change, e.g.
    tokens added). Off: such a run is refused before it starts (:mod:`mftcoder_coba.training.tokenizer_match`)."""

    def validate(self) -> None:
        check(
            (self.path is None) != (self.model_config is None),
            "model.path",
            "set exactly one of 'model.path' (a local model directory) and 'model.model_config' (random init)",
        )
        if self.model_config is not None:
            check(
                isinstance(self.model_config.get("model_type"), str),
                "model.model_config.model_type",
                "required: the transformers model type, e.g. 'llama'",
            )
        check(not (self.compile and self.adapter == "qlora"), "model.compile",
              "not supported with adapter 'qlora' (bitsandbytes' 4-bit layers)")
        check(
            self.adapter != "qlora" or self.path is not None,
            "model.adapter",
            "'qlora' quantises pretrained weights and needs 'model.path'; use 'lora' with 'model_config'",
        )


def concrete_dtype(dtype: str, on_cuda: bool) -> str:
    """``model.dtype`` with ``auto`` decided for a run on CUDA (``on_cuda``) or the CPU: ``bf16`` only where the
    GPU supports it. torch is imported here, not at module level: reading a run config imports no torch."""
    if dtype != "auto":
        return dtype
    if not on_cuda:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
