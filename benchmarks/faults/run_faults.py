"""Fault injection: kill, corrupt, race and poison every stage through the real command line; print what happened.

Why: the promises in the README's "Reliability" section (nothing lost, nothing half-written, damaged input
refused, a diverged run never called a success, no shared run directories, untrusted files never run code)
are only worth what a hostile run of the real tool shows. Every case here drives ``python -m mftcoder_coba``
in subprocesses on the shipped demo corpus and a tiny Llama, does the damage, and checks the outcome from
outside: exit codes, what is on disk, whether an input or a completed output was lost.

    python benchmarks/faults/run_faults.py [--work DIR] [--kills 4] [--seed 0] [--out benchmarks/faults]

Writes ``results.json`` and ``results.md`` (a table: case, expected, observed, lost data, ok) to ``--out``
and exits non-zero if any case did not behave as expected. A few minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 64
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": SEQ_LEN,
              "tie_word_embeddings": False}


@dataclass
class Outcome:
    case: str
    expected: str
    observed: str
    lost_data: bool
    ok: bool


class Harness:
    """The work folder, the prepared demo shards, and helpers to run the CLI and read what it left."""

    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        self.env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

        self.inputs = work / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.tasks: dict[str, Path] = {}
        for name, path in DEMO_TASKS.items():
            self.tasks[name] = self.inputs / path.name
            shutil.copyfile(path, self.tasks[name])
        self.tokenizer = Path(TOKENIZER_DIR)
        self.data = work / "data"
        shutil.rmtree(self.data, ignore_errors=True)
        proc = self.cli(*self.prep_args(self.data))
        if proc.returncode != 0:
            raise SystemExit(f"preparing the demo shards failed:\n{proc.stdout}")

    # --- running --------------------------------------------------------------------------------------------
    def prep_args(self, out: Path, *extra: str) -> list[str]:
        args = ["prep", "--tokenizer", str(self.tokenizer), "--seq-len", str(SEQ_LEN), "--out", str(out),
                "--valid-samples-per-task", "4", "--seed", "0"]
        for name, path in self.tasks.items():
            args += ["--task", f"{name}={path}"]
        return args + list(extra)

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mftcoder_coba", *args], cwd=REPO, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "mftcoder_coba", *args], cwd=REPO, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def config(self, run_dir: Path, data: Path | None = None, steps: int = 8, name: str | None = None,
               **train: Any) -> Path:
        data = data or self.data
        cfg = {
            "run_dir": str(run_dir),
            "data": {"train": str(data / "train"), "valid": str(data / "valid")},
            "model": {"model_config": TINY_LLAMA, "dtype": "fp32", "attn_implementation": "sdpa", "init_seed": 1},
            "balancer": {"name": "coba", "options": {"warmup_steps": 1, "history_length": 4}},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"max_steps": steps, "micro_batch_size": 2, "global_batch_size": 4, "log_every": 1, "seed": 3,
                      "save_every": 2, "keep_last": 3, **train},
        }
        path = run_dir.parent / f"{name or run_dir.name}.json"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg), encoding="utf-8")
        return path

    def train(self, cfg: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("train", "--config", str(cfg), *extra)

    def fresh(self, name: str) -> Path:
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder


def last_line(proc: subprocess.CompletedProcess | str) -> str:
    text = proc if isinstance(proc, str) else proc.stdout
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mftcoder-coba: error:")]
    line = (errors or lines or [""])[-1]
    return line.replace("mftcoder-coba: error: ", "")[:220]


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.read_bytes())
    return h.hexdigest()


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []


def same_losses(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return False
    return all((x["loss"] is None and y["loss"] is None) or abs(x["loss"] - y["loss"]) <= 1e-5 * max(1, abs(y["loss"]))
               for x, y in zip(a, b))


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the process alone (as an OOM killer or a pre-empted node would) and return its children's pids."""
    import psutil

    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return children


def alive(pids: list[int], wait: float = 5.0) -> list[int]:
    import psutil

    deadline = time.time() + wait
    while True:
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name)


