"""``mftcoder-coba bench-memory``: training memory by component, measured on any device, the CPU included.

A training step's peak is, to a close approximation, what the engine holds for each parameter (weights,
master copy, Adam moments, gradients at the accumulation boundary) plus what the decoder layers keep for
backward. Both are fixed by the code path, not by the device, so both are measured here through the
project's own pieces and then projected onto ``bench-train``'s workload:

* **activations**: the distinct storages autograd saves (``torch.autograd.graph.saved_tensors_hooks``) during
  a forward through :func:`~mftcoder_coba.models.build_model` / :func:`~mftcoder_coba.models.hidden_states`,
  for each ``gradient_checkpointing`` mode, eager and under ``compile``; a one-layer model is subtracted from
  a two-layer one, so embeddings, final norm and mask are left out. Eager *selective* checkpointing is not
  listed: its saved tensors live in the checkpoint's own cache, out of the hooks' sight.
* **engine**: every tensor storage alive (found through the garbage collector) after a real DeepSpeed
  engine's last backward of a step and after its optimizer step, beyond those alive before the model was
  built, per parameter, for fp32 and bf16 master weights.

The projection, ``engine bytes/param x parameters + activation bytes/token/layer x layers x tokens``, reproduces
the 32.9 GiB measured by ``bench-train`` on an H100 for the eager fp32-master run within a few percent (README).
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mftcoder_coba.bench_train import LLAMA_1B, TINY, environment
from mftcoder_coba.models import ModelConfig, build_model, causal_lm, hidden_states

log = logging.getLogger(__name__)

# (gradient_checkpointing, compile): the activation variants, in table order.
ACTIVATION_VARIANTS: tuple[tuple[bool | str, bool], ...] = (
    (False, False), (True, False), (False, True), ("selective", True), (True, True),
)
# (ZeRO stage, master_weights): the engine variants, each with its default gradient accumulation dtype
# (bf16 at ZeRO-0, fp32 from ZeRO-1 on with fp32 masters, bf16 with bf16 masters).
ENGINE_VARIANTS: tuple[tuple[int, str], ...] = ((0, "fp32"), (1, "fp32"), (1, "bf16"))
BENCH_TRAIN_TOKENS = 2 * 4096  # bench-train's micro-batch
VOCAB = 1024  # the embedding is outside the activation difference; keep it small


@dataclass
class ActivationRow:
    gradient_checkpointing: bool | str
    compile: bool
    bytes_per_token_per_layer: float

    def label(self) -> str:
        ckpt = {False: "none", True: "full"}.get(self.gradient_checkpointing, self.gradient_checkpointing)
        return f"{ckpt}{' + compile' if self.compile else ''}"


@dataclass
class EngineRow:
    zero_stage: int
    master_weights: str
    grad_accum_dtype: str
    bytes_per_param_at_boundary: float
    bytes_per_param_between_steps: float

    def label(self) -> str:
        return f"ZeRO-{self.zero_stage}, {self.master_weights} master, {self.grad_accum_dtype} grads"


def saved_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``tokens`` tokens
    (one packed row of two samples); the backward is run too, so a variant that cannot train fails here."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, causal_lm(model).config.vocab_size, (1, tokens), generator=g)
    half = tokens // 2
    positions = torch.cat([torch.arange(half), torch.arange(tokens - half)]).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hidden_states(model, ids, positions)
    out.float().square().mean().backward()
    return sum(saved.values())


def measure_activations(shape: dict[str, Any], tokens: int, dtype: str, checkpointing: bool | str,
                        compiled: bool) -> ActivationRow:
    """Per-token, per-layer saved bytes of one variant (two-layer minus one-layer model)."""
    per_depth = []
    for depth in (1, 2):
        cfg = ModelConfig(model_config={**shape, "num_hidden_layers": depth, "vocab_size": VOCAB},
                          dtype=dtype, attn_implementation="sdpa", gradient_checkpointing=checkpointing,
                          compile=compiled)
        model = build_model(cfg, VOCAB, 1)
        saved_bytes(model, tokens)  # the first call compiles
        per_depth.append(saved_bytes(model, tokens))
    return ActivationRow(checkpointing, compiled, (per_depth[1] - per_depth[0]) / tokens)


def _live_storages() -> dict[tuple[str, int], torch.UntypedStorage]:
    """Every tensor storage reachable by the garbage collector, by (device, address).

    The storages themselves are returned: holding them keeps their memory from being freed and its address
    handed to a new tensor, which would otherwise be mistaken for one that existed before."""
    gc.collect()
    found: dict[tuple[str, int], torch.UntypedStorage] = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.is_meta:  # no fake/compiler tensors
            storage = obj.untyped_storage()
            found[(str(obj.device), storage.data_ptr())] = storage
    return found


def _new_bytes(before: dict[tuple[str, int], torch.UntypedStorage]) -> int:
    """Bytes of the storages alive now that were not alive (and held) in ``before``."""
    return sum(storage.nbytes() for key, storage in _live_storages().items() if key not in before)


def measure_engine(shape: dict[str, Any], dtype: str, zero_stage: int, master_weights: str) -> EngineRow:
    """Bytes per parameter a real DeepSpeed engine holds: after a step's last backward and after its step."""
    from mftcoder_coba import config_io
    from mftcoder_coba.config import RunConfig
    from mftcoder_coba.training import distributed, ds_config
    from mftcoder_coba.training.objective import TaskLoss, accumulate_gradients, loss_token_counts
    from mftcoder_coba.training.resolved import grad_accum_dtype

    world = distributed.init()
    cfg = config_io.build(RunConfig, {
        "run_dir": "unused", "data": {"train": "unused"},
        "model": {"model_config": {**shape, "num_hidden_layers": 1, "vocab_size": VOCAB}, "dtype": dtype,
                  "attn_implementation": "sdpa"},
        "optim": {"master_weights": master_weights},
        "train": {"zero_stage": zero_stage, "micro_batch_size": 1, "global_batch_size": world.size},
    })
    before = _live_storages()
    model = build_model(cfg.model, VOCAB, 2)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _ = ds_config.initialize(cfg, TaskLoss(model, fused_linear=True), world.size,
                                     on_cuda=world.device.type == "cuda")
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(0, VOCAB, (1, 64)), "labels": rng.integers(0, VOCAB, (1, 64)),
            "task_ids": np.zeros((1, 64), dtype=np.int64), "position_ids": np.arange(64)[None]}
    counts = loss_token_counts([rows], 2)
    for _ in range(2):  # the second step has every lazily created buffer (optimizer state) in place
        accumulate_gradients(engine, [rows], np.array([0.5, 0.5]), counts, world.device)
        boundary = _new_bytes(before)
        engine.step()
    between = _new_bytes(before)
    engine.destroy()
    sums = grad_accum_dtype(cfg, zero_stage) if dtype == "bf16" else dtype
    return EngineRow(zero_stage, master_weights, sums, boundary / n_params, between / n_params)


