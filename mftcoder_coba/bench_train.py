"""``mftcoder-coba bench-train``: training throughput, MFU, peak memory and CoBa's overhead.

The workload is the issue's: a Llama-3.2-1B-shaped model with random weights (hidden 2048, 16 layers, 32
heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings), rows of 4096 tokens, micro-batch 2, bf16,
8 tasks, a global batch of 64 rows. It runs the real trainer (:func:`mftcoder_coba.training.train`: DeepSpeed
step, fused linear + per-task cross-entropy) twice on the same synthetic shards:

* ``coba``: CoBa with a held-out sample of one row per task after every step (``update_interval: 1``);
* ``uniform``: fixed equal weights and no held-out split, i.e. plain multitask training.

The shards are made by the project's own ``prepare`` from random "words" of a word-level tokenizer whose
vocabulary has the model's size, in samples of 256-3000 tokens, so rows are really packed (several samples
per row, attention confined to each). Step times are the trainer's own (``tokens_per_s`` in metrics.jsonl,
the held-out sample included); the first ``--warmup-steps`` are left out and the median of the others
reported. CoBa's overhead is split into the held-out forwards, timed in the trainer as they run, and
everything else (the rest of the difference to the uniform run: bookkeeping, all-reduces, weight math).

Results: a table on stdout and ``<device>.json`` / ``<device>.md`` in ``--out`` with the device, date and
versions. ``--tiny`` runs a small model on the CPU in seconds (for tests; its numbers mean nothing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mftcoder_coba.errors import UserError
from mftcoder_coba.models.attention import resolve_attn_implementation
from mftcoder_coba.models.build import DTYPES

log = logging.getLogger(__name__)

LLAMA_1B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
}
TINY: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}
NUM_TASKS = 8
# Relative task sizes (largest first): the global batches mix tasks unevenly, as real multitask data does.
TASK_SHARES = (0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03)


@dataclass
class Workload:
    """The shape of one benchmark: model, rows, batch."""

    model_config: dict[str, Any]
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    dtype: str
    sample_tokens: tuple[int, int]
    train_rows: int


def workload(tiny: bool, on_cuda: bool) -> Workload:
    """The issue's 1B workload, or the tiny CPU one (``--tiny``)."""
    if tiny:
        return Workload(dict(TINY), seq_len=128, micro_batch_size=2, global_batch_size=8,
                        dtype="bf16" if on_cuda else "fp32", sample_tokens=(8, 100), train_rows=16)
    return Workload(dict(LLAMA_1B), seq_len=4096, micro_batch_size=2, global_batch_size=64, dtype="bf16",
                    sample_tokens=(256, 3000), train_rows=128)


@dataclass
class Knobs:
    """The memory/speed settings under test, the same for every mode of one run."""

    attn: str = "auto"
    zero_stage: int = 0
    gradient_checkpointing: bool | str = False
    compile: bool = False
    master_weights: str = "fp32"

    def label(self) -> str:
        """Short text for table headers and file names, e.g. ``zero1 selective-ckpt compile bf16-master``."""
        parts = [f"zero{self.zero_stage}"]
        if self.gradient_checkpointing:
            parts.append(f"{'full' if self.gradient_checkpointing is True else self.gradient_checkpointing}-ckpt")
        if self.compile:
            parts.append("compile")
        if self.master_weights != "fp32":
            parts.append(f"{self.master_weights}-master")
        return " ".join(parts)


@dataclass
class ModeResult:
    """Medians over the timed steps of one mode."""

    mode: str
    step_time_s: float
    tokens_per_s: float
    mfu: float | None
    peak_memory_gib: float | None
    held_out_forward_s: float | None
    step_times_s: list[float] = field(default_factory=list)
    final_loss: float | None = None


