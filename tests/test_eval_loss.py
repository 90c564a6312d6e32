"""``mftcoder-coba eval``: per-task loss of runs, exports, model directories and adapters equals an independent
float64 per-task loss computed with plain transformers (the model's own logits) on the same rows."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import TINY_LLAMA
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mftcoder_coba.cli import main as cli
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.loss import evaluate_split
from mftcoder_coba.evaluation.targets import load_model, resolve_target
from mftcoder_coba.models.persist import model_dir_of


def tiny_model_dir(path: Path, vocab_size: int, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama saved as a transformers directory with the demo tokenizer."""
    torch.manual_seed(seed)
    options = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**{**options, "max_position_embeddings": 1024}, vocab_size=vocab_size))
    model.save_pretrained(path)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy2(item, path / item.name)
    return path


def segment_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(L, V) logits of one packed row, each packed sample run through the model as its own sequence.

    Independent of transformers' packed-sequence detection: a plain ``model(input_ids, position_ids)`` call
    with the KV cache on (the default) lets tokens attend across samples."""
    starts = [0, *(i for i in range(1, len(position_ids)) if position_ids[i] != position_ids[i - 1] + 1),
              len(position_ids)]
    return torch.cat([model(input_ids=input_ids[None, a:b], position_ids=position_ids[None, a:b]).logits[0]
                      for a, b in itertools.pairwise(starts)])


def reference(models: dict[str, torch.nn.Module], dataset: PackedDataset) -> dict[str, tuple[float, int]]:
    """Per task: (mean token loss, tokens) from ``models[task]``'s own logits in float64 and torch's
    per-token cross-entropy, over the rows holding the task."""
    out = {}
    for k, task in enumerate(dataset.tasks):
        model = models[task].double().eval()
        batch = {key: torch.as_tensor(v) for key, v in dataset.rows(dataset.task_rows(k)).items()}
        with torch.no_grad():
            logits = torch.stack([segment_logits(model, ids, pos)
                                  for ids, pos in zip(batch["input_ids"], batch["position_ids"])])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none",
                                               ignore_index=-100)
        mine = (batch["task_ids"].flatten() == k) & (batch["labels"].flatten() != -100)
        out[task] = (float(ce[mine].sum() / mine.sum()), int(mine.sum()))
    return out


def run_eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "eval.json"
    assert cli(["eval", *args, "--out", str(out), "--batch-size", "3"]) == 0
    return json.loads(out.read_text())


def assert_matches(result: dict, expected: dict[str, tuple[float, int]]) -> None:
    assert list(result["tasks"]) == list(expected)
    for task, (loss, tokens) in expected.items():
        row = result["tasks"][task]
        assert row["tokens"] == tokens > 0
        assert row["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), task
        assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["mean_loss"] == pytest.approx(np.mean([v[0] for v in expected.values()]), rel=1e-5)


def test_model_directory_matches_plain_transformers(prepared: Path, tmp_path: Path) -> None:
    valid = PackedDataset(prepared / "valid")
    model_dir = tiny_model_dir(tmp_path / "model", valid.vocab_size)
    result = run_eval(tmp_path, str(model_dir), "--data", str(prepared / "valid"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    assert_matches(result, reference({t: model for t in valid.tasks}, valid))
    assert result["rows"] == len(valid) and result["target"]["kind"] == "model"


@pytest.mark.slow
def test_every_row_of_a_larger_split_is_counted(prepared: Path, tmp_path: Path) -> None:
    """The train split (several tasks per packed row): tokens per task equal the split's loss tokens."""
    train_split = PackedDataset(prepared / "train")
    model = load_model(resolve_target(tiny_model_dir(tmp_path / "model", train_split.vocab_size)))
    losses = evaluate_split(model, train_split, micro_batch_size=16)
    labels = np.concatenate([train_split.rows(np.arange(i, min(i + 256, len(train_split))))["labels"]
                             for i in range(0, len(train_split), 256)])
    tasks = np.concatenate([train_split.rows(np.arange(i, min(i + 256, len(train_split))))["task_ids"]
                            for i in range(0, len(train_split), 256)])
    expected = np.bincount(tasks[(labels != -100) & (tasks >= 0)], minlength=len(train_split.tasks))
    np.testing.assert_array_equal(losses.counts, expected)
    assert np.all(losses.sums > 0)


def test_full_and_lora_runs_match_plain_transformers(runs: dict[str, Path], prepared: Path,
                                                     tmp_path: Path) -> None:
    from peft import PeftModel

    valid = PackedDataset(prepared / "valid")
    full = AutoModelForCausalLM.from_pretrained(model_dir_of(runs["none"]), attn_implementation="eager")
    result = run_eval(tmp_path, str(runs["none"]), "--data", str(prepared / "valid"))
    assert_matches(result, reference({t: full for t in valid.tasks}, valid))
    assert result["target"]["step"] == 2

    base_dir = runs["lora"] / "base_model"
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
                                     model_dir_of(runs["lora"]))
    expected = reference({t: lora for t in valid.tasks}, valid)
    assert_matches(run_eval(tmp_path, str(runs["lora"]), "--data", str(prepared / "valid")), expected)
    adapter_on_base = run_eval(tmp_path, str(base_dir), "--adapter", str(model_dir_of(runs["lora"])),
                               "--data", str(prepared / "valid"))
    assert_matches(adapter_on_base, expected)
    with pytest.raises(UserError, match="give the base as TARGET and this adapter as --adapter"):
        resolve_target(model_dir_of(runs["lora"]))  # a trainer's adapter does not name a local base
    config = json.loads((model_dir_of(runs["lora"]) / "adapter_config.json").read_text())
    named = tmp_path / "adapter"
    shutil.copytree(model_dir_of(runs["lora"]), named)
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base_dir)}))
    assert_matches(run_eval(tmp_path, str(named), "--data", str(prepared / "valid")), expected)
    base_alone = run_eval(tmp_path, str(base_dir), "--data", str(prepared / "valid"))
    assert base_alone["mean_loss"] != pytest.approx(adapter_on_base["mean_loss"], rel=1e-6)


