"""The console command's own behaviour: help text, defaults in sub-command help, logging per rank."""
import logging
import subprocess
import sys

import pytest

from mftcoder_coba import cli


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mftcoder_coba.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_top_help_is_plain_text_and_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    assert "``" not in out.stdout and ":func:" not in out.stdout
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_sub_command_help_shows_defaults():
    out = _run("prep", "--help")
    assert out.returncode == 0
    assert "(default: 1234)" in out.stdout  # --seed


@pytest.mark.parametrize("rank, all_ranks, level", [("0", False, logging.INFO), ("1", False, logging.WARNING),
                                                    ("1", True, logging.INFO)])
def test_logging_on_rank_zero_only_unless_asked(monkeypatch, rank, all_ranks, level):
    monkeypatch.setenv("RANK", rank)
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        cli.configure_logging("INFO", all_ranks=all_ranks)
        assert root.level == level
        if all_ranks:
            assert f"[rank {rank}]" in root.handlers[0].formatter._fmt
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_bad_log_level_is_one_line():
    out = _run("--log-level", "LOUD", "verify", "nowhere")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["mftcoder-coba: error: --log-level 'LOUD': not a logging level "
                                               "(DEBUG, INFO, WARNING, ERROR)"]
