"""CGC-LoRA: the task gate, the gated update against a float64 reference, parameter parity with plain
LoRA, task clusters, the two scaling modes, the effective rank, the "1+N" export reproduced through peft,
and save/load."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from train_helpers import run_config
from transformers import LlamaConfig, LlamaForCausalLM

from mftcoder_coba.atomic import mark_output
from mftcoder_coba.config_io import build
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models.cgc_config import CgcLoraConfig
from mftcoder_coba.models.cgc_export import export_task_adapters
from mftcoder_coba.models.cgc_lora import (
    apply_cgc_lora,
    cgc_layers,
    cgc_state_dict,
    load_cgc,
    load_cgc_config,
    save_cgc,
    set_task_ids,
    task_ids_context,
)
from mftcoder_coba.models.layers import enable_checkpointing

NUM_TASKS = 3


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial experts and gates (B starts at zero and the gate map at zero after init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cgc_layers(model).values():
            for p in (layer.cgc.lora_B, layer.cgc.gate.weight, layer.cgc.gate.bias, layer.cgc.task_embedding.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


class OneLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


TASKS = ["code", "text", "tests"]


def one_layer(cfg: CgcLoraConfig, seed: int = 0) -> OneLinear:
    torch.manual_seed(seed)
    module = apply_cgc_lora(OneLinear(12, 10), dataclasses.replace(cfg, target_modules=["proj"]), NUM_TASKS,
                            TASKS)
    randomise(module, seed + 1)
    return module


def reference_output(module: OneLinear, cfg: CgcLoraConfig, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in float64: base + sum over the token's experts (the common ones
    and its cluster's) of softmax-gate weight of its cluster * scale_e * B_e A_e x, with scale_e = alpha / r_e
    (scaling expert) or alpha / sum of all ranks (scaling total)."""
    layer = module.proj
    clusters = list(dict.fromkeys(cfg.clusters[t] for t in TASKS)) if cfg.clusters else TASKS
    cluster_of = [clusters.index(cfg.clusters[t]) if cfg.clusters else i for i, t in enumerate(TASKS)]
    ranks = cfg.expert_ranks(len(clusters))
    starts = [sum(ranks[:e]) for e in range(len(ranks))]
    a, b = layer.cgc.lora_A.double(), layer.cgc.lora_B.double()
    emb, gate_w, gate_b = (layer.cgc.task_embedding.weight.double(), layer.cgc.gate.weight.double(),
                           layer.cgc.gate.bias.double())
    common, per_task = cfg.num_common_experts, cfg.num_task_experts
    out = torch.empty(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]):
        pos = tuple(pos.tolist())
        xi = x[pos].double()
        y = layer.weight.double() @ xi + layer.bias.double()
        t = int(task_ids[pos])
        if t < 0:
            experts, gates = list(range(common)), [1.0 / common] * common
        else:
            k = cluster_of[t]
            experts = list(range(common)) + [common + k * per_task + j for j in range(per_task)]
            gates = torch.softmax(gate_w @ emb[k] + gate_b, dim=0).tolist()
        for e, g in zip(experts, gates):
            rows = slice(starts[e], starts[e] + ranks[e])
            scale = cfg.alpha / (ranks[e] if cfg.scaling == "expert" else sum(ranks))
            y = y + g * scale * (b[:, rows] @ (a[rows] @ xi))
        out[pos] = y
    return out


def test_default_ranks_match_plain_lora_parameters() -> None:
    cfg = CgcLoraConfig()
    assert cfg.expert_ranks(3) == [4, 3, 3, 3, 3] and sum(cfg.expert_ranks(5)) == cfg.rank_budget
    cgc = apply_cgc_lora(tiny_llama(), cfg, NUM_TASKS)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=cfg.rank_budget, target_modules=cfg.target_modules))
    plain_count = sum(p.numel() for n, p in plain.named_parameters() if p.requires_grad)
    expert_count = sum(p.numel() for n, p in cgc.named_parameters() if "lora_" in n)
    gate_count = sum(p.numel() for n, p in cgc.named_parameters() if p.requires_grad and "lora_" not in n)
    layers = len(cgc_layers(cgc))
    assert layers == 2 * 7
    assert expert_count == plain_count
    c_plus_s = cfg.num_common_experts + cfg.num_task_experts
    assert gate_count == layers * (NUM_TASKS * cfg.task_embedding_dim + c_plus_s * (cfg.task_embedding_dim + 1))
    trainable = {n for n, p in cgc.named_parameters() if p.requires_grad}
    assert trainable and all(".cgc." in n for n in trainable)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="model.cgc_lora.dropout"):
        build(CgcLoraConfig, {"dropout": 1.5}, prefix="model.cgc_lora.")  # the loader nests it there
    with pytest.raises(ConfigError, match="model.cgc_lora.rank_budget"):
        apply_cgc_lora(tiny_llama(), CgcLoraConfig(rank_budget=4), NUM_TASKS)
    with pytest.raises(UserError, match="target_modules"):
        apply_cgc_lora(tiny_llama(), CgcLoraConfig(target_modules=["qkv"]), NUM_TASKS)


