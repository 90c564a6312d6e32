"""``mftcoder-coba bench-activations``: the bytes each decoder layer keeps for backward, per token.

Training memory at long rows is mostly activations, and what a layer keeps does not depend on the device:
it is fixed by the graph (eager, checkpointed, compiled). So this measures it on any machine, the CPU
included, by counting the distinct storages autograd saves (``torch.autograd.graph.saved_tensors_hooks``)
during a forward through the project's own :func:`~mftcoder_coba.models.build_model` and
:func:`~mftcoder_coba.models.hidden_states`, then running the backward. Parameters are not counted. A model
with one decoder layer and one with two are measured and the difference taken, so embeddings, the final norm
and the mask are left out.

Variants: each ``model.gradient_checkpointing`` mode, eager and under ``model.compile``. Eager *selective*
checkpointing is left out: its saved tensors live in the checkpoint's own cache, out of the hooks' sight.

The projection column multiplies by the ``bench-train`` workload (16 layers, micro-batch 2 x 4096 tokens):
the activation memory one micro-batch holds at the end of its forward.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mftcoder_coba.bench_train import LLAMA_1B, TINY, environment
from mftcoder_coba.models import ModelConfig, build_model, causal_lm, hidden_states

log = logging.getLogger(__name__)

# (gradient_checkpointing, compile): the variants reported, in table order.
VARIANTS: tuple[tuple[bool | str, bool], ...] = (
    (False, False), (True, False), (False, True), ("selective", True), (True, True),
)
BENCH_TRAIN_TOKENS = 2 * 4096  # bench-train's micro-batch
VOCAB = 1024  # the embedding is outside the measured difference; keep it small


@dataclass
class Row:
    """One variant's measurement."""

    gradient_checkpointing: bool | str
    compile: bool
    bytes_per_token_per_layer: float
    projected_gib: float

    def label(self) -> str:
        ckpt = {False: "none", True: "full"}.get(self.gradient_checkpointing, self.gradient_checkpointing)
        return f"{ckpt}{' + compile' if self.compile else ''}"


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


def measure(shape: dict[str, Any], tokens: int, dtype: str, checkpointing: bool | str, compiled: bool,
            layers_projected: int) -> Row:
    """Per-token, per-layer saved bytes of one variant (two-layer minus one-layer model)."""
    per_depth = []
    for depth in (1, 2):
        cfg = ModelConfig(model_config={**shape, "num_hidden_layers": depth, "vocab_size": VOCAB},
                          dtype=dtype, attn_implementation="sdpa", gradient_checkpointing=checkpointing,
                          compile=compiled)
        model = build_model(cfg, VOCAB, 1)
        saved_bytes(model, tokens)  # the first call compiles
        per_depth.append(saved_bytes(model, tokens))
    per_token = (per_depth[1] - per_depth[0]) / tokens
    projected = per_token * layers_projected * BENCH_TRAIN_TOKENS / 2**30
    return Row(checkpointing, compiled, per_token, projected)


def run(tiny: bool, tokens: int) -> dict[str, Any]:
    """All variants; the report with environment, rows and table."""
    shape = {k: v for k, v in (TINY if tiny else LLAMA_1B).items() if k not in ("vocab_size", "num_hidden_layers")}
    dtype = "fp32" if tiny else "bf16"
    layers = int((TINY if tiny else LLAMA_1B)["num_hidden_layers"])
    rows = []
    for checkpointing, compiled in VARIANTS:
        log.info("bench-activations: gradient_checkpointing=%s compile=%s", checkpointing, compiled)
        torch._dynamo.reset()
        rows.append(measure(shape, tokens, dtype, checkpointing, compiled, layers))
    report = {
        "benchmark": "bench-activations",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "shape": {**shape, "dtype": dtype, "tokens_measured": tokens, "layers_projected": layers,
                  "tokens_projected": BENCH_TRAIN_TOKENS, "tiny": tiny},
        "rows": [{**row.__dict__, "label": row.label()} for row in rows],
    }
    report["table"] = format_table(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    s, env = report["shape"], report["environment"]
    base = report["rows"][0]["bytes_per_token_per_layer"]
    lines = [
        f"bench-activations on {env['device']} ({report['date']}); torch {env['torch']}, transformers "
        f"{env['transformers']}",
        f"decoder layer: hidden {s['hidden_size']}, MLP {s['intermediate_size']}, {s['num_attention_heads']} heads "
        f"({s['num_key_value_heads']} KV), {s['dtype']}, sdpa; measured on {s['tokens_measured']} tokens",
        "",
        f"| checkpointing + compile | KB / token / layer | vs eager | {s['layers_projected']} layers x "
        f"{s['tokens_projected']} tokens (GiB) |",
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['label']} | {r['bytes_per_token_per_layer'] / 1000:.1f} | "
                     f"{r['bytes_per_token_per_layer'] / base:.2f} | {r['projected_gib']:.2f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train"),
                        help="folder for activations_<device>.json / .md (default: benchmarks/train)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the measured row (default 1024)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (tests; seconds)")


def main(args: argparse.Namespace) -> int:
    from mftcoder_coba.errors import UserError

    if args.tokens < 4:
        raise UserError("--tokens must be >= 4")
    report = run(args.tiny, args.tokens)
    slug = re.sub(r"[^a-z0-9]+", "-", report["environment"]["device"].lower()).strip("-")
    stem = f"activations_{slug}" + ("-tiny" if args.tiny else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{stem}.md").write_text(report["table"] + "\n", encoding="utf-8")
    print(report["table"])
    print(f"\nwrote {args.out / stem}.json and .md")
    return 0
