"""Run directories name their inputs by absolute path, and the DeepSpeed configs ship in the package by name
(issue 23, items 3 and 4): a run made from one folder is exported from another."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from train_helpers import TINY_LLAMA, run_data, write_config

from mftcoder_coba.config import DS_CONFIGS, load_run_config
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.export import export_run
from mftcoder_coba.training import train


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working folder of its own; the test's current directory is restored afterwards."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    before = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(before)


def test_relative_inputs_become_absolute_and_packaged_deepspeed_configs_load_by_name(elsewhere: Path) -> None:
    (elsewhere / "base").mkdir()
    path = elsewhere / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "runs/a", "data": {"train": "prepared/train", "valid": "p/valid"},
                                    "model": {"path": "base"}, "eval": {"data": "e/test"},
                                    "train": {"deepspeed_config": "zero3"}}))
    cfg = load_run_config(path)
    assert cfg.run_dir == elsewhere / "runs" / "a" and cfg.data.train == elsewhere / "prepared" / "train"
    assert cfg.data.valid == elsewhere / "p" / "valid" and cfg.eval.data == elsewhere / "e" / "test"
    assert cfg.model.path == str(elsewhere / "base")
    assert cfg.train.deepspeed_config == DS_CONFIGS / "zero3.json" and cfg.train.deepspeed_config.is_file()
    (elsewhere / "mine.json").write_text("{}")
    assert load_run_config(path, ["train.deepspeed_config=mine.json"]).train.deepspeed_config == \
        elsewhere / "mine.json"
    with pytest.raises(ConfigError, match=r"^config field 'train.deepspeed_config': file not found: .*zero9"):
        load_run_config(path, ["train.deepspeed_config=zero9"])


@pytest.mark.slow
def test_a_lora_run_on_a_relative_base_model_exports_from_another_folder(prepared: Path, tmp_path: Path,
                                                                         elsewhere: Path) -> None:
    """The issue's case: model.path given relative; export from another folder said the base model was missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**shape, vocab_size=50257)).save_pretrained(elsewhere / "base")
    shutil.copytree(prepared, elsewhere / "prepared")
    model = {"path": "base", "model_config": None, "adapter": "lora", "dtype": "fp32", "attn_implementation": "sdpa"}
    data = run_data(Path("prepared"), Path("runs/lora"), model=model,
                    train={"max_steps": 1, "micro_batch_size": 2, "global_batch_size": 4, "tensorboard": False})
    run_dir = train(load_run_config(write_config(elsewhere / "run.json", data)))
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["model"]["path"] == str(elsewhere / "base") and Path(recorded["data"]["train"]).is_absolute()
    os.chdir(tmp_path)
    out = export_run(run_dir, tmp_path / "exported")
    assert (out / "config.json").is_file()
    (elsewhere / "base").rename(elsewhere / "moved")
    with pytest.raises(UserError) as caught:
        export_run(run_dir, tmp_path / "again")
    assert str(caught.value) == (f"{elsewhere / 'base'}: the base model of this lora run is missing "
                                 f"(config field 'model.path' in {run_dir / 'config.yaml'})")