def parameter_count(shape: dict[str, Any]) -> int:
    """Parameters of the full model ``shape`` describes (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(shape)
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def run(tiny: bool, tokens: int) -> dict[str, Any]:
    """Every variant of both parts, the projection; the report with environment and table."""
    full = TINY if tiny else LLAMA_1B
    shape = {k: v for k, v in full.items() if k not in ("vocab_size", "num_hidden_layers")}
    dtype = "fp32" if tiny else "bf16"
    activations = []
    for checkpointing, compiled in ACTIVATION_VARIANTS:
        log.info("bench-memory: activations, gradient_checkpointing=%s compile=%s", checkpointing, compiled)
        torch._dynamo.reset()
        activations.append(measure_activations(shape, tokens, dtype, checkpointing, compiled))
    engines = []
    for stage, master in ENGINE_VARIANTS:
        if master == "bf16" and dtype != "bf16":
            continue
        log.info("bench-memory: engine, ZeRO-%d, %s master weights", stage, master)
        engines.append(measure_engine(shape, dtype, stage, master))
    n_params, layers = parameter_count(full), int(full["num_hidden_layers"])
    projection = [
        {"engine": e.label(), "activations": a.label(),
         "gib": (e.bytes_per_param_at_boundary * n_params
                 + a.bytes_per_token_per_layer * layers * BENCH_TRAIN_TOKENS) / 2**30}
        for e in engines for a in activations
    ]
    report = {
        "benchmark": "bench-memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "shape": {**shape, "dtype": dtype, "tokens_measured": tokens, "parameters": n_params,
                  "layers": layers, "tokens_projected": BENCH_TRAIN_TOKENS, "tiny": tiny},
        "activations": [{**asdict(r), "label": r.label()} for r in activations],
        "engine": [{**asdict(r), "label": r.label()} for r in engines],
        "projection": projection,
    }
    report["table"] = format_table(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    s, env = report["shape"], report["environment"]
    base = report["activations"][0]["bytes_per_token_per_layer"]
    lines = [
        f"bench-memory on {env['device']} ({report['date']}); torch {env['torch']}, transformers "
        f"{env['transformers']}, deepspeed {env['deepspeed']}",
        f"decoder layer: hidden {s['hidden_size']}, MLP {s['intermediate_size']}, {s['num_attention_heads']} heads "
        f"({s['num_key_value_heads']} KV), {s['dtype']}, sdpa; activations measured on {s['tokens_measured']} tokens",
        "",
        "| activations: checkpointing + compile | KB / token / layer | vs eager |",
        "|---|---|---|",
    ]
    for r in report["activations"]:
        lines.append(f"| {r['label']} | {r['bytes_per_token_per_layer'] / 1000:.1f} | "
                     f"{r['bytes_per_token_per_layer'] / base:.2f} |")
    lines += ["", "| engine | bytes / param after the last backward | between steps |", "|---|---|---|"]
    for r in report["engine"]:
        lines.append(f"| {r['label']} | {r['bytes_per_param_at_boundary']:.2f} | "
                     f"{r['bytes_per_param_between_steps']:.2f} |")
    lines += [
        "",
        f"Projected peak for bench-train ({s['parameters'] / 1e6:.0f}M parameters, {s['layers']} layers x "
        f"{s['tokens_projected']} tokens): engine bytes at the boundary + activations, GiB",
        "",
        "| activations \\ engine | " + " | ".join(r["label"] for r in report["engine"]) + " |",
        "|---|" + "---|" * len(report["engine"]),
    ]
    by_pair = {(p["activations"], p["engine"]): p["gib"] for p in report["projection"]}
    for a in report["activations"]:
        cells = [f"{by_pair[a['label'], e['label']]:.1f}" for e in report["engine"]]
        lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
