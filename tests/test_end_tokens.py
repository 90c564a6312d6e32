"""An export stops where training taught the model to stop (issue 22, item 6).

A Qwen2.5-base-style tokenizer (EOS ``<|endoftext|>``, ChatML turns closed by ``<|im_end|>``) trains the model
to end replies with ``<|im_end|>``: the export's ``config.json`` / ``generation_config.json`` list both, plain
transformers ``generate`` on the export stops there, ``eval-code`` stops on the same set, and a base model's
list of end ids (Llama 3.1's three) is kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from train_helpers import TINY_LLAMA, run_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.end_tokens import trained_end_ids, turn_end_token
from mftcoder_coba.evaluation.generation import end_token
from mftcoder_coba.export import export_run
from mftcoder_coba.training import train

GPT2 = Path("/work/shared/tokenizers/gpt2")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
LLAMA31 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
           "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
RECORDS = [{"chat_rounds": [{"role": "human", "content": f"Write f{i}."},
                            {"role": "bot", "content": f"def f{i}(): return {i}"}]} for i in range(12)]


def gpt2_tokenizer(target: Path, specials: list[str], template: str | None, **named: str) -> Path:
    """A copy of the GPT-2 tokenizer with ``specials`` added as special tokens, ``template`` as its chat
    template and ``named`` special tokens (``eos_token=...``) set."""
    shutil.copytree(GPT2, target)
    backend = Tokenizer.from_file(str(target / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(target / "tokenizer.json"))
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config.update(named)
    if template is not None:
        config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def qwen_base_tokenizer(target: Path) -> Path:
    """EOS ``<|endoftext|>`` (GPT-2's), turns closed by ``<|im_end|>``: Qwen2.5's base tokenizer in small."""
    return gpt2_tokenizer(target, ["<|im_start|>", "<|im_end|>"], CHATML, eos_token="<|endoftext|>",
                          pad_token="<|endoftext|>")


def prep_and_train(tmp: Path, tokenizer: Path, records: list[dict] = RECORDS, seq_len: int = 64,
                   template: str = "auto", **model: object) -> Path:
    """Prep ``records`` as one task with ``tokenizer`` under ``tmp/prepared``, train a tiny Llama 2 steps."""
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(PrepOptions(tasks={"code": data}, tokenizer=tokenizer, seq_len=seq_len, out=tmp / "prepared",
                        valid_samples_per_task=0, seed=0, progress=False, template=template))
    model_section = {"model_config": {**TINY_LLAMA, "max_position_embeddings": seq_len}, **model}
    cfg = run_config(tmp / "prepared", tmp / "run", model=model_section, data={"valid": None},
                     balancer={"name": "uniform", "options": {}}, train={"max_steps": 2})
    return train(cfg)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("qwen")
    return prep_and_train(tmp, qwen_base_tokenizer(tmp / "tokenizer"))


def always_says(model_dir: Path, token_id: int) -> None:
    """Rewrite an exported tiny Llama so that greedy decoding emits ``token_id`` after any prompt: the
    residual stream is the embedding (attention and MLP outputs zeroed), whose dimension 0 is 1 for every
    token; the final norm keeps only that dimension and the head maps it to ``token_id`` alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 100.0
    model.save_pretrained(model_dir)


@pytest.mark.slow
def test_export_of_a_chatml_run_stops_at_im_end(qwen_run: Path, tmp_path: Path) -> None:
    out = export_run(qwen_run, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == [eos, im_end]
    always_says(out, im_end)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write f."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated[0, prompt["input_ids"].shape[1]:].tolist() == [im_end]  # before: im_end six times
    # eval-code stops on the same set, from the run's tokenizer as from the export's
    assert end_token(tokenizer, model.config.eos_token_id) == [eos, im_end]
    run_tokenizer = AutoTokenizer.from_pretrained(qwen_run / "tokenizer")
    assert end_token(run_tokenizer, None) == [eos, im_end]


@pytest.mark.slow
def test_mftcoder_run_exports_its_markers_as_the_chat_template(tmp_path: Path) -> None:
    """Shards rendered with MFTCoder's role markers (a tokenizer with a ChatML template, --template mftcoder):
    the export's template renders those markers, not the ChatML the model never saw, and stops on EOS only."""
    run = prep_and_train(tmp_path, qwen_base_tokenizer(tmp_path / "tokenizer"), template="mftcoder")
    out = export_run(run, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<s>human\nq\n<s>bot\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def llama31_tokenizer(target: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>"]
    return gpt2_tokenizer(target, specials, LLAMA31, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                          pad_token="<|end_of_text|>")


@pytest.mark.slow
def test_a_base_models_list_of_end_ids_is_kept(tmp_path: Path) -> None:
    """A Llama-3.1-style base (its config lists three end ids, the template ends turns with <|eot_id|>)
    trained from ``model.path`` exports with all three; a default id of a config-built model that is ordinary
    text in this tokenizer (Llama's 2, GPT-2's '#') never becomes a stop token."""
    base = tmp_path / "base"
    tokenizer_dir = llama31_tokenizer(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    options = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**options, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=ids))
    model.generation_config.eos_token_id = ids
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = prep_and_train(tmp_path, base, path=str(base), model_config=None)
    out = export_run(run, tmp_path / "export")
    for name in ("config.json", "generation_config.json"):
        assert sorted(json.loads((out / name).read_text())["eos_token_id"]) == sorted(ids)
    assert turn_end_token(tokenizer) == "<|eot_id|>"
    assert trained_end_ids(tokenizer, "chat", [2]) == [ids[0], ids[2]]