def run_benchmark(modes: list[str], *, tiny: bool, steps: int, warmup_steps: int, knobs: Knobs | None = None,
                  work_dir: Path | None = None) -> dict[str, Any]:
    """Prepare the shards, train each mode, and return the report (results, table, environment)."""
    on_cuda = torch.cuda.is_available()
    if not tiny and not on_cuda:
        raise UserError("bench-train: the 1B workload needs a CUDA GPU; use --tiny on a CPU")
    work = workload(tiny, on_cuda)
    knobs = knobs or Knobs()
    if knobs.master_weights == "bf16":  # bf16 masters need a bf16 model, on the CPU too
        work = dataclasses.replace(work, dtype="bf16")
    knobs = dataclasses.replace(knobs, attn=resolve_attn_implementation(knobs.attn, DTYPES[work.dtype]))
    with _work_dir(work_dir) as root:
        data = make_shards(root / "data", work)
        results = [_run_mode(mode, root, data, work, steps, warmup_steps, knobs) for mode in modes]
    report = {
        "benchmark": "bench-train",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "workload": {**asdict(work), "num_tasks": NUM_TASKS, "attn_implementation": knobs.attn,
                     **{k: v for k, v in asdict(knobs).items() if k != "attn"}, "label": knobs.label(),
                     "timed_steps": steps, "warmup_steps": warmup_steps, "tiny": tiny},
        "results": [asdict(r) for r in results],
        "coba_overhead": coba_overhead(results),
    }
    report["table"] = format_table(report)
    return report


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        yield Path(tmp)


def make_shards(out: Path, work: Workload, seed: int = 0) -> Path:
    """Synthetic multitask shards (``out/train``, ``out/valid``) through the project's own ``prepare``.

    A word-level tokenizer maps ``w<i>`` to id i, so random words are random token ids over the model's
    whole vocabulary; every sample is one plain-text record (loss on all its tokens) of a random length.
    """
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare

    vocab_size = int(work.model_config["vocab_size"])
    tokenizer_dir = out.parent / "tokenizer"
    word_level_tokenizer(vocab_size, tokenizer_dir)
    rng = np.random.default_rng(seed)
    raw = out.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    low, high = work.sample_tokens
    train_tokens = work.train_rows * work.seq_len
    tasks = {}
    for t, share in enumerate(TASK_SHARES):
        budget, records = int(share * train_tokens), []
        while budget > 0 or len(records) < 4:
            n = int(rng.integers(low, high))
            records.append(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(3, vocab_size, n))}))
            budget -= n
        path = raw / f"task{t}.jsonl"
        path.write_text("\n".join(records) + "\n", encoding="utf-8")
        tasks[f"task{t}"] = path
    prepare(PrepOptions(tasks=tasks, tokenizer=tokenizer_dir, seq_len=work.seq_len, out=out,
                        valid_samples_per_task=2, seed=seed, progress=False))
    return out


