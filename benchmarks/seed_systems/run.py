"""Do the headline claims of CGC-LoRA and ColD Fusion hold at small scale? (issue 17)

No pretrained weights can be downloaded here, so the demo's small Llama (``mftcoder_coba.demo.DEMO_MODEL``)
is first pretrained briefly on the union of the shipped demo tasks' text (a stand-in for a pretrained base,
trained once, seed 0). Then, with ``--seeds`` seeds (each seed changes the adapters' initialisation, the
data order and ColD Fusion's contributor draws; the base stays the same), the uniform balancer everywhere
(so CoBa is no confound) and the per-task held-out loss on every held-out row:

CGC-LoRA (Song et al. 2024) claims task-common plus task-specific experts avoid the multitask "seesaw"
(tasks ending worse than alone). Methods, all on the frozen base with the same trainable parameters
(rank budget R) and the same steps and batch:

    lora           plain multitask LoRA of rank R on the four tasks
    cgc-total      CGC-LoRA, C common + S per-task experts splitting R, scaling alpha/R (MOELoRA's)
    cgc-expert     the same with scaling alpha/r_e (this project's default, about E times larger)
    common-only    C' task-gated common experts and no task-specific ones (about MOELoRA)
    single         one LoRA of rank R per task, trained alone on that task for the same steps

  The seesaw count is, per seed, the number of tasks whose held-out loss ends above their single-task LoRA's.
  At equal steps and batch a single-task LoRA reads about four times as many of its task's tokens as a
  multitask run does, so it is a strong reference: the count says whether sharing beats that, not only
  whether tasks conflict.

ColD Fusion (Don-Yehiya et al. 2023) claims the fused model is a better starting point for new tasks. Three
tasks form the pool, ``unit_tests`` is kept out (unseen). Full fine-tuning of the whole model:

    base           the pretrained base
    cold-fusion    ``--iterations`` rounds, ``--contributors-per-iteration`` of the 3 contributors drawn per
                   round, ``--contributor-steps`` steps each, uniform average
    one-round      one round, every contributor, the same total steps (so the same tokens), uniform average
    multitask      one run on the pooled seen data, the same total steps and batch (the same tokens)

  Seen: held-out loss of each pool task. Unseen: held-out loss of ``unit_tests`` after ``--unseen-steps``
  fine-tuning steps from each starting point (the same run config, seed and batches for all four).

    OMP_NUM_THREADS=1 python benchmarks/seed_systems/run.py                     # the committed results
    OMP_NUM_THREADS=1 python benchmarks/seed_systems/run.py --seeds 1 --pretrain-steps 4 --steps 2 \\
        --contributor-steps 2 --unseen-steps 2 --out /tmp/smoke.json             # smoke (about 2 minutes)

Writes ``--out`` (JSON: settings, device, date, versions, every run's numbers, the summary) and a Markdown
copy of the printed tables beside it. Everything runs one job at a time in this process; the work folder
is deleted at the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SEQ_LEN = 128
VALID_SAMPLES = 32
TASKS = ["code_completion", "text_to_code", "code_to_text", "unit_tests"]
UNSEEN = "unit_tests"
POOL = [t for t in TASKS if t != UNSEEN]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
ALPHA = 32.0
CGC_METHODS = {  # label -> model section (besides path and dtype); "single" is per task
    "lora": {"adapter": "lora", "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS}},
    "cgc-total": {"adapter": "cgc_lora", "cgc_lora": {"num_common_experts": 2, "num_task_experts": 1,
                                                      "rank_budget": RANK, "alpha": ALPHA, "dropout": 0.0,
                                                      "scaling": "total"}},
    "cgc-expert": {"adapter": "cgc_lora", "cgc_lora": {"num_common_experts": 2, "num_task_experts": 1,
                                                       "rank_budget": RANK, "alpha": ALPHA, "dropout": 0.0,
                                                       "scaling": "expert"}},
    "common-only": {"adapter": "cgc_lora", "cgc_lora": {"num_common_experts": 4, "num_task_experts": 0,
                                                        "rank_budget": RANK, "alpha": ALPHA, "dropout": 0.0,
                                                        "scaling": "total"}},
}
SINGLE = {"adapter": "lora", "lora": CGC_METHODS["lora"]["lora"]}
log = logging.getLogger("seed_systems")


def prepare_data(work: Path) -> dict[str, Path]:
    """The demo corpus at ``SEQ_LEN``: all tasks together, the pool together, and every task alone (the
    held-out records are chosen per task by name and seed, so they are the same rows in every folder)."""
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    folders = {"all": TASKS, "pool": POOL, **{t: [t] for t in TASKS}}
    for name, tasks in folders.items():
        prepare(PrepOptions(tasks={t: DEMO_TASKS[t] for t in tasks}, tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN,
                            out=work / "data" / name, valid_samples_per_task=VALID_SAMPLES, seed=0))
    return {name: work / "data" / name for name in folders}


def run_data(run_dir: Path, data: Path, model: dict[str, Any], steps: int, seed: int, lr: float) -> dict[str, Any]:
    """A run config: batch 8 rows of ``SEQ_LEN``, uniform balancer, AdamW with a short warm-up and cosine decay."""
    return {
        "run_dir": str(run_dir),
        "data": {"train": str(data / "train"), "valid": str(data / "valid")},
        "model": {"dtype": "fp32", "attn_implementation": "sdpa", **model},
        "balancer": {"name": "uniform"},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"max_steps": steps, "micro_batch_size": 8, "global_batch_size": 8, "seed": seed,
                  "save_every": 0, "keep_last": 1, "log_every": max(1, steps), "tensorboard": False},
    }


def train_run(data: dict[str, Any]) -> Path:
    from mftcoder_coba import config_io
    from mftcoder_coba.config import RunConfig
    from mftcoder_coba.training import train

    return train(config_io.build(RunConfig, data))


def held_out(model: Any, split: Path) -> dict[str, float]:
    """Token-mean loss per task over every held-out row of ``split``."""
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.training.validation import evaluate_per_task

    valid = PackedDataset(split / "valid")
    sums, counts = evaluate_per_task(model, valid, np.arange(len(valid), dtype=np.int64), micro_batch_size=8)
    return {t: float(s / c) for t, s, c in zip(valid.tasks, sums, counts)}


def run_losses(run_dir: Path, split: Path) -> dict[str, float]:
    from mftcoder_coba.models import load_trained

    return held_out(load_trained(run_dir), split)


def model_losses(model_dir: Path, split: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    return held_out(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(), split)


def trainable_parameters(model: dict[str, Any], base: Path, split: Path) -> int:
    from mftcoder_coba import config_io
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.models import ModelConfig, build_model

    cfg = config_io.build(ModelConfig, {"path": str(base), "dtype": "fp32", "attn_implementation": "sdpa", **model})
    train = PackedDataset(split / "train")
    built = build_model(cfg, train.vocab_size, len(train.tasks), train.tasks)
    return sum(p.numel() for p in built.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------

def cgc_seed(work: Path, data: dict[str, Path], base: Path, seed: int, steps: int) -> dict[str, dict[str, float]]:
    """Held-out loss per task of every CGC-LoRA comparison method for one seed."""
    out: dict[str, dict[str, float]] = {}
    for label, model in CGC_METHODS.items():
        run = train_run(run_data(work / f"cgc-{seed}" / label, data["all"], {"path": str(base), **model}, steps,
                                 seed, 1e-2))
        out[label] = run_losses(run, data["all"])
        log.info("seed %d %s: %s", seed, label, out[label])
    out["single"] = {}
    for task in TASKS:
        run = train_run(run_data(work / f"cgc-{seed}" / f"single-{task}", data[task], {"path": str(base), **SINGLE},
                                 steps, seed, 1e-2))
        out["single"].update(run_losses(run, data[task]))
    log.info("seed %d single: %s", seed, out["single"])
    return out


def fusion_seed(work: Path, data: dict[str, Path], base: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seen-task held-out loss and unseen-task fine-tune loss of base, ColD Fusion, one-round fuse, multitask."""
    from mftcoder_coba import config_io
    from mftcoder_coba.fusion import FusionConfig, run_cold_fusion
    from mftcoder_coba.fusion.cold_fusion import unseen_run_data

    folder = work / f"fusion-{seed}"
    total_steps = args.iterations * args.contributors_per_iteration * args.contributor_steps
    template = run_data(folder / "template", data["pool"], {"path": str(base)}, args.contributor_steps, seed, 2e-3)
    contributors = [{"name": t, "train": str(data[t] / "train"), "valid": str(data[t] / "valid")} for t in POOL]
    unseen = [{"name": UNSEEN, "train": str(data[UNSEEN] / "train"), "valid": str(data[UNSEEN] / "valid")}]

    def fusion(name: str, iterations: int, per_iteration: int | None, steps: int, with_unseen: bool) -> FusionConfig:
        job = json.loads(json.dumps(template))
        job["train"]["max_steps"] = steps
        job["optim"]["warmup_steps"] = max(1, steps // 10)
        cfg = {"run_dir": str(folder / name), "template": job, "contributors": contributors,
               "iterations": iterations, "contributors_per_iteration": per_iteration, "seed": seed,
               "fusion_weights": "uniform", "unseen": unseen if with_unseen else [], "unseen_steps": args.unseen_steps}
        return config_io.build(FusionConfig, cfg)

    cold = fusion("cold-fusion", args.iterations, args.contributors_per_iteration, args.contributor_steps, True)
    records = _records(run_cold_fusion(cold))
    result: dict[str, Any] = {"seen": {"base": records[0]["valid_loss"], "cold-fusion": records[-1]["valid_loss"]},
                              "unseen": {"base": records[-1]["unseen"]["valid_loss"]["base"][UNSEEN],
                                         "cold-fusion": records[-1]["unseen"]["valid_loss"]["fused"][UNSEEN]},
                              "unseen_start": {"base": records[-1]["unseen"]["start_loss"]["base"][UNSEEN],
                                               "cold-fusion": records[-1]["unseen"]["start_loss"]["fused"][UNSEEN]},
                              "draws": {r["iteration"]: sorted(r["weights"]) for r in records[1:]}}
    one = fusion("one-round", 1, None, total_steps // len(POOL), False)
    one_model = Path(_records(run_cold_fusion(one))[-1]["model"])
    result["seen"]["one-round"] = _records(one.run_dir)[-1]["valid_loss"]
    multi = train_run(run_data(folder / "multitask", data["pool"], {"path": str(base)}, total_steps, seed, 2e-3))
    from mftcoder_coba.models.persist import model_dir_of

    multi_model = model_dir_of(multi)
    result["seen"]["multitask"] = model_losses(multi_model, data["pool"])
    task = cold.unseen[0]
    for label, start in (("one-round", one_model), ("multitask", multi_model)):
        run = train_run(unseen_run_data(cold, task, folder / f"unseen-{label}", start))
        result["unseen"][label] = run_losses(run, data[UNSEEN])[UNSEEN]
        result["unseen_start"][label] = model_losses(start, data[UNSEEN])[UNSEEN]
    log.info("seed %d fusion: %s", seed, result)
    return result


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "fusion_metrics.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------------------

def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}"


def summarise(cgc: list[dict[str, dict[str, float]]], fusion: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Means ± standard deviations over seeds, paired differences, seesaw counts; and the printed tables."""
    methods = list(CGC_METHODS) + ["single"]
    summary: dict[str, Any] = {"cgc": {}, "fusion": {}}
    lines = ["CGC-LoRA: held-out loss per task (mean ± sd over seeds); seesaw = tasks worse than single-task LoRA",
             "", "| method | " + " | ".join(TASKS) + " | task mean | seesaw (per seed) |",
             "|---" * (len(TASKS) + 3) + "|"]
    for m in methods:
        per_task = {t: [s[m][t] for s in cgc] for t in TASKS}
        task_mean = [statistics.fmean(s[m][t] for t in TASKS) for s in cgc]
        seesaw = [sum(s[m][t] > s["single"][t] for t in TASKS) for s in cgc] if m != "single" else None
        summary["cgc"][m] = {"per_task": {t: _mean_sd(v) for t, v in per_task.items()},
                             "task_mean": _mean_sd(task_mean), "seesaw": seesaw}
        lines.append(f"| {m} | " + " | ".join(_fmt(per_task[t]) for t in TASKS) + f" | {_fmt(task_mean)} | "
                     + ("-" if seesaw is None else ", ".join(map(str, seesaw))) + " |")
    lines += ["", "Paired differences of the task-mean loss (method - lora; negative = better than plain LoRA):", ""]
    for m in methods:
        if m == "lora":
            continue
        diff = [statistics.fmean(s[m][t] - s["lora"][t] for t in TASKS) for s in cgc]
        summary["cgc"][m]["minus_lora"] = _mean_sd(diff)
        lines.append(f"- {m}: {_fmt(diff)}")

    starts = ["base", "cold-fusion", "one-round", "multitask"]
    lines += ["", (f"ColD Fusion: seen tasks' held-out loss; unseen task ({UNSEEN}) held-out loss before and after "
              "the same short fine-tune (mean ± sd over seeds)"), "",
              "| start | " + " | ".join(POOL) + " | seen mean | unseen before | unseen after fine-tune |",
              "|---" * (len(POOL) + 4) + "|"]
    for m in starts:
        per_task = {t: [s["seen"][m][t] for s in fusion] for t in POOL}
        seen_mean = [statistics.fmean(s["seen"][m][t] for t in POOL) for s in fusion]
        before = [s["unseen_start"][m] for s in fusion]
        after = [s["unseen"][m] for s in fusion]
        summary["fusion"][m] = {"seen": {t: _mean_sd(v) for t, v in per_task.items()}, "seen_mean": _mean_sd(seen_mean),
                                "unseen_before": _mean_sd(before), "unseen_after": _mean_sd(after)}
        lines.append(f"| {m} | " + " | ".join(_fmt(per_task[t]) for t in POOL)
                     + f" | {_fmt(seen_mean)} | {_fmt(before)} | {_fmt(after)} |")
    lines += ["", "Paired differences (method - base, and cold-fusion - others; negative = cold-fusion better):", ""]
    for m in starts[1:]:
        diff = [s["unseen"][m] - s["unseen"]["base"] for s in fusion]
        summary["fusion"][m]["unseen_after_minus_base"] = _mean_sd(diff)
        lines.append(f"- unseen after fine-tune, {m} - base: {_fmt(diff)}")
    for m in ("one-round", "multitask"):
        seen = [statistics.fmean(s["seen"]["cold-fusion"][t] - s["seen"][m][t] for t in POOL) for s in fusion]
        unseen = [s["unseen"]["cold-fusion"] - s["unseen"][m] for s in fusion]
        summary["fusion"]["cold-fusion"][f"minus_{m}"] = {"seen_mean": _mean_sd(seen), "unseen_after": _mean_sd(unseen)}
        lines.append(f"- cold-fusion - {m}: seen mean {_fmt(seen)}, unseen after fine-tune {_fmt(unseen)}")
    return summary, "\n".join(lines)


def environment() -> dict[str, Any]:
    import deepspeed
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": f"CPU ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "deepspeed": deepspeed.__version__},
            "commit": commit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=150, help="full training of the stand-in base")
    parser.add_argument("--steps", type=int, default=50, help="steps of every CGC-LoRA comparison run")
    parser.add_argument("--iterations", type=int, default=3, help="ColD Fusion rounds")
    parser.add_argument("--contributors-per-iteration", type=int, default=2, help=f"of the {len(POOL)} in the pool")
    parser.add_argument("--contributor-steps", type=int, default=15, help="steps of each contributor job")
    parser.add_argument("--unseen-steps", type=int, default=15, help="fine-tune steps on the unseen task")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    from mftcoder_coba.demo import DEMO_MODEL

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="seed_systems-"))
    try:
        data = prepare_data(work)
        model = {"model_config": {**DEMO_MODEL, "max_position_embeddings": SEQ_LEN}, "init_seed": 0}
        pretrain = train_run(run_data(work / "pretrain", data["all"], model, args.pretrain_steps, 0, 3e-3))
        from mftcoder_coba.models.persist import model_dir_of

        base = model_dir_of(pretrain)
        base_loss = model_losses(base, data["all"])
        log.info("pretrained base (%d steps): %s", args.pretrain_steps, base_loss)
        params = {m: trainable_parameters(cfg, base, data["all"]) for m, cfg in CGC_METHODS.items()}
        params["single"] = trainable_parameters(SINGLE, base, data[TASKS[0]])
        cgc, fusion = [], []
        for seed in range(args.seeds):
            cgc.append(cgc_seed(work, data, base, seed, args.steps))
            fusion.append(fusion_seed(work, data, base, seed, args))
        summary, table = summarise(cgc, fusion)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(seq_len=SEQ_LEN, valid_samples_per_task=VALID_SAMPLES, rank_budget=RANK, alpha=ALPHA,
                    model=DEMO_MODEL, cgc_methods=CGC_METHODS, pool=POOL, unseen=UNSEEN)
    header = (f"base: {args.pretrain_steps} steps of full training on all four tasks; held-out loss {base_loss}\n"
              f"trainable parameters: {params}\n")
    report = {"settings": settings, **environment(), "seconds": round(time.perf_counter() - started, 1),
              "cpu_seconds": round(time.process_time(), 1),
              "base_held_out_loss": base_loss, "trainable_parameters": params, "runs": {"cgc": cgc, "fusion": fusion},
              "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(header + "\n" + table + "\n", encoding="utf-8")
    print(header)
    print(table)
    print(f"\n{report['seconds']} s wall, {report['cpu_seconds']} s CPU; wrote {args.out} and "
          f"{args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
