"""The ``prep``, ``inspect`` and ``verify`` sub-commands as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mftcoder_coba", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    args = []
    for name, path in DEMO_TASKS.items():
        subset = root / f"{name}.jsonl"
        subset.write_text("\n".join(path.read_text().splitlines()[:50]) + "\n")
        args += ["--task", f"{name}={subset}"]
    result = _cli("prep", *args, "--tokenizer", str(TOKENIZER_DIR), "--seq-len", "256", "--out", str(root / "out"),
                  "--valid-samples-per-task", "3", "--seed", "7", "--rows-per-shard", "16")
    assert result.returncode == 0, result.stderr
    return root, args, result


@pytest.mark.slow
def test_prep_prints_tables_and_records_arguments(prepared):
    root, _, result = prepared
    assert "code_completion" in result.stdout and "util %" in result.stdout
    manifest = json.loads((root / "out" / "valid" / "manifest.json").read_text())
    assert manifest["arguments"]["seed"] == 7 and manifest["arguments"]["valid_samples_per_task"] == 3
    assert all(s["samples"] == 3 for s in manifest["task_stats"].values())


@pytest.mark.slow
def test_inspect_and_verify(prepared):
    root, args, _ = prepared
    out = root / "out"
    shown = _cli("inspect", str(out), "--row", "1")
    assert shown.returncode == 0, shown.stderr
    assert "unit_tests" in shown.stdout and "[[" in shown.stdout and "<|im_end|>]]" in shown.stdout
    ok = _cli("verify", str(out))
    assert ok.returncode == 0 and "OK" in ok.stdout
    shard = out / "train" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = _cli("verify", str(out))
    assert bad.returncode == 2
    assert bad.stderr.startswith("mftcoder-coba: error:") and "shard-00001.bin: sha256 mismatch" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    again = _cli("prep", *args, "--tokenizer", str(TOKENIZER_DIR), "--seq-len", "256", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bad_task_syntax_and_missing_tokenizer_are_one_line_errors(tmp_path):
    for args, message in [
        (["--task", "nameonly", "--tokenizer", str(TOKENIZER_DIR)], "expected NAME=PATH"),
        (["--task", f"a={DEMO_TASKS['unit_tests']}", "--tokenizer", str(tmp_path / "tok")],
         "tokenizer directory not found"),
    ]:
        result = _cli("prep", *args, "--seq-len", "64", "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
