"""ColD Fusion end to end on CPU: two contributors with their own shards of the shipped corpus fine-tune a tiny
random-init Llama in turn, the repository averages them, and every task's held-out loss improves on the base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from mftcoder_coba import config_io
from mftcoder_coba.cli import main as cli_main
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.fusion import FusionConfig, run_cold_fusion

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False}
SHARDS = {"alice": ["text_to_code", "code_to_text"], "bob": ["unit_tests"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each contributor's own prepared data (train/ and valid/), one shared tokenizer."""
    from mftcoder_coba.data_prep import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    root = tmp_path_factory.mktemp("contributors")
    for name, tasks in SHARDS.items():
        prepare(PrepOptions(tasks={t: DEMO_TASKS[t] for t in tasks}, tokenizer=TOKENIZER_DIR, seq_len=64,
                            out=root / name, valid_samples_per_task=4, seed=0))
    return root


def fusion_data(shards: Path, run_dir: Path, **fields) -> dict:
    data = {
        "run_dir": str(run_dir),
        "iterations": 2,
        "template": {
            "model": {"model_config": dict(TINY_LLAMA), "dtype": "fp32", "attn_implementation": "sdpa"},
            "balancer": {"name": "uniform"},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"max_steps": 3, "micro_batch_size": 2, "global_batch_size": 4, "seed": 3, "tensorboard": False},
        },
        "contributors": [{"name": name, "train": str(shards / name / "train"), "valid": str(shards / name / "valid")}
                         for name in SHARDS],
    }
    data.update(fields)
    return data


def test_fused_model_improves_held_out_loss_of_every_task(shards, tmp_path) -> None:
    cfg = config_io.build(FusionConfig, fusion_data(shards, tmp_path / "run"))
    run_dir = run_cold_fusion(cfg)
    lines = [json.loads(line) for line in (run_dir / "fusion_metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2]
    tasks = ["code_to_text", "text_to_code", "unit_tests"]
    assert all(sorted(line["valid_loss"]) == tasks for line in lines)
    for task in tasks:
        base, first, last = (line["valid_loss"][task] for line in lines)
        assert last < first < base, (task, base, first, last)
    assert (run_dir / "plots" / "fusion_valid_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each job fine-tuned the previous shared model on its own data, with a per-iteration seed
    job = yaml.safe_load((run_dir / "iteration-02" / "bob.yaml").read_text())
    assert job["model"]["path"] == str((run_dir / "iteration-01" / "fused").absolute())
    assert "model_config" not in job["model"] and job["train"]["seed"] == 4
    assert job["data"]["train"] == str((shards / "bob" / "train").absolute())
    assert lines[2]["model"] == str(run_dir / "iteration-02" / "fused")
    fused = AutoModelForCausalLM.from_pretrained(lines[2]["model"])          # a plain transformers model
    assert fused.config.num_hidden_layers == 2

    # running it again continues after the last complete iteration: nothing is retrained
    checkpoint = run_dir / "iteration-02" / "alice" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    assert run_cold_fusion(cfg) == run_dir
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before
    assert [json.loads(line) for line in (run_dir / "fusion_metrics.jsonl").read_text().splitlines()] == lines


def test_parallel_contributor_failure_names_the_contributor_and_its_log(shards, tmp_path) -> None:
    data = fusion_data(shards, tmp_path / "run", iterations=1, parallel=True)
    data["contributors"] = data["contributors"][:1]                   # one subprocess is enough here
    data["template"]["balancer"] = {"name": "no-such-balancer"}        # fails in each job's own preflight
    with pytest.raises(UserError, match=r"contributor 'alice' training failed \(exit 2; log .*alice\.log\).*balancer"):
        run_cold_fusion(config_io.build(FusionConfig, data))
    assert (tmp_path / "run" / "iteration-00" / "metrics.json").is_file()   # the base was scored
    assert not (tmp_path / "run" / "iteration-01" / "fused").exists()


def test_config_errors_stop_before_any_work(shards, tmp_path, capsys) -> None:
    def error_of(data: dict) -> str:
        with pytest.raises(ConfigError) as info:
            run_cold_fusion(config_io.build(FusionConfig, data))
        return str(info.value)

    data = fusion_data(shards, tmp_path / "run")
    data["template"]["model"]["adapter"] = "cgc_lora"
    assert "template.model.adapter" in error_of(data)
    data = fusion_data(shards, tmp_path / "run")
    data["contributors"][1]["overrides"] = ["train.max_step=3"]
    assert "contributor 'bob'" in error_of(data) and "train.max_step" in error_of(data)
    data = fusion_data(shards, tmp_path / "run")
    data["contributors"][0]["train"] = str(tmp_path / "missing")
    assert "contributors[0].train" in error_of(data)
    data = fusion_data(shards, tmp_path / "run")
    data["contributors"][1]["name"] = "alice"
    assert "names must be unique" in error_of(data)
    assert not (tmp_path / "run").exists()

    config = tmp_path / "fusion.yaml"
    config.write_text(yaml.safe_dump(fusion_data(shards, tmp_path / "run")))
    capsys.readouterr()
    assert cli_main(["cold-fusion", "--config", str(config), "iterations=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mftcoder-coba: error: ") and "iterations" in err and len(err.splitlines()) == 1
