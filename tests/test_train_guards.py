"""What ``train`` refuses before it starts and what stops it: damaged shards (checksums, with the verified-state
cache), out-of-range ids, a manifest pointing at a foreign tokenizer folder, a balancer that cannot measure a
task, non-finite losses/gradients/weights (stop or skip; ZeRO 0-3, fp32 and bf16), a second run on the same run
directory, and the CPU thread count."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import REPO, cpu_env, read_metrics, run_config, run_data, write_config

from mftcoder_coba import cli
from mftcoder_coba.atomic import output_kind
from mftcoder_coba.data.layout import file_sha256, row_dtype
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models import load_trained
from mftcoder_coba.training import objective, preflight, train, verified
from mftcoder_coba.training.divergence import TrainingDiverged
from mftcoder_coba.training.threads import resolve

UNIFORM = {"name": "uniform", "options": {}}


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private user cache dir for the verified-shard records."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def data(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared demo output (train/, valid/, tokenizer/) to damage."""
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    return out


def _config(data: Path, run_dir: Path, **sections):
    return run_config(data, run_dir, **{"balancer": UNIFORM, **sections,
                                        "train": {"max_steps": 2, "tensorboard": False, **sections.get("train", {})}})


def _edit_rows(split: Path, shard: int, edit) -> Path:
    """Apply ``edit(records)`` to a shard's rows in place; returns the shard file."""
    manifest = json.loads((split / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    file = split / entry["file"]
    rows = np.memmap(file, dtype=row_dtype(manifest["dtypes"], manifest["seq_len"]), mode="r+", shape=(entry["rows"],))
    edit(rows)
    rows.flush()
    del rows
    return file


def _reseal(split: Path) -> None:
    """Rewrite the manifest's shard checksums to match the (edited) files: bad data with valid checksums."""
    manifest = json.loads((split / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = file_sha256(split / entry["file"])
    (split / "manifest.json").write_text(json.dumps(manifest))


# --- 1. shard checksums ----------------------------------------------------------------------------------------

def test_a_flipped_byte_in_a_shard_is_refused_naming_the_shard(data: Path, tmp_path: Path) -> None:
    shard = data / "train" / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard-00000\.bin: sha256 mismatch") as caught:
        train(_config(data, tmp_path / "run"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_verified_shards_are_hashed_once_until_they_change(data: Path, cache_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mftcoder_coba.data import PackedDataset

    split = PackedDataset(data / "train")
    shards = len(split.manifest["shards"])
    assert verified.verify_split(split) == shards
    assert list((cache_home / "mftcoder-coba" / "verified").glob("*.json"))
    assert verified.verify_split(split) == 0  # remembered: nothing hashed
    file = data / "train" / split.manifest["shards"][0]["file"]
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1000))
    assert verified.verify_split(split) == 1  # its state changed: hashed again

    # same size, mtime set back afterwards: ctime still changes, so the edit is caught
    stat = file.stat()
    raw = bytearray(file.read_bytes())
    raw[7] ^= 0x10
    file.write_bytes(bytes(raw))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="sha256 mismatch"):
        verified.verify_split(split)


def test_shards_are_verified_when_the_cache_cannot_be_written(data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mftcoder_coba.data import PackedDataset

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # mkdir under a file fails
    split = PackedDataset(data / "train")
    shards = len(split.manifest["shards"])
    assert verified.verify_split(split) == shards
    assert verified.verify_split(split) == shards  # nothing remembered: hashed every time
    shard = data / "train" / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard-00000\.bin: sha256 mismatch"):
        verified.verify_split(split)


# --- 2. ids the model cannot index -----------------------------------------------------------------------------

def test_out_of_range_ids_with_valid_checksums_stop_training_naming_shard_and_row(data: Path, tmp_path: Path) -> None:
    def too_big(rows: np.ndarray) -> None:
        rows["input_ids"][:, 5] = np.iinfo(rows["input_ids"].dtype).max  # every row: whichever is read first
    file = _edit_rows(data / "train", 0, too_big)
    _reseal(data / "train")
    with pytest.raises(UserError, match=rf"{file.name}: row \d+ holds input id \d+ outside \[0, \d+\)"):
        train(_config(data, tmp_path / "run"))


def test_one_bad_row_is_refused_before_training_even_if_never_drawn(data: Path, tmp_path: Path) -> None:
    """Verification scans every row once, so a bad id in a row the first steps would not read stops the run
    before step 1 (naming shard and row), not hours later when the row comes up."""
    def last_row(rows: np.ndarray) -> None:
        rows["task_ids"][-1, 0] = 99
    file = _edit_rows(data / "train", 0, last_row)
    _reseal(data / "train")
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"{file.name}: row \d+ holds task id 99 outside \[-1, 4\)"):
        train(_config(data, run))
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


# --- 3. the tokenizer comes only from the prepared output ------------------------------------------------------

def test_manifest_pointing_at_a_foreign_folder_copies_nothing_of_it(data: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "home" / ".ssh"
    foreign.mkdir(parents=True)
    (foreign / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    shutil.copy(data / "tokenizer" / "tokenizer.json", foreign / "tokenizer.json")
    (data / "tokenizer" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")  # an unknown name
    for split in ("train", "valid"):
        manifest = json.loads((data / split / "manifest.json").read_text())
        manifest["tokenizer"].update(dir=str(foreign), source=str(foreign))
        (data / split / "manifest.json").write_text(json.dumps(manifest))

    run_dir = train(_config(data, tmp_path / "run", train={"max_steps": 1}))
    copied = sorted(p.name for p in (run_dir / "tokenizer").iterdir())
    assert copied == sorted(json.loads((data / "train" / "manifest.json").read_text())["tokenizer"]["files"])
    assert not [p for p in run_dir.rglob("*") if "id_rsa" in p.name or "BEGIN OPENSSH" in _text(p)]


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="ignore") if path.is_file() and path.stat().st_size < 1 << 20 else ""
    except OSError:
        return ""


def test_a_modified_tokenizer_file_is_refused_before_the_run_dir_is_touched(data: Path, tmp_path: Path) -> None:
    config = data / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"injected": 1, ', 1))
    with pytest.raises(UserError, match=r"tokenizer_config\.json: differs from the tokenizer the shards were made"):
        train(_config(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --- 4. non-finite numbers -------------------------------------------------------------------------------------

@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """``poison(kind, steps)``: make the training forward of those optimizer steps non-finite: ``loss`` (the
    loss and the per-task sums, hence the gradients) or ``grad`` (only the backward: losses stay finite).
    Two micro-batches per step (global 4, micro 2), counted over forwards with autograd on (held-out
    measurements run without it)."""
    head_loss = objective.head_loss
    calls = {"n": 0}

    def arm(kind: str, steps: set[int]) -> None:
        def poisoned(*args, **kwargs):
            loss, sums, counts = head_loss(*args, **kwargs)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if (calls["n"] + 1) // 2 in steps:
                    loss = loss * float("nan")
                    if kind == "loss":
                        sums = sums * float("nan")
            return loss, sums, counts
        monkeypatch.setattr(objective, "head_loss", poisoned)
    return arm


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_stops_the_run_without_a_checkpoint(data: Path, tmp_path: Path, poison, stage: int,
                                                            kind: str) -> None:
    poison(kind, {2})
    cfg = _config(data, tmp_path / "run", train={"max_steps": 4, "save_every": 1, "zero_stage": stage})
    with pytest.raises(TrainingDiverged, match="training diverged at step 2: non-finite") as caught:
        train(cfg)
    message = str(caught.value)
    if kind == "loss":
        assert "training loss of task(s) " in message and "code_completion" in message
    else:
        assert "gradient norm" in message and "training loss" not in message
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step-00000001"]
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [0, 1]
    assert isinstance(caught.value, UserError) and "\n" not in message


@pytest.mark.parametrize(("stage", "dtype"), [(0, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16")])
@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.slow
def test_skipped_step_changes_no_weight_and_holds_the_schedule(data: Path, tmp_path: Path, poison, stage: int,
                                                               dtype: str, kind: str) -> None:
    """Skipped by the trainer (ZeRO-0 fp32, or a non-finite loss) or by DeepSpeed's own check of the norm
    (ZeRO 1-3, bf16 at ZeRO-0): either way no weight, optimizer or LR-schedule step happens."""
    poison(kind, {2})
    cfg = _config(data, tmp_path / "run", model={"dtype": dtype},
                  optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "cosine"},
                  train={"max_steps": 4, "save_every": 1, "keep_last": 4, "zero_stage": stage,
                         "nonfinite": "skip"})
    run_dir = train(cfg)
    lines = {r["step"]: r for r in read_metrics(run_dir)}
    assert [lines[s].get("skipped_steps", 0) for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert lines[2]["grad_norm"] is None and lines[1]["grad_norm"] > 0
    assert lines[3]["lr"] == lines[2]["lr"]  # the schedule did not move on the skipped step
    weights = {s: load_trained(run_dir, run_dir / "checkpoints" / f"step-{s:08d}").state_dict() for s in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert all(torch.isfinite(v).all() for v in weights[3].values())
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["consecutive_skips"] == 0


def test_too_many_consecutive_skips_stop_the_run(data: Path, tmp_path: Path, poison) -> None:
    poison("loss", {2, 3, 4, 5})
    cfg = _config(data, tmp_path / "run", train={"max_steps": 6, "nonfinite": "skip", "max_skipped_steps": 3})
    with pytest.raises(TrainingDiverged, match=r"at step 4: .*3 steps in a row skipped"):
        train(cfg)
    assert [r.get("skipped_steps", 0) for r in read_metrics(cfg.run_dir)] == [0, 0, 1, 2]


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.slow
def test_non_finite_weights_are_never_published(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                stage: int) -> None:
    """A weight that turns non-finite while the step's losses and gradient norm stay finite (an optimizer
    overflow, a bad kernel) is found before the checkpoint is written: here step 2 plants one NaN into a
    trainable weight (this rank's partition under ZeRO-3)."""
    from mftcoder_coba.training import trainer

    plain_step = trainer._Trainer._train_step

    def step_then_damage(self) -> None:
        plain_step(self)
        if self.step == 2:
            param = next(p for p in self.engine.module.parameters() if p.requires_grad)
            with torch.no_grad():
                (param.ds_tensor if stage == 3 else param).view(-1)[0] = float("nan")
    monkeypatch.setattr(trainer._Trainer, "_train_step", step_then_damage)
    cfg = _config(data, tmp_path / "run", train={"max_steps": 3, "save_every": 1, "zero_stage": stage})
    with pytest.raises(TrainingDiverged, match=r"by step 2: 1 trainable weight tensor\(s\) hold inf or NaN; the "
                                               r"checkpoint was not written"):
        train(cfg)
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step-00000001"]


def test_cli_exits_2_with_one_line_on_divergence(data: Path, tmp_path: Path, poison,
                                                 capsys: pytest.CaptureFixture) -> None:
    poison("loss", {1})
    config = write_config(tmp_path / "run.json", run_data(data, tmp_path / "run", balancer=UNIFORM,
                                                          train={"max_steps": 2, "tensorboard": False}))
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the run's own log lines come first
    assert err[-1].startswith("mftcoder-coba: error: training diverged at step 1: "), err[-3:]
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err)


# --- 5. one run per run directory ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.json", run_data(data, run_dir, balancer=UNIFORM,
                                                          train={"max_steps": 100000, "tensorboard": False,
                                                                 "save_final": False}))
    holder = subprocess.Popen([sys.executable, "-m", "mftcoder_coba", "train", "--config", str(config)], cwd=REPO,
                              env=cpu_env(XDG_CACHE_HOME=os.environ["XDG_CACHE_HOME"]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None
        before = (run_dir / "config.yaml").read_bytes()
        with pytest.raises(UserError, match=rf"another train run is using this run directory \(host \S+, "
                                            rf"pid {holder.pid}, started "):
            train(_config(data, run_dir))
        assert (run_dir / "config.yaml").read_bytes() == before  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: the run directory is usable again (fresh: the killed run saved nothing)
    train(_config(data, run_dir, train={"max_steps": 1}))
    assert output_kind(run_dir) == "run"
    assert f"pid {os.getpid()}," in (run_dir / ".lock").read_text()


def test_repeated_runs_in_one_process_release_the_lock(data: Path, tmp_path: Path) -> None:
    from mftcoder_coba.training import run_lock

    cfg = _config(data, tmp_path / "run", train={"max_steps": 1})
    train(cfg)
    train(cfg, resume="auto")  # the first call released it
    run_lock.acquire(cfg.run_dir).release()


# --- 6. balancers that measure held-out loss need every task held out ------------------------------------------

def test_validation_balancer_refuses_a_task_without_held_out_rows(tmp_path: Path) -> None:
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    tasks = {}
    for i, (name, path) in enumerate(DEMO_TASKS.items()):
        tasks[name] = tmp_path / f"{name}.jsonl"
        lines = path.read_text().splitlines()
        tasks[name].write_text("\n".join(lines[: 1 if i == 1 else 40]) + "\n")  # one record: none held out
    prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=64, out=tmp_path / "out", progress=False))
    lonely = list(DEMO_TASKS)[1]
    cfg = run_config(tmp_path / "out", tmp_path / "run", train={"global_batch_size": 2})
    with pytest.raises(ConfigError, match=rf"'data.valid': task\(s\) {lonely} have no held-out rows.*"
                                          r"--valid-samples-per-task.*--valid-fraction"):
        preflight.run(cfg, 1, None)
    preflight.run(run_config(tmp_path / "out", tmp_path / "run", balancer=UNIFORM, train={"global_batch_size": 2}),
                  1, None)  # a balancer that reads no held-out loss does not care


# --- 7. CPU threads --------------------------------------------------------------------------------------------

def test_cpu_threads_resolution() -> None:
    assert resolve("auto", {}, cores=2).threads == 2
    choice = resolve("auto", {"LOCAL_WORLD_SIZE": "2"}, cores=2)
    assert choice.describe() == "CPU threads: 1 per rank (2 cores, 2 local ranks)"
    assert resolve("auto", {"LOCAL_WORLD_SIZE": "8"}, cores=2).threads == 1  # at least one
    assert resolve("auto", {"LOCAL_SIZE": "4"}, cores=16).threads == 4  # the deepspeed launcher's name
    assert resolve("auto", {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, cores=16).threads == 3
    assert resolve(5, {"OMP_NUM_THREADS": "3"}, cores=16).describe() == "CPU threads: 5 per rank (train.cpu_threads)"
    assert resolve("auto", {}).threads == len(os.sched_getaffinity(0))


def test_train_sets_and_restores_the_thread_count(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from mftcoder_coba.training.rng import ProcessRNG

    seen = []
    monkeypatch.setattr(ProcessRNG, "seed", lambda self, seed: (seen.append(torch.get_num_threads()),
                                                                torch.manual_seed(seed)))
    before = torch.get_num_threads()
    with caplog.at_level("INFO", logger="mftcoder_coba.training.trainer"):
        train(_config(data, tmp_path / "run", train={"max_steps": 1, "cpu_threads": 2}))
    assert seen == [2] and torch.get_num_threads() == before
    assert "CPU threads: 2 per rank (train.cpu_threads)" in caplog.text


# --- 8. rows longer than the model's positions -----------------------------------------------------------------

def test_rows_longer_than_the_model_positions_are_refused(data: Path, tmp_path: Path) -> None:
    """Shards of 64-token rows on a model built for 32 positions trained without a word before."""
    from train_helpers import TINY_LLAMA

    short = {**TINY_LLAMA, "max_position_embeddings": 32}
    cfg = _config(data, tmp_path / "run", model={"model_config": short})
    with pytest.raises(ConfigError, match=r"'model.model_config.max_position_embeddings': the shards' rows are 64 "
                                          r"tokens but the model takes at most max_position_embeddings = 32"):
        preflight.run(cfg, 1, None)
    assert not (tmp_path / "run").exists()
