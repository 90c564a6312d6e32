"""ColD Fusion end to end on CPU: two contributors with their own shards of the shipped corpus fine-tune a tiny
random-init Llama in turn, the repository averages them, and every task's held-out loss improves on the base;
contributors drawn per iteration, checkpoint selection on held-out loss, fusion weights, unseen tasks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from mftcoder_coba import config_io
from mftcoder_coba.cli import main as cli_main
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.fusion import FusionConfig, format_summary, run_cold_fusion
from mftcoder_coba.fusion.cold_fusion import fusion_weights, sampled_contributors, select_checkpoint

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False}
SHARDS = {"alice": ["text_to_code", "code_to_text"], "bob": ["unit_tests"]}
UNSEEN = {"carol": ["code_completion"]}                     # prepared, kept out of the pool


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each contributor's own prepared data (train/ and valid/), one shared tokenizer."""
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

    root = tmp_path_factory.mktemp("contributors")
    for name, tasks in {**SHARDS, **UNSEEN}.items():
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sampled_contributors_best_checkpoints_and_unseen_tasks(shards, tmp_path) -> None:
    data = fusion_data(shards, tmp_path / "run", iterations=1, contributors_per_iteration=1, seed=5,
                       contributor_selection="best_valid", unseen_steps=2,
                       unseen=[{"name": "carol", "train": str(shards / "carol" / "train"),
                                "valid": str(shards / "carol" / "valid")}])
    data["template"]["train"].update(save_every=1, keep_last=3, max_steps=3)
    data["template"]["balancer"].update(held_out="all", update_interval=1)
    cfg = config_io.build(FusionConfig, data)
    run_dir = run_cold_fusion(cfg)
    lines = [json.loads(line) for line in (run_dir / "fusion_metrics.jsonl").read_text().splitlines()]
    drawn = [c.name for c in sampled_contributors(cfg, 1)]
    assert len(drawn) == 1 and sorted(lines[1]["weights"]) == drawn and lines[1]["weights"][drawn[0]] == 1.0
    assert not (run_dir / "iteration-01" / next(n for n in SHARDS if n not in drawn)).exists()

    # the handed-in checkpoint is the one with the lowest held-out loss in the contributor's metrics.jsonl
    name = drawn[0]
    metrics_path = run_dir / "iteration-01" / name / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    mean = {m["step"]: sum(m["valid_loss"].values()) / len(m["valid_loss"]) for m in metrics if m["step"] >= 1}
    best = min(mean, key=lambda step: (mean[step], step))
    assert lines[1]["selected_step"] == {name: best}
    assert lines[1]["contributors"][name].endswith(f"step-{best:08d}/model")

    # unseen task: base and fused model each fine-tuned 2 steps, held-out loss before and after
    unseen = lines[-1]["unseen"]
    assert unseen["steps"] == 2 and set(unseen["valid_loss"]) == {"base", "fused"}
    for start in ("base", "fused"):
        before, after = unseen["start_loss"][start]["code_completion"], unseen["valid_loss"][start]["code_completion"]
        assert after < before, (start, before, after)
        job = yaml.safe_load((run_dir / "iteration-01" / "unseen" / "carol" / f"{start}.yaml").read_text())
        assert job["train"]["max_steps"] == 2 and job["model"]["path"] == unseen["models"][start]
    assert unseen["models"]["fused"] == lines[-1]["model"]
    table = format_summary(lines)
    assert "unseen task" in table and "code_completion" in table and "fused+2" in table

    # continuing with more iterations: iteration 1 is kept (with its unseen measurement), iteration 2 draws
    # what seed 5 gives for i = 2, and the unseen tasks are measured again from the new last fused model
    more = config_io.build(FusionConfig, {**data, "iterations": 2})
    checkpoints = run_dir / "iteration-01" / name / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    run_cold_fusion(more)
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()} == before
    again = [json.loads(line) for line in (run_dir / "fusion_metrics.jsonl").read_text().splitlines()]
    assert again[:2] == lines
    assert sorted(again[2]["weights"]) == [c.name for c in sampled_contributors(more, 2)]
    assert again[2]["unseen"]["models"]["fused"] == again[2]["model"]


def test_contributor_draws_depend_only_on_seed_and_iteration(shards, tmp_path) -> None:
    def cfg(**fields) -> FusionConfig:
        data = fusion_data(shards, tmp_path / "run", **fields)
        data["contributors"] = [{"name": f"c{i}", "train": str(shards / "alice" / "train"),
                                 "valid": str(shards / "alice" / "valid")} for i in range(8)]
        return config_io.build(FusionConfig, data)

    a, b = cfg(contributors_per_iteration=3, seed=1, iterations=2), cfg(contributors_per_iteration=3, seed=1,
                                                                         iterations=9)
    draws = [[c.name for c in sampled_contributors(a, i)] for i in range(1, 10)]
    assert draws == [[c.name for c in sampled_contributors(b, i)] for i in range(1, 10)]
    assert all(len(d) == 3 == len(set(d)) for d in draws) and len({tuple(d) for d in draws}) > 1
    other = cfg(contributors_per_iteration=3, seed=2)
    assert draws != [[c.name for c in sampled_contributors(other, i)] for i in range(1, 10)]
    assert len(sampled_contributors(cfg(), 1)) == 8                            # default: everyone


