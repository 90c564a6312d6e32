"""Task inputs: every supported record file format in a directory, and errors that name the real place."""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import re
from pathlib import Path

import pytest
from prep_helpers import write_table

from mftcoder_coba.data_prep.formats import READERS, BadRecord, Source, count_records, decode, iter_raw
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import UserError

RECORDS = [{"prompt": f"question {i}", "answer": f"answer {i} " * (i % 4 + 1)} for i in range(40)]


def _opts(tasks, out, **kw) -> PrepOptions:
    kw.setdefault("seq_len", 128)
    kw.setdefault("valid_samples_per_task", 3)
    return PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, out=out, progress=False, **kw)


def _lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_directory_reads_every_format_in_any_case_and_says_what_it_skipped(tmp_path, caplog):
    import datasets

    one = tmp_path / "one.jsonl"
    one.write_bytes(_lines(RECORDS))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / ".cache").mkdir()
    parts = [RECORDS[i:i + 5] for i in range(0, 40, 5)]
    (tree / "1_lines.JSONL").write_bytes(_lines(parts[0]))
    (tree / "2_array.json").write_text(json.dumps(parts[1], indent=2))  # pretty-printed top-level array
    (tree / "3_lines.Json").write_bytes(_lines(parts[2]))  # JSON lines under .json
    (tree / "4_lines.jsonl.bz2").write_bytes(bz2.compress(_lines(parts[3])))
    (tree / "5_array.JSON.GZ").write_bytes(gzip.compress(json.dumps(parts[4]).encode()))  # one-line array
    (tree / "6_array.json.bz2").write_bytes(bz2.compress(json.dumps(parts[5], indent=1).encode()))
    datasets.Dataset.from_list(parts[6]).save_to_disk(str(tree / "7_saved"))  # its .json files are not records
    (tree / "sub" / "8.jsonl.gz").write_bytes(gzip.compress(_lines(parts[7])))
    (tree / "notes.txt").write_text("not data")
    (tree / ".hidden.jsonl").write_bytes(_lines(RECORDS[:2]))
    (tree / ".cache" / "x.jsonl").write_bytes(_lines(RECORDS[:2]))
    with caplog.at_level(logging.INFO, logger="mftcoder_coba.data_prep.formats"):
        from_tree = prepare(_opts({"t": tree}, tmp_path / "out_tree"))
    from_one = prepare(_opts({"t": one}, tmp_path / "out_one"))
    assert from_tree["task_stats"]["t"]["samples"] == from_one["task_stats"]["t"]["samples"] == 37
    shards = {k: v for k, v in _tree(tmp_path / "out_one").items() if k.endswith(".bin")}
    assert shards == {k: v for k, v in _tree(tmp_path / "out_tree").items() if k.endswith(".bin")}  # same order
    listing = " ".join(r.getMessage() for r in caplog.records)
    assert "reading 8: 1_lines.JSONL, 2_array.json, 3_lines.Json, 4_lines.jsonl.bz2, 5_array.JSON.GZ, " \
           "6_array.json.bz2, 7_saved, sub/8.jsonl.gz" in listing
    for skipped in (".cache/ (hidden)", ".hidden.jsonl (hidden file)", "notes.txt (unknown extension)"):
        assert skipped in listing