def test_gate_is_a_softmax_over_common_and_own_experts_only() -> None:
    cfg = CgcLoraConfig(num_common_experts=2, num_task_experts=2, rank_budget=16, dropout=0.0)
    experts = one_layer(cfg).proj.cgc
    weights = experts.expert_weights().detach()
    logits = experts.gate(experts.task_embedding.weight).detach()
    assert weights.shape == (NUM_TASKS + 1, 2 + 2 * NUM_TASKS)
    for t in range(NUM_TASKS):
        own = [0, 1, 2 + 2 * t, 3 + 2 * t]
        torch.testing.assert_close(weights[t, own], torch.softmax(logits[t], 0), rtol=0, atol=1e-15)
        others = [e for e in range(weights.shape[1]) if e not in own]
        assert torch.all(weights[t, others] == 0)
    torch.testing.assert_close(weights[NUM_TASKS], torch.tensor([0.5, 0.5] + [0.0] * 6, dtype=torch.float64))


@pytest.mark.parametrize("cfg", [CgcLoraConfig(dropout=0.0, rank_budget=11),
                                 CgcLoraConfig(num_common_experts=1, num_task_experts=2, expert_rank=2, dropout=0.0),
                                 CgcLoraConfig(dropout=0.0, rank_budget=11, scaling="total"),
                                 CgcLoraConfig(dropout=0.0, rank_budget=8, clusters={"code": "gen", "text": "doc",
                                                                                     "tests": "gen"})])
def test_layer_output_matches_float64_reference_with_per_token_tasks(cfg: CgcLoraConfig) -> None:
    module = one_layer(cfg)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    task_ids = torch.tensor([[0, 0, 2, 2, -1], [1, 1, 1, 0, -1]])
    with task_ids_context(module, task_ids):
        out = module(x)
    torch.testing.assert_close(out, reference_output(module, cfg, x, task_ids), rtol=1e-12, atol=1e-12)
    # packed rows flattened into one sequence (varlen attention) keep their tokens' task ids
    with task_ids_context(module, task_ids):
        flat = module(x.reshape(1, 10, 12))
    torch.testing.assert_close(flat, out.reshape(1, 10, 10), rtol=0, atol=0)
    # one task per row broadcasts over positions
    rows = torch.tensor([2, 1])
    with task_ids_context(module, rows):
        out = module(x)
    torch.testing.assert_close(out, reference_output(module, cfg, x, rows[:, None].expand(2, 5)),
                               rtol=1e-12, atol=1e-12)


def test_other_tasks_experts_neither_contribute_nor_get_gradient() -> None:
    cfg = CgcLoraConfig(num_common_experts=1, num_task_experts=1, expert_rank=3, dropout=0.0)
    module = one_layer(cfg)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    task_ids = torch.tensor([[0, 0, 2, -1], [2, 0, 0, 2]])
    experts = module.proj.cgc
    task1_columns = slice(3 * (1 + 1), 3 * (1 + 2))          # expert 2 = task 1's own expert
    with task_ids_context(module, task_ids):
        before = module(x).detach()
        with torch.no_grad():
            experts.lora_A[task1_columns] += 5.0
            experts.lora_B[:, task1_columns] += 5.0
            experts.task_embedding.weight[1] += 5.0
        after = module(x)
        after.sum().backward()
    assert torch.equal(before, after.detach())
    assert torch.all(experts.lora_A.grad[task1_columns] == 0)
    assert torch.all(experts.lora_B.grad[:, task1_columns] == 0)
    assert torch.all(experts.task_embedding.weight.grad[1] == 0)
    assert experts.lora_A.grad[: 3 * 2].abs().sum() > 0      # the common and task-0 experts learn
    with task_ids_context(module, torch.ones(2, 4, dtype=torch.long)):
        assert not torch.allclose(module(x), before)          # task 1 tokens do see the change


