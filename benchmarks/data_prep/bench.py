"""Data-prep benchmark: prep throughput against the raw tokenizer, packing utilisation, memory, workers.

``python benchmarks/data_prep/bench.py`` builds a corpus with a realistic mix of sample lengths (the
demo's generated Python functions, 1 to 48 per sample, log-normally distributed, in chat, prompt/answer and
text records; a short and a long mix), then measures in one run:

* end-to-end ``prepare`` tokens/s against the raw batched throughput of the same tokenizer on the same
  rendered text (rounds alternate so both see the same machine load; medians are compared), and CPU time
  per token of each, for a short-sample and a long-sample mix; for reference also the same tokenizer called
  from one thread per core with its own pool off (how prep calls it), which outruns its batched call here;
* packing utilisation (non-pad tokens / all tokens) of those runs;
* peak RSS of a prep process at two corpus sizes 10x apart (each in its own subprocess);
* tokens/s for each ``--workers`` count, with the workers' start-up time (spawned processes) apart.

It prints a table and writes JSON (with device, date and versions) to ``benchmarks/data_prep/``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from demo_corpus import documented, make_function

from mftcoder_coba.data_prep.formats import normalise
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokens import encode_threads, load_tokenizer, serial_encode_calls
from mftcoder_coba.demo_data import TOKENIZER_DIR

RESULTS_DIR = Path(__file__).resolve().parent


MIXES = {"short": 1.0, "long": 2.0}  # log-mean of functions per sample: medians of about 120 and 330 tokens


def write_corpus(path: Path, records: int, seed: int = 0, log_mean: float = MIXES["short"]) -> None:
    """``records`` jsonl records, 1 to 48 functions each, log-normally distributed (40 to 6000 tokens)."""
    rng = random.Random(seed)
    counts = np.clip(np.random.default_rng(seed).lognormal(log_mean, 1.0, records), 1, 48).astype(int)
    with open(path, "w", encoding="utf-8") as f:
        for k in counts:
            fns = [make_function(rng) for _ in range(int(k))]
            code = "\n\n".join(documented(fn) for fn in fns)
            draw = rng.random()
            if draw < 0.45:
                record: dict[str, Any] = {"prompt": f"Write functions: {fns[0].summary}", "answer": code}
            elif draw < 0.85:
                record = {"chat_rounds": [{"role": "system", "content": "You write Python."},
                                          {"role": "user", "content": fns[0].summary},
                                          {"role": "assistant", "content": code}]}
            else:
                record = {"text": code}
            f.write(json.dumps(record) + "\n")


def raw_tokenize(texts: list[str], batch: int) -> tuple[float, float, int]:
    """The tokenizer alone, its fastest batched call over the whole rendered samples: (wall s, CPU s, tokens)."""
    backend = load_tokenizer(TOKENIZER_DIR).backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(e.ids) for e in encode(texts[i : i + batch], add_special_tokens=False))
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def raw_tokenize_threaded(texts: list[str], batch: int) -> tuple[float, int]:
    """A stronger reference than the batched call: one thread per core each encoding batches with the
    tokenizer's own pool off (prep's own scheme, see ``pipeline._run_batches``): (wall s, tokens)."""
    backend = load_tokenizer(TOKENIZER_DIR).backend_tokenizer

    def encode(i: int) -> int:
        return sum(len(e.ids) for e in backend.encode_batch_fast(texts[i : i + batch], add_special_tokens=False))

    with serial_encode_calls():
        start = time.perf_counter()
        with ThreadPoolExecutor(encode_threads()) as pool:
            tokens = sum(pool.map(encode, range(0, len(texts), batch)))
        return time.perf_counter() - start, tokens


def timed_prep(corpus: Path, out: Path, seq_len: int, workers: int = 1) -> tuple[float, float, dict[str, Any]]:
    """One ``prepare`` run in this process: (wall s, CPU s of this process, train manifest)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    manifest = prepare(PrepOptions(tasks={"code": corpus}, tokenizer=TOKENIZER_DIR, seq_len=seq_len, out=out,
                                   valid_fraction=0.0, workers=workers, progress=False))
    return time.perf_counter() - start, time.process_time() - cpu, manifest


_RSS_CHILD = """
import resource, sys, json
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
m = prepare(PrepOptions(tasks={"code": sys.argv[1]}, tokenizer=sys.argv[2], seq_len=int(sys.argv[3]), out=sys.argv[4],
                        valid_fraction=0.0, progress=False))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": m["totals"]["tokens"], "rows": m["num_rows"]}))
"""