# --- cases -----------------------------------------------------------------------------------------------------
def kill_prep(h: Harness, kills: int) -> list[Outcome]:
    """SIGKILL ``prep --workers 2`` at random moments; the output is absent or whole, workers die, inputs stay.

    Every task is mixed x12 so that the stream lasts seconds (with its tokenizer cached, prep of the plain demo
    corpus ends within a second of starting, before most kill moments)."""
    out: list[Outcome] = []
    before = digest(list(h.tasks.values()))
    extra = ["--workers", "2", *(arg for name in h.tasks for arg in ("--mix", f"{name}=12"))]
    start = time.time()
    h.cli(*h.prep_args(h.work / "prep_timing" / "out", *extra))
    full = time.time() - start
    for i in range(kills):
        folder = h.fresh(f"prep_kill_{i}")
        delay = h.rng.uniform(0.3, max(0.6, full * 0.9))
        proc = h.start(*h.prep_args(folder / "out", *extra))
        time.sleep(delay)
        if proc.poll() is not None:
            out.append(Outcome(f"prep killed at {delay:.1f}s (#{i})", "output absent or complete",
                               "finished before the kill", False, True))
            continue
        children = kill_tree(proc)
        left = alive(children)
        result = folder / "out"
        verify = h.cli("verify", str(result)) if result.exists() else None
        rerun = h.cli(*h.prep_args(result, *extra, "--overwrite"))
        stale = hidden_leftovers(folder)
        whole = verify is None or verify.returncode == 0
        lost = digest(list(h.tasks.values())) != before
        ok = whole and not left and rerun.returncode == 0 and not stale and not lost
        observed = (f"out {'absent' if verify is None else 'verifies' if whole else 'BROKEN'}; "
                    f"{len(left)} of {len(children)} workers alive; rerun exit {rerun.returncode}; "
                    f"{len(stale)} stale temporaries")
        out.append(Outcome(f"prep --workers 2 killed at {delay:.1f}s (#{i})",
                           "out absent or verifies; no live workers; rerun works and cleans temporaries",
                           observed, lost, ok))
    return out


def _wait_for_lines(run_dir: Path, proc: subprocess.Popen, lines: int, timeout: float = 300) -> None:
    """Wait until the run has written ``lines`` metrics lines (or ended)."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)


def kill_train(h: Harness, kills: int) -> list[Outcome]:
    """SIGKILL training at random steps (and so sometimes inside a checkpoint save: one every 2 steps), then
    ``--resume auto``: the resumed run's per-step losses equal an uninterrupted run's."""
    ref_dir = h.fresh("train_ref") / "run"
    ref = h.train(h.config(ref_dir))
    if ref.returncode != 0:
        return [Outcome("reference run", "exit 0", last_line(ref), False, False)]
    reference = metrics(ref_dir)
    out = []
    for i in range(kills):
        run_dir = h.fresh(f"train_kill_{i}") / "run"
        cfg = h.config(run_dir)
        lines, extra = h.rng.randint(2, 8), h.rng.uniform(0.0, 0.4)  # after step lines-1, then a little more
        proc = h.start("train", "--config", str(cfg))
        _wait_for_lines(run_dir, proc, lines)
        time.sleep(extra)
        finished = proc.poll() is not None
        if not finished:
            kill_tree(proc)
        saved = [p.name for p in checkpoints(run_dir)]
        resumed = h.train(cfg, "--resume", "auto")
        ok = resumed.returncode == 0 and same_losses(metrics(run_dir), reference)
        observed = (f"{'finished first' if finished else 'killed'}; checkpoints then {saved[-1] if saved else 'none'}; "
                    f"resume exit {resumed.returncode}; losses {'equal' if ok else 'DIFFER'}")
        out.append(Outcome(f"train killed {extra:.2f}s after step {lines - 1} of 8 (#{i})",
                           "resume --auto continues; per-step losses equal the uninterrupted run", observed,
                           resumed.returncode != 0, ok))
    return out


def _copy_data(h: Harness, name: str) -> Path:
    folder = h.fresh(name)
    shutil.copytree(h.data, folder / "data")
    return folder / "data"


def _shard(data: Path) -> Path:
    return sorted((data / "train").glob("shard-*.bin"))[0]


def _rehash(data: Path) -> None:
    """Make the manifest's checksums match damaged shards (what a buggy writer, not a bit flip, would leave)."""
    from mftcoder_coba.data.layout import file_sha256

    manifest_path = data / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = file_sha256(data / "train" / shard["file"])
    manifest_path.write_text(json.dumps(manifest, indent=2))


