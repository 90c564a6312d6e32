"""``mftcoder-coba eval-code``: HumanEval's canonical solutions all pass through the sandbox; wrong, hanging,
crashing, forking, memory-hogging and exiting solutions fail with the right kind; generation end to end on a
tiny model; every checkpoint of a run scored into ``eval_code.jsonl``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_eval_loss import tiny_model_dir
from train_helpers import run_config

from mftcoder_coba.cli import main as cli
from mftcoder_coba.commands.eval_code import parse_ks
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.problems import load_benchmark, read_problems, truncate_at_stop
from mftcoder_coba.evaluation.prompts import CHAT_INSTRUCTION, Sampling, extract_completion, render_prompt
from mftcoder_coba.evaluation.sandbox import KINDS, Limits, isolation_problem, run_program

# (task_id, canonical solution of ``def f(x):`` whose test wants f(2) == 4, the outcome it must get)
BAD_SOLUTIONS = [
    ("wrong", "    return x + 3\n", "failed"),
    ("raises", "    return 1 / 0\n", "exception"),
    ("syntax", "    return (\n", "syntax"),
    ("hangs", "    while True:\n        pass\n", "timeout"),
    ("sleeps", "    import time\n    time.sleep(60)\n", "timeout"),
    ("kills_itself", "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n", "crashed"),
    ("fork_bomb", "    import os\n    while True:\n        os.fork()\n", "forbidden"),
    ("subprocess", "    import subprocess\n    subprocess.run(['true'])\n    return x * 2\n", "forbidden"),
    ("memory_hog", "    data = []\n    while True:\n        data.append(bytearray(10**7))\n", "memory"),
    ("huge_allocation", "    return len(bytearray(1 << 40))\n", "memory"),
    ("exits", "    import sys\n    sys.exit(0)\n", "exited"),
    ("exits_hard", "    import os\n    os._exit(0)\n", "exited"),
    ("prints_forever", "    while True:\n        print('x' * 100000)\n", "exception"),
]


def write_problems(path: Path, solutions: list[tuple[str, str, str]]) -> Path:
    lines = [json.dumps({"task_id": task, "prompt": "def f(x):\n", "canonical_solution": solution,
                         "test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"})
             for task, solution, _ in solutions]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(tmp_path: Path) -> None:
    out = tmp_path / "self.json"
    start = time.monotonic()
    assert cli(["eval-code", "--self-check", "--workers", "2", "--out", str(out)]) == 0
    assert time.monotonic() - start < 90
    summary = json.loads(out.read_text())
    assert summary["problems"] == 164 and summary["n"] == 1
    assert summary["pass@1"] == 1.0 and summary["outcomes"] == {"passed": 164}
    assert summary["sandbox"] == ("isolated" if isolation_problem() is None else "guarded")  # --sandbox auto
    samples = [json.loads(line) for line in (tmp_path / "self.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 164 and all(s["passed"] and s["status"] == "passed" for s in samples)
    assert {"task_id", "completion", "passed", "status", "seconds"} <= set(samples[0])


@pytest.mark.slow
def test_bad_solutions_fail_with_their_kind_and_never_break_the_harness(tmp_path: Path) -> None:
    bench = write_problems(tmp_path / "bad.jsonl", BAD_SOLUTIONS)
    out = tmp_path / "bad.json"
    assert cli(["eval-code", "--self-check", "--benchmark", str(bench), "--workers", "2", "--timeout", "2",
                "--memory-mb", "256", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["pass@1"] == 0.0 and summary["problems"] == len(BAD_SOLUTIONS)
    samples = {s["task_id"]: s for s in map(json.loads, (tmp_path / "bad.samples.jsonl").read_text().splitlines())}
    assert {task: samples[task]["status"] for task, _, _ in BAD_SOLUTIONS} == {t: kind for t, _, kind in BAD_SOLUTIONS}
    assert samples["hangs"]["seconds"] < 5
    assert "File too large" in samples["prints_forever"]["detail"] and len(samples["prints_forever"]["output"]) == 2000


@pytest.mark.slow
def test_sandbox_scrubs_the_environment_and_leaves_nothing_behind(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    marker = tmp_path / "escaped"
    program = f"""