def test_cgc_lora_run_and_its_1_plus_n_export_give_each_task_its_adapter(runs: dict[str, Path], prepared: Path,
                                                                          tmp_path: Path) -> None:
    from peft import PeftModel

    from mftcoder_coba.export import export_run

    valid = PackedDataset(prepared / "valid")
    export = export_run(runs["cgc_lora"], tmp_path / "export")
    summary = json.loads((export / "export.json").read_text())
    models = {}
    for entry in summary["tasks"]:
        base = AutoModelForCausalLM.from_pretrained(export / "base", attn_implementation="eager")
        models[entry["name"]] = PeftModel.from_pretrained(base, export / entry["adapter"])
    expected = reference(models, valid)
    from_export = run_eval(tmp_path, str(export), "--data", str(prepared / "valid"))
    assert from_export["target"]["kind"] == "export-1+N"
    assert_matches(from_export, expected)
    assert_matches(run_eval(tmp_path, str(runs["cgc_lora"]), "--data", str(prepared / "valid")), expected)
    by_task_adapter = run_eval(tmp_path, str(export / "base"), "--data", str(prepared / "valid"),
                               *[f"--task-adapter={e['name']}={export / e['adapter']}" for e in summary["tasks"]])
    assert_matches(by_task_adapter, expected)


def test_user_errors_are_one_line(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    valid = PackedDataset(prepared / "valid")
    small = tiny_model_dir(tmp_path / "small", valid.vocab_size - 1)
    cases = [
        ([str(small), "--data", str(prepared / "valid")], "vocabulary"),
        ([str(tmp_path / "missing"), "--data", str(prepared / "valid")], "not a directory"),
        ([str(small), "--data", str(prepared / "valid"), "--task-adapter", "nope=x"], "not among the tasks"),
        ([str(small), "--data", str(prepared / "valid"), "--task-adapter", "broken"], "expected TASK=DIR"),
        ([str(small), "--data", str(prepared / "valid"), "--adapter", str(tmp_path)], "not a peft adapter"),
        ([str(small), "--data", str(prepared / "valid"), "--checkpoint", str(tmp_path)], "not a run directory"),
    ]
    for args, message in cases:
        assert cli(["eval", *args]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("mftcoder-coba: error: ") and message in errors[0], args
    with pytest.raises(UserError, match="not a run directory, an export or a transformers model"):
        resolve_target(tmp_path)


@pytest.mark.distributed
def test_two_ranks_under_torchrun_give_the_single_process_numbers(prepared: Path, tmp_path: Path) -> None:
    import subprocess

    from train_helpers import REPO, cpu_env

    valid = PackedDataset(prepared / "valid")
    model_dir = tiny_model_dir(tmp_path / "model", valid.vocab_size)
    single = run_eval(tmp_path, str(model_dir), "--data", str(prepared / "valid"))
    out = tmp_path / "two.json"
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "mftcoder_coba", "eval",
                           str(model_dir), "--data", str(prepared / "valid"), "--batch-size", "2", "--out", str(out)],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("mean over tasks") == 1  # only rank 0 prints
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    for task, row in single["tasks"].items():
        assert two["tasks"][task]["tokens"] == row["tokens"]
        assert two["tasks"][task]["loss"] == pytest.approx(row["loss"], rel=1e-6)


def test_cgc_lora_generation_per_task_matches_the_export(runs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """eval-code on a CGC-LoRA run gates every generated token with --task; greedy completions equal those of
    the 1+N export with that task's adapter."""
    from mftcoder_coba.export import export_run

    export = export_run(runs["cgc_lora"], tmp_path / "export")
    common = ["--limit", "2", "--n", "1", "--temperature", "0", "--max-new-tokens", "12"]
    completions = {}
    for name, target in (("run", runs["cgc_lora"]), ("export", export)):
        for task in ("code_completion", "unit_tests"):
            out = tmp_path / f"{name}-{task}.json"
            assert cli(["eval-code", str(target), "--task", task, *common, "--out", str(out)]) == 0
            samples = (tmp_path / f"{name}-{task}.samples.jsonl").read_text().splitlines()
            completions[name, task] = [json.loads(line)["completion"] for line in samples]
    assert completions["run", "code_completion"] != completions["run", "unit_tests"]  # the gates differ per task
    assert completions["run", "code_completion"] == completions["export", "code_completion"]
    assert completions["run", "unit_tests"] == completions["export", "unit_tests"]
    capsys.readouterr()
    for target in (runs["cgc_lora"], export):
        assert cli(["eval-code", str(target), *common]) == 2
        assert "choose one with --task" in capsys.readouterr().err


def test_a_models_own_code_runs_only_with_trust_remote_code(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path / "model", 64)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tagged.TaggedForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_tagged.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass TaggedForCausalLM(LlamaForCausalLM):\n    pass\n")
    target = resolve_target(model_dir)
    assert type(load_model(target)).__name__ == "LlamaForCausalLM"
    assert type(load_model(target, trust_remote_code=True)).__name__ == "TaggedForCausalLM"


def test_an_unloadable_model_is_one_error_line(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path / "model", 64)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"model: cannot load the model \("):
        load_model(resolve_target(model_dir))