def test_task_ids_are_checked() -> None:
    module = one_layer(CgcLoraConfig(dropout=0.0))
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="without task ids"):
        module(x)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        set_task_ids(module, torch.tensor([[0, 3, 0, 0]]))
    with pytest.raises(RuntimeError, match="do not match"):
        with task_ids_context(module, torch.zeros(2, 5, dtype=torch.long)):
            module(x)
    with task_ids_context(module, torch.zeros(2, 4, dtype=torch.long)):
        module(x)
    with pytest.raises(RuntimeError, match="without task ids"):   # the context restored "unset"
        module(x)


def test_set_task_ids_survives_gradient_checkpointing_recompute() -> None:
    ids = torch.randint(0, 128, (2, 8))
    task_ids = torch.tensor([[0] * 5 + [1] * 3, [2] * 6 + [-1] * 2])
    grads = []
    for checkpointing in (False, True):
        model = apply_cgc_lora(tiny_llama(), CgcLoraConfig(dropout=0.0), NUM_TASKS)
        randomise(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model, {"use_reentrant": False})  # either transformers name
        set_task_ids(model, task_ids)
        model(input_ids=ids).logits.square().mean().backward()   # backward recomputes after the forward
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scaling", ["expert", "total"])
def test_exported_task_adapters_reproduce_the_gated_model(tmp_path, scaling: str) -> None:
    model = apply_cgc_lora(tiny_llama(), CgcLoraConfig(dropout=0.0, rank_budget=9, scaling=scaling), NUM_TASKS)
    randomise(model)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    out = export_task_adapters(model, tmp_path / "export", TASKS, tokenizer_dir, merged=True)
    summary = json.loads((out / "export.json").read_text())
    assert [t["rank"] for t in summary["tasks"]] == [2 + 2 + 2, 2 + 2 + 2, 2 + 2 + 1]   # 9 = 2,2 | 2 | 2 | 1
    assert [t["cluster"] for t in summary["tasks"]] == TASKS                           # one cluster per task
    assert (summary["rank_budget"], summary["num_experts"], summary["experts_per_task"]) == (9, 5, 3)
    assert summary["scaling"] == scaling
    assert (out / "base" / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 128, (2, 7))
    outputs = []
    for t, name in enumerate(TASKS):
        with torch.no_grad(), task_ids_context(model, torch.full((2, 7), t)):
            expected = model(input_ids=ids).logits
        outputs.append(expected)
        base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float64)
        adapted = PeftModel.from_pretrained(base, out / "adapters" / name).eval()
        merged = LlamaForCausalLM.from_pretrained(out / "merged" / name, dtype=torch.float64).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(outputs[0], outputs[1])            # the tasks really differ
    with pytest.raises(UserError, match="already exists"):
        export_task_adapters(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]   # no temporary left behind


CLUSTERS = {"code": "gen", "text": "doc", "tests": "gen"}


