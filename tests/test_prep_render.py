"""Record formats, templates and loss masks: the loss covers assistant replies plus the marker closing them."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from prep_helpers import llama_bos_tokenizer, tokenizer_copy

from mftcoder_coba.data_prep.formats import BadRecord, Chat, Text, decode, normalise
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokens import Encoder, load_tokenizer
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _tokenizer_with_template(tmp_path: Path, template: str):
    target = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(target)


def _loss_runs(tokenizer, record: dict, template: str = "auto") -> tuple[list[str], str]:
    """Decoded contiguous runs of loss tokens, and the whole decoded sample."""
    text, spans = Renderer(tokenizer, template).render(normalise(record, "t.jsonl:1"))
    ids, mask = Encoder(tokenizer).encode([text], [spans])[0]
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i].tolist()))
            start = None
    return runs, tokenizer.decode(ids.tolist())


CHAT = {"chat_rounds": [
    {"role": "system", "content": "Be brief."},
    {"role": "human", "content": "Write add(a, b)."},
    {"role": "bot", "content": "def add(a, b):\n    return a + b\n"},
    {"role": "user", "content": "Now subtract."},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
]}


def test_chat_template_loss_is_exactly_the_replies_plus_end_marker(tokenizer):
    runs, whole = _loss_runs(tokenizer, CHAT)
    assert runs == ["def add(a, b):\n    return a + b\n" + EOS, "def sub(a, b):\n    return a - b" + EOS]
    expected = tokenizer.apply_chat_template(
        [{"role": r["role"].replace("human", "user").replace("bot", "assistant"), "content": r["content"]}
         for r in CHAT["chat_rounds"]], tokenize=False)
    assert expected.startswith(whole) and expected[len(whole):] == "\n"  # only the unread tail is dropped


def test_mftcoder_markers_loss_is_exactly_the_replies_plus_eos(tokenizer):
    runs, whole = _loss_runs(tokenizer, CHAT, template="mftcoder")
    assert runs == ["def add(a, b):\n    return a + b\n" + EOS, "def sub(a, b):\n    return a - b" + EOS]
    assert whole == ("<s>system\nBe brief.\n<s>human\nWrite add(a, b).\n<s>bot\ndef add(a, b):\n    return a + b\n"
                     f"{EOS}\n<s>human\nNow subtract.\n<s>bot\ndef sub(a, b):\n    return a - b{EOS}")


def test_mftcoder_markers_with_a_bos_of_s_start_with_one_bos(tmp_path):
    """On a tokenizer whose BOS is ``<s>`` the first marker is the BOS: no ``<s><s>system`` (issue 22, item 5)."""
    tok = load_tokenizer(llama_bos_tokenizer(tmp_path / "llama_tok"))
    renderer = Renderer(tok)
    assert renderer.mode == "mftcoder" and renderer.bos == "<s>"
    for record in (CHAT, {"prompt": "q", "answer": "a"}):
        text, spans = renderer.render(normalise(record, "w"))
        ids, mask = Encoder(tok).encode([text], [spans])[0]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert tok.decode(ids.tolist()).startswith("<s>system\n" if "chat_rounds" in record else "<s>human\nq")
    text, _ = renderer.render(Text("x"))  # raw text still gets its BOS
    assert text == "<s>x" + EOS


@pytest.mark.parametrize("record,prompt,answer", [
    ({"prompt": "P", "answer": "A"}, "P", "A"),
    ({"prompt": "P", "response": "R"}, "P", "R"),
    ({"instruction": "I", "output": "O"}, "I", "O"),
    ({"instruction": "I", "input": "X", "output": "O"}, "I\n\nX", "O"),
    ({"input": "X", "output": "O"}, "X", "O"),
    ({"question": "Q", "answer": "A"}, "Q", "A"),
    ({"query": "Q", "answer": "A", "system": "S"}, "Q", "A"),
])
def test_prompt_answer_family(tokenizer, record, prompt, answer):
    sample = normalise(record, "f:1")
    assert sample == Chat(record.get("system"), (("user", prompt), ("assistant", answer)))
    runs, _ = _loss_runs(tokenizer, record)
    assert runs == [answer + EOS]


def test_text_records_train_on_every_token(tokenizer):
    text = "def f(x):\n    return x * 2\n"
    assert normalise({"text": text}, "f:1") == Text(text)
    rendered, spans = Renderer(tokenizer).render(Text(text))
    ids, mask = Encoder(tokenizer).encode([rendered], [spans])[0]
    assert mask.all() and tokenizer.decode(ids.tolist()) == text + EOS


def test_roles_are_case_insensitive_and_data_field_accepted():
    sample = normalise({"data": [{"role": "HUMAN", "content": "q"}, {"role": "Bot", "content": "a"}]}, "f:1")
    assert sample == Chat(None, (("user", "q"), ("assistant", "a")))
    assert normalise({"chat_rounds": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]},
                     "f:1").turns[1] == ("assistant", "a")


@pytest.mark.parametrize("raw,reason,needle", [
    (b'{"prompt": "a", "answer": ', "invalid_json", "malformed JSON"),
    (b'\xff\xfe{"text": "x"}', "not_utf8", "not valid UTF-8"),
    (b'[1, 2]', "not_object", "expected a JSON object"),
    (b'{"foo": 1}', "unknown_format", "no known fields"),
    (b'{"prompt": "a"}', "missing_field", "field 'answer' missing"),
    (b'{"prompt": "a", "answer": "  "}', "empty_field", "field 'answer' is empty"),
    (b'{"text": 3}', "bad_type", "must be a string"),
    (b'{"chat_rounds": []}', "empty_field", "is empty"),
    (b'{"chat_rounds": [{"role": "robot", "content": "x"}]}', "unknown_role", "unknown role 'robot'"),
    (b'{"chat_rounds": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "turn_order",
     "expected a assistant turn"),
    (b'{"chat_rounds": [{"role": "bot", "content": "a"}]}', "turn_order", "expected a user turn"),
    (b'{"chat_rounds": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}', "turn_order",
     "system turn may only come first"),
    (b'{"chat_rounds": [{"role": "user", "content": "a"}]}', "turn_order", "last turn must be from the assistant"),
    (b'{"chat_rounds": [{"role": "user"}, {"role": "bot", "content": "b"}]}', "missing_field",
     "field 'content' missing"),
])
def test_bad_records_name_place_and_reason(raw, reason, needle):
    with pytest.raises(BadRecord) as info:
        normalise(decode(raw, "data/x.jsonl", 7), "data/x.jsonl:7")
    assert info.value.reason == reason
    assert str(info.value).startswith("data/x.jsonl:7: ") and needle in str(info.value)


def test_template_that_trims_content_is_rendered_exactly(tmp_path):
    trimming = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _tokenizer_with_template(tmp_path, trimming)
    renderer = Renderer(tok)
    record = {"chat_rounds": [{"role": "user", "content": " q "}, {"role": "bot", "content": "  a = 1  "},
                              {"role": "user", "content": "more"}, {"role": "bot", "content": "b = 2\n"}]}
    runs, whole = _loss_runs(tok, record)
    assert renderer._pieces(normalise(record, "f:1")) is None  # detected as content-dependent
    assert runs == ["a = 1" + EOS, "b = 2" + EOS]
    assert whole == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na = 1<|im_end|>\n<|im_start|>user\n" \
                    "more<|im_end|>\n<|im_start|>assistant\nb = 2<|im_end|>"


def test_template_without_end_marker_gets_eos(tmp_path):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = _tokenizer_with_template(tmp_path, plain)
    runs, whole = _loss_runs(tok, {"prompt": "hi", "answer": "x = 1"})
    assert runs == ["x = 1" + EOS] and whole == "user: hi\nassistant: x = 1" + EOS


def test_demo_corpus_formats_and_masks(tokenizer):
    """Every shipped record parses, and its loss runs are its replies (plus the closing marker)."""
    renderer, encoder = Renderer(tokenizer), Encoder(tokenizer)
    for task, path in DEMO_TASKS.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) >= 100 and len(set(lines)) == len(lines), task
        for line in lines[:40]:
            sample = normalise(json.loads(line), task)
            text, spans = renderer.render(sample)
            ids, mask = encoder.encode([text], [spans])[0]
            replies = [sample.text + EOS] if isinstance(sample, Text) else \
                [c + EOS for r, c in sample.turns if r == "assistant"]
            bounds = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
            runs = [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(bounds[::2], bounds[1::2])]
            assert runs == replies, (task, line)
    sizes = {task: len(path.read_text().splitlines()) for task, path in DEMO_TASKS.items()}
    assert list(sizes) == ["code_completion", "text_to_code", "code_to_text", "unit_tests"]
    assert sizes["code_completion"] > sizes["text_to_code"] > sizes["code_to_text"] > 3 * sizes["unit_tests"]
    assert sum(p.stat().st_size for p in DEMO_TASKS.values()) < 2_000_000


def test_whole_sample_path_agrees_with_piecewise_path(tokenizer):
    text, spans = Renderer(tokenizer).render(normalise(CHAT, "f:1"))
    encoder = Encoder(tokenizer)
    assert encoder.piecewise  # byte-level BPE without a prefix space: replies are tokenised on their own
    piecewise = encoder.encode([text], [spans])[0]
    encoder.piecewise = False
    whole = encoder.encode([text], [spans])[0]
    for a, b in zip(piecewise, whole):
        np.testing.assert_array_equal(a, b)


def test_sentencepiece_style_prefix_space_tokenizer(tmp_path):
    """Metaspace tokenizers add a prefix to every string they encode: the whole sample is tokenised at once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["def add(a, b): return a + b", "write a function that adds two numbers", "<s>human", "<s>bot"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    sp = load_tokenizer(tmp_path)
    assert not Encoder(sp).piecewise
    runs, _ = _loss_runs(sp, {"prompt": "write a function that adds", "answer": "def add(a, b): return a + b"})
    assert [r.strip() for r in runs] == ["def add(a, b): return a + b</s>"]


def _one_encoding_per_piece(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Reference: every piece (between and inside the loss spans) encoded on its own, then concatenated."""
    ids, mask, pos = [], [], 0
    for start, end in spans:
        for piece, loss in ((text[pos:start], 0), (text[start:end], 1)):
            if piece:
                piece_ids = tokenizer.backend_tokenizer.encode(piece, add_special_tokens=False).ids
                ids += piece_ids
                mask += [loss] * len(piece_ids)
        pos = end
    return ids, mask


def test_joined_pieces_encode_exactly_as_separate_pieces(tokenizer):
    """One encoding per sample (pieces joined by a private special token) equals one encoding per piece,
    also where whitespace meets at a piece boundary; text holding the separator itself falls back."""
    from mftcoder_coba.data_prep.tokens import SEPARATOR

    encoder = Encoder(tokenizer)
    assert encoder._joiner is not None
    records = [CHAT, {"prompt": "x\n", "answer": "  indented\n\n"}, {"text": "\n\n  a"},
               {"prompt": "q ", "answer": " <|im_end|> b"}]
    records += [json.loads(line) for path in DEMO_TASKS.values() for line in path.read_text().splitlines()[:25]]
    renderer = Renderer(tokenizer)
    rendered = [renderer.render(normalise(r, "f:1")) for r in records]
    with_separator = [renderer.render(normalise({"prompt": "p", "answer": f"a{SEPARATOR}b"}, "f:1"))] + rendered[:3]
    for batch in (rendered, with_separator):
        encoded = encoder.encode([t for t, _ in batch], [s for _, s in batch])
        for (text, spans), (ids, mask) in zip(batch, encoded):
            assert (ids.tolist(), mask.tolist()) == _one_encoding_per_piece(tokenizer, text, spans)
    # pickled (for workers and the cache) the backend travels as JSON, rebuilt only for a batch that needs it
    shipped = pickle.loads(pickle.dumps(encoder))
    assert shipped._backend is None and shipped._joiner is not None
    for batch in (rendered, with_separator):
        texts, spans = [t for t, _ in batch], [s for _, s in batch]
        assert [(i.tolist(), m.tolist()) for i, m in shipped.encode(texts, spans)] == \
            [(i.tolist(), m.tolist()) for i, m in encoder.encode(texts, spans)]
        assert (shipped._backend is None) == (batch is rendered)


QWEN3_STYLE = (  # the reasoning split of Qwen3's template (and DeepSeek-R1's), abridged
    "{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}{% if loop.last %}{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}{% else %}{{ '<|im_start|>assistant\\n' + content }}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_that_splits_reasoning_at_think_is_rendered_as_the_template_does(tmp_path):
    """Qwen3-style templates branch on '</think>' in the content: sentinel probes alone never see it."""
    tok = load_tokenizer(tokenizer_copy(tmp_path / "qwen3", chat_template=QWEN3_STYLE))
    reply = "<think>\nadd two numbers\n</think>\n\ndef add(a, b): return a + b"
    record = {"messages": [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": reply}]}
    text, spans = Renderer(tok).render(normalise(record, "w"))
    messages = record["messages"]
    assert text + "\n" == tok.apply_chat_template(messages, tokenize=False)
    assert text.count("<think>") == 1 and text[spans[0][0]:spans[0][1]] == reply + EOS