def test_one_table_maps_every_suffix_to_its_reader(tmp_path):
    assert sorted(READERS) == sorted([f"{s}{c}" for s in (".jsonl", ".json") for c in ("", ".gz", ".bz2")]
                                     + [".parquet", ".arrow"])
    for suffix in READERS:  # the same records through every reader, named in upper case
        path = tmp_path / f"data{suffix.upper()}"
        if suffix in (".parquet", ".arrow"):
            write_table(path, RECORDS[:3])
        else:
            data = json.dumps(RECORDS[:3]).encode() if ".json." in suffix + "." else _lines(RECORDS[:3])
            path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else
                             bz2.compress(data) if suffix.endswith(".bz2") else data)
        assert count_records(Source(path)) == 3
        assert [decode(raw, str(path), line) for line, _, raw in iter_raw(Source(path))] == RECORDS[:3]
    with pytest.raises(UserError,
                       match=r"notes\.txt: task 't': not a record file: expected \.arrow, \.json, \.jsonl, \.parquet"):
        prepare(_opts({"t": _write(tmp_path / "notes.txt", b"{}")}, tmp_path / "out"))
    with pytest.raises(UserError, match=r"empty: task 't': directory holds no record files .*skipped 1: a\.txt"):
        prepare(_opts({"t": _write(tmp_path / "empty" / "a.txt", b"{}").parent}, tmp_path / "out"))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_json_array_elements_are_named_by_line_and_column(tmp_path):
    good = json.dumps({"prompt": "q", "answer": "a"})
    text = "[\n  " + good + ',\n  {"prompt": "q"},\n  {\n    "prompt": "q",\n    "answer": "a" "b"\n  }\n]\n'
    path = _write(tmp_path / "x.json", text.encode())
    assert [(line, column) for line, column, _ in iter_raw(Source(path))] == [(2, 3), (3, 3), (4, 3)]
    with pytest.raises(UserError, match=rf"^{path}:3:3: field 'answer' missing"):
        prepare(_opts({"t": path}, tmp_path / "out", valid_samples_per_task=0))
    manifest = prepare(_opts({"t": path}, tmp_path / "out", valid_samples_per_task=0, skip_bad=True))
    assert manifest["task_stats"]["t"]["skipped"] == {"invalid_json": 1, "missing_field": 1}
    raw = list(iter_raw(Source(path)))[2]
    with pytest.raises(BadRecord, match=rf"^{path}:6: malformed JSON: Expecting ',' delimiter at column 19$"):
        decode(raw[2], str(path), raw[0], raw[1])  # the fault's own line, not the record's first


@pytest.mark.parametrize("text,message", [
    ('[{"text": "a"}', r"x\.json:1:2: the file ends inside this record of the JSON array"),
    ('[{"text": "a"},', r"x\.json:1:16: the JSON array is never closed"),
    ('[{"text": "a"}] {}', r"x\.json:1:17: unexpected content after the closing '\]'"),
    ('[{"text": "a"} }', r"x\.json:1:16: unexpected '}' between the records"),
])
def test_broken_json_array_is_one_line_naming_the_place(tmp_path, text, message):
    path = _write(tmp_path / "x.json", text.encode())
    with pytest.raises(UserError, match=message):
        prepare(_opts({"t": path}, tmp_path / "out", skip_bad=True))
    assert not (tmp_path / "out").exists()


def test_malformed_json_names_the_real_column(tmp_path):
    good = json.dumps({"prompt": "q", "answer": "a"})
    cut = '{"prompt": "q", "answer": 1'  # cut off after column 27: the fault is at column 28, not 1
    path = _write(tmp_path / "x.jsonl", f"{good}\n{cut}\n{good}\n".encode())
    with pytest.raises(UserError, match=rf"^{path}:2: malformed JSON: Expecting ',' delimiter at column 28$"):
        prepare(_opts({"t": path}, tmp_path / "out", valid_samples_per_task=1))
    with pytest.raises(BadRecord, match=r"^x\.jsonl:4: not valid UTF-8 \(byte 0xff at column 11\)$"):
        decode(b'{"text": "\xff"}\n', "x.jsonl", 4)


def test_broken_datasets_directory_is_one_line(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ')
    with pytest.raises(UserError, match=r"ds/dataset_dict\.json: not a datasets split index \(JSONDecodeError"):
        prepare(_opts({"t": tmp_path / "ds"}, tmp_path / "out"))
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(UserError, match=r"ds: cannot load datasets directory: [^\n]*$"):
        prepare(_opts({"t": tmp_path / "ds"}, tmp_path / "out"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_record_nested_100000_levels_deep_is_one_line_naming_file_and_line(tmp_path, suffix):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "x"}'
    good = json.dumps({"prompt": "q", "answer": "a"})
    data = tmp_path / f"d{suffix}"
    data.write_text(f"{good}\n{deep}\n{good}\n" if suffix == ".jsonl" else f"[{good},\n{deep},\n{good}]\n")
    common = {"tasks": {"t": data}, "tokenizer": TOKENIZER_DIR, "seq_len": 64, "valid_samples_per_task": 0,
              "progress": False}
    with pytest.raises(UserError, match=rf"/d{re.escape(suffix)}:2(:1)?: nested too deeply to read"):
        prepare(PrepOptions(out=tmp_path / "out", **common))
    assert not (tmp_path / "out").exists()
    train = prepare(PrepOptions(out=tmp_path / "out", skip_bad=True, **common))
    assert train["task_stats"]["t"]["skipped"] == {"too_deep": 1} and train["task_stats"]["t"]["samples"] == 2
