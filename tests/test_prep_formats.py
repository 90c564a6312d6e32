"""Record formats users bring (OpenAI/TRL messages, ShareGPT, TRL prompt/completion, Alpaca with history, tool
calls), per-turn train flags, Parquet/Arrow files and Hub datasets: what carries the loss, and bad records
named by path:line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prep_helpers import tokenizer_copy, write_table

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.formats import (
    BadRecord,
    Chat,
    Completion,
    HubDataset,
    Source,
    count_records,
    iter_raw,
    normalise,
    parse_hub,
)
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokens import Encoder, load_tokenizer
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import UserError

EOS = "<|im_end|>"
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _loss_runs(tokenizer, record: dict, template: str = "auto") -> tuple[list[str], str]:
    """Decoded contiguous runs of loss tokens, and the whole decoded sample."""
    text, spans = Renderer(tokenizer, template).render(normalise(record, "t.jsonl:1"))
    ids, mask = Encoder(tokenizer).encode([text], [spans])[0]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
    return runs, tokenizer.decode(ids.tolist())


def _opts(tasks, out, **kw) -> PrepOptions:
    kw.setdefault("seq_len", 256)
    kw.setdefault("valid_samples_per_task", 1)
    return PrepOptions(tasks=tasks, tokenizer=kw.pop("tokenizer", TOKENIZER_DIR), out=out, progress=False, **kw)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MESSAGES = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Write add."},
    {"role": "assistant", "content": "def add(a, b): return a + b", "train": False},
    {"role": "user", "content": "Now sub."},
    {"role": "assistant", "content": "def sub(a, b): return a - b"},
]}


def test_openai_messages_with_system_and_a_context_only_turn(tokenizer):
    runs, whole = _loss_runs(tokenizer, MESSAGES)
    assert runs == ["def sub(a, b): return a - b" + EOS]  # the first reply is context only
    assert whole == tokenizer.apply_chat_template(MESSAGES["messages"], tokenize=False).rstrip("\n")
    flagged = json.loads(json.dumps(MESSAGES))
    del flagged["messages"][2]["train"]
    flagged["messages"][4]["weight"] = 1
    assert _loss_runs(tokenizer, flagged)[0] == ["def add(a, b): return a + b" + EOS,
                                                 "def sub(a, b): return a - b" + EOS]


def test_sharegpt_conversations_with_weight_zero_and_trailing_context_dropped(tokenizer):
    record = {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2", "weight": 0}]}
    sample = normalise(record, "t.jsonl:1")
    assert sample == Chat("Be brief.", (("user", "q1"), ("assistant", "a1")))  # nothing learned after a1
    runs, whole = _loss_runs(tokenizer, record)
    assert runs == ["a1" + EOS] and "q2" not in whole


def test_a_record_level_system_is_kept_for_sharegpt_and_messages_records(tokenizer):
    """LLaMA-Factory's ShareGPT layout keeps the system prompt beside the turns, not among them."""
    turns = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]
    sharegpt = {"system": "Be brief.", "conversations": turns}
    messages = {"system": "Be brief.", "messages": [{"role": "user", "content": "q1"},
                                                    {"role": "assistant", "content": "a1"}]}
    conversational = {"system": "Be brief.", "prompt": [{"role": "user", "content": "q1"}],
                      "completion": [{"role": "assistant", "content": "a1"}]}
    for record in (sharegpt, messages, conversational):
        assert normalise(record, "w") == Chat("Be brief.", (("user", "q1"), ("assistant", "a1")))
        runs, whole = _loss_runs(tokenizer, record)
        assert runs == ["a1" + EOS] and whole.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    same = {"system": "Be brief.", "conversations": [{"from": "system", "value": "Be brief."}, *turns]}
    assert normalise(same, "w") == Chat("Be brief.", (("user", "q1"), ("assistant", "a1")))
    with pytest.raises(BadRecord, match="w: field 'system' and the system turn of 'conversations' differ"):
        normalise({"system": "Other.", "conversations": [{"from": "system", "value": "Be brief."}, *turns]}, "w")


def test_trl_prompt_completion_plain_is_raw_text_and_conversational_learns_the_completion(tokenizer):
    runs, whole = _loss_runs(tokenizer, {"prompt": "def square(x):\n", "completion": "    return x * x\n"})
    assert normalise({"prompt": "p", "completion": "c"}, "w") == Completion("p", "c")
    assert whole == "def square(x):\n    return x * x\n" + EOS and runs == ["    return x * x\n" + EOS]
    conversational = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
                      "completion": [{"role": "assistant", "content": "a2"}]}
    runs, whole = _loss_runs(tokenizer, conversational)
    assert runs == ["a2" + EOS] and "a1" in whole and whole.startswith("<|im_start|>system\nS")