def damaged_shards(h: Harness) -> list[Outcome]:
    """Train must refuse a flipped byte, an id past the vocabulary, a truncated shard and a garbled manifest."""
    out = []

    def flip(data: Path) -> None:
        shard = _shard(data)
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x5A
        shard.write_bytes(bytes(raw))

    def big_id(data: Path) -> None:
        manifest = json.loads((data / "train" / "manifest.json").read_text())
        from mftcoder_coba.data.layout import row_dtype

        dtype = row_dtype(manifest["dtypes"], manifest["seq_len"])
        rows = np.memmap(_shard(data), dtype=dtype, mode="r+")
        rows["input_ids"][-1, 5] = np.iinfo(rows["input_ids"].dtype).max  # the last row: not read in 8 steps
        rows.flush()
        del rows
        _rehash(data)

    def truncate(data: Path) -> None:
        shard = _shard(data)
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)

    def garble(data: Path) -> None:
        path = data / "train" / "manifest.json"
        path.write_text(path.read_text()[: len(path.read_text()) // 2])

    for name, damage, expect in [("one flipped byte in a shard", flip, "shard"),
                                 ("token id past the vocabulary (checksums re-made)", big_id, "row"),
                                 ("truncated shard", truncate, "shard"),
                                 ("manifest cut in half", garble, "manifest")]:
        data = _copy_data(h, f"shards_{expect}_{len(out)}")
        damage(data)
        run_dir = data.parent / "run"
        proc = h.train(h.config(run_dir, data))
        line = last_line(proc)
        ok = proc.returncode != 0 and "Traceback" not in proc.stdout and not checkpoints(run_dir)
        out.append(Outcome(f"train on {name}", "refused in one line naming the file; nothing trained",
                           f"exit {proc.returncode}: {line}", False, ok))
    return out


def damaged_checkpoints(h: Harness) -> list[Outcome]:
    """A truncated newest checkpoint is skipped by --resume auto; a torn metrics tail is tolerated; export of a
    damaged checkpoint is one line."""
    out = []
    run_dir = h.fresh("ckpt") / "run"
    cfg = h.config(run_dir, steps=6)
    first = h.train(cfg)
    if first.returncode != 0:
        return [Outcome("checkpoint cases: first run", "exit 0", last_line(first), False, False)]
    cfg = h.config(run_dir, steps=8)
    newest = checkpoints(run_dir)[-1]
    victim = max((p for p in (newest / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    export = h.cli("export", str(run_dir), "--out", str(run_dir.parent / "export"), "--checkpoint", str(newest))
    out.append(Outcome("export of a checkpoint whose weights file is truncated",
                       "one error line, non-zero exit, no export",
                       f"exit {export.returncode}: {last_line(export)}", False,
                       export.returncode != 0 and "Traceback" not in export.stdout
                       and not (run_dir.parent / "export").exists()))
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "loss": 1.2')  # a line torn by a kill mid-write
    resumed = h.train(cfg, "--resume", "auto")
    skipped = newest.name in resumed.stdout
    steps = [r["step"] for r in metrics(run_dir)] if resumed.returncode == 0 else []
    ok = resumed.returncode == 0 and steps == list(range(0, 9)) and skipped
    out.append(Outcome("resume with the newest checkpoint's weights truncated and a torn metrics line",
                       "resumes from the previous checkpoint, says which it skipped, metrics steps 0..8 once each",
                       f"exit {resumed.returncode}; skip named: {skipped}; steps {steps[:3]}..{steps[-2:]}",
                       resumed.returncode != 0, ok))
    return out


def concurrent_runs(h: Harness) -> list[Outcome]:
    """Two ``train`` commands started together on one run directory (the second with another seed and
    ``--resume auto``): one trains, the other is refused by the run-directory lock naming the holder, and the
    metrics hold each step exactly once."""
    run_dir = h.fresh("concurrent") / "run"
    steps_total = 150
    runs = [h.start("train", "--config", str(h.config(run_dir, steps=steps_total, save_every=50))),
            h.start("train", "--config", str(h.config(run_dir, steps=steps_total, name="second", seed=99)),
                    "--resume", "auto")]
    outputs = [proc.communicate()[0] for proc in runs]
    codes = [proc.returncode for proc in runs]
    winners = [i for i, code in enumerate(codes) if code == 0]
    loser = 1 - winners[0] if len(winners) == 1 else None
    refusal = last_line(outputs[loser]) if loser is not None else ""
    steps = [r["step"] for r in metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
    ok = loser is not None and "pid" in refusal and steps == list(range(0, steps_total + 1))
    return [Outcome("two train runs started together on one run_dir", "one trains; the other is refused naming the "
                    "holder; each step logged once", f"exit codes {codes}: {refusal}; {len(steps)} metric lines",
                    len(winners) != 1, ok)]


class _Evil:
    """Unpickling this runs ``os.system``: stands in for a crafted checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def untrusted_files(h: Harness) -> list[Outcome]:
    from mftcoder_coba.file_manifest import write_manifest

    out = []
    # 1. a crafted pickle in a checkpoint's engine state
    run_dir = h.fresh("untrusted") / "run"
    cfg = h.config(run_dir, steps=4)
    proc = h.train(cfg)
    marker = h.work / "untrusted" / "PWNED"
    if proc.returncode == 0:
        newest = checkpoints(run_dir)[-1]
        target = sorted((newest / "engine").rglob("*.pt"))[0]
        target.write_bytes(pickle.dumps(_Evil(marker)))
        write_manifest(newest)  # an attacker rewrites files.json too: only the weights-only load stands in the way
        resumed = h.train(h.config(run_dir, steps=6), "--resume", str(newest))
        out.append(Outcome("resume from a checkpoint whose engine file is a crafted pickle",
                           "refused; the pickle's code never runs", f"exit {resumed.returncode}: "
                           f"{last_line(resumed)}; code ran: {marker.exists()}", False,
                           resumed.returncode != 0 and not marker.exists()))
        # 2. export honours trust_remote_code only from the command line
        config_yaml = run_dir / "config.yaml"
        text = config_yaml.read_text().replace("trust_remote_code: false", "trust_remote_code: true")
        config_yaml.write_text(text)
        model_dir = checkpoints(run_dir)[-2] / "model"
        code_marker = h.work / "untrusted" / "REMOTE_CODE_RAN"
        (model_dir / "evil_config.py").write_text(
            f"import pathlib\npathlib.Path({str(code_marker)!r}).touch()\n"
            "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
        config_json = json.loads((model_dir / "config.json").read_text())
        config_json["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
        (model_dir / "config.json").write_text(json.dumps(config_json))
        write_manifest(model_dir.parent)
        export = h.cli("export", str(run_dir), "--out", str(run_dir.parent / "export"),
                       "--checkpoint", str(model_dir.parent))
        out.append(Outcome("export of a run whose config.yaml says trust_remote_code: true (remote code in the "
                           "checkpoint)", "the checkpoint's code never runs", f"exit {export.returncode}; code ran: "
                           f"{code_marker.exists()}", False, not code_marker.exists()))
    else:
        out.append(Outcome("untrusted: first run", "exit 0", last_line(proc), False, False))
    # 3. a manifest whose tokenizer location points at a private folder
    data = _copy_data(h, "untrusted_manifest")
    secret = h.work / "untrusted_manifest" / "home"
    secret.mkdir()
    (secret / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    shutil.copy(h.tokenizer / "tokenizer.json", secret / "tokenizer.json")
    for split in ("train", "valid"):
        path = data / split / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["tokenizer"]["dir"] = os.path.relpath(secret, data / split)
        manifest["tokenizer"]["source"] = str(secret)
        path.write_text(json.dumps(manifest, indent=2))
    run_dir = data.parent / "run"
    proc = h.train(h.config(run_dir, data, steps=2))
    leaked = any(p.name == "id_rsa" for p in run_dir.rglob("*")) if run_dir.exists() else False
    out.append(Outcome("manifest pointing its tokenizer at a folder holding a private key",
                       "nothing of that folder reaches the run directory",
                       f"exit {proc.returncode}; key copied: {leaked}", leaked, not leaked))
    return out


def overwrite_guard(h: Harness) -> list[Outcome]:
    out = []
    folder = h.fresh("overwrite")
    (folder / "notes.txt").write_text("my notes\n")
    task = folder / "mine.jsonl"
    shutil.copyfile(next(iter(h.tasks.values())), task)
    before = digest([folder / "notes.txt", task])
    args = ["prep", "--tokenizer", str(h.tokenizer), "--seq-len", str(SEQ_LEN), "--out", str(folder),
            "--task", f"mine={task}", "--overwrite"]
    proc = h.cli(*args)
    intact = (folder / "notes.txt").exists() and task.exists() and digest([folder / "notes.txt", task]) == before
    out.append(Outcome("prep --out DIR --overwrite, DIR holding the input and notes",
                       "refused in one line; both files intact", f"exit {proc.returncode}: {last_line(proc)}",
                       not intact, proc.returncode != 0 and intact))
    run_dir = h.fresh("overwrite_run") / "run"
    cfg = h.config(run_dir, steps=4)
    if h.train(cfg).returncode == 0:
        names = [p.name for p in checkpoints(run_dir)]
        proc = h.cli("export", str(run_dir), "--out", str(run_dir / "checkpoints"), "--overwrite")
        kept = [p.name for p in checkpoints(run_dir)] == names
        out.append(Outcome("export RUN --out RUN/checkpoints --overwrite", "refused; every checkpoint kept",
                           f"exit {proc.returncode}: {last_line(proc)}; checkpoints kept: {kept}", not kept,
                           proc.returncode != 0 and kept))
    return out


def divergence(h: Harness) -> list[Outcome]:
    out = []
    run_dir = h.fresh("diverge_inf") / "run"
    proc = h.train(h.config(run_dir), "optim.lr=.inf")
    out.append(Outcome("optim.lr=.inf", "refused before training, naming the field",
                       f"exit {proc.returncode}: {last_line(proc)}", False,
                       proc.returncode != 0 and "optim.lr" in proc.stdout and not checkpoints(run_dir)))
    run_dir = h.fresh("diverge_nan") / "run"
    proc = h.train(h.config(run_dir, steps=8), "optim.lr=1e30")
    lines = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    nan_metric = any(r.get("loss") is not None and not np.isfinite(r["loss"]) for r in lines)
    bad_ckpt = False
    for ckpt in checkpoints(run_dir):
        from safetensors.numpy import load_file

        for file in (ckpt / "model").glob("*.safetensors"):
            bad_ckpt |= any(not np.isfinite(v).all() for v in load_file(str(file)).values())
    out.append(Outcome("optim.lr=1e30 (the loss turns NaN)", "stops with an error and a non-zero exit; no "
                       "checkpoint with non-finite weights", f"exit {proc.returncode}: {last_line(proc)}; "
                       f"non-finite checkpoint: {bad_ckpt}; NaN in metrics: {nan_metric}", False,
                       proc.returncode != 0 and "diverged" in proc.stdout and not bad_ckpt))
    return out


def unmeasurable_task(h: Harness) -> list[Outcome]:
    folder = h.fresh("no_valid")
    tasks = dict(h.tasks)
    tiny = folder / "tiny.jsonl"
    tiny.write_text(next(iter(tasks.values())).read_text().splitlines()[0] + "\n")
    args = ["prep", "--tokenizer", str(h.tokenizer), "--seq-len", str(SEQ_LEN), "--out", str(folder / "data"),
            "--valid-fraction", "0.05", "--seed", "0"]  # one record: it trains, none is held out
    for name, path in list(tasks.items())[:2]:
        args += ["--task", f"{name}={path}"]
    args += ["--task", f"tiny={tiny}"]
    prep = h.cli(*args)
    if prep.returncode != 0:
        return [Outcome("prep of a task with one record", "prepared, with a warning that it has no held-out rows",
                        f"prep exit {prep.returncode}: {last_line(prep)}", False, False)]
    proc = h.train(h.config(folder / "run", folder / "data"))
    return [Outcome("CoBa with a task that has no held-out rows", "refused, naming the task and the prep flag",
                    f"exit {proc.returncode}: {last_line(proc)}", False,
                    proc.returncode != 0 and "tiny" in last_line(proc))]


CASES: dict[str, Callable[..., list[Outcome]]] = {
    "kill_prep": kill_prep, "kill_train": kill_train, "damaged_shards": damaged_shards,
    "damaged_checkpoints": damaged_checkpoints, "concurrent_runs": concurrent_runs,
    "untrusted_files": untrusted_files, "overwrite_guard": overwrite_guard, "divergence": divergence,
    "unmeasurable_task": unmeasurable_task,
}


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def table(outcomes: list[Outcome]) -> str:
    rows = ["| case | expected | observed | lost data | ok |", "|---|---|---|---|---|"]
    for o in outcomes:
        cells = [o.case, o.expected, o.observed.replace("|", "/"), "yes" if o.lost_data else "no",
                 "yes" if o.ok else "**NO**"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--kills", type=int, default=4, help="random kill points each for prep and train")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these case groups")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where results go")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mftcoder-faults-"))
    start = time.time()
    outcomes: list[Outcome] = []
    try:
        h = Harness(work, args.seed)
        for name, case in CASES.items():
            if args.only and name not in args.only:
                continue
            print(f"== {name}", flush=True)
            found = case(h, args.kills) if name in ("kill_prep", "kill_train") else case(h)
            for o in found:
                print(f"   {'ok ' if o.ok else 'BAD'} {o.case}: {o.observed}", flush=True)
            outcomes += found
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for o in outcomes:  # the scratch folder's name says nothing; keep the table readable
        o.observed = o.observed.replace(str(work), "WORK")
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "seconds": round(time.time() - start, 1), "seed": args.seed, "kills": args.kills,
              "outcomes": [asdict(o) for o in outcomes]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = (f"# Fault injection ({report['date']}, {report['versions']['machine']}, torch {report['versions']['torch']}, "
          f"deepspeed {report['versions']['deepspeed']}; {report['seconds']} s)\n\n{table(outcomes)}\n")
    (args.out / "results.md").write_text(md, encoding="utf-8")
    print(table(outcomes))
    bad = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
