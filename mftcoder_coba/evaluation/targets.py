"""What ``eval`` and ``eval-code`` evaluate: a run, an export, a transformers model, with LoRA adapters.

A TARGET path is recognised by what it holds:

- a run directory (``config.yaml`` + ``checkpoints/``): the newest complete checkpoint or ``--checkpoint``,
  rebuilt with :func:`mftcoder_coba.models.load_trained` (full, LoRA, QLoRA unquantised, CGC-LoRA gated);
- a CGC-LoRA "1+N" export (``export.json``, ``base/``, ``adapters/<task>/``): each task with its own adapter;
- a peft adapter directory (``adapter_config.json``): on the base it names (a local directory);
- any transformers model directory (``config.json``), optionally with ``--adapter DIR`` on top.

``--task-adapter TASK=DIR`` gives a task its own adapter on the (plain) target, as the "1+N" export does.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from mftcoder_coba.atomic import is_run_dir
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.cli_options import DTYPE_NAMES
from mftcoder_coba.models import causal_lm, load_trained
from mftcoder_coba.models.attention import FLASH, flash_attn_available, resolve_attn_implementation
from mftcoder_coba.models.cgc_lora import cgc_layers
from mftcoder_coba.models.persist import CHECKPOINT_NAME, model_dir_of

log = logging.getLogger(__name__)

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


@dataclass(frozen=True)
class Target:
    """A resolved TARGET: where its weights are and how tasks map to adapters."""

    kind: str
    """``run``, ``export-1+N`` or ``model``."""
    path: Path
    """The directory the user named."""
    checkpoint: Path | None = None
    """Run targets: the checkpoint directory (``checkpoints/step-N``)."""
    base: Path | None = None
    """Model targets: the transformers directory of the (base) model."""
    adapter: Path | None = None
    """A peft adapter applied to every task."""
    task_adapters: dict[str, Path] = field(default_factory=dict)
    """Task name -> peft adapter applied for that task only (the "1+N" export's adapters)."""
    tokenizer: Path | None = None
    """The tokenizer directory that goes with the model, when one is known."""

    @property
    def step(self) -> int | None:
        """The optimizer step of a run's checkpoint."""
        found = CHECKPOINT_NAME.match(self.checkpoint.name) if self.checkpoint is not None else None
        return int(found.group(1)) if found else None

    def describe(self) -> dict:
        """The target as plain JSON data for result files."""
        return {"kind": self.kind, "path": str(self.path),
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint), "step": self.step,
                "adapter": None if self.adapter is None else str(self.adapter),
                "task_adapters": {task: str(p) for task, p in self.task_adapters.items()}}


def resolve_target(path: str | Path, *, checkpoint: str | Path | None = None, adapter: str | Path | None = None,
                   task_adapters: dict[str, Path] | None = None) -> Target:
    """Recognise ``path`` (see the module docstring); errors name the path and what is missing."""
    path = Path(path)
    task_adapters = dict(task_adapters or {})
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (a run directory, an export or a transformers model directory)")
    for adapter_dir in [adapter, *task_adapters.values()]:
        if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise UserError(f"{adapter_dir}: not a peft adapter directory (no adapter_config.json)")
    if checkpoint is not None and not is_run_dir(path):
        raise UserError(f"--checkpoint: {path} is not a run directory")
    if is_run_dir(path):
        if adapter is not None or task_adapters:
            raise UserError(f"{path}: a run directory already holds its adapters; --adapter/--task-adapter apply to "
                            "model directories")
        model_dir = model_dir_of(path, checkpoint)
        ckpt = model_dir.parent if model_dir.name == "model" else model_dir
        tokenizer = path / "tokenizer"
        return Target("run", path, checkpoint=ckpt, tokenizer=tokenizer if tokenizer.is_dir() else None)
    if (path / "export.json").is_file():
        return _cgc_export(path, adapter, task_adapters)
    base = path
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        if adapter is not None:
            raise UserError(f"{path}: is itself an adapter; give its base model as TARGET and it as --adapter")
        base, adapter = _adapter_base(path), path
    if not (base / "config.json").is_file():
        raise UserError(f"{path}: not a run directory, an export or a transformers model directory (no config.json)")
    return Target("model", path, base=base, adapter=None if adapter is None else Path(adapter),
                  task_adapters=task_adapters, tokenizer=_tokenizer_dir(path, base))


