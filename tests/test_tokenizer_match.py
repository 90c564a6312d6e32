"""A tokenizer that does not belong to the model is refused before training (issue 22, item 7).

The shards' tokenizer (``OUT/tokenizer``) is compared with the tokenizer in ``model.path``: the same files
pass at once, other files with the same vocabulary pass after token-id probes, another vocabulary is one
error line unless ``model.allow_other_tokenizer`` is set; a model directory without a tokenizer is let
through with a warning."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer
from train_helpers import TINY_LLAMA, run_config, run_data, write_config
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mftcoder_coba import cli
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import preflight
from mftcoder_coba.training.tokenizer_match import difference, tokenizer_mismatch

GPT2 = Path("/work/shared/tokenizers/gpt2")
UNIFORM = {"name": "uniform", "options": {}}


def model_dir(target: Path, tokenizer: Path | None, vocab_size: int) -> Path:
    """A tiny Llama saved as a model directory, with ``tokenizer``'s files beside it (none for None)."""
    options = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**options, vocab_size=vocab_size)).save_pretrained(target)
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(target)
    return target


def check(prepared: Path, tmp_path: Path, model: Path, **options: object) -> preflight.Plan:
    cfg = run_config(prepared, tmp_path / "run", balancer=UNIFORM,
                     model={"model_config": None, "path": str(model), **options})
    return preflight.run(cfg, world_size=1, resume=None, on_cuda=False)


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50k-vocabulary model with GPT-2's tokenizer: the demo shards' 1,268-token tokenizer is not its own."""
    return model_dir(tmp_path_factory.mktemp("gpt2") / "model", GPT2, 50257)


def test_shards_of_another_tokenizer_are_refused_in_one_line(prepared: Path, gpt2_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"^config field 'model.path': the shards' tokenizer .* is not the "
                                          r"model's own \(1268 tokens vs 50257\); .*model.allow_other_tokenizer"):
        check(prepared, tmp_path, gpt2_model)
    data = run_data(prepared, tmp_path / "run", balancer=UNIFORM, model={"model_config": None,
                                                                         "path": str(gpt2_model)})
    assert cli.main(["train", "--config", str(write_config(tmp_path / "run.json", data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mftcoder-coba: error: config field 'model.path': the shards' tokenizer")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_deliberate_vocabulary_change_passes_with_the_override(prepared: Path, gpt2_model: Path,
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check(prepared, tmp_path, gpt2_model, allow_other_tokenizer=True)
    assert "model.allow_other_tokenizer is set" in caplog.text


def test_the_models_own_tokenizer_passes(prepared: Path, tmp_path: Path) -> None:
    """The same files pass on their hashes; files written differently (a chat template changed, the config
    re-serialised) pass on the probes."""
    same = model_dir(tmp_path / "same", None, 1268)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, same / name)
    check(prepared, tmp_path, same)
    rewritten = model_dir(tmp_path / "rewritten", TOKENIZER_DIR, 1268)
    config = json.loads((rewritten / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (rewritten / "tokenizer_config.json").write_text(json.dumps(config, indent=4))
    assert tokenizer_mismatch(prepared / "tokenizer", rewritten) is None
    check(prepared, tmp_path, rewritten)


def test_a_model_directory_without_a_tokenizer_passes_with_a_warning(prepared: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    bare = model_dir(tmp_path / "bare", None, 1268)
    with caplog.at_level(logging.WARNING):
        check(prepared, tmp_path, bare)
    assert "holds no tokenizer: cannot check" in caplog.text


def test_same_size_other_ids_differ(tmp_path: Path) -> None:
    """Two tokenizers of one size whose added tokens took each other's ids: the vocabularies differ."""
    loaded = []
    for name, specials in (("a", ["<|a|>", "<|b|>"]), ("b", ["<|b|>", "<|a|>"])):
        shutil.copytree(GPT2, tmp_path / name)
        backend = Tokenizer.from_file(str(tmp_path / name / "tokenizer.json"))
        backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
        backend.save(str(tmp_path / name / "tokenizer.json"))
        loaded.append(AutoTokenizer.from_pretrained(tmp_path / name))
    assert difference(*loaded) == "2 tokens have other ids (e.g. '<|a|>': 50257 vs 50258)"
    assert difference(loaded[0], loaded[0]) is None


def test_cold_fusion_refuses_contributors_with_different_tokenizers(tmp_path: Path) -> None:
    """ColD Fusion averages the contributors' models, so one id must mean one token in all of them: two
    tokenizers of one size whose added tokens swapped ids are refused before any work (the vocabulary-size
    check let them through, and the second contributor trained on ids the shared model read otherwise)."""
    from prep_helpers import tokenizer_copy

    from mftcoder_coba import config_io
    from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
    from mftcoder_coba.demo_data import DEMO_TASKS
    from mftcoder_coba.fusion import FusionConfig, run_cold_fusion

    contributors = []
    for name, task, added in (("alice", "unit_tests", ("<|a|>", "<|b|>")), ("bob", "code_completion",
                                                                          ("<|b|>", "<|a|>"))):
        tokenizer = tokenizer_copy(tmp_path / f"tokenizer-{name}", fim_tokens=added)
        prepare(PrepOptions(tasks={task: DEMO_TASKS[task]}, tokenizer=tokenizer, seq_len=64, out=tmp_path / name,
                            valid_samples_per_task=4, seed=0, progress=False))
        contributors.append({"name": name, "train": str(tmp_path / name / "train"),
                             "valid": str(tmp_path / name / "valid")})
    data = {"run_dir": str(tmp_path / "run"), "iterations": 1, "contributors": contributors,
            "template": {"model": {"model_config": dict(TINY_LLAMA), "dtype": "fp32", "attn_implementation": "sdpa"},
                         "balancer": UNIFORM, "train": {"max_steps": 2, "micro_batch_size": 2,
                                                        "global_batch_size": 4}}}
    with pytest.raises(ConfigError, match=r"^config field 'contributors\[1\].valid': prepared with another "
                                          r"tokenizer than 'alice' \(2 tokens have other ids"):
        run_cold_fusion(config_io.build(FusionConfig, data))
    assert not (tmp_path / "run").exists()
