"""Reading a run config imports neither torch nor transformers: a config mistake is reported in a fraction of a
second, and the config tree stays usable where torch is broken or absent (the model package's heavy names are
imported on first use, see ``mftcoder_coba.models``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

HEAVY = ("torch", "transformers")
CONFIG = {
    "run_dir": "runs/x",
    "data": {"train": "prepared/train", "valid": "prepared/valid"},
    "model": {"model_config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 48},
              "adapter": "cgc_lora", "cgc_lora": {"rank_budget": 8, "clusters": {"a": "c1", "b": "c1"}}},
    "train": {"max_steps": 5, "micro_batch_size": 2, "global_batch_size": 4},
}


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_loading_a_run_config_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    code = ("import sys\n"
            "from mftcoder_coba.config import load_run_config\n"
            "cfg = load_run_config(sys.argv[1], ['model.cgc_lora.alpha=8'])\n"
            "print(cfg.model.adapter, cfg.model.cgc_lora.clusters, cfg.model.cgc_lora.alpha)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = _python(code, str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cgc_lora {'a': 'c1', 'b': 'c1'} 8.0", "[]"]


def test_train_with_a_bad_field_is_one_line_before_torch(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "model": {**CONFIG["model"], "cgc_lora": {"dropout": 1.5}}}))
    code = ("import runpy, sys\n"
            "sys.argv = ['mftcoder-coba', 'train', '--config', sys.argv[1]]\n"
            "try:\n"
            "    runpy.run_module('mftcoder_coba', run_name='__main__')\n"
            "except SystemExit as exit:\n"
            f"    print(exit.code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = _python(code, str(path))
    assert done.stdout.strip() == "2 []", done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.cgc_lora.dropout" in lines[0], lines