def _cgc_export(path: Path, adapter: str | Path | None, task_adapters: dict[str, Path]) -> Target:
    if adapter is not None or task_adapters:
        raise UserError(f"{path}: a CGC-LoRA export brings one adapter per task; --adapter/--task-adapter do not apply")
    try:
        summary = json.loads((path / "export.json").read_text(encoding="utf-8"))
        tasks = {t["name"]: path / t["adapter"] for t in summary["tasks"]}
        base = path / summary.get("base", "base")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / 'export.json'}: not a CGC-LoRA export summary ({exc})") from None
    if not (base / "config.json").is_file():
        raise UserError(f"{base}: the export's base model is missing")
    return Target("export-1+N", path, base=base, task_adapters=tasks, tokenizer=_tokenizer_dir(base, base))


def _adapter_base(adapter: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{adapter}: its base model {base!r} is not a local model directory; give the base as "
                        "TARGET and this adapter as --adapter")
    return Path(base)


def _tokenizer_dir(*candidates: Path) -> Path | None:
    for candidate in candidates:
        if any((candidate / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return candidate
    return None


def pick_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name}: {exc}") from None


def load_model(target: Target, *, dtype: str = "auto", device: torch.device | None = None,
               for_generation: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """The target's model in eval mode on ``device``; with task adapters, a peft model holding all of them
    (select one with :func:`use_task`).

    ``dtype``: ``auto`` keeps the run's or the saved model's dtype. Packed-row loss uses the attention the
    trainer would choose; generation uses SDPA (or flash-attn), which serve the KV cache. A model's own code
    (``auto_map``) runs only with ``trust_remote_code``, which comes from the command line.
    """
    if target.kind == "run":
        model = load_trained(target.path, target.checkpoint, trust_remote_code=trust_remote_code)
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
    else:
        from transformers import AutoModelForCausalLM

        torch_dtype = DTYPES.get(dtype, "auto")
        config_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(target.base), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                attn_implementation=resolve_attn_implementation("auto", config_dtype))
            model = _with_adapters(model, target)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise UserError(f"{target.path}: cannot load the model ({first_line(exc)})") from None
    lm = causal_lm(model)
    if for_generation and lm.config._attn_implementation not in (FLASH, "sdpa", "eager"):
        lm.set_attn_implementation(FLASH if flash_attn_available() and lm.dtype == torch.bfloat16 else "sdpa")
    return model.to(device or torch.device("cpu")).eval()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _adapter_names(target: Target) -> dict[Path, str]:
    """A peft adapter name per distinct task adapter (tasks of one CGC-LoRA cluster share theirs)."""
    names: dict[Path, str] = {}
    for path in target.task_adapters.values():
        names.setdefault(path, f"task_adapter_{len(names)}")
    return names


def _with_adapters(model: nn.Module, target: Target) -> nn.Module:
    """``model`` with ``--adapter`` (merged when task adapters follow) and every task adapter loaded."""
    if target.adapter is None and not target.task_adapters:
        return model
    from peft import PeftModel

    if target.adapter is not None:
        model = PeftModel.from_pretrained(model, str(target.adapter), is_trainable=False)
        if not target.task_adapters:
            return model
        model = model.merge_and_unload()
    for i, (path, name) in enumerate(_adapter_names(target).items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return model


def use_task(model: nn.Module, target: Target, task: str | None) -> None:
    """Make ``model`` compute ``task``'s outputs: its adapter among the task adapters (the shared model for a
    task without one). Models without task adapters are unchanged."""
    if not target.task_adapters:
        return
    if task in target.task_adapters:
        model.base_model.enable_adapter_layers()
        model.set_adapter(_adapter_names(target)[target.task_adapters[task]])
    else:
        model.base_model.disable_adapter_layers()


def is_cgc(model: nn.Module) -> bool:
    """True for a CGC-LoRA model whose layers are gated by task ids (a CGC-LoRA run's checkpoint)."""
    return bool(cgc_layers(causal_lm(model)))


def run_tasks(target: Target) -> list[str] | None:
    """Task names in task-id order of a run's checkpoint (its trainer_state.json), when known."""
    if target.checkpoint is None:
        return None
    state = target.checkpoint / "trainer_state.json"
    if not state.is_file():
        return None
    tasks = json.loads(state.read_text(encoding="utf-8")).get("tasks")
    return [str(t) for t in tasks] if isinstance(tasks, list) else None
