"""``mftcoder-coba export RUN_DIR --out DIR``: a run's trained model as a plain transformers directory.

Full fine-tuning and LoRA/QLoRA runs give one model directory (LoRA merged into the weights) with the
run's tokenizer, which ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
load without this package. CGC-LoRA runs give the "1+N" layout (the base plus one peft LoRA adapter per task,
see :func:`mftcoder_coba.models.cgc_lora.export_task_adapters`). The output is written under a temporary
name beside DIR and renamed when complete; an existing DIR is replaced only with ``--overwrite``, and only
after the new export is whole.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from torch import nn

from mftcoder_coba.atomic import atomic_directory, refuse_existing
from mftcoder_coba.errors import UserError
from mftcoder_coba.models import causal_lm, load_trained
from mftcoder_coba.models.cgc_lora import cgc_layers, export_task_adapters
from mftcoder_coba.models.persist import model_dir_of

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint to export (RUN_DIR/checkpoints/step-N); default: the newest complete one")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--merged-tasks", action="store_true",
                        help="CGC-LoRA runs: also write one merged model per task under OUT/merged/<task>")


def main(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, args.checkpoint, overwrite=args.overwrite,
                     merged_tasks=args.merged_tasks)
    print(out)
    return 0


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, *,
               overwrite: bool = False, merged_tasks: bool = False) -> Path:
    """Export a run's checkpoint (the newest by default) to ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    tokenizer_dir = run_dir / "tokenizer"
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir / 'config.yaml'}: not found (is {run_dir} a run directory?)")
    if not tokenizer_dir.is_dir():
        raise UserError(f"{tokenizer_dir}: not found; the run's tokenizer is needed to export a usable model")
    refuse_existing(out, overwrite=overwrite)
    if out.exists() and (out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents):
        raise UserError(f"{out}: is the run directory or holds it; choose another output directory")
    model_dir = model_dir_of(run_dir, checkpoint)
    model = load_trained(run_dir, checkpoint)
    if cgc_layers(causal_lm(model)):
        export_task_adapters(model, out, _task_names(model_dir), tokenizer_dir, merged=merged_tasks,
                             overwrite=overwrite)
    else:
        with atomic_directory(out, overwrite=overwrite) as staging:
            _write_plain(model, tokenizer_dir, staging)
    log.info("exported %s to %s", model_dir, out)
    return out


def _write_plain(model: nn.Module, tokenizer_dir: Path, out: Path) -> None:
    """One transformers directory: LoRA merged, ready for inference (KV cache on, the tokenizer's special ids)."""
    from transformers import AutoTokenizer

    if causal_lm(model) is not model:  # peft: fold the adapters into the base weights
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model.config.use_cache = True
    configs = [c for c in (model.config, getattr(model, "generation_config", None)) if c is not None]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            for config in configs:
                setattr(config, name, value)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _task_names(model_dir: Path) -> list[str] | None:
    """Task names in task-id order, from the checkpoint's trainer_state.json (None: E's default names)."""
    state = model_dir.parent / "trainer_state.json"
    if state.is_file():
        tasks = json.loads(state.read_text(encoding="utf-8")).get("tasks")
        if isinstance(tasks, list):
            return [str(t) for t in tasks]
    return None
