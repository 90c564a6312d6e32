"""Parameter averaging (the fusion step of ColD Fusion) and the ``fuse`` command: exact arithmetic on full
weights and on LoRA updates, and one-line errors that leave nothing behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from mftcoder_coba.cli import main as cli_main
from mftcoder_coba.errors import UserError
from mftcoder_coba.fusion import average_models

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64)


def llama(seed: int, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides})).to(dtype).eval()


def saved(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def lora_adapter(base_seed: int, seed: int, path: Path, r: int, alpha: float, rslora: bool = False,
                 modules_to_save=None) -> Path:
    """A peft LoRA adapter of the base ``llama(base_seed)`` with random (non-zero) A and B."""
    model = get_peft_model(llama(base_seed, torch.float64),
                           LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "down_proj"],
                                      modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    model.save_pretrained(str(path), save_embedding_layers=False)
    return path


def test_full_models_average_exactly_in_their_sharded_layout(tmp_path) -> None:
    a = saved(llama(0), tmp_path / "a", max_shard_size="40KB")
    b = saved(llama(1), tmp_path / "b", max_shard_size="40KB")
    c = saved(llama(2), tmp_path / "c", max_shard_size="40KB")
    assert (a / "model.safetensors.index.json").is_file()
    out = average_models([a, b, c], tmp_path / "fused", weights=[1, 2, 1])
    ta, tb, tc, fused = tensors(a), tensors(b), tensors(c), tensors(out)
    assert fused.keys() == ta.keys()
    for key, value in fused.items():
        expected = (0.25 * ta[key].double() + 0.5 * tb[key].double() + 0.25 * tc[key].double()).float()
        assert value.dtype == torch.float32 and torch.equal(value, expected), key
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in a.glob("*.safetensors"))
    assert json.loads((out / "fusion.json").read_text())["weights"] == [0.25, 0.5, 0.25]
    reloaded = LlamaForCausalLM.from_pretrained(out)                  # loads as a plain transformers model
    torch.testing.assert_close(reloaded.model.norm.weight, fused["model.norm.weight"])


def test_lora_updates_are_averaged_not_their_factors(tmp_path) -> None:
    base = saved(llama(0, torch.float64), tmp_path / "base")
    one = lora_adapter(0, 1, tmp_path / "one", r=2, alpha=4.0)
    two = lora_adapter(0, 2, tmp_path / "two", r=4, alpha=2.0, rslora=True)
    out = average_models([one, two], tmp_path / "merged", weights=[3, 1], base_dir=base)
    w_base, w_out, t1, t2 = tensors(base), tensors(out), tensors(one), tensors(two)
    changed = 0
    for key, weight in w_base.items():
        module = "base_model.model." + key[: -len(".weight")]
        if f"{module}.lora_A.weight" not in t1:
            assert torch.equal(w_out[key], weight), key
            continue
        d1 = (4.0 / 2) * t1[f"{module}.lora_B.weight"] @ t1[f"{module}.lora_A.weight"]
        d2 = (2.0 / 4 ** 0.5) * t2[f"{module}.lora_B.weight"] @ t2[f"{module}.lora_A.weight"]
        torch.testing.assert_close(w_out[key], weight + 0.75 * d1 + 0.25 * d2, rtol=0, atol=1e-14)
        changed += 1
    assert changed == 4                                             # q_proj and down_proj of 2 layers

    # without a base: one exact adapter of rank 2 + 4 that peft loads and that equals the merged model
    stacked = average_models([one, two], tmp_path / "stacked", weights=[3, 1])
    config = json.loads((stacked / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 6, False)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        via_adapter = PeftModel.from_pretrained(llama(0, torch.float64), stacked).eval()(input_ids=ids).logits
        via_merge = LlamaForCausalLM.from_pretrained(out, dtype=torch.float64).eval()(input_ids=ids).logits
    torch.testing.assert_close(via_adapter, via_merge, rtol=1e-10, atol=1e-10)


def test_lora_modules_to_save_are_averaged_as_parameters(tmp_path) -> None:
    base = saved(llama(0, torch.float64), tmp_path / "base")
    one = lora_adapter(0, 1, tmp_path / "one", r=2, alpha=2.0, modules_to_save=["lm_head"])
    two = lora_adapter(0, 2, tmp_path / "two", r=2, alpha=2.0, modules_to_save=["lm_head"])
    out = average_models([one, two], tmp_path / "merged", base_dir=base)
    head1, head2 = tensors(one)["base_model.model.lm_head.weight"], tensors(two)["base_model.model.lm_head.weight"]
    torch.testing.assert_close(tensors(out)["lm_head.weight"], 0.5 * head1 + 0.5 * head2, rtol=0, atol=1e-15)
    # same ranks and scaling, so averaging the factors separately is possible, and gives a different model
    t1, t2, key = tensors(one), tensors(two), "model.layers.0.self_attn.q_proj.weight"
    a1, b1 = t1[f"base_model.model.{key[:-7]}.lora_A.weight"], t1[f"base_model.model.{key[:-7]}.lora_B.weight"]
    a2, b2 = t2[f"base_model.model.{key[:-7]}.lora_A.weight"], t2[f"base_model.model.{key[:-7]}.lora_B.weight"]
    merged = tensors(out)[key] - tensors(base)[key]
    torch.testing.assert_close(merged, 0.5 * b1 @ a1 + 0.5 * b2 @ a2, rtol=0, atol=1e-14)
    assert (merged - (0.5 * b1 + 0.5 * b2) @ (0.5 * a1 + 0.5 * a2)).abs().max() > 1e-3


def _fuse(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()                                    # drop the set-up's progress bars
    code = cli_main(["fuse", *argv])
    return code, capsys.readouterr().err.strip()


def test_fuse_command_and_its_errors(tmp_path, capsys) -> None:
    a = saved(llama(0), tmp_path / "a")
    b = saved(llama(1), tmp_path / "b")
    # a run directory stands for its newest complete checkpoint's model
    run = tmp_path / "run"
    shutil.copytree(b, run / "checkpoints" / "step-00000004" / "model")
    (run / "checkpoints" / "step-00000009.tmp").mkdir()
    code, err = _fuse(capsys, str(a), str(run), "--out", str(tmp_path / "fused"), "--weights", "1", "1")
    assert code == 0 and "error" not in err                               # stderr holds the log only
    assert torch.equal(tensors(tmp_path / "fused")["lm_head.weight"],
                       ((tensors(a)["lm_head.weight"].double() + tensors(b)["lm_head.weight"].double()) / 2).float())

    wide = saved(llama(2, hidden_size=48), tmp_path / "wide")
    torch.manual_seed(3)
    mistral = saved(MistralForCausalLM(MistralConfig(**SMALL)), tmp_path / "mistral")
    adapter = lora_adapter(0, 1, tmp_path / "adapter", r=2, alpha=2.0)
    (tmp_path / "empty").mkdir()
    cgc = tmp_path / "cgc"
    cgc.mkdir()
    (cgc / "cgc_lora.json").write_text("{}")
    cases = [
        ([str(a), str(tmp_path / "nope")], "nope: not found"),
        ([str(a), str(tmp_path / "empty")], "neither a transformers model directory"),
        ([str(a), str(wide)], "has shape"),
        ([str(a), str(mistral)], "different architectures"),
        ([str(a), str(adapter)], "cannot mix full models and LoRA adapters"),
        ([str(a), str(cgc)], "CGC-LoRA checkpoint cannot be fused"),
        ([str(a), str(b), "--weights", "1"], "1 weights given for 2 models"),
        ([str(a), str(b), "--weights", "1", "-1"], "non-negative"),
    ]
    for inputs, message in cases:
        code, err = _fuse(capsys, *inputs, "--out", str(tmp_path / "bad"))
        assert code == 2 and err.startswith("mftcoder-coba: error: ") and message in err, (inputs, err)
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    code, err = _fuse(capsys, str(a), str(b), "--out", str(tmp_path / "fused"))
    assert code == 2 and "already exists" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary directories left


def test_average_refuses_lora_adapters_of_other_modules(tmp_path) -> None:
    one = lora_adapter(0, 1, tmp_path / "one", r=2, alpha=2.0)
    model = get_peft_model(llama(0, torch.float64), LoraConfig(r=2, target_modules=["v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(UserError, match="adapts other modules"):
        average_models([one, tmp_path / "other"], tmp_path / "out")


def test_fused_output_is_marked_and_never_inside_an_input_or_a_run(tmp_path, capsys) -> None:
    a = saved(llama(0), tmp_path / "a")
    b = saved(llama(1), tmp_path / "b")
    out = average_models([a, b], tmp_path / "fused")
    assert (out / ".mftcoder-coba-output").read_text().strip() == "fused-model"
    again = average_models([out, a], tmp_path / "fused2")       # a fused input's marker is not copied over
    assert (again / ".mftcoder-coba-output").read_text().strip() == "fused-model"
    assert json.loads((again / "fusion.json").read_text())["inputs"] == [str(out), str(a)]
    run = tmp_path / "run"
    shutil.copytree(b, run / "checkpoints" / "step-00000004" / "model")
    (run / "config.yaml").write_text("{}")
    cases = [
        (a / "fused", "lies inside the input"),
        (a, "is, holds or lies inside the input"),
        (tmp_path, "holds or lies inside the input"),
        (run / "fused", "lies inside the run directory"),
    ]
    for dest, message in cases:
        with pytest.raises(UserError, match=message):
            average_models([a, run / "checkpoints" / "step-00000004" / "model"], dest)
    code, err = _fuse(capsys, str(a), str(run), "--out", str(run / "fused"))
    assert code == 2 and "run directory" in err and len(err.splitlines()) == 1
    assert not (a / "fused").exists() and not (run / "fused").exists()