def test_clusters_share_experts_gate_and_one_exported_adapter(tmp_path) -> None:
    cfg = CgcLoraConfig(dropout=0.0, rank_budget=8, clusters=CLUSTERS)
    model = apply_cgc_lora(tiny_llama(), cfg, NUM_TASKS, TASKS)
    randomise(model)
    layer = next(iter(cgc_layers(model).values())).cgc
    # 2 common + 2 clusters x 1 expert, one gate input per cluster
    assert layer.num_experts == 4 and layer.task_embedding.weight.shape[0] == 2
    assert cfg.expert_ranks(2) == [2, 2, 2, 2] and cfg.effective_ranks(2) == [6, 6]
    ids = torch.randint(0, 128, (2, 7))
    logits = []
    for t in range(NUM_TASKS):
        with torch.no_grad(), task_ids_context(model, torch.full((2, 7), t)):
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[2])                     # code and tests: the same cluster
    assert not torch.allclose(logits[0], logits[1])

    out = export_task_adapters(model, tmp_path / "export", merged=True)
    summary = json.loads((out / "export.json").read_text())
    assert {t["name"]: t["cluster"] for t in summary["tasks"]} == CLUSTERS
    assert [(c["cluster"], c["tasks"], c["rank"]) for c in summary["clusters"]] == \
        [("gen", ["code", "tests"], 6), ("doc", ["text"], 6)]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["doc", "gen"]
    for t, name in enumerate(TASKS):
        base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float64)
        adapted = PeftModel.from_pretrained(base, out / "adapters" / CLUSTERS[name]).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, logits[t], rtol=1e-10, atol=1e-10)
    with pytest.raises(UserError, match="differ from the model's"):
        export_task_adapters(model, tmp_path / "renamed", ["a", "b", "c"])

    # the layout (tasks and their clusters) travels with a checkpoint and is checked on load
    save_cgc(model, tmp_path / "ckpt")
    saved_cfg, names = load_cgc_config(tmp_path / "ckpt")
    assert names == TASKS and saved_cfg.clusters == CLUSTERS
    fresh = apply_cgc_lora(tiny_llama(), saved_cfg, NUM_TASKS, names)
    load_cgc(fresh, tmp_path / "ckpt")
    with torch.no_grad(), task_ids_context(fresh, torch.full((2, 7), 2)):
        assert torch.equal(fresh(input_ids=ids).logits, logits[2])
    regrouped = apply_cgc_lora(tiny_llama(), dataclasses.replace(cfg, clusters={"code": "gen", "text": "gen",
                                                                                "tests": "doc"}), NUM_TASKS, TASKS)
    with pytest.raises(UserError, match="task_clusters"):
        load_cgc(regrouped, tmp_path / "ckpt")


def test_cluster_mapping_errors_name_the_field() -> None:
    def error(clusters: dict, names=TASKS) -> str:
        with pytest.raises(ConfigError) as info:
            apply_cgc_lora(tiny_llama(), CgcLoraConfig(clusters=clusters, rank_budget=8), len(names), names)
        return str(info.value)

    message = error({"code": "gen", "text": "doc", "tset": "gen"})
    assert "model.cgc_lora.clusters" in message and "tset not in the data" in message \
        and "no cluster for task(s) tests" in message and len(message.splitlines()) == 1
    assert "model.cgc_lora.clusters" in error({"code": "gen"})
    with pytest.raises(ConfigError, match="model.cgc_lora.clusters.*directory names"):
        build(CgcLoraConfig, {"clusters": {"code": "../up"}})
    with pytest.raises(ValueError, match="task names"):
        apply_cgc_lora(tiny_llama(), CgcLoraConfig(clusters=CLUSTERS), NUM_TASKS)


def test_scaling_total_is_smaller_by_the_total_over_expert_rank() -> None:
    """MOELoRA's alpha/R against the per-expert alpha/r_e: with equal expert ranks the whole update (same
    experts, same gate) differs by exactly R / r_e = E."""
    expert_cfg = CgcLoraConfig(dropout=0.0, expert_rank=2)
    deltas = {}
    for scaling in ("expert", "total"):
        module = one_layer(dataclasses.replace(expert_cfg, scaling=scaling))
        x = torch.randn(2, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad(), task_ids_context(module, torch.tensor([[0, 1, 2, -1], [2, 2, 1, 0]])):
            deltas[scaling] = module.proj.cgc(x)
    experts = 2 + NUM_TASKS
    torch.testing.assert_close(deltas["expert"], experts * deltas["total"], rtol=1e-12, atol=0)
    # with uneven ranks, column by column: alpha/r_e over alpha/R
    cfg = CgcLoraConfig(rank_budget=11)
    ranks = cfg.expert_ranks(NUM_TASKS)
    ratios = [e / t for e, t in zip(cfg.expert_scales(ranks),
                                    dataclasses.replace(cfg, scaling="total").expert_scales(ranks))]
    assert ratios == pytest.approx([11 / r for r in ranks], rel=1e-15)


def test_effective_rank_is_logged(caplog) -> None:
    names = [f"t{i}" for i in range(8)]
    with caplog.at_level(logging.INFO, logger="mftcoder_coba.models.cgc_lora"):
        apply_cgc_lora(tiny_llama(), CgcLoraConfig(rank_budget=16), 8, names)
    assert "each task uses 2+1 experts of total rank 5-6 (budget 16 over 10 experts: 2 common + 8 clusters x 1)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mftcoder_coba.models.cgc_lora"):
        apply_cgc_lora(tiny_llama(), CgcLoraConfig(rank_budget=16, scaling="total",
                                                   clusters={n: f"c{i % 2}" for i, n in enumerate(names)}), 8, names)
    assert "each task uses 2+1 experts of total rank 12 (budget 16 over 4 experts: 2 common + 2 clusters x 1); " \
        "scaling total: alpha/R = 1" in caplog.text


