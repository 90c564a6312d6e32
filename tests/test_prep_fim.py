"""Fill-in-the-middle: FIM rows decode back to the original text, the loss is the middle and EOS, choices are
seeded per record (same output for any --workers), and a tokenizer without FIM tokens is refused."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from prep_helpers import packed_samples, tokenizer_copy

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.fim import FAMILIES, FimRate, directive, find_tokens, parse_rate
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.report import decode_row, mix_and_fim_lines
from mftcoder_coba.data_prep.tokens import load_tokenizer
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import UserError

EOS = "<|im_end|>"
P, S, M = FAMILIES[0]


@pytest.fixture(scope="module")
def fim_tokenizer(tmp_path_factory) -> Path:
    return tokenizer_copy(tmp_path_factory.mktemp("fim") / "tok", fim_tokens=FAMILIES[0])


def _code(i: int) -> str:
    return f"def f{i}(x):\n    y = x * {i}\n    return y + {i % 7}  # ünïcode {i}\n"


def _records() -> tuple[list[dict], list[str]]:
    """Records of three formats and the text each one's FIM form must decode back to."""
    records, originals = [], []
    for i in range(60):
        if i % 3 == 0:
            records.append({"text": _code(i)})
            originals.append(_code(i))
        elif i % 3 == 1:
            records.append({"messages": [{"role": "user", "content": f"Write f{i}."},
                                         {"role": "assistant", "content": _code(i)}]})
            originals.append(_code(i))  # the answer alone: FIM is used raw at inference
        else:
            records.append({"prompt": f"# f{i}\n", "completion": _code(i)})
            originals.append(f"# f{i}\n" + _code(i))  # a plain completion keeps its prompt before the prefix
    return records, originals


def _unfim(text: str, loss: str) -> tuple[str, str]:
    """(original document, order) from a decoded FIM sample and its decoded loss targets (middle + EOS)."""
    assert loss.endswith(EOS) and text.endswith(loss)
    middle = loss[: -len(EOS)]
    if text.startswith(P + S):  # SPM: suffix, then the prefix right before the middle
        suffix, prefix = text[len(P + S): -len(loss)].split(M)
        return prefix + middle + suffix, "spm"
    assert text.startswith(P)
    prefix, rest = text[len(P):].split(S)
    suffix = rest[: -len(loss)]
    assert suffix.endswith(M)
    return prefix + middle + suffix[: -len(M)], "psm"


def _opts(data: Path, out: Path, tokenizer: Path, **kw) -> PrepOptions:
    kw.setdefault("seq_len", 512)
    kw.setdefault("valid_samples_per_task", 6)
    return PrepOptions(tasks={"code": data}, tokenizer=tokenizer, out=out, progress=False, **kw)


def test_fim_rows_decode_back_to_the_original_text_and_train_the_middle(tmp_path, fim_tokenizer):
    records, originals = _records()
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare(_opts(data, tmp_path / "out", fim_tokenizer, fim={"code": FimRate(1.0, 0.5)}))
    tokenizer = load_tokenizer(fim_tokenizer)
    recovered, orders = Counter(), Counter()
    for split in ("train", "valid"):
        for text, loss in packed_samples(PackedDataset(tmp_path / "out" / split), tokenizer):
            document, order = _unfim(text, loss)
            recovered[document] += 1
            orders[order] += 1
    assert recovered == Counter(originals)  # every record, exactly once, decodes back to its text
    assert orders["psm"] > 10 and orders["spm"] > 10
    fim = manifest["fim"]
    assert fim["tokens"] == {"prefix": P, "suffix": S, "middle": M}
    valid = json.loads((tmp_path / "out" / "valid" / "manifest.json").read_text())["fim"]["tasks"]["code"]
    train = fim["tasks"]["code"]
    assert train["rate"] == 1.0 and train["spm_rate"] == 0.5
    # every sample is counted; a PSM sample with an empty prefix reads like SPM, so SPM can only look more common
    assert train["psm"] + valid["psm"] + train["spm"] + valid["spm"] == len(originals)
    assert orders["psm"] <= train["psm"] + valid["psm"] and orders["spm"] >= train["spm"] + valid["spm"]
    assert any("fim: task 'code' rate 1 (SPM 0.5)" in line for line in mix_and_fim_lines(manifest))
    shown = decode_row(PackedDataset(tmp_path / "out" / "train"), 0, tokenizer)
    assert f"{M}[[" in shown and f"{EOS}]]" in shown  # inspect shows the middle and EOS as the targets