def test_alpaca_with_system_and_history(tokenizer):
    record = {"system": "Sys", "history": [["first q", "first a"]], "instruction": "Do it", "input": "x = 1",
              "output": "done"}
    assert normalise(record, "w") == Chat("Sys", (("user", "first q"), ("assistant", "first a"),
                                                  ("user", "Do it\n\nx = 1"), ("assistant", "done")))
    assert _loss_runs(tokenizer, record)[0] == ["first a" + EOS, "done" + EOS]
    assert _loss_runs(tokenizer, record, "mftcoder")[0] == ["first a" + EOS, "done" + EOS]


def _tool_tokenizer(tmp_path: Path) -> Path:
    return tokenizer_copy(tmp_path / "tool_tok", chat_template=TOOL_TEMPLATE)


TOOLS = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
         "messages": [
             {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "5"},
             {"role": "assistant", "content": "It is 5."}]}


def test_tool_calls_rendered_by_a_template_that_supports_them_else_refused(tmp_path, tokenizer):
    tool_tok = load_tokenizer(_tool_tokenizer(tmp_path))
    runs, whole = _loss_runs(tool_tok, TOOLS)
    # the call (arguments decoded from OpenAI's JSON string) and the final answer are learned; the result is not
    assert runs == ['<call>{"name": "add", "arguments": {"a": 2}}</call>' + EOS, "It is 5." + EOS]
    assert "<|im_start|>tool\n5<|im_end|>" in whole
    with pytest.raises(BadRecord, match=r"^t\.jsonl:1: a conversation with tool calls, but the chat template of "
                                        r".* does not render tool calls") as caught:
        _loss_runs(tokenizer, TOOLS)  # the demo template drops tool calls
    assert caught.value.reason == "tools_unsupported"
    with pytest.raises(BadRecord, match="--template mftcoder has no tool format"):
        _loss_runs(tool_tok, TOOLS, "mftcoder")
    # end to end: a file mixing tool and plain records, through the tool-aware tokenizer
    data = _jsonl(tmp_path / "tools.jsonl", [TOOLS, MESSAGES] * 4)
    manifest = prepare(_opts({"t": data}, tmp_path / "out", tokenizer=tmp_path / "tool_tok"))
    assert manifest["task_stats"]["t"]["samples"] == 7
    with pytest.raises(UserError, match=r"tools\.jsonl:1: a conversation with tool calls"):
        prepare(_opts({"t": data}, tmp_path / "out2"))


BAD = [  # (record, reason, message fragment)
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "missing_field",
     "messages[0]: field 'role' missing"),
    ({"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown_role",
     "conversations[0]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "bad_train_flag", "field 'weight' must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "q", "train": False}, {"role": "assistant", "content": "a"}]},
     "bad_train_flag", "may only mark assistant turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]},
     "no_trained_turn", "every assistant turn is marked context only"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "bad_type",
     "must both be strings or both message lists"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "bad_type", "field 'history' must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "5"},
                   {"role": "assistant", "content": "a"}]}, "turn_order", "a tool turn must follow"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty_field",
     "messages[1]: field 'content' is empty"),
    ({"prompt": "q"}, "missing_field", "field 'answer' missing"),
    ({"weird": 1}, "unknown_format", "messages, conversations"),
]


def test_malformed_variants_name_path_line_and_are_counted_by_reason(tmp_path):
    good = {"prompt": "question", "answer": "answer"}
    records = [good, good]
    for record, _, _ in BAD:
        records += [record, good]
    data = _jsonl(tmp_path / "bad.jsonl", records)
    for k, (record, _reason, fragment) in enumerate(BAD):
        one = _jsonl(tmp_path / f"one{k}.jsonl", [good, good, record])
        with pytest.raises(UserError) as caught:
            prepare(_opts({"t": one}, tmp_path / f"out{k}"))
        assert str(caught.value).startswith(f"{one}:3: ") and fragment in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
    manifest = prepare(_opts({"t": data}, tmp_path / "out", skip_bad=True))
    skipped = {reason: 0 for _, reason, _ in BAD}
    for _, reason, _ in BAD:
        skipped[reason] += 1
    valid = json.loads((tmp_path / "out" / "valid" / "manifest.json").read_text())
    counted = dict(manifest["task_stats"]["t"]["skipped"])
    for reason, n in valid["task_stats"]["t"]["skipped"].items():
        counted[reason] = counted.get(reason, 0) + n
    assert counted == skipped


