"""Suite-wide settings and shared fixtures.

Triton runs in its interpreter on CPU-only machines: ``TRITON_INTERPRET`` must be set before any
``@triton.jit`` function is defined, so it is set here, at collection time, before test modules import the
kernels. GPU tests skip without CUDA. Plain helpers live in ``train_helpers.py`` and ``prep_helpers.py``.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects, so that ``-m "not slow"`` sees the added marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start several processes are ``slow`` too; GPU tests skip without CUDA."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo corpus prepared at seq_len 64: a folder with ``train/`` and ``valid/``.

    Session-scoped: preparing takes seconds, and the trainer, eval and export tests all read the same shards.
    Imports are local so that ``TRITON_INTERPRET`` above is set before anything can import the kernels."""
    from train_helpers import SEQ_LEN

    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare(PrepOptions(tasks=dict(DEMO_TASKS), tokenizer=TOKENIZER_DIR, seq_len=SEQ_LEN, out=out,
                        valid_samples_per_task=4, seed=0))
    return out


@pytest.fixture(scope="session")
def runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step trainer runs (full, LoRA, CGC-LoRA) on the prepared demo shards, shared by the export and eval
    tests (which only read them or work on copies)."""
    from train_helpers import run_config

    from mftcoder_coba.training import train

    root = tmp_path_factory.mktemp("runs")
    made = {}
    for adapter in ("none", "lora", "cgc_lora"):
        model = {"adapter": adapter, "lora": {"dropout": 0.0}, "cgc_lora": {"dropout": 0.0}}
        made[adapter] = train(run_config(prepared, root / adapter, model=model, train={"max_steps": 2}))
    return made
