"""Suite-wide settings: Triton runs in its interpreter on CPU-only machines; GPU tests skip without CUDA.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set here, at
collection time, before test modules import the kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
