"""The isolated sandbox against samples written to do harm (issue 21): each attack is the body of a solution that
would still return the right answer, run through ``run_program`` with ``sandbox="isolated"``; the test checks the
host afterwards. Under ``guarded`` (and before the namespaces) each of these reached the host; one case shows the
guarded mode still does, so the suite is known to tell the two apart. Every case is bounded to a few seconds."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mftcoder_coba.cli import main as cli
from mftcoder_coba.evaluation.sandbox import Limits, Outcome, isolation_problem, run_program

pytestmark = pytest.mark.slow

ISOLATED = Limits(timeout=5, memory_mb=256, sandbox="isolated", scratch_mb=16)


@pytest.fixture(scope="module", autouse=True)
def namespaces_available() -> None:
    problem = isolation_problem()
    if problem is not None:
        pytest.skip(f"the kernel refuses the isolated sandbox here: {problem}")


def run(program: str, limits: Limits = ISOLATED) -> Outcome:
    outcome = run_program(program, limits)
    assert outcome.status != "passed" or "ESCAPED" not in outcome.output, outcome
    return outcome


def victims(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "data.txt").write_text("precious")
    lone = tmp_path / "lone.txt"
    lone.write_text("precious")
    return folder, lone


def test_guarded_mode_is_no_boundary(tmp_path: Path) -> None:
    folder, _ = victims(tmp_path)
    outcome = run_program(f"import shutil\nshutil.rmtree({str(folder)!r})\n", Limits(timeout=5, sandbox="guarded"))
    assert outcome.status == "passed" and not folder.exists()


def test_no_file_outside_the_scratch_folder_can_be_changed(tmp_path: Path) -> None:
    folder, lone = victims(tmp_path)
    written = tmp_path / "written.txt"
    outcome = run(f"""
import os, shutil
for attack in (lambda: shutil.rmtree({str(folder)!r}), lambda: os.remove({str(lone)!r}),
               lambda: open({str(written)!r}, "w").write("x"), lambda: open("/etc/mftcoder-escape", "w"),
               lambda: open(os.path.join({os.getcwd()!r}, "escape"), "w")):
    try:
        attack()
        print("ESCAPED")
    except OSError as exc:
        print(type(exc).__name__)
open("mine.txt", "w").write("scratch is writable")
assert open("mine.txt").read() == "scratch is writable"
""")
    assert outcome.passed, outcome
    assert (folder / "data.txt").read_text() == "precious" and lone.read_text() == "precious"
    assert not written.exists() and not Path("/etc/mftcoder-escape").exists() and not Path("escape").exists()


def test_folders_named_by_the_harness_are_hidden() -> None:
    """eval-code hides its TARGET (a run or model) and output paths this way; /usr/share stands in for one."""
    program = "import os\nprint(len(os.listdir('/usr/share')))\n"
    assert int(run(program, Limits(timeout=5, sandbox="isolated")).output) > 0
    assert int(run(program, Limits(timeout=5, sandbox="isolated", hidden=("/usr/share",))).output) == 0


def test_a_private_key_in_home_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-key-material\n")
    key.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    outcome = run(f"""
import os
for path in ({str(key)!r}, os.path.expanduser("~/.ssh/id_ed25519"), "/root/.ssh/id_rsa", "/root/.bash_history"):
    try:
        print(open(path).read())
    except OSError as exc:
        print(type(exc).__name__)
""")
    assert outcome.passed and "secret-key-material" not in outcome.output, outcome


def test_no_network_not_even_loopback() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]
    received: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
            received.append(conn.recv(100))
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        outcome = run(f"""
import socket
socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"exfiltrated")
""")
    finally:
        thread.join()
        server.close()
    assert outcome.status == "exception" and received == [], (outcome, received)


def test_processes_of_the_sample_die_with_it(tmp_path: Path) -> None:
    """A ``setsid`` child started through ``ctypes`` (no Python guard sees it), and a bounded fork bomb."""
    marker = tmp_path / "late"
    outcome = run(f"""
import ctypes, time
libc = ctypes.CDLL(None)
started = 0
for _ in range(50):
    pid = libc.fork()
    if pid == 0:
        libc.setsid()
        time.sleep(2)
        open({str(marker)!r}, "w").close()
        libc._exit(0)
    started += pid > 0
print("forked", started)
""")
    assert outcome.passed and "forked 0" in outcome.output, outcome
    time.sleep(2.5)
    assert not marker.exists()


def test_the_sample_cannot_see_or_signal_the_harness_or_other_processes(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "30"], env={"PATH": os.environ["PATH"], "SECRET_TOKEN": "hunter2"})
    try:
        outcome = run(f"""
