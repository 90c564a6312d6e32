"""``eval-code --engine auto|transformers|vllm``: which engine generates, the one-line errors when vLLM cannot,
raw stop sequences applied to the completion only, and (with vllm installed) vLLM's greedy completions and
pass@k equal to transformers' on the same tiny models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_loss import tiny_model_dir
from train_helpers import TINY_LLAMA
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mftcoder_coba.cli import main as cli
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.evaluation.vllm_engine import RUN_CHECKPOINTS, vllm_missing
from mftcoder_coba.models.persist import model_dir_of

VLLM_MISSING = vllm_missing()
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=f"needs vllm: {VLLM_MISSING}")
COMMON = ["--limit", "1", "--n", "1", "--temperature", "0", "--max-new-tokens", "4", "--workers", "1"]


@pytest.fixture(autouse=True)
def _small_vllm_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU build reserves its KV cache up front: 1 GiB is plenty for these models."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def one_error(capsys: pytest.CaptureFixture) -> str:
    """The single error line the CLI printed (log lines aside), with no traceback."""
    return one_error_line(capsys.readouterr().err)


def eval_code(tmp_path: Path, name: str, target: Path, *args: str) -> tuple[dict, list[dict]]:
    """Run ``eval-code`` through the CLI: (summary, per-sample records)."""
    out = tmp_path / f"{name}.json"
    assert cli(["eval-code", str(target), *args, "--out", str(out)]) == 0
    return read_results(out)


def read_results(out: Path) -> tuple[dict, list[dict]]:
    samples = out.with_name(out.stem + ".samples.jsonl").read_text().splitlines()
    return json.loads(out.read_text()), [json.loads(line) for line in samples]


def fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    """``args`` run as a process of its own, without the launcher variables a trainer in this one has set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def eval_code_process(tmp_path: Path, name: str, target: Path, *args: str, rc: int = 0) -> tuple[dict, list[dict], str]:
    """``mftcoder-coba eval-code`` in a process of its own, as users run it (where vLLM may generate: other tests
    in this process may have started torch.distributed): (summary, per-sample records, stderr)."""
    out = tmp_path / f"{name}.json"
    done = fresh_process([sys.executable, "-m", "mftcoder_coba", "eval-code", str(target), *args, "--out", str(out)])
    assert done.returncode == rc, done.stderr[-3000:]
    return (*read_results(out), done.stderr) if rc == 0 else ({}, [], done.stderr)


def one_error_line(stderr: str) -> str:
    """The single error line in a command's ``stderr``, with no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("mftcoder-coba: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def save_with_tokenizer(model: torch.nn.Module, path: Path) -> Path:
    """``model`` saved as a transformers directory with the demo tokenizer, as a user's model directory is."""
    model.save_pretrained(path)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy2(item, path / item.name)
    return path


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tests' tiny Llama (random) with 32-wide attention heads, the smallest vLLM's CPU kernels take."""
    torch.manual_seed(seed)
    options = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = LlamaConfig(**{**options, "max_position_embeddings": 1024, "head_dim": 32},
                         vocab_size=len(AutoTokenizer.from_pretrained(TOKENIZER_DIR)))
    return LlamaForCausalLM(config)


def constant_model_dir(path: Path, token: str) -> Path:
    """A tiny Llama that predicts ``token`` after any context: every token embeds alike, the layers add nothing
    to the residual stream, and only ``token``'s output row is non-zero (aligned with the normed embedding)."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.ones_like(model.model.embed_tokens.weight))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 1.0
    return save_with_tokenizer(model, path)