import ctypes, json, os, sys, time
assert "SECRET_TOKEN" not in os.environ and sorted(os.environ) == ["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "TMPDIR"]
assert os.environ["HOME"] == os.getcwd() and os.listdir(".") == ["program.py"] and sys.stdin.read() == ""
os.mkdir("locked"); open("locked/file", "w").close(); os.chmod("locked", 0o500)
print(os.getcwd())
libc = ctypes.CDLL(None)
if libc.fork() == 0:  # a child the guards do not see (root ignores RLIMIT_NPROC): the group kill must end it
    time.sleep(1.5)
    open({str(marker)!r}, "w").close()
    libc._exit(0)
"""
    outcome = run_program(program, Limits(timeout=5))
    assert outcome.status == "passed", outcome
    workdir = Path(outcome.output.strip())
    assert workdir != Path.cwd() and not workdir.exists()
    time.sleep(2.5)
    assert not marker.exists()


def test_problem_files_are_checked_line_by_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = {"task_id": "a", "prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}
    cases = [
        ("{not json\n", "bad.jsonl:1: not valid JSON"),
        (json.dumps(good) + "\n\n" + json.dumps({**good, "test": ""}) + "\n", "bad.jsonl:3: field 'test'"),
        (json.dumps(good) + "\n" + json.dumps(good) + "\n", "bad.jsonl:2: task_id 'a' repeats line 1"),
        (json.dumps({**good, "entry_point": "not valid"}) + "\n", "bad.jsonl:1: field 'entry_point'"),
        ("[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
        ("\n", "no problems"),
    ]
    for text, message in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(UserError, match=message):
            read_problems(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n")
    assert cli(["eval-code", "--self-check", "--benchmark", str(tmp_path / "bad.jsonl")]) == 2
    assert "error: --self-check: no canonical_solution for a" in capsys.readouterr().err
    name, problems = load_benchmark("humaneval")
    assert name == "humaneval" and len(problems) == 164 and problems[0].task_id == "HumanEval/0"


def test_stop_sequences_chat_extraction_and_k() -> None:
    assert truncate_at_stop("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert truncate_at_stop("    return 1\nif __name__ == '__main__':\n") == "    return 1"
    assert truncate_at_stop("    x = 1  # fine\n    return x\n# end") == "    x = 1  # fine\n    return x"
    reply = "Here:\n```python\ndef f(x):\n    return x * 2\n```\nDone."
    assert extract_completion(reply, "chat") == "\ndef f(x):\n    return x * 2\n"
    from transformers import AutoTokenizer

    from mftcoder_coba.demo_data import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    bare = render_prompt(tokenizer, "def f(x):\n", Sampling(prompt_format="chat", instruction=""))
    assert bare == "<|im_start|>user\ndef f(x):\n<|im_end|>\n<|im_start|>assistant\n"
    assert CHAT_INSTRUCTION in render_prompt(tokenizer, "def f(x):\n", Sampling(prompt_format="chat"))
    assert render_prompt(tokenizer, "def f(x):\n", Sampling()) == "def f(x):\n"
    assert parse_ks(None, 10) == [1, 10] and parse_ks("10,1", 10) == [1, 10]
    for text in ("1,20", "0", "a"):
        with pytest.raises(UserError, match="--k"):
            parse_ks(text, 10)


def test_generation_end_to_end_on_a_tiny_model(prepared: Path, tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path / "model", PackedDataset(prepared / "valid").vocab_size)
    out = tmp_path / "gen.json"
    assert cli(["eval-code", str(model), "--limit", "2", "--n", "2", "--k", "1,2", "--max-new-tokens", "8",
                "--temperature", "0.8", "--workers", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["problems"] == 2 and summary["n"] == 2 and 0 <= summary["pass@2"] <= 1
    samples = [json.loads(line) for line in (tmp_path / "gen.samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(s["status"] in KINDS and isinstance(s["completion"], str) for s in samples)
    assert cli(["eval-code", str(model), "--limit", "1", "--n", "3", "--temperature", "0", "--prompt-format", "chat",
                "--max-new-tokens", "8", "--out", str(out)]) == 0
    greedy = [json.loads(line) for line in (tmp_path / "gen.samples.jsonl").read_text().splitlines()]
    assert len(greedy) == 3 and len({s["completion"] for s in greedy}) == 1
    assert cli(["eval-code", str(model), "--n", "2", "--k", "5"]) == 2


def test_all_checkpoints_of_a_run(prepared: Path, tmp_path: Path) -> None:
    from mftcoder_coba.training import train

    run = train(run_config(prepared, tmp_path / "run", train={"max_steps": 2, "save_every": 1, "keep_last": 2}))
    args = ["eval-code", str(run), "--all-checkpoints", "--limit", "1", "--n", "1", "--max-new-tokens", "4"]
    assert cli(args) == 0 and cli(args) == 0  # the second run replaces the lines of the first
    lines = [json.loads(line) for line in (run / "eval_code.jsonl").read_text().splitlines()]
    assert [(line["step"], line["benchmark"]) for line in lines] == [(1, "humaneval"), (2, "humaneval")]
    assert all("pass@1" in line and line["target"]["step"] == line["step"] for line in lines)
    assert sorted(p.name for p in (run / "eval_code").iterdir()) == [
        "humaneval-step-00000001.samples.jsonl", "humaneval-step-00000002.samples.jsonl"]
    assert not [p for p in os.listdir(run) if ".tmp-" in p]  # no staging leftovers


def test_the_command_module_does_not_import_torch() -> None:
    """Option errors and --self-check answer without loading a model library (seconds on a busy machine)."""
    import subprocess
    import sys

    code = "import sys, mftcoder_coba.commands.eval_code; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
