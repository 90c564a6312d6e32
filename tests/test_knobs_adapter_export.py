"""``export --adapter-only`` (issue 23, item 7): peft's unmerged adapter beside the merged export, loadable
onto the run's base with peft and giving the merged model's logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mftcoder_coba.errors import UserError
from mftcoder_coba.export import export_run


def test_adapter_only_export_loads_onto_the_base_and_matches_the_merged_model(runs: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    adapter = export_run(runs["lora"], tmp_path / "adapter", adapter_only=True)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists() and (adapter / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export_run(runs["lora"], tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(runs["lora"] / "base_model")
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="^--adapter-only: .* trained no LoRA adapter"):
        export_run(runs["none"], tmp_path / "full", adapter_only=True)