def test_export_replaces_only_its_own_output_outside_inputs_and_runs(tmp_path) -> None:
    model = apply_cgc_lora(tiny_llama(), CgcLoraConfig(dropout=0.0, rank_budget=9), NUM_TASKS, TASKS)
    out = export_task_adapters(model, tmp_path / "export")
    assert (out / ".mftcoder-coba-output").read_text().strip() == "export"
    (out / "stale.txt").write_text("old")
    export_task_adapters(model, out, overwrite=True)                # its own marked output: replaced
    assert not (out / "stale.txt").exists() and (out / "adapters" / "tests").is_dir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not this tool's export output"):
        export_task_adapters(model, notes, overwrite=True)
    assert (notes / "keep.txt").read_text() == "mine"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="inside the run directory"):
        export_task_adapters(model, run / "export")
    with pytest.raises(UserError, match="input"):
        export_task_adapters(model, tmp_path / "data" / "export", inputs=[tmp_path / "data"])
    mark_output(notes, "fused-model")
    with pytest.raises(UserError, match="not this tool's export output"):
        export_task_adapters(model, notes, overwrite=True)


def test_save_load_round_trip_and_layout_mismatch(tmp_path) -> None:
    cfg = CgcLoraConfig(dropout=0.0)
    model = apply_cgc_lora(tiny_llama(), cfg, NUM_TASKS)
    randomise(model)
    save_cgc(model, tmp_path / "ckpt")
    fresh = apply_cgc_lora(tiny_llama(), cfg, NUM_TASKS)
    load_cgc(fresh, tmp_path / "ckpt")
    saved, loaded = cgc_state_dict(model), cgc_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids, task_ids = torch.randint(0, 128, (1, 6)), torch.tensor([[0, 0, 1, 1, 2, -1]])
    with torch.no_grad(), task_ids_context(model, task_ids), task_ids_context(fresh, task_ids):
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    other = apply_cgc_lora(tiny_llama(), cfg, NUM_TASKS + 1)
    with pytest.raises(UserError, match="num_tasks"):
        load_cgc(other, tmp_path / "ckpt")
    with pytest.raises(UserError, match="not found"):
        load_cgc(fresh, tmp_path / "missing")


DEMO_CLUSTERS = {"code_completion": "code", "text_to_code": "code", "unit_tests": "code", "code_to_text": "text"}


def test_trained_run_with_clusters_exports_one_adapter_per_cluster(prepared: Path,
                                                                     tmp_path: Path) -> None:
    from mftcoder_coba.export import export_run
    from mftcoder_coba.training import train

    model = {"adapter": "cgc_lora", "cgc_lora": {"dropout": 0.0, "rank_budget": 8, "clusters": DEMO_CLUSTERS}}
    missing = {**model, "cgc_lora": {**model["cgc_lora"], "clusters": {"code_completion": "code"}}}
    with pytest.raises(ConfigError, match="model.cgc_lora.clusters.*no cluster for task"):
        train(run_config(prepared, tmp_path / "bad", model=missing, train={"max_steps": 1}))
    assert not (tmp_path / "bad").exists()                              # refused before anything was written

    run_dir = train(run_config(prepared, tmp_path / "run", model=model, train={"max_steps": 2}))
    out = export_run(run_dir, tmp_path / "export")
    summary = json.loads((out / "export.json").read_text())
    assert {t["name"]: t["cluster"] for t in summary["tasks"]} == DEMO_CLUSTERS
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["code", "text"]
    assert [c["rank"] for c in summary["clusters"]] == [6, 6]         # 8 over 2 common + 2 clusters: 2+2+2