def peak_rss(corpus: Path, out: Path, seq_len: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(corpus), str(TOKENIZER_DIR), str(seq_len),
                             str(out)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def device() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{model}, {os.cpu_count()} CPU cores"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import tokenizers
    import transformers

    return {"python": platform.python_version(), "numpy": np.__version__, "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__, "mftcoder-coba": version("mftcoder-coba")}


def throughput(tmp: Path, mix: str, records: int, seq_len: int, rounds: int) -> dict[str, Any]:
    """Prep against the raw tokenizer on one length mix, alternating rounds; medians and their ratio."""
    corpus = tmp / f"{mix}.jsonl"
    write_corpus(corpus, records, log_mean=MIXES[mix])
    renderer = Renderer(load_tokenizer(TOKENIZER_DIR))
    texts = [renderer.render(normalise(json.loads(line), "bench"))[0] for line in corpus.open(encoding="utf-8")]
    raw_runs, threaded_runs, prep_runs, raw_cpu, prep_cpu, manifest, tokens = [], [], [], [], [], {}, 0
    timed_prep(corpus, tmp / "warmup", seq_len)
    for _ in range(rounds):
        # the raw rate is the better of prep's batch size and one batch of everything (fewer barriers)
        seconds, cpu, tokens = min(raw_tokenize(texts, batch) for batch in (PrepOptions.batch_records, len(texts)))
        raw_runs.append(tokens / seconds)
        raw_cpu.append(cpu / tokens * 1e9)
        seconds, _ = raw_tokenize_threaded(texts, PrepOptions.batch_records)
        threaded_runs.append(tokens / seconds)
        seconds, cpu, manifest = timed_prep(corpus, tmp / "prep", seq_len)
        prep_runs.append(tokens / seconds)
        prep_cpu.append(cpu / tokens * 1e9)
    raw_med, prep_med = statistics.median(raw_runs), statistics.median(prep_runs)
    return {"records": records, "tokens": tokens, "length_mix": f"log-normal({MIXES[mix]}, 1.0) functions per sample",
            "truncated": manifest["task_stats"]["code"]["truncated"], "utilisation": manifest["utilisation"],
            "raw_tokens_per_s": raw_runs, "prep_tokens_per_s": prep_runs, "raw_median": raw_med,
            "prep_median": prep_med, "ratio": prep_med / raw_med, "raw_cpu_ns_per_token": raw_cpu,
            "prep_cpu_ns_per_token": prep_cpu,
            "cpu_ratio": statistics.median(raw_cpu) / statistics.median(prep_cpu),
            "raw_threaded_tokens_per_s": threaded_runs,
            "ratio_to_threaded": prep_med / statistics.median(threaded_runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=12000, help="records of the throughput corpus")
    parser.add_argument("--rss-records", type=int, default=2000, help="small corpus of the memory pair (x10 large)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prep_bench.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp_name:
        tmp = Path(tmp_name)
        mixes = {mix: throughput(tmp, mix, records, args.seq_len, args.rounds)
                 for mix, records in (("short", args.records), ("long", args.records // 2))}

        small, large = tmp / "small.jsonl", tmp / "large.jsonl"
        write_corpus(small, args.rss_records, seed=1)
        write_corpus(large, 10 * args.rss_records, seed=1)
        rss = {"small": peak_rss(small, tmp / "rss-small", args.seq_len) | {"records": args.rss_records},
               "large": peak_rss(large, tmp / "rss-large", args.seq_len) | {"records": 10 * args.rss_records}}

        # Worker processes are spawned (each imports transformers), a fixed cost measured on a one-record
        # corpus and reported beside the end-to-end and after-start-up rates on the large corpus.
        one = tmp / "one.jsonl"
        one.write_text(large.open(encoding="utf-8").readline(), encoding="utf-8")
        scaling = {}
        for workers in args.workers:
            startup, _, _ = timed_prep(one, tmp / f"s{workers}", args.seq_len, workers)
            seconds, _, _ = timed_prep(large, tmp / f"w{workers}", args.seq_len, workers)
            scaling[str(workers)] = {"tokens_per_s": rss["large"]["tokens"] / seconds, "startup_s": startup,
                                     "tokens_per_s_after_startup": rss["large"]["tokens"] / max(seconds - startup,
                                                                                                1e-9)}

    result = {
        "benchmark": "data_prep", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(), "load_average_1min": os.getloadavg()[0], "versions": versions(),
        "tokenizer": "shipped demo byte-level BPE", "seq_len": args.seq_len, "throughput": mixes,
        "workers": scaling, "peak_rss": rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(f"device: {result['device']}  ({result['date']}, load average {os.getloadavg()[0]:.1f})")
    print(f"{'measure':50s} {'value':>14s}")
    for mix, entry in mixes.items():
        print(f"{mix} samples: {entry['records']} records, {entry['tokens']} tokens, seq_len {args.seq_len}")
        print(f"{'  raw tokenizer, batched (median tokens/s)':50s} {entry['raw_median']:14,.0f}")
        print(f"{'  prep end to end, workers=1 (median tokens/s)':50s} {entry['prep_median']:14,.0f}")
        print(f"{'  ratio prep / raw (wall clock)':50s} {entry['ratio']:14.3f}")
        print(f"{'  ratio raw / prep CPU time per token':50s} {entry['cpu_ratio']:14.3f}")
        label = "  reference: raw, a thread per core, pool off"
        print(f"{label:50s} {statistics.median(entry['raw_threaded_tokens_per_s']):14,.0f}")
        print(f"{'  ratio prep / that reference':50s} {entry['ratio_to_threaded']:14.3f}")
        print(f"{'  packing utilisation':50s} {100 * entry['utilisation']:13.2f}%")
    for workers, entry in scaling.items():
        label = f"prep, workers={workers}, large corpus (tokens/s)"
        print(f"{label:50s} {entry['tokens_per_s']:14,.0f}")
        label = f"  after {entry['startup_s']:.1f} s start-up (tokens/s)"
        print(f"{label:50s} {entry['tokens_per_s_after_startup']:14,.0f}")
    for name, entry in rss.items():
        label = f"peak RSS, {name}: {entry['records']} records ({entry['tokens']} tokens)"
        print(f"{label:50s} {entry['peak_rss_mib']:10.1f} MiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
