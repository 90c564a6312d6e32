"""The vLLM engine of ``eval-code``, and the choice between it and transformers (``--engine auto|transformers|vllm``).

vLLM (``pip install 'mftcoder-coba[vllm]'``) serves plain transformers model directories: no peft adapters, no
per-task adapters or CGC-LoRA gates, no run checkpoints (those are rebuilt by mftcoder-coba's own loader; export
the run and evaluate the export's plain model). It is given the token ids
:func:`~mftcoder_coba.evaluation.generation.encode_prompts` makes and its tokens are cut by
:func:`~mftcoder_coba.evaluation.generation.decode_completions`, as transformers' are, with the same sampling
settings, end token and stop sequences, so greedy decoding gives the same completions with either engine (the
same floating-point precision given). ``--batch-size`` does not apply: vLLM schedules its own batches. Under
``auto``, a model vLLM cannot load or run (an architecture it lacks, a head size its kernels lack) is generated
with transformers instead, with a warning. The engine runs in this process; vLLM is imported only here, only
when used.
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.model_options import ModelOptions
from mftcoder_coba.evaluation.problems import STOP_SEQUENCES
from mftcoder_coba.evaluation.prompts import Sampling

if TYPE_CHECKING:
    from mftcoder_coba.evaluation.generation import Engine
    from mftcoder_coba.evaluation.targets import Target

log = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "vllm")
"""``--engine`` values: ``auto`` is vLLM when it is installed and serves the target, else transformers."""
RUN_CHECKPOINTS = "run checkpoints are rebuilt by mftcoder-coba's own loader (export the run and evaluate its model)"
"""Why vLLM does not serve a run's checkpoints."""
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def unservable(target: Target, options: ModelOptions) -> str | None:
    """Why vLLM cannot generate for ``target`` with ``options`` (None when it can, vllm's presence aside)."""
    if target.kind == "run":
        return f"{target.path}: {RUN_CHECKPOINTS}"
    if target.task_adapters:
        return f"{target.path} applies one adapter per task"
    if target.adapter is not None:
        return f"the LoRA adapter {target.adapter} is applied with peft"
    if options.task is not None:
        return "--task selects a per-task adapter"
    if options.device != "auto":
        return f"--device {options.device}: vLLM places the model itself"
    return None


def vllm_missing() -> str | None:
    """Why ``import vllm`` fails (None when it works)."""
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - a broken install (CUDA libraries missing, ...) fails in many ways
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"vllm cannot be imported ({detail}; pip install 'mftcoder-coba[vllm]')"
    return None