@pytest.mark.skipif(VLLM_MISSING is None, reason="vllm is installed")
def test_without_vllm_engine_vllm_is_one_line_and_auto_uses_transformers(prepared: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    model = tiny_model_dir(tmp_path / "model", PackedDataset(prepared / "valid").vocab_size)
    assert cli(["eval-code", str(model), *COMMON, "--engine", "vllm"]) == 2
    assert one_error(capsys).startswith("mftcoder-coba: error: --engine vllm: vllm cannot be imported (")
    assert not list(tmp_path.glob("*.json"))
    summary, samples = eval_code(tmp_path, "auto", model, *COMMON)
    assert summary["engine"] == "transformers" and len(samples) == 1
    assert "generation engine: transformers (--engine auto: vllm cannot be imported" in capsys.readouterr().err


def test_targets_vllm_cannot_serve_are_one_line_and_auto_uses_transformers(runs: dict[str, Path], tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """A LoRA adapter, a CGC-LoRA run (and its checkpoints) and a CGC-LoRA 1+N export need mftcoder-coba's
    loading and peft: ``--engine vllm`` names why in one line, whether vllm is installed or not."""
    from mftcoder_coba.export import export_run

    base, adapter = tmp_path / "base", model_dir_of(runs["lora"])
    shutil.copytree(runs["lora"] / "base_model", base)  # the LoRA run's base with its tokenizer: a model directory
    shutil.copytree(runs["lora"] / "tokenizer", base, dirs_exist_ok=True)
    export = export_run(runs["cgc_lora"], tmp_path / "export")
    capsys.readouterr()  # (its log lines, through an earlier test's handler)
    cases = [
        ([str(base), "--adapter", str(adapter)], f"the LoRA adapter {adapter} is applied with peft"),
        ([str(runs["cgc_lora"]), "--task", "unit_tests"], f"{runs['cgc_lora']}: {RUN_CHECKPOINTS}"),
        ([str(runs["none"])], f"{runs['none']}: {RUN_CHECKPOINTS}"),
        ([str(runs["cgc_lora"]), "--all-checkpoints"], f"--engine vllm: {RUN_CHECKPOINTS}"),
        ([str(export), "--task", "unit_tests"], "applies one adapter per task"),
        ([str(base), "--device", "cpu"], "--device cpu: vLLM places the model itself"),
    ]
    for args, message in cases:
        assert cli(["eval-code", *args, *COMMON, "--engine", "vllm"]) == 2, args
        line = one_error(capsys)
        assert line.startswith("mftcoder-coba: error: --engine vllm: ") and message in line, line
        assert line.endswith("; use --engine transformers"), line
    summary, _ = eval_code(tmp_path, "lora", base, "--adapter", str(adapter), *COMMON)
    assert summary["engine"] == "transformers"
    assert "generation engine: transformers (--engine auto: the LoRA adapter" in capsys.readouterr().err
    summary, _ = eval_code(tmp_path, "cgc", export, "--task", "unit_tests", *COMMON, "--engine", "transformers")
    assert summary["engine"] == "transformers" and summary["task"] == "unit_tests"


def test_raw_stop_sequences_apply_to_the_completion_only(tmp_path: Path) -> None:
    """HumanEval prompts end with a newline; a completion starting with ``def`` has not reached the stop
    sequence ``\\ndef`` (transformers' ``stop_strings`` matched across the prompt's end and stopped it there)."""
    model = constant_model_dir(tmp_path / "model", "def")
    summary, samples = eval_code(tmp_path, "raw", model, *COMMON, "--engine", "transformers")
    assert [s["completion"] for s in samples] == ["defdefdefdef"] and summary["engine"] == "transformers"


@needs_vllm
@pytest.mark.slow
def test_vllm_greedy_completions_and_pass_at_k_equal_transformers(tmp_path: Path) -> None:
    """Same model, prompts and settings: vLLM (float32) decodes the same tokens as transformers' batched,
    left-padded ``generate``, so the completions, every sample's outcome and pass@k are equal."""
    model = save_with_tokenizer(tiny_llama(), tmp_path / "model")
    comments = tmp_path / "comments.jsonl"  # a completion continuing the comment passes when it holds an "e"
    test = "import inspect\n\ndef check(candidate):\n    assert 'e' in inspect.getsource(candidate).split('#')[1]\n"
    comments.write_text("".join(json.dumps({
        "task_id": f"comment/{i}", "prompt": f"def f(x):\n    return x * 2  # {word}", "entry_point": "f",
        "test": test}) + "\n"
        for i, word in enumerate(["doubl", "th", "input", "valu", "twic", "as", "a", "numb"])))
    formats = {"raw": ["--limit", "6", "--max-new-tokens", "48"],
               "chat": ["--limit", "6", "--prompt-format", "chat", "--instruction", "", "--max-new-tokens", "24"],
               "comments": ["--benchmark", str(comments), "--max-new-tokens", "6"]}
    for name, args in formats.items():
        common = ["--n", "2", "--k", "1,2", "--temperature", "0", "--batch-size", "4", "--dtype", "fp32",
                  "--workers", "2", *args]
        reference, expected = eval_code(tmp_path, f"hf-{name}", model, *common, "--engine", "transformers")
        summary, samples, _ = eval_code_process(tmp_path, f"vllm-{name}", model, *common, "--engine", "vllm")
        assert summary["engine"] == "vllm" and reference["engine"] == "transformers"
        assert [(s["task_id"], s["completion"]) for s in samples] == [(s["task_id"], s["completion"])
                                                                      for s in expected], name
        assert [s["status"] for s in samples] == [s["status"] for s in expected]
        assert {k: summary[k] for k in ("pass@1", "pass@2", "outcomes")} == \
            {k: reference[k] for k in ("pass@1", "pass@2", "outcomes")}
        assert len({s["completion"] for s in samples}) > 1  # the prompts' completions differ: a real comparison
    assert 0 < summary["pass@1"] < 1  # (comments) some pass, some fail: the pass@k compared is not trivial
    stopped, samples, _ = eval_code_process(tmp_path, "stop", constant_model_dir(tmp_path / "def", "def"), *COMMON)
    assert stopped["engine"] == "vllm" and [s["completion"] for s in samples] == ["defdefdefdef"]


@needs_vllm
@pytest.mark.slow
def test_vllm_sampling_draws_n_completions_per_problem_reproducibly(tmp_path: Path) -> None:
    model = save_with_tokenizer(tiny_llama(), tmp_path / "model")
    common = ["--limit", "2", "--n", "4", "--k", "1,4", "--temperature", "0.8", "--max-new-tokens", "16",
              "--seed", "3", "--workers", "2"]
    summary, samples, _ = eval_code_process(tmp_path, "first", model, *common)  # --engine auto: a plain model
    assert summary["engine"] == "vllm" and summary["n"] == 4 and summary["problems"] == 2
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 4 + ["HumanEval/1"] * 4
    assert [s["sample"] for s in samples] == [0, 1, 2, 3] * 2
    assert len({s["completion"] for s in samples[:4]}) > 1  # sampled, not one completion repeated
    _, again, _ = eval_code_process(tmp_path, "again", model, *common)
    assert [s["completion"] for s in again] == [s["completion"] for s in samples]  # --seed: the same draws


@needs_vllm
def test_a_model_vllm_has_no_implementation_of_is_one_line(tmp_path: Path) -> None:
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    config = OpenAIGPTConfig(vocab_size=len(AutoTokenizer.from_pretrained(TOKENIZER_DIR)), n_positions=256,
                             n_embd=64, n_layer=1, n_head=2)
    model = save_with_tokenizer(OpenAIGPTLMHeadModel(config), tmp_path / "gpt")
    line = one_error_line(eval_code_process(tmp_path, "gpt", model, *COMMON, "--engine", "vllm", rc=2)[2])
    assert f"{model}: vLLM cannot load the model (Model architectures ['OpenAIGPTLMHeadModel'] are not " in line
    assert line.endswith("...)") and len(line) < len(str(model)) + 300, line  # not every architecture vLLM has


@needs_vllm
@pytest.mark.slow
def test_auto_falls_back_to_transformers_when_vllm_cannot_run_the_model(prepared: Path, tmp_path: Path) -> None:
    """The tests' usual tiny Llama has 8-wide attention heads, which vLLM's CPU kernels lack: ``--engine vllm``
    says so in one line, ``auto`` generates with transformers instead."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's GPU attention backends may serve 8-wide heads")
    model = tiny_model_dir(tmp_path / "model", PackedDataset(prepared / "valid").vocab_size)
    _, _, stderr = eval_code_process(tmp_path, "vllm", model, *COMMON, "--engine", "vllm", rc=2)
    assert "vLLM cannot generate (Unsupported CPU attention configuration: head_dim=8" in one_error_line(stderr)
    summary, samples, stderr = eval_code_process(tmp_path, "auto", model, *COMMON)
    assert summary["engine"] == "transformers" and len(samples) == 1
    assert "generating with transformers (--engine auto)" in stderr


@needs_vllm
def test_vllm_stays_out_of_a_process_running_torch_distributed(runs: dict[str, Path], prepared: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The trainer leaves its process group running (``runs`` trained in this process); vLLM's engine would
    destroy it on shutdown under DeepSpeed, which keeps the group cached (the next training run here fails)."""
    from train_helpers import run_config

    from mftcoder_coba.training import train

    assert torch.distributed.is_initialized()
    model = save_with_tokenizer(tiny_llama(), tmp_path / "model")
    capsys.readouterr()
    assert cli(["eval-code", str(model), *COMMON, "--engine", "vllm"]) == 2
    assert "torch.distributed is already running in this process" in one_error(capsys)
    summary, _ = eval_code(tmp_path, "auto", model, *COMMON)
    assert summary["engine"] == "transformers"
    assert "(--engine auto: torch.distributed is already running" in capsys.readouterr().err
    assert (train(run_config(prepared, tmp_path / "run", train={"max_steps": 1})) / "checkpoints").is_dir()


@needs_vllm
@pytest.mark.slow
def test_training_after_vllm_in_the_same_process(prepared: Path, tmp_path: Path) -> None:
    """eval-code (auto: vLLM starts, and on CPU fails on 8-wide heads and hands over to transformers), then two
    training runs in one fresh process: vLLM's engine was shut down when eval-code was done with it, not when the
    garbage collector got to it, which would have destroyed the first run's process group under DeepSpeed."""
    model = tiny_model_dir(tmp_path / "model", PackedDataset(prepared / "valid").vocab_size)
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from train_helpers import run_config
from mftcoder_coba.cli import main
from mftcoder_coba.training import train
assert main(["eval-code", {str(model)!r}, *{COMMON!r}, "--out", {str(tmp_path / "auto.json")!r}]) == 0
for name in ("first", "second"):
    train(run_config(Path({str(prepared)!r}), Path({str(tmp_path)!r}) / name, train={{"max_steps": 1}}))
"""
    done = fresh_process([sys.executable, "-c", script])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generation engine: vllm" in done.stderr
    assert (tmp_path / "second" / "checkpoints").is_dir()