import os, signal
for pid in ({victim.pid}, {os.getpid()}):
    try:
        print(open(f"/proc/{{pid}}/environ").read())
    except OSError as exc:
        print(type(exc).__name__)
    try:
        os.kill(pid, signal.SIGKILL)
        print("ESCAPED")
    except OSError as exc:
        print(type(exc).__name__)
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
""")
        assert outcome.passed and "hunter2" not in outcome.output, outcome
        assert outcome.output.strip().endswith("[1, 2]"), outcome.output  # only the init and the sample itself
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_filling_the_scratch_folder_fills_only_its_tmpfs() -> None:
    outcome = run("""
import os
written = 0
try:
    for i in range(16):  # each file under the 16 MiB file-size limit; 240 MiB in all
        with open(f"fill{i}", "wb") as handle:
            handle.write(b"x" * (15 << 20))
        written += 15 << 20
except OSError as exc:
    print(type(exc).__name__, exc.errno)
print("written", written >> 20)
""")
    assert outcome.passed and "OSError 28" in outcome.output, outcome  # ENOSPC at the 16 MiB scratch size
    assert int(outcome.output.split("written")[1]) <= 16


def test_a_forged_passed_report_is_not_taken(tmp_path: Path) -> None:
    bench = tmp_path / "forge.jsonl"
    forge = ("    import os, sys, json\n"
             "    os.write(int(sys.argv[1]), json.dumps({'status': 'passed', 'detail': ''}).encode())\n"
             "    print('passed')\n"
             "    os._exit(0)\n")
    bench.write_text(json.dumps({"task_id": "forge", "prompt": "def f(x):\n", "canonical_solution": forge,
                                "test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"})
                     + "\n")
    out = tmp_path / "forge.json"
    for mode in ("isolated", "guarded"):
        assert cli(["eval-code", "--self-check", "--benchmark", str(bench), "--sandbox", mode, "--timeout", "5",
                    "--out", str(out)]) == 0
        summary = json.loads(out.read_text())
        assert summary["sandbox"] == mode and summary["pass@1"] == 0.0 and summary["outcomes"] == {"exited": 1}


def test_legitimate_samples_keep_working_isolated() -> None:
    outcome = run("""
import collections, hashlib, json, math, os, re, tempfile, threading
assert os.listdir(".") == ["program.py"] and "hashlib" in open("program.py").read()
with tempfile.NamedTemporaryFile("w", dir=".", delete=False) as handle:
    handle.write("ok")
assert open(handle.name).read() == "ok" and os.environ["HOME"] == os.getcwd()
os.makedirs("a/b"); open("a/b/c", "w").write(json.dumps({"x": math.pi}))
print("to nowhere", file=open(os.devnull, "w")); assert len(os.urandom(4)) == 4
print(hashlib.sha256(b"x").hexdigest()[:8], re.sub("a", "b", "aa"), collections.Counter("aab")["a"])
""")
    assert outcome.passed and "2d711642 bb 2" in outcome.output, outcome
    assert run("while True:\n    pass\n", Limits(timeout=1.5, sandbox="isolated")).status == "timeout"
    assert run("x = bytearray(1 << 30)\n").status == "memory"


def test_sandbox_isolated_refuses_where_the_kernel_does_not_allow_it(tmp_path: Path) -> None:
    """A process 32 user namespaces deep cannot create another (EUSERS): a real machine without the boundary."""
    nest = f"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(32):
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(0x10000000) != 0:
        break
    open("/proc/self/setgroups", "w").write("deny")
    open("/proc/self/uid_map", "w").write(f"{{uid}} {{uid}} 1")
    open("/proc/self/gid_map", "w").write(f"{{gid}} {{gid}} 1")
for mode in ("isolated", "auto"):
    done = subprocess.run([sys.executable, "-m", "mftcoder_coba", "eval-code", "--self-check", "--limit", "2",
                           "--sandbox", mode, "--out", {str(tmp_path / 'auto.json')!r}], capture_output=True, text=True)
    print(mode, done.returncode, done.stderr.strip().replace(chr(10), " | "))
"""
    done = subprocess.run([sys.executable, "-c", nest], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    isolated, auto = done.stdout.strip().splitlines()
    assert isolated.startswith("isolated 2 ") and "error: --sandbox isolated: the kernel refused" in isolated
    assert auto.startswith("auto 0 ") and auto.count("SANDBOX NOT ISOLATED") == 1, auto
    assert json.loads((tmp_path / "auto.json").read_text())["sandbox"] == "guarded"
