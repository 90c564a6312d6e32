"""CI runs what the README tells a new user to run: the README's test command stands, as written (pip's -q
aside), in ``.ci/run``, inside a virtual environment that script creates afresh."""
from __future__ import annotations

import re

from train_helpers import REPO


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*Tests\*\*.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README.md has no **Tests** command block"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command_in_a_new_venv() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.replace("pip install -q ", "pip install ") for line in ci.splitlines()]
    assert _readme_test_command() in lines
    assert "python3 -m venv" in ci and 'rm -rf "$venv"' in ci
