"""``mftcoder-coba export RUN_DIR --out DIR``: a run's trained model as a plain transformers directory.

Full fine-tuning and LoRA/QLoRA runs give one model directory (LoRA merged into the weights) with the
run's tokenizer, which ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
load without this package. CGC-LoRA runs give the "1+N" layout (the base plus one peft LoRA adapter per task,
see :func:`mftcoder_coba.models.cgc_export.export_task_adapters`). The output is written under a temporary
name beside DIR and renamed when complete; an existing DIR is replaced only with ``--overwrite``, only when
it is an export (marked as one, or an export made before markers), never the run or anything inside it,
and only after the new export is whole. The checkpoint is checked against its ``files.json`` first.
The model stops where training taught it to: ``config.json`` and ``generation_config.json`` list every end
token (the tokenizer's EOS, the chat template's end-of-turn token, the base's own special end ids; see
:mod:`mftcoder_coba.end_tokens`), and the tokenizer carries the chat template the shards were rendered with
(MFTCoder's role markers as a template for a ``--template mftcoder`` run). ``--trust-remote-code`` is the
only way to run a model's own code: the run's config.yaml is a file being read, so its ``trust_remote_code``
is ignored here. ``--best`` exports the checkpoint ``train.keep_best`` kept
(named by ``RUN_DIR/checkpoints/best.json``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from mftcoder_coba import config_io
from mftcoder_coba.atomic import atomic_directory, check_replaceable, mark_output
from mftcoder_coba.end_tokens import mftcoder_template, trained_end_ids
from mftcoder_coba.errors import UserError
from mftcoder_coba.models import causal_lm, load_trained
from mftcoder_coba.models.cgc_export import export_task_adapters
from mftcoder_coba.models.cgc_lora import cgc_layers
from mftcoder_coba.models.persist import model_dir_of, run_model_config

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, *,
               overwrite: bool = False, merged_tasks: bool = False, trust_remote_code: bool = False,
               adapter_only: bool = False) -> Path:
    """Export a run's checkpoint (the newest complete one by default) to ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    tokenizer_dir = run_dir / "tokenizer"
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir / 'config.yaml'}: not found (is {run_dir} a run directory?)")
    if not tokenizer_dir.is_dir():
        raise UserError(f"{tokenizer_dir}: not found; the run's tokenizer is needed to export a usable model")
    check_replaceable(out, overwrite=overwrite, kind="export", inputs=[run_dir], owned=_unmarked_export)
    model_dir = model_dir_of(run_dir, checkpoint)
    model = load_trained(run_dir, model_dir, trust_remote_code=trust_remote_code)
    mode = _template_mode(run_dir)
    tokenizer = _trained_tokenizer(tokenizer_dir, mode)
    _set_special_ids(causal_lm(model), tokenizer, mode)
    if cgc_layers(causal_lm(model)):
        export_task_adapters(model, out, _task_names(model_dir), tokenizer, merged=merged_tasks,
                             overwrite=overwrite)
    else:
        if adapter_only and causal_lm(model) is model:
            raise UserError(f"--adapter-only: {run_dir} trained no LoRA adapter (model.adapter in its config.yaml)")
        with atomic_directory(out, overwrite=overwrite) as staging:
            if adapter_only:
                _write_adapter(model, tokenizer, staging, run_dir)
            else:
                _write_plain(model, tokenizer, staging)
            mark_output(staging, "export")
    log.info("exported %s to %s", model_dir, out)
    return out


def _template_mode(run_dir: Path) -> str | None:
    """How the run's shards were rendered (``chat`` or ``mftcoder``, their manifest's ``template``); None when
    the shards named in ``config.yaml`` are no longer there to ask."""
    data = config_io.load_mapping(run_dir / "config.yaml").get("data")
    train = data.get("train") if isinstance(data, dict) else None
    manifest = Path(str(train)) / "manifest.json" if train else None
    try:
        mode = json.loads(manifest.read_text(encoding="utf-8")).get("template") if manifest else None
    except (OSError, ValueError, AttributeError):
        mode = None
    if mode not in ("chat", "mftcoder"):
        log.warning("%s: the shards' template mode is unknown (their manifest is gone); assuming the chat "
                    "template of the run's tokenizer if it has one, else MFTCoder's role markers", run_dir)
        return None
    return mode


def _trained_tokenizer(tokenizer_dir: Path, mode: str | None):
    """The run's tokenizer with the chat template the shards were rendered with: its own for ``chat``,
    MFTCoder's role markers for ``mftcoder`` (and for a tokenizer without a template, which prep renders so)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{tokenizer_dir}: cannot load the run's tokenizer ({reason})") from None
    if mode == "mftcoder" or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = mftcoder_template(tokenizer)
    return tokenizer


def _set_special_ids(lm: nn.Module, tokenizer, mode: str | None) -> None:
    """The tokenizer's BOS/pad and every trained end id (:func:`trained_end_ids`, the base's list kept) on the
    model's config and generation config, KV cache on: what ``generate`` on the export reads."""
    generation = getattr(lm, "generation_config", None)
    base = [getattr(c, "eos_token_id", None) for c in (lm.config, generation) if c is not None]
    base_ids = [i for value in base if value is not None for i in ([value] if isinstance(value, int) else value)]
    ends = trained_end_ids(tokenizer, mode, base_ids)
    values = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": ends[0] if len(ends) == 1 else ends or None}
    lm.config.use_cache = True
    for config in (lm.config, generation):
        for name, value in values.items():
            if config is not None and value is not None:
                setattr(config, name, value)


def _write_plain(model: nn.Module, tokenizer, out: Path) -> None:
    """One transformers directory: LoRA merged, ready for inference (:func:`_set_special_ids` done before)."""
    if causal_lm(model) is not model:  # peft: fold the adapters into the base weights
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _write_adapter(model: nn.Module, tokenizer, out: Path, run_dir: Path) -> None:
    """peft's own adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, unmerged) and the
    tokenizer, for serving several adapters on one base; ``base_model_name_or_path`` names the run's base model
    (``model.path``, or the run's ``base_model/`` for a random-init base)."""
    path = run_model_config(run_dir).path
    for config in model.peft_config.values():
        config.base_model_name_or_path = path if path is not None else str((run_dir / "base_model").absolute())
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _unmarked_export(path: Path) -> bool:
    """An export made before output markers existed: a transformers model directory with the tokenizer beside
    it (``config.json`` and ``tokenizer_config.json``; a checkpoint's ``model/`` or a ``base_model/`` has no
    tokenizer) or the "1+N" layout (``export.json`` beside ``base/config.json``). Run directories and what
    lies in them are refused before this is asked (:func:`check_replaceable`)."""
    plain = (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
    return plain or ((path / "export.json").is_file() and (path / "base" / "config.json").is_file())


def _task_names(model_dir: Path) -> list[str] | None:
    """Task names in task-id order, from the checkpoint's trainer_state.json (None: E's default names)."""
    state = model_dir.parent / "trainer_state.json"
    if state.is_file():
        try:
            tasks = json.loads(state.read_text(encoding="utf-8")).get("tasks")
        except (ValueError, AttributeError) as exc:
            raise UserError(f"{state}: does not load ({exc}); the checkpoint is damaged") from None
        if isinstance(tasks, list):
            return [str(t) for t in tasks]
    return None