def test_fim_rate_share_and_cut_points_are_seeded_per_record():
    rate = FimRate(0.3, 0.25)
    chosen = [directive(rate, 7, "code", i) for i in range(4000)]
    taken = [d for d in chosen if d is not None]
    assert 0.27 < len(taken) / 4000 < 0.33
    assert 0.2 < sum(d[0] for d in taken) / len(taken) < 0.3
    assert chosen == [directive(rate, 7, "code", i) for i in range(4000)]  # no hidden state
    assert chosen != [directive(rate, 8, "code", i) for i in range(4000)]
    assert chosen != [directive(rate, 7, "other", i) for i in range(4000)]
    assert [directive(rate, 7, "code", i, copy=1) for i in range(4000)] != chosen  # copies under --mix differ
    assert all(directive(FimRate(0.0), 7, "code", i) is None for i in range(100))
    assert all(directive(FimRate(1.0), 7, "code", i) is not None for i in range(100))


def test_fim_is_the_same_for_any_workers_and_batch_size(tmp_path, fim_tokenizer):
    records, _ = _records()
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = []
    for k, kw in enumerate(({}, {"batch_records": 7}, {"batch_records": 5, "workers": 2})):
        prepare(_opts(data, tmp_path / f"out{k}", fim_tokenizer, fim={"code": FimRate(0.5, 0.5)},
                      mix={"code": 1.5}, **kw))
        files = {p.relative_to(tmp_path / f"out{k}").as_posix(): p.read_bytes()
                 for p in sorted((tmp_path / f"out{k}").rglob("*")) if p.is_file()}
        for split in ("train", "valid"):  # the arguments name batch_records; all else must match
            manifest = json.loads(files.pop(f"{split}/manifest.json"))
            assert manifest.pop("arguments")["batch_records"] == kw.get("batch_records", 512)
            files[split] = manifest
        outs.append(files)
    assert outs[0] == outs[1] == outs[2]


def test_tokenizer_families_and_refusals(tmp_path, fim_tokenizer):
    assert find_tokens(load_tokenizer(TOKENIZER_DIR)) is None
    for family in FAMILIES[1:]:
        tok = load_tokenizer(tokenizer_copy(tmp_path / f"tok{len(family[0])}", fim_tokens=family))
        assert tuple(vars(find_tokens(tok)).values()) == family
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": _code(i)}) + "\n" for i in range(10)))
    with pytest.raises(UserError, match=r"^--fim code: tokenizer '.*' has no FIM special tokens \(looked for "
                                        r"<fim_prefix>/<fim_suffix>/<fim_middle>; <\|fim_prefix\|>"):
        prepare(_opts(data, tmp_path / "out", TOKENIZER_DIR, fim={"code": FimRate(0.5)}))
    with pytest.raises(UserError, match=r"^--fim: no task named 'other'"):
        prepare(_opts(data, tmp_path / "out", fim_tokenizer, fim={"other": FimRate(0.5)}))
    with pytest.raises(UserError, match=r"--fim code: RATE must be a number in \[0, 1\], got 1.5"):
        prepare(_opts(data, tmp_path / "out", fim_tokenizer, fim={"code": FimRate(1.5)}))
    assert not (tmp_path / "out").exists()
    assert parse_rate("code=0.5") == ("code", FimRate(0.5, 0.0))
    assert parse_rate(" code = 0.5,0.25") == ("code", FimRate(0.5, 0.25))
    for bad in ("code", "code=", "code=x", "code=0.1,0.2,0.3", "=0.5"):
        with pytest.raises(UserError, match=r"expected NAME=RATE\[,SPM_RATE\]"):
            parse_rate(bad)
