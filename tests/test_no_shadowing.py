"""Nothing in the repository root shadows an installed package.

Python puts the current folder first on ``sys.path`` for ``python -m``, ``python -c``, pytest and notebooks, and
users start all of those (and the launchers) from the root of a checkout. A root folder with an ``__init__.py``
is a regular package there and wins over any installed distribution of that name: ``kernels/`` once shadowed
Hugging Face's ``kernels``, which transformers >= 5.25 imports, and every process started in the root died at
import. The root's folders are namespace portions instead (see setup.py), which never win over an installed
regular package; these tests hold every root entry to that and run the real entry points from the root.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, cpu_env, read_metrics, run_data, write_config

PACKAGE = "mftcoder_coba"
ROOT_MODULES_ALLOWED = {"setup"}  # setuptools' own entry point, run as a script


def _root_import_names() -> dict[str, str]:
    """Top-level names a Python started in the root can import from it, and what kind of entry holds each."""
    names = {}
    for entry in REPO.iterdir():
        if entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").exists():
            names[entry.name] = "regular package"
        elif entry.is_file() and entry.suffix == ".py" and entry.stem not in ROOT_MODULES_ALLOWED:
            names[entry.stem] = "module"
    return names


def test_no_root_folder_is_a_regular_package_but_the_project() -> None:
    assert _root_import_names() == {PACKAGE: "regular package"}
    for folder in ("kernels", "data_prep"):  # the layout users asked for stays
        assert (REPO / folder).is_dir() and not (REPO / folder / "__init__.py").exists()


def test_no_root_name_is_an_installed_distributions_import_name() -> None:
    """The same rule against this environment: no regular package or module in the root carries a top-level
    import name of any installed distribution (but the project's own)."""
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if any(d.lower().replace("_", "-") != "mftcoder-coba" for d in dists)}
    assert not installed & set(_root_import_names())


def _in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_python_in_the_root_imports_transformers_models_and_the_kernels() -> None:
    code = ("import importlib.util, sys\n"
            "from transformers import LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM\n"
            "model = LlamaForCausalLM  # touching PreTrainedModel is what imports Hugging Face's kernels\n"
            "import mftcoder_coba.kernels.api, mftcoder_coba.data_prep.pipeline\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('HF-KERNELS', spec.origin if spec else None)\n")
    done = _in_root("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    origin = done.stdout.split("HF-KERNELS ", 1)[1].strip()
    if importlib.util.find_spec("kernels") is not None:  # installed: transformers >= 5.25 depends on it
        assert origin != "None" and not Path(origin).is_relative_to(REPO), origin
    else:
        assert origin == "None"


@pytest.mark.slow
def test_the_cli_as_a_module_in_the_root() -> None:
    done = _in_root("-m", PACKAGE, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prep" in done.stdout and "train" in done.stdout


@pytest.mark.distributed
def test_single_node_launcher_in_the_root(prepared: Path, tmp_path: Path) -> None:
    """Two ranks started by ``launch/single_node.sh`` from the root train to the end (every rank used to die
    importing transformers)."""
    config = write_config(tmp_path / "run.json", run_data(prepared, tmp_path / "run", train={
        "max_steps": 2, "micro_batch_size": 1, "global_batch_size": 2, "tensorboard": False}))
    done = subprocess.run(["bash", "launch/single_node.sh", "2", "--config", str(config)], cwd=REPO,
                          env=cpu_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run") if m["step"] > 0] == [1, 2]  # 0: start losses
