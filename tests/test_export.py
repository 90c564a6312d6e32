"""``mftcoder-coba export``: runs made by the trainer become plain transformers directories (LoRA merged) with
the tokenizer, written atomically; CGC-LoRA runs become the "1+N" layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mftcoder_coba.atomic import OUTPUT_MARKER, output_kind
from mftcoder_coba.cli import main as cli
from mftcoder_coba.errors import UserError
from mftcoder_coba.export import export_run
from mftcoder_coba.file_manifest import MANIFEST, write_manifest
from mftcoder_coba.models import load_trained
from mftcoder_coba.training.checkpoint import checkpoint_problem


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_export_is_a_plain_model_equal_to_the_trained_one(runs: dict[str, Path], tmp_path: Path, adapter: str) -> None:
    out = tmp_path / "model"
    assert cli(["export", str(runs[adapter]), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name in exported.state_dict())
    assert exported.config.eos_token_id == tokenizer.eos_token_id and exported.config.use_cache
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b").input_ids])
    trained = load_trained(runs[adapter])
    torch.testing.assert_close(_logits(exported, ids), _logits(trained, ids), rtol=0, atol=1e-4)
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_lora_export_differs_from_the_base(runs: dict[str, Path], tmp_path: Path) -> None:
    """The merged adapters changed the weights (guards against exporting the bare base)."""
    out = export_run(runs["lora"], tmp_path / "model")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    base = AutoModelForCausalLM.from_pretrained(runs["lora"] / "base_model")
    assert (_logits(AutoModelForCausalLM.from_pretrained(out), ids) - _logits(base, ids)).abs().max() > 1e-4


def test_cgc_lora_export_is_one_base_plus_an_adapter_per_task(runs: dict[str, Path], tmp_path: Path) -> None:
    out = export_run(runs["cgc_lora"], tmp_path / "cgc")
    tasks = json.loads((runs["cgc_lora"] / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["tasks"]
    summary = json.loads((out / "export.json").read_text())
    assert [t["name"] for t in summary["tasks"]] == tasks
    assert (out / "base" / "config.json").is_file() and (out / "base" / "tokenizer.json").is_file()
    assert all((out / "adapters" / t / "adapter_config.json").is_file() for t in tasks)


def test_existing_output_needs_overwrite_and_survives_a_failed_export(runs: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = export_run(runs["none"], tmp_path / "model")
    assert output_kind(out) == "export"
    weights = (out / "model.safetensors").read_bytes()
    assert cli(["export", str(runs["none"]), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a checkpoint"):
        export_run(runs["none"], out, tmp_path / "no-such-checkpoint", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == weights
    export_run(runs["none"], out, runs["none"] / "checkpoints" / "step-00000002", overwrite=True)
    assert (out / "config.json").is_file() and output_kind(out) == "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_replaces_exports_only(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """--overwrite never replaces a run's checkpoints (once it did, and a later --resume auto started from
    step 0) nor any folder that is not an export; an export made before output markers is replaced."""
    run = tmp_path / "run"
    shutil.copytree(runs["none"], run)
    before = sorted(p.relative_to(run).as_posix() for p in (run / "checkpoints").rglob("*"))
    assert cli(["export", str(run), "--out", str(run / "checkpoints"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoints" in err and "\n" not in err
    assert sorted(p.relative_to(run).as_posix() for p in (run / "checkpoints").rglob("*")) == before
    assert checkpoint_problem(run / "checkpoints" / "step-00000002") is None

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    assert cli(["export", str(run), "--out", str(notes), "--overwrite"]) == 2
    assert "is not this tool's export output" in capsys.readouterr().err
    assert (notes / "keep.txt").read_text() == "mine"

    old = export_run(run, tmp_path / "old")
    (old / OUTPUT_MARKER).unlink()  # as exports were written before markers
    export_run(run, old, overwrite=True)
    assert output_kind(old) == "export"


def test_damaged_checkpoint_is_one_error_line(runs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["none"], run)
    step = run / "checkpoints" / "step-00000002"
    weights = step / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli(["export", str(run), "--out", str(tmp_path / "a"), "--checkpoint", str(step)]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged or incomplete checkpoint: model/model.safetensors has 1000 bytes" in err and "\n" not in err
    with pytest.raises(UserError, match="no complete checkpoint"):  # the only checkpoint is skipped
        export_run(run, tmp_path / "b")
    (step / MANIFEST).unlink()  # a checkpoint written before files.json: the load itself fails, in one line
    capsys.readouterr()
    assert cli(["export", str(run), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load the trained model" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_trust_remote_code_comes_from_the_command_line_only(runs: dict[str, Path], tmp_path: Path) -> None:
    """A run directory is a file being read: its config.yaml saying trust_remote_code does not let the
    model's own code (auto_map) run on export; only --trust-remote-code does."""
    run = tmp_path / "run"
    shutil.copytree(runs["none"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    step = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "remote-code-ran"
    (step / "model" / "remote_llama.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaForCausalLM\n\n\nclass RemoteLlama(LlamaForCausalLM):\n    pass\n")
    model_config = json.loads((step / "model" / "config.json").read_text())
    model_config["auto_map"] = {"AutoModelForCausalLM": "remote_llama.RemoteLlama"}
    (step / "model" / "config.json").write_text(json.dumps(model_config))
    write_manifest(step)
    export_run(run, tmp_path / "out")
    assert not marker.exists()
    export_run(run, tmp_path / "out", overwrite=True, trust_remote_code=True)
    assert marker.exists()  # the same files do run code when the user asks for it


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"config.yaml: not found"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match=r"tokenizer: not found"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