def word_level_tokenizer(vocab_size: int, out: Path) -> None:
    """A fast tokenizer with exactly ``vocab_size`` ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``w3``..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(str(out))


def run_config_data(mode: str, run_dir: Path, data: Path, work: Workload, max_steps: int,
                    knobs: Knobs) -> dict[str, Any]:
    """The trainer config of one mode: CoBa with a held-out row per task every step, or uniform without."""
    coba = mode == "coba"
    return {
        "run_dir": str(run_dir),
        "data": {"train": str(data / "train"), "valid": str(data / "valid") if coba else None},
        "model": {"model_config": work.model_config, "dtype": work.dtype, "attn_implementation": knobs.attn,
                  "gradient_checkpointing": knobs.gradient_checkpointing, "compile": knobs.compile, "init_seed": 0},
        # CoBa's warm-up is one update so every timed step runs the full slope/score/weight computation.
        "balancer": {"name": mode, "update_interval": 1, "valid_rows_per_task": 1,
                     "options": {"warmup_steps": 1} if coba else {}},
        "optim": {"lr": 1e-4, "warmup_steps": 1, "master_weights": knobs.master_weights},
        "train": {"max_steps": max_steps, "micro_batch_size": work.micro_batch_size,
                  "global_batch_size": work.global_batch_size, "zero_stage": knobs.zero_stage, "seed": 0,
                  "save_every": 0, "save_final": False, "keep_last": 1, "log_every": 1, "tensorboard": False},
    }


def _run_mode(mode: str, root: Path, data: Path, work: Workload, steps: int, warmup_steps: int,
              knobs: Knobs) -> ModeResult:
    from mftcoder_coba import config_io
    from mftcoder_coba.config import RunConfig
    from mftcoder_coba.training import train

    run_dir = root / f"run-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_io.build(RunConfig, run_config_data(mode, run_dir, data, work, warmup_steps + steps, knobs))
    log.info("bench-train: %s, %d + %d steps", mode, warmup_steps, steps)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(run_dir, ignore_errors=True)
    timed = [r for r in records if r["step"] > warmup_steps]
    tokens_per_step = work.global_batch_size * work.seq_len
    step_times = [tokens_per_step / r["tokens_per_s"] for r in timed]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    forwards = [r["valid_s"] for r in timed if "valid_s" in r]
    median = statistics.median(step_times)
    return ModeResult(mode, median, tokens_per_step / median, statistics.median(mfus) if mfus else None, peak,
                      statistics.median(forwards) if forwards else None, step_times, timed[-1]["loss"])


def coba_overhead(results: list[ModeResult]) -> dict[str, float] | None:
    """CoBa's step-time overhead over uniform weights, split into held-out forwards and everything else."""
    by_mode = {r.mode: r for r in results}
    if "coba" not in by_mode or "uniform" not in by_mode:
        return None
    coba, uniform = by_mode["coba"], by_mode["uniform"]
    total = coba.step_time_s - uniform.step_time_s
    forwards = coba.held_out_forward_s or 0.0
    return {
        "total_s": total,
        "held_out_forwards_s": forwards,
        "everything_else_s": total - forwards,
        "total_pct": 100 * total / uniform.step_time_s,
        "held_out_forwards_pct": 100 * forwards / uniform.step_time_s,
        "everything_else_pct": 100 * (total - forwards) / uniform.step_time_s,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of the results and the overhead split."""
    env, work = report["environment"], report["workload"]
    shape = work["model_config"]
    lines = [
        f"bench-train on {env['device']} ({report['date']}); torch {env['torch']}, transformers "
        f"{env['transformers']}, deepspeed {env['deepspeed']}",
        f"model: llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab "
        f"{shape['vocab_size']}; seq {work['seq_len']}, micro-batch {work['micro_batch_size']}, global batch "
        f"{work['global_batch_size']} rows, {work['dtype']}, attention {work['attn_implementation']}, "
        f"{work['label']}, {NUM_TASKS} tasks; median of {work['timed_steps']} steps after "
        f"{work['warmup_steps']} warm-up",
        "",
        "| mode | step time (s) | tokens/s | MFU | peak memory (GiB) | held-out forwards (s/step) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        held = f"{r['held_out_forward_s']:.4f}" if r["held_out_forward_s"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['step_time_s']:.4f} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | {held} |")
    overhead = report["coba_overhead"]
    if overhead is not None:
        lines += [
            "",
            "| CoBa overhead vs uniform | s/step | % of uniform step |",
            "|---|---|---|",
            f"| whole | {overhead['total_s']:.4f} | {overhead['total_pct']:.2f}% |",
            f"| held-out forwards | {overhead['held_out_forwards_s']:.4f} | {overhead['held_out_forwards_pct']:.2f}% |",
            f"| everything else | {overhead['everything_else_s']:.4f} | {overhead['everything_else_pct']:.2f}% |",
        ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Device and library versions for the report."""
    import deepspeed
    import transformers

    versions: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }
    for name in ("triton", "flash_attn", "peft"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    return versions


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``<device>_<attention>_<settings>[-tiny].json`` (everything) and ``.md`` (the table) in ``out``."""
    work = report["workload"]
    return write_files(report, out, [work["attn_implementation"], work["label"].replace(" ", "_")], work["tiny"])


def write_files(report: dict[str, Any], out: Path, parts: list[str], tiny: bool, prefix: str = ""
                ) -> tuple[Path, Path]:
    """A benchmark report as ``<prefix><device>_<parts...>[-tiny]``: ``.json`` (everything) and ``.md`` (its
    table), the device name made file-safe."""
    slug = re.sub(r"[^a-z0-9]+", "-", report["environment"]["device"].lower()).strip("-")
    stem = prefix + "_".join([slug, *parts]) + ("-tiny" if tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report["table"] + "\n", encoding="utf-8")
    return json_path, md_path
