"""The tokens a trained model stops on, and the chat template it was trained with, for exports and generation.

Prep closes every assistant reply with an end marker and puts it inside the loss (see
:mod:`mftcoder_coba.data_prep.render`): with a chat template, the first special token the template writes
after the reply (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), or the tokenizer's EOS where the template writes
none; with MFTCoder's role markers, the EOS. That marker is what the model learned to emit, so generation
must stop on it; the tokenizer's EOS alone misses ``<|im_end|>`` on a Qwen2.5-base-style tokenizer whose EOS
is ``<|endoftext|>``, and the model then writes turn after turn until ``max_new_tokens``. A base model's own
end ids (Llama 3.1's three) stay in the set, as long as the tokenizer knows them as special tokens: a model
built from a bare transformers config carries default ids (Llama's 2) that mean ordinary text in another
tokenizer.

Prep records only the template mode (``chat`` or ``mftcoder``, the manifest's ``template``); the end marker is
found here the way prep finds it, by rendering a one-turn conversation.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

_CONTENT = "\ue000reply\ue001"  # private-use characters: never written or edited by a template

MFTCODER_TEMPLATE = (
    "{{ bos }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<s>system\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<s>human\\n' + message['content'] + '\\n' }}"
    "{% else %}{{ '<s>bot\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<s>bot\\n' }}{% endif %}"
)
"""MFTCoder's role markers (``data_prep.render.MFTCODER_MARKERS``) as a chat template: what a run prepared with
``--template mftcoder`` (or with a tokenizer that has no template) trained on. ``bos`` is set by
:func:`mftcoder_template` to the BOS the renderer writes (none unless the tokenizer adds one itself)."""


def special_tokens(tokenizer: Any) -> set[str]:
    """Every special token of ``tokenizer``: its named ones and the added tokens marked special."""
    found = {str(t.content) for t in tokenizer.added_tokens_decoder.values() if t.special}
    return found | {str(t) for t in tokenizer.all_special_tokens}


def turn_end_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's chat template writes first after an assistant reply; None when the
    tokenizer has no template, the template fails on a user/assistant conversation, or writes no special
    token there (prep then closes replies with the EOS)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        rendered = str(tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _CONTENT}], tokenize=False))
    except Exception as exc:  # noqa: BLE001 - templates raise whatever their author chose
        log.warning("the chat template fails on a user/assistant conversation (%s); no end-of-turn token found",
                    exc)
        return None
    at = rendered.find(_CONTENT)
    if at < 0:
        return None
    after = rendered[at + len(_CONTENT):]
    found = [(after.find(token) + len(token), -len(token), token) for token in special_tokens(tokenizer)
             if token in after]
    return min(found)[2] if found else None


def trained_end_ids(tokenizer: Any, mode: str | None, base_eos: int | Iterable[int] | None = None) -> list[int]:
    """Every token id generation must stop on: the tokenizer's EOS, the end marker training closed replies
    with (``mode``: ``chat``, ``mftcoder``, or None for unknown, then the template's marker when it has one),
    and the base model's end ids that are special tokens of ``tokenizer``. Tokenizer EOS first, no repeats."""
    ids: list[int] = []

    def add(token_id: int | None) -> None:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))

    add(tokenizer.eos_token_id)
    if mode != "mftcoder":
        marker = turn_end_token(tokenizer)
        if marker is not None:
            add(tokenizer.convert_tokens_to_ids(marker))
    specials = special_tokens(tokenizer)
    base = [] if base_eos is None else [base_eos] if isinstance(base_eos, int) else list(base_eos)
    for token_id in base:
        token = tokenizer.convert_ids_to_tokens(int(token_id)) if 0 <= int(token_id) < len(tokenizer) else None
        if token in specials:
            add(token_id)
        else:
            log.info("base end id %s is no special token of the tokenizer (%r); not a stop token", token_id, token)
    return ids


def mftcoder_template(tokenizer: Any) -> str:
    """:data:`MFTCODER_TEMPLATE` with the BOS prep writes: the tokenizer's, when encoding adds it by itself."""
    probe = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    bos = str(tokenizer.bos_token) if adds_bos else ""
    return "{% set bos = " + repr(bos) + " %}" + MFTCODER_TEMPLATE