def process_group_running() -> str | None:
    """Why vLLM must not run in this process now: torch.distributed is running (a trainer's, in the same process).
    vLLM builds its groups on that default group and destroys it when its engine shuts down, under its owner
    (DeepSpeed keeps using the group it cached)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return ("torch.distributed is already running in this process, and vLLM's engine destroys its default "
                "group when it shuts down")
    return None


def choose_engine(requested: str, target: Target, options: ModelOptions) -> str:
    """``transformers`` or ``vllm`` for ``--engine requested``, logged with the reason; ``--engine vllm`` that
    cannot be honoured is a :class:`UserError`."""
    if requested == "transformers":
        log.info("generation engine: transformers (--engine transformers)")
        return "transformers"
    reason = unservable(target, options) or vllm_missing() or process_group_running()
    if reason is None:
        log.info("generation engine: vllm (--engine %s: a plain model and vllm is installed)", requested)
        return "vllm"
    if requested == "vllm":
        raise UserError(f"--engine vllm: {reason}; use --engine transformers")
    log.info("generation engine: transformers (--engine auto: %s)", reason)
    return "transformers"


def saved_config(target: Target) -> dict:
    """The model's config.json (empty when unreadable: vLLM then reports what is wrong with the model)."""
    try:
        config = json.loads((target.base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def vllm_dtype(config: dict, dtype: str) -> str:
    """vLLM's name for ``--dtype``. ``auto`` keeps the dtype the model was saved in, as transformers does; vLLM's
    own ``auto`` would turn a float32 model into 16-bit on a GPU."""
    if dtype != "auto":
        return _VLLM_DTYPES[dtype]
    name = config.get("dtype") or config.get("torch_dtype")
    return name if isinstance(name, str) else "auto"


def vllm_engine(target: Target, tokenizer, sampling: Sampling, options: ModelOptions) -> Engine:
    """An engine generating with vLLM's offline ``LLM`` on ``target``'s plain model, loaded now and released
    after its one call (:func:`~mftcoder_coba.evaluation.generation.generate_completions` makes one)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its errors are
    # raised here, and no engine process outlives the command (vLLM reads this when LLM is built)
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from mftcoder_coba.evaluation.generation import decode_completions, encode_prompts, end_token

    config = saved_config(target)
    try:
        llm = LLM(model=str(target.base), tokenizer=str(target.tokenizer), dtype=vllm_dtype(config, options.dtype),
                  seed=sampling.seed, trust_remote_code=options.trust_remote_code,
                  generation_config="vllm",  # as transformers' path: the end token below, not the model's list
                  enforce_eager=current_platform.is_cpu())  # compiling: 32 s a load on 2 CPU cores, eager 3 s
        failure = None
    except Exception as exc:  # noqa: BLE001 - vLLM reports an unsupported model or device in many ways
        log.debug("vLLM failed to load %s", target.base, exc_info=True)
        failure = vllm_error(exc)
    if failure is not None:  # outside the handler: the traceback, and what vLLM built, are garbage now
        release(None)
        raise UserError(f"{target.path}: vLLM cannot load the model ({failure})")
    eos = end_token(tokenizer, config.get("eos_token_id"))
    params = SamplingParams(
        n=1, temperature=sampling.temperature, top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
        top_k=-1,  # off, as in transformers' path (-1 is "off" in every vLLM from 0.8 on)
        max_tokens=sampling.max_new_tokens, skip_special_tokens=True,
        stop=list(STOP_SEQUENCES) if sampling.prompt_format == "raw" else None,
        stop_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos])
    loaded = [llm]
    del llm  # held by ``loaded`` only, so that releasing it frees the model

    def engine(prompts: list[str], progress: Callable[[int], None]) -> list[str]:
        requests = [{"prompt_token_ids": ids} for ids in encode_prompts(tokenizer, prompts, sampling)]
        try:
            outputs = loaded[0].generate(requests, params, use_tqdm=False)
            failure = None
        except Exception as exc:  # noqa: BLE001 - a prompt past the model's context, a head size its kernels lack
            log.debug("vLLM failed to generate", exc_info=True)
            outputs, failure = [], vllm_error(exc)
        release(loaded.pop())
        if failure is not None:
            raise UserError(f"{target.path}: vLLM cannot generate ({failure})")
        completions = decode_completions(tokenizer, [list(o.outputs[0].token_ids) for o in outputs], sampling)
        progress(len(completions))
        return completions

    return engine


def vllm_error(exc: BaseException, limit: int = 200) -> str:
    """One line of a vLLM error that says what is wrong: the message past pydantic's "N validation error(s) for
    X" header, at most ``limit`` characters (vLLM appends long lists, such as every architecture it supports)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"\d+ validation errors? for ", line)] or [type(exc).__name__]
    text = lines[0].removeprefix("Value error, ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def release(llm) -> None:
    """Shut ``llm``'s engine down now (None: only collect what a failed load left), then vLLM's process-wide state
    (its torch.distributed group), so that the process can load another model, with either engine, afterwards.
    Left to the garbage collector, vLLM's engine shuts down whenever it is collected, and takes down whatever
    default process group is running by then (a later trainer's in the same process)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
    gc.collect()
    cleanup_dist_env_and_memory()
