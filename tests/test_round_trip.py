"""What the model trains on is what it sees at inference, and it ends where ``generate`` stops (issue 22).

Per template family: prep a multi-turn record, train 2 steps (a tiny Llama from a config), export; then for
every assistant turn ``apply_chat_template(add_generation_prompt=True)`` on the export's tokenizer gives
exactly the training sample's tokens before that turn's loss span, the span is the trained answer followed by
one end token, and that end token is one the export's ``generate`` stops on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_end_tokens import CHATML, GPT2, LLAMA31, gpt2_tokenizer, prep_and_train, qwen_base_tokenizer
from transformers import AutoTokenizer, GenerationConfig

from mftcoder_coba.data import IGNORE_INDEX, PackedDataset
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.export import export_run

SYSTEM = "You write short Python."
TURNS = [("Write f returning 1.", "def f():\n    return 1"),
         ("Now g, returning f() + 1.", "def g():\n    return f() + 1")]
RECORD = {"chat_rounds": [{"role": "system", "content": SYSTEM}]
          + [r for q, a in TURNS for r in ({"role": "human", "content": q}, {"role": "bot", "content": a})]}


def llama31(target: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>"]
    return gpt2_tokenizer(target, specials, LLAMA31, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


FAMILIES = {
    # ChatML on a base tokenizer whose EOS is another token (Qwen2.5 base): turns end with <|im_end|>
    "chatml-gpt2": (qwen_base_tokenizer, "auto"),
    # the shipped demo tokenizer: ChatML, EOS <|im_end|>
    "demo": (lambda target: TOKENIZER_DIR, "auto"),
    # ChatML with a system prompt the template writes itself, on GPT-2's tokenizer with the tokens added
    "chatml-default-system": (lambda target: gpt2_tokenizer(
        target, ["<|im_start|>", "<|im_end|>"],
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
        "{% endif %}" + CHATML, eos_token="<|im_end|>"), "auto"),
    # Llama 3.1 headers, the template writing the BOS, turns ending with <|eot_id|>
    "llama3": (llama31, "auto"),
    # a template that closes replies with no special token: prep inserts the EOS after each reply
    "plain-no-marker": (lambda target: gpt2_tokenizer(
        target, [], "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"), "auto"),
    # no chat template: MFTCoder's role markers, EOS closing every reply; the export ships them as a template
    "mftcoder-gpt2": (lambda target: GPT2, "auto"),
}


def first_sample(prepared: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """The first packed sample of the training split: its token ids and its loss spans (token ranges)."""
    row = PackedDataset(prepared / "train")[0]
    ids, labels, positions = (np.asarray(row[k]) for k in ("input_ids", "labels", "position_ids"))
    end = int(np.flatnonzero(positions[1:] == 0)[0]) + 1 if (positions[1:] == 0).any() else len(ids)
    target = np.zeros(end, dtype=bool)
    target[1:] = labels[:end - 1] != IGNORE_INDEX  # token t is a target when the label at t-1 is
    edges = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(np.int8), [0]])))
    return ids[:end].tolist(), [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


# Prep encodes each conversation as one text. Llama 3's generation prompt ends with "\n\n": GPT-2's
# pre-tokenizer (this test's stand-in vocabulary) splits "\n\ndef" as "\n" "\n" "def" but a prompt ending in
# "\n\n" as one token, so the trained prefix is not what inference feeds. Prep's to fix (issue 22, item 3:
# train on what inference will feed, e.g. encode up to the generation prompt on its own); strict, so the
# fix shows.
BOUNDARY = pytest.mark.xfail(strict=True, reason="prep encodes across the generation prompt's end (issue 22.3)")
# A template that writes no special token after a reply: prep inserts the EOS there, so the history of a
# second turn holds EOS tokens the template (shipped as is) never writes; and "assistant: " + "def" encodes
# as "assistant:" " def". Prep's to decide (issue 22, item 3).
NO_MARKER = pytest.mark.xfail(strict=True, reason="prep inserts EOS into the history; ' def' boundary (issue 22.3)")
XFAIL = {"llama3": BOUNDARY, "plain-no-marker": NO_MARKER}


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=XFAIL[f]) if f in XFAIL else f for f in sorted(FAMILIES)])
def test_generation_prompt_plus_answer_is_the_trained_sample(family: str, tmp_path: Path) -> None:
    make_tokenizer, template = FAMILIES[family]
    run = prep_and_train(tmp_path, make_tokenizer(tmp_path / "tokenizer"), records=[RECORD] * 8, seq_len=128,
                         template=template)
    out = export_run(run, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(out)
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    assert json.loads((out / "config.json").read_text())["eos_token_id"] in (stops, stops[0])
    ids, spans = first_sample(tmp_path / "prepared")
    assert len(spans) == len(TURNS)
    messages = [{"role": "system", "content": SYSTEM}]
    for (question, answer), (start, end) in zip(TURNS, spans):
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == ids[:start], (tokenizer.decode(prompt), tokenizer.decode(ids[:start]))
        trained = ids[start:end]
        assert tokenizer.decode(trained[:-1]) == answer and trained[-1] in stops
        assert prompt + trained == ids[:end]
        messages.append({"role": "assistant", "content": answer})
