"""Data-prep benchmark of the input formats users bring: an OpenAI ``messages`` corpus as JSON lines and the
same records as Parquet, against the raw batched tokenizer on the exact text prep tokenises.

``python benchmarks/data_prep/bench_formats.py`` writes the short-mix corpus of
``bench.py`` (the demo's generated functions, log-normally 1 to 48 per record) as
``messages`` conversations (a system turn, one or two rounds, the first reply marked context only in a
quarter of them), saves it also as Parquet, and alternates rounds of raw tokenizer / prep from JSON lines
/ prep from Parquet (medians compared, as the main bench does). Peak RSS of prep from Parquet at two
corpus sizes 10x apart (each in its own subprocess) shows memory stays flat for table inputs too.
Results go to ``benchmarks/data_prep/formats_bench.json`` with device, date and versions.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from bench import MIXES, RESULTS_DIR, device, peak_rss, raw_tokenize, timed_prep, versions
from demo_corpus import documented, make_function

from mftcoder_coba.data_prep.formats import normalise
from mftcoder_coba.data_prep.pipeline import PrepOptions
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokens import load_tokenizer
from mftcoder_coba.demo_data import TOKENIZER_DIR


def messages_records(records: int, seed: int = 0) -> list[dict[str, Any]]:
    """``messages`` conversations over the bench's generated code, lengths as in its short mix."""
    rng = random.Random(seed)
    counts = np.clip(np.random.default_rng(seed).lognormal(MIXES["short"], 1.0, records), 1, 48).astype(int)
    out = []
    for k in counts:
        fns = [make_function(rng) for _ in range(int(k))]
        messages = [{"role": "system", "content": "You write Python."},
                    {"role": "user", "content": fns[0].summary},
                    {"role": "assistant", "content": "\n\n".join(documented(fn) for fn in fns)}]
        if rng.random() < 0.5:
            if rng.random() < 0.5:
                messages[2]["train"] = False
            messages += [{"role": "user", "content": "Add a docstring to the first."},
                         {"role": "assistant", "content": documented(fns[0])}]
        out.append({"messages": messages})
    return out


def write_both(records: list[dict[str, Any]], jsonl: Path, parquet: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), parquet, row_group_size=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--rss-records", type=int, default=2000, help="small corpus of the memory pair (x10 large)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "formats_bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        records = messages_records(args.records)
        jsonl, parquet = tmp / "messages.jsonl", tmp / "messages.parquet"
        write_both(records, jsonl, parquet)
        renderer = Renderer(load_tokenizer(TOKENIZER_DIR))
        texts = [renderer.render(normalise(r, "bench"))[0] for r in records]
        runs: dict[str, list[float]] = {"raw": [], "prep_jsonl": [], "prep_parquet": []}
        timed_prep(jsonl, tmp / "warmup", args.seq_len)
        tokens, manifest = 0, {}
        for _ in range(args.rounds):
            seconds, _, tokens = min(raw_tokenize(texts, b) for b in (PrepOptions.batch_records, len(texts)))
            runs["raw"].append(tokens / seconds)
            for kind, corpus in (("prep_jsonl", jsonl), ("prep_parquet", parquet)):
                seconds, _, manifest = timed_prep(corpus, tmp / kind, args.seq_len)
                runs[kind].append(tokens / seconds)
        medians = {k: statistics.median(v) for k, v in runs.items()}
        memory = {}
        for label, n in (("small", args.rss_records), ("10x", 10 * args.rss_records)):
            small = tmp / f"rss_{label}.parquet"
            write_both(messages_records(n, seed=1), tmp / f"rss_{label}.jsonl", small)
            memory[label] = {"records": n, **peak_rss(small, tmp / f"rss_out_{label}", args.seq_len)}
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device(),
        "load_average": os.getloadavg(), "versions": versions(), "seq_len": args.seq_len, "records": args.records,
        "tokens": tokens, "utilisation": manifest.get("utilisation"), "tokens_per_s": runs, "medians": medians,
        "ratio_jsonl": medians["prep_jsonl"] / medians["raw"],
        "ratio_parquet": medians["prep_parquet"] / medians["raw"],
        "peak_rss_parquet": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"messages corpus: {args.records} records, {tokens / 1e6:.2f} M tokens")
    for kind, value in medians.items():
        ratio = "" if kind == "raw" else f"  ({value / medians['raw']:.2f}x raw)"
        print(f"  {kind:13s} {value / 1e6:.2f} M tok/s{ratio}")
    for label, m in memory.items():
        print(f"  peak RSS, Parquet, {label}: {m['records']} records, {m['tokens'] / 1e6:.2f} M tokens, "
              f"{m['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