def test_fusion_weights_uniform_tokens_given(shards, tmp_path) -> None:
    pool = fusion_data(shards, tmp_path / "run")
    uniform = config_io.build(FusionConfig, pool)
    assert uniform.fusion_weights == "uniform" and fusion_weights(uniform, uniform.contributors) == [0.5, 0.5]
    tokens = config_io.build(FusionConfig, {**pool, "fusion_weights": "tokens"})
    counts = [json.loads((shards / n / "train" / "manifest.json").read_text())["totals"]["tokens"] for n in SHARDS]
    assert fusion_weights(tokens, tokens.contributors) == pytest.approx([c / sum(counts) for c in counts])
    given = fusion_data(shards, tmp_path / "run", fusion_weights="given")
    given["contributors"][0]["weight"], given["contributors"][1]["weight"] = 3.0, 1.0
    given_cfg = config_io.build(FusionConfig, given)
    assert fusion_weights(given_cfg, given_cfg.contributors) == [0.75, 0.25]


def _checkpoint(run: Path, step: int) -> None:
    folder = run / "checkpoints" / f"step-{step:08d}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "trainer_state.json").write_text("{}")


def test_select_checkpoint_reads_the_contributors_metrics(tmp_path) -> None:
    run = tmp_path / "job"
    for step in (2, 4, 6):
        _checkpoint(run, step)
    losses = {0: 3.0, 2: 2.0, 4: 1.5, 6: 1.7}
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "valid_loss": {"a": v, "b": v + 0.2}}) + "\n" for s, v in losses.items()))
    assert select_checkpoint(run, "best_valid") == (run / "checkpoints" / "step-00000004" / "model", 4)
    assert select_checkpoint(run, "last") == (run / "checkpoints" / "step-00000006" / "model", 6)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "valid_loss": {"a": 1.0}}) + "\n")
    with pytest.raises(UserError, match=r"no held-out loss at checkpoint step\(s\) \[4, 6\]"):
        select_checkpoint(run, "best_valid")


def test_new_option_errors_name_their_field(shards, tmp_path) -> None:
    def error_of(data: dict) -> str:
        with pytest.raises(ConfigError) as info:
            run_cold_fusion(config_io.build(FusionConfig, data))
        return str(info.value)

    data = fusion_data(shards, tmp_path / "run", contributors_per_iteration=3)
    assert "contributors_per_iteration" in error_of(data)
    data = fusion_data(shards, tmp_path / "run")
    data["contributors"][0]["weight"] = 2.0
    assert "contributors[0].weight" in error_of(data) and "fusion_weights 'given'" in error_of(data)
    assert "contributors[0].weight" in error_of(fusion_data(shards, tmp_path / "run", fusion_weights="given"))
    data = fusion_data(shards, tmp_path / "run", contributor_selection="best_valid")
    data["template"]["train"]["save_every"] = 0  # final checkpoint only (the default is now periodic)
    assert "contributor_selection" in error_of(data) and "save_every" in error_of(data)
    data["template"]["train"].update(save_every=2, keep_last=1)
    data["template"]["balancer"]["update_interval"] = 2
    assert "max_steps (3) a multiple of balancer.update_interval (2)" in error_of(data)
    data["template"]["train"].update(save_every=1, keep_last=1)
    data["template"]["balancer"]["update_interval"] = 1
    assert "keep_last >= 3" in error_of(data)
    data["template"]["train"]["keep_last"] = 3
    data["template"]["balancer"]["held_out"] = "rotate"  # the default, fixed, measures the same rows each time
    assert "balancer.held_out" in error_of(data)
    unseen = {"name": "again", "train": str(shards / "bob" / "train"), "valid": str(shards / "bob" / "valid")}
    assert "unseen[0]" in error_of(fusion_data(shards, tmp_path / "run", unseen=[unseen]))   # in the pool
    assert "unseen_steps" in error_of(fusion_data(shards, tmp_path / "run", unseen_steps=0))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_fuses_uniformly(tmp_path) -> None:
    from mftcoder_coba.demo import run_demo

    result = run_demo(tmp_path / "demo", steps=1, mode="cold-fusion")
    assert [r.weight for r in result.rows] == [0.25] * 4
    config = yaml.safe_load((tmp_path / "demo" / "run" / "fusion_config.yaml").read_text())
    assert config["fusion_weights"] == "uniform"


def test_shared_models_take_only_the_verified_tokenizer_files(shards, tmp_path) -> None:
    """A file slipped into a contributor's OUT/tokenizer (a key, say) never reaches a shared model directory, and a
    tokenizer file that differs from the manifest's hash is refused, as train refuses it."""
    import shutil

    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.fusion.cold_fusion import _copy_tokenizer

    prepared = tmp_path / "alice"
    shutil.copytree(shards / "alice", prepared)
    (prepared / "tokenizer" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    out = tmp_path / "shared"
    out.mkdir()
    _copy_tokenizer(PackedDataset(prepared / "train"), out)
    assert (out / "tokenizer.json").is_file() and not (out / "id_rsa").exists()
    with open(prepared / "tokenizer" / "tokenizer.json", "a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(UserError, match="differs from the tokenizer the shards were made with"):
        _copy_tokenizer(PackedDataset(prepared / "train"), tmp_path / "other")
