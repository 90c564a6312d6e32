"""Helpers shared by the prep tests: table files, and tokenizers with FIM tokens or a tool-aware template."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mftcoder_coba.data import IGNORE_INDEX, PackedDataset
from mftcoder_coba.demo_data import TOKENIZER_DIR


def write_table(path: Path, records: list[dict]) -> None:
    """Records as a Parquet file or an Arrow IPC file (two rows per row group / batch), by the suffix of
    ``path`` (any case)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_struct_array(pa.array(records))  # columns of every record, not just the first
    if path.suffix.lower() == ".parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)


def tokenizer_copy(target: Path, *, fim_tokens: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """A copy of the demo tokenizer with extra special tokens (e.g. a FIM family) and/or another template."""
    shutil.copytree(TOKENIZER_DIR, target)
    if fim_tokens:
        from tokenizers import AddedToken, Tokenizer

        backend = Tokenizer.from_file(str(target / "tokenizer.json"))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fim_tokens])
        backend.save(str(target / "tokenizer.json"))
    if chat_template is not None:
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["chat_template"] = chat_template
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def packed_samples(ds: PackedDataset, tokenizer) -> list[tuple[str, str]]:
    """Every packed sample of a split, in row order, as (decoded text, decoded loss targets)."""
    out = []
    for r in range(len(ds)):
        row = ds[r]
        ids, labels, pos, tasks = row["input_ids"], row["labels"], row["position_ids"], row["task_ids"]
        target = np.zeros(len(ids), dtype=bool)
        target[1:] = labels[:-1] != IGNORE_INDEX
        starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            if tasks[a] >= 0:
                out.append((tokenizer.decode(ids[a:b].tolist()), tokenizer.decode(ids[a:b][target[a:b]].tolist())))
    return out


def llama_bos_tokenizer(target: Path) -> Path:
    """A copy of the demo tokenizer as Llama-family tokenizers are: BOS ``<s>`` put before every encoding, no
    chat template (so prep falls back to MFTCoder's ``<s>``-led role markers)."""
    from tokenizers import AddedToken, Tokenizer, processors

    shutil.copytree(TOKENIZER_DIR, target)
    backend = Tokenizer.from_file(str(target / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    backend.save(str(target / "tokenizer.json"))
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["bos_token"] = "<s>"
    del config["chat_template"]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target
