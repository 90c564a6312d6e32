"""``mftcoder-coba eval-code TARGET --benchmark humaneval|FILE.jsonl``: pass@k of generated code, run in a sandbox.

Generates ``--n`` completions per problem (transformers ``generate``, KV cache, batched; or vLLM, see
:mod:`mftcoder_coba.evaluation.vllm_engine`), runs each as
``prompt + completion + test`` in its own sandboxed interpreter (:mod:`mftcoder_coba.evaluation.sandbox`; behind
Linux namespaces with ``--sandbox isolated``/``auto``, see there) and reports unbiased pass@k. ``--self-check``
runs the benchmark's canonical solutions instead of a model (HumanEval must give pass@1 = 1.0).
``--all-checkpoints`` scores every complete checkpoint of a run and writes ``RUN_DIR/eval_code.jsonl`` (one line
per step and benchmark).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.cli_options import add_model_arguments
from mftcoder_coba.evaluation.code_eval import canonical_completions
from mftcoder_coba.evaluation.code_run import (
    RUN_RESULTS,
    evaluate_checkpoints,
    evaluate_target,
    report,
    score,
)
from mftcoder_coba.evaluation.model_options import ModelOptions
from mftcoder_coba.evaluation.problems import HUMANEVAL, load_benchmark
from mftcoder_coba.evaluation.prompts import CHAT_INSTRUCTION, Sampling
from mftcoder_coba.evaluation.sandbox import MODES, IsolationUnavailable, Limits, resolve_mode
from mftcoder_coba.evaluation.vllm_engine import ENGINES, RUN_CHECKPOINTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, nargs="?", default=None,
                        help="run directory, export, transformers model or adapter directory (not with --self-check)")
    parser.add_argument("--benchmark", default=HUMANEVAL, help="'humaneval' or a JSONL file of problems")
    parser.add_argument("--n", type=int, default=10, help="samples per problem")
    parser.add_argument("--k", default=None, help="comma-separated k of pass@k, each <= n; unset: 1,10,100 up to n")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling probability mass")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per completion at most")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences generated together (transformers; vLLM schedules its own batches)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="generation engine; auto: vLLM when it is installed and TARGET is a plain model "
                             "(no adapters, not a run), else transformers")
    parser.add_argument("--prompt-format", choices=("raw", "chat"), default="raw",
                        help="raw: continue the prompt; chat: the tokenizer's chat template")
    parser.add_argument("--instruction", default=None,
                        help="chat format: text before each prompt in the user message ('' for none; default asks "
                             "for the whole function in a python code block)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--workers", type=int, default=2, help="samples executed in parallel")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per sample")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample")
    parser.add_argument("--sandbox", choices=MODES, default="auto",
                        help="isolated: Linux namespaces (no network, read-only filesystem without home/run "
                             "folders, all processes die with the sample), refuse where the kernel does not allow "
                             "them; guarded: limits and Python guards only (not a boundary); auto: isolated where "
                             "it works, else guarded with a warning")
    parser.add_argument("--task", default=None,
                        help="CGC-LoRA runs and exports: the task whose adapter/gates generate")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run targets: this checkpoint instead of the newest")
    parser.add_argument("--all-checkpoints", action="store_true",
                        help=f"score every complete checkpoint of the run TARGET into TARGET/{RUN_RESULTS}")
    parser.add_argument("--self-check", action="store_true",
                        help="execute the benchmark's canonical solutions instead of generating (harness check)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary (pass@k) as JSON here")
    parser.add_argument("--samples", type=Path, default=None,
                        help="write every sample as JSONL here; unset with --out: OUT's name + .samples.jsonl")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    try:
        limits.validate()
    except ValueError as exc:
        raise UserError(f"--timeout/--memory-mb: {exc}") from None
    limits = sandbox_limits(limits, args.sandbox)
    written = [path.resolve().parent for path in (args.out, args.samples) if path is not None]
    limits = replace(limits, hidden=tuple(str(p) for p in [args.target and args.target.resolve(), *written] if p))
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    n = 1 if args.self_check else args.n
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    ks = parse_ks(args.k, n)
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.batch_size, args.prompt_format,
                        args.seed, CHAT_INSTRUCTION if args.instruction is None else args.instruction)
    sampling.validate()
    bench, problems = load_benchmark(args.benchmark)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        problems = problems[:args.limit]
    settings = {"benchmark": bench, "benchmark_source": args.benchmark, "k": ks,
                "timeout": limits.timeout, "memory_mb": limits.memory_mb}
    if args.self_check:
        if args.target is not None or args.all_checkpoints:
            raise UserError("--self-check runs the benchmark's own solutions; give no TARGET / --all-checkpoints")
        summary, results = score(problems, canonical_completions(problems), ks, limits, args.workers,
                                 {**settings, "self_check": True})
        report(summary, results, args.out, _samples_path(args))
        return 0
    if args.target is None:
        raise UserError("TARGET is required (a run directory, an export or a model directory), or pass --self-check")
    settings["sampling"] = vars(sampling).copy()
    options = ModelOptions(dtype=args.dtype, device=args.device, task=args.task, workers=args.workers,
                           trust_remote_code=args.trust_remote_code, engine=args.engine)
    if args.all_checkpoints:
        if args.checkpoint is not None or args.adapter is not None:
            raise UserError("--all-checkpoints scores every checkpoint of the run; drop --checkpoint/--adapter")
        if args.engine == "vllm":
            raise UserError(f"--engine vllm: {RUN_CHECKPOINTS}; use --engine transformers")
        summaries = evaluate_checkpoints(args.target, problems, n, ks, sampling, limits, settings, options)
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(summaries, indent=2) + "\n")
        return 0
    from mftcoder_coba.evaluation.targets import resolve_target  # torch and transformers: only when generating

    target = resolve_target(args.target, checkpoint=args.checkpoint, adapter=args.adapter)
    summary, results = evaluate_target(target, problems, n, ks, sampling, limits, settings, options)
    report(summary, results, args.out, _samples_path(args))
    return 0


def sandbox_limits(limits: Limits, requested: str) -> Limits:
    """``limits`` with the sandbox mode ``--sandbox requested`` resolves to (one warning where auto falls back)."""
    try:
        return replace(limits, sandbox=resolve_mode(requested))
    except IsolationUnavailable as exc:
        raise UserError(f"--sandbox isolated: the kernel refused the namespaces ({exc}); use a machine that allows "
                        f"unprivileged user namespaces, or --sandbox guarded (not a security boundary)") from None


def parse_ks(text: str | None, n: int) -> list[int]:
    """``--k`` as sorted unique ints, each in [1, n]; default 1, 10, 100 where <= n."""
    if text is None:
        return [k for k in (1, 10, 100) if k <= n]
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--k {text!r}: expected comma-separated integers like 1,10") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise UserError(f"--k {text!r}: pass@k needs 1 <= k <= n = {n} samples per problem (raise --n)")
    return ks


def _samples_path(args: argparse.Namespace) -> Path | None:
    if args.samples is not None:
        return args.samples
    return None if args.out is None else args.out.with_name(args.out.stem + ".samples.jsonl")