def _roundtrip_records() -> list[dict]:
    """Rows of different formats in one table, so most columns are null in most rows."""
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": f"a{i} " * (i % 5 + 1)}]})
        elif i % 3 == 1:
            rows.append({"prompt": f"p{i}", "answer": f"ans{i}", "system": "S"})
        else:
            rows.append({"text": f"def f{i}():\n    return {i}\n"})
    return rows


def test_parquet_and_arrow_give_the_same_shards_as_jsonl(tmp_path):
    rows = _roundtrip_records()
    outs = {}
    for name in ("d.jsonl", "d.parquet", "d.ARROW"):
        path = tmp_path / name
        if name.endswith("jsonl"):
            _jsonl(path, rows)
        else:
            write_table(path, rows)
        assert count_records(Source(path)) == 24
        prepare(_opts({"t": path}, tmp_path / f"out_{name}", valid_samples_per_task=3))
        outs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"out_{name}").rglob("shard-*.bin"))}
    assert outs["d.jsonl"] == outs["d.parquet"] == outs["d.ARROW"] and outs["d.jsonl"]
    first = next(iter_raw(Source(tmp_path / "d.parquet")))
    assert first == (1, 1, rows[0])  # null columns of other formats are absent, not None
    ds = PackedDataset(tmp_path / "out_d.parquet" / "train")
    assert ds.manifest["task_stats"]["t"]["samples"] == 21


def test_arrow_stream_files_and_broken_tables_are_one_line_errors(tmp_path):
    import pyarrow as pa

    table = pa.Table.from_pylist(_roundtrip_records())
    stream = tmp_path / "cache-train.arrow"  # the format datasets writes into its cache
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    assert count_records(Source(stream)) == 24
    assert [line for line, _, _ in iter_raw(Source(stream))] == list(range(1, 25))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UserError, match=r"^\S*broken\.parquet: cannot read: ") as caught:
        prepare(_opts({"t": broken}, tmp_path / "out"))
    assert "\n" not in str(caught.value)
    bad_row = tmp_path / "bad.parquet"
    write_table(bad_row, [{"prompt": "q", "answer": "a"}, {"prompt": "q", "answer": " "},
                          {"prompt": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"bad\.parquet:2: field 'answer' is empty"):
        prepare(_opts({"t": bad_row}, tmp_path / "out"))


def test_hub_spec_parsing_and_errors():
    assert parse_hub("hf:org/data") == HubDataset("org/data", None, "train")
    assert parse_hub("hf:org/data:python@validation") == HubDataset("org/data", "python", "validation")
    assert parse_hub("hf:org/data@test").label == "hf:org/data@test"
    for bad in ("hf:", "hf:org/data@", "hf:org/data:a:b", "hf:@train"):
        with pytest.raises(UserError, match="expected hf:ORG/DATASET"):
            parse_hub(bad)


def _offline(monkeypatch, cache: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def test_hub_dataset_offline_not_cached_is_one_line(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(UserError) as caught:
        prepare(_opts({"t": "hf:someone/never-downloaded@train"}, tmp_path / "out"))
    message = str(caught.value)
    assert message.startswith("hf:someone/never-downloaded@train: not in the local Hugging Face cache")
    assert "HF_DATASETS_OFFLINE" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch):
    """A dataset the HF cache holds (as ``load_dataset`` leaves it after a download) is read offline."""
    import datasets

    records = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(12)]
    source = _jsonl(tmp_path / "d.jsonl", records)
    built = tmp_path / "build"
    datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(built))
    made = next(built.glob("json/*/0.0.0/*/dataset_info.json")).parent
    cache = tmp_path / "cache"
    target = cache / "org___tiny_set" / "default" / "0.0.0" / "abc"
    target.mkdir(parents=True)
    shutil.copy(made / "json-train.arrow", target / "tiny_set-train.arrow")
    info = json.loads((made / "dataset_info.json").read_text())
    info.update(config_name="default", builder_name="tiny_set", dataset_name="tiny_set")
    (target / "dataset_info.json").write_text(json.dumps(info))
    _offline(monkeypatch, cache)
    from_hub = prepare(_opts({"t": "hf:org/tiny_set"}, tmp_path / "out_hub"))
    from_file = prepare(_opts({"t": source}, tmp_path / "out_file"))
    assert from_hub["task_stats"] == from_file["task_stats"] and from_hub["arguments"]["tasks"] == {
        "t": "hf:org/tiny_set"}
    assert [p.read_bytes() for p in sorted((tmp_path / "out_hub").rglob("shard-*.bin"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "out_file").rglob("shard-*.bin"))]
