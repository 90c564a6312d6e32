"""``prep --fim / --mix / --overlong truncate-left / --task NAME=hf:...`` as a user types them, and what
``inspect`` shows of them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prep_helpers import tokenizer_copy

from mftcoder_coba.data_prep.fim import FAMILIES

pytestmark = pytest.mark.slow  # every test starts prep and inspect as child processes


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mftcoder_coba", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_fim_mix_and_truncate_left_from_the_command_line(tmp_path):
    tokenizer = tokenizer_copy(tmp_path / "tok", fim_tokens=FAMILIES[1])  # the <|fim_prefix|> family
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(30)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(30)))
    out = tmp_path / "out"
    result = _cli("prep", "--task", f"code={code}", "--task", f"chat={chat}", "--tokenizer", str(tokenizer),
                  "--seq-len", "128", "--out", str(out), "--valid-samples-per-task", "2", "--fim", "code=0.5,0.5",
                  "--mix", "chat=1.5", "--overlong", "truncate-left")
    assert result.returncode == 0, result.stderr
    assert "mix: task 'chat' x1.5: 28 training records -> 42 samples" in result.stdout
    assert "fim: task 'code' rate 0.5 (SPM 0.5):" in result.stdout and "<|fim_prefix|>" in result.stdout
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["arguments"]["fim"] == {"code": {"rate": 0.5, "spm_rate": 0.5}}
    assert manifest["arguments"]["overlong"] == "truncate-left" and manifest["task_stats"]["chat"]["samples"] == 42
    shown = _cli("inspect", str(out), "--no-decode")
    assert shown.returncode == 0 and "mix: task 'chat' x1.5" in shown.stdout and "fim: task 'code'" in shown.stdout


def test_option_errors_are_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    offline = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    tokenizer = tokenizer_copy(tmp_path / "tok")
    for args, message in [
        (["--task", f"a={data}", "--fim", "a=2"], "--fim a: RATE must be a number in [0, 1], got 2.0"),
        (["--task", f"a={data}", "--fim", "a=0.5", "--fim", "a=0.1"], "--fim: task 'a' given twice"),
        (["--task", f"a={data}", "--mix", "b=2"], "--mix: no task named 'b'"),
        (["--task", f"a={data}", "--mix", "a=none"], "expected NAME=FACTOR"),
        (["--task", "a=hf:org/not-here@train"], "hf:org/not-here@train: not in the local Hugging Face cache"),
    ]:
        result = _cli("prep", *args, "--tokenizer", str(tokenizer), "--seq-len", "64", "--out", str(tmp_path / "out"),
                      env=offline)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
