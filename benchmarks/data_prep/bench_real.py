"""Data-prep benchmark on real vocabularies: prep ``--workers 2`` against the tokenizer alone, paired rounds.

``python benchmarks/data_prep/bench_real.py --tokenizer ../shared/tokenizers/gpt2`` writes a corpus of code
records (the demo's generated Python functions, 1 to 48 per record, log-normally distributed; half MFTCoder
``chat_rounds`` with a system turn, half prompt/answer) of at least ``--min-tokens`` tokens into a temporary
directory, then alternates, round by round so both see the same machine load:

* raw: ``tokenizer(texts[k:k+1000])``, the tokenizer's own batched call (its thread pool on) over the exact
  text prep tokenises, in this process with the tokenizer already loaded;
* raw per process: the same call driven from one spawned process per core (pool off), timed from
  starting the processes, so it pays a start-up as prep does;
* prep: ``prepare(..., workers=2)`` end to end in a fresh interpreter (start-up, reading, rendering,
  tokenising, packing, writing and hashing the shards included), and its peak RSS, with the tokenizer in prep's
  tokenizer cache (as on every run after the first with that tokenizer);
* prep, first run: the same with an empty cache (``XDG_CACHE_HOME`` a new folder each time), so it loads the
  tokenizer through transformers (importing torch) as a first run does.

Every rate is the same token count (the raw call's) over each contender's wall time. The ratios of medians
and of each round's pair are written with machine, date, load and versions to ``benchmarks/data_prep/``.

``--make-llama3-like DIR`` builds the other vocabulary offline: a 128,256-token byte-level BPE with Llama 3's
pre-tokenizer split pattern, special tokens and header/``<|eot_id|>`` chat template, trained on this
Python's standard-library sources (no download; Meta's own tokenizer cannot be fetched here). Its template
writes contents verbatim (Llama 3's own trims them, which sends every record down the renderer's exact,
per-record Jinja path: a rendering cost, not measured here).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from bench import RESULTS_DIR, device, versions
from demo_corpus import documented, make_function

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
LLAMA3_VOCAB = 128256
_HEADER = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ " + _HEADER + " + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def make_llama3_like(out: Path) -> Path:
    """Train the 128k Llama-3-style tokenizer on the standard library's ``.py`` files into ``out``."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(LLAMA3_VOCAB - 128000 - len(LLAMA3_SPECIALS))]
    trainer = trainers.BpeTrainer(vocab_size=128000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    tokenizer.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    tokenizer.add_special_tokens(LLAMA3_SPECIALS + reserved)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>", "model_max_length": 131072,
              "chat_template": LLAMA3_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def write_corpus(path: Path, min_tokens: int, tokenizer_dir: Path, seed: int = 0, log_mean: float = 1.5,
                 pool: int = 4000) -> int:
    """Records (half chat, half prompt/answer) until their contents hold ``min_tokens`` tokens; returns records.

    Functions are drawn from a pool of ``pool`` generated ones (generating each record's afresh would take
    minutes for a corpus this size)."""
    from mftcoder_coba.data_prep.tokens import load_tokenizer

    backend = load_tokenizer(tokenizer_dir).backend_tokenizer
    rng = random.Random(seed)
    functions = [make_function(rng) for _ in range(pool)]
    codes = [documented(fn) for fn in functions]
    counts = np.random.default_rng(seed)
    tokens = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while tokens < min_tokens:
            block = []
            for k in np.clip(counts.lognormal(log_mean, 1.0, 1000), 1, 48).astype(int):
                picks = [rng.randrange(pool) for _ in range(int(k))]
                code = "\n\n".join(codes[i] for i in picks)
                summary = functions[picks[0]].summary
                if rng.random() < 0.5:
                    block.append({"prompt": f"Write functions: {summary}", "answer": code})
                else:
                    block.append({"chat_rounds": [{"role": "system", "content": "You write Python."},
                                                  {"role": "user", "content": summary},
                                                  {"role": "assistant", "content": code}]})
            texts = [r["answer"] if "answer" in r else r["chat_rounds"][2]["content"] for r in block]
            tokens += sum(len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False))
            records += len(block)
            f.writelines(json.dumps(r) + "\n" for r in block)
    return records


def rendered_texts(corpus: Path, tokenizer_dir: Path) -> list[str]:
    """Each record as prep renders it (the text the tokenizer sees, pieces and markers included)."""
    from mftcoder_coba.data_prep.formats import normalise
    from mftcoder_coba.data_prep.render import Renderer
    from mftcoder_coba.data_prep.tokens import load_tokenizer

    renderer = Renderer(load_tokenizer(tokenizer_dir))
    with corpus.open(encoding="utf-8") as f:
        return [renderer.render(normalise(json.loads(line), "bench"))[0] for line in f]


def raw_batched(tokenizer: Any, texts: list[str], batch: int = 1000) -> tuple[float, int, float]:
    """``tokenizer(texts[k:k+batch])`` over all texts: (wall s, tokens, CPU s of all this process's threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for k in range(0, len(texts), batch):
        tokens += sum(map(len, tokenizer(texts[k : k + batch])["input_ids"]))
    return time.perf_counter() - start, tokens, time.process_time() - cpu


_RAW_TOKENIZER: list[Any] = []


def _raw_init(tokenizer_dir: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from mftcoder_coba.data_prep.tokens import load_tokenizer

    _RAW_TOKENIZER.append(load_tokenizer(tokenizer_dir))


def _raw_count(texts: list[str]) -> int:
    return sum(map(len, _RAW_TOKENIZER[0](texts)["input_ids"]))


def raw_per_process(tokenizer_dir: Path, texts: list[str], processes: int, batch: int = 1000
                    ) -> tuple[float, int, float]:
    """The same call from ``processes`` spawned processes (pool off), timed from their start:
    (wall s, tokens, CPU s of this process and the processes)."""
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_raw_init,
                             initargs=(str(tokenizer_dir),)) as pool:
        tokens = sum(pool.map(_raw_count, (texts[k : k + batch] for k in range(0, len(texts), batch))))
    return time.perf_counter() - start, tokens, time.process_time() - cpu + _children_cpu() - children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_PREP_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
imported = time.perf_counter()
m = prepare(PrepOptions(tasks={"code": sys.argv[1]}, tokenizer=sys.argv[2], seq_len=int(sys.argv[3]),
                        out=sys.argv[4], workers=int(sys.argv[5]), progress=False, overwrite=True))
end = time.perf_counter()
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for f in ("ru_utime", "ru_stime"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"cpu_s": cpu, "prepare_s": end - imported, "import_s": imported - start,
                  "tokens": m["totals"]["tokens"], "utilisation": m["utilisation"], "peak_rss_mib": peak,
                  "worker_peak_rss_mib": children}))
"""


def prep_run(corpus: Path, tokenizer_dir: Path, out: Path, seq_len: int, workers: int) -> dict[str, Any]:
    """``prepare`` in a fresh interpreter: its wall time (and the whole process's), tokens, peak RSS.

    It runs in ``out``'s folder: ``python -c`` puts its working directory first on ``sys.path``, so started
    from a checkout it would import that checkout's package instead of a ``--before`` tree on PYTHONPATH."""
    start = time.perf_counter()
    paths = [str(p.resolve()) for p in (corpus, tokenizer_dir, out)]
    result = subprocess.run([sys.executable, "-c", _PREP_CHILD, *paths[:2], str(seq_len), paths[2], str(workers)],
                            capture_output=True, text=True, check=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, cwd=out.parent)
    return json.loads(result.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - start}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(tokenizer_dir: Path, name: str, min_tokens: int, rounds: int, seq_len: int, workers: int,
        before: Path | None, tmp: Path) -> dict[str, Any]:
    """Paired rounds of raw, raw per process, prep (and prep from the ``before`` source tree), order rotated."""
    from mftcoder_coba.data_prep.tokens import load_tokenizer

    corpus = tmp / f"{name}.jsonl"
    records = write_corpus(corpus, min_tokens, tokenizer_dir)
    texts = rendered_texts(corpus, tokenizer_dir)
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    load_s = time.perf_counter() - start
    one = tmp / "one.jsonl"
    with corpus.open(encoding="utf-8") as f:
        one.write_text(f.readline() + f.readline(), encoding="utf-8")

    warm_cache = tmp / "cache-warm"
    # prep's own cache moves with XDG_CACHE_HOME; the Hugging Face one stays where a user's first run finds it
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cold_runs = iter(range(1_000_000))

    def prep(source: Path | None, path: Path = corpus, cold: bool = False, processes: int = workers
             ) -> dict[str, Any]:
        cache = tmp / f"cache-cold-{next(cold_runs)}" if cold else warm_cache
        env = {"XDG_CACHE_HOME": str(cache), "HF_HOME": hf_home} | \
            ({"PYTHONPATH": str(source)} if source is not None else {})
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return prep_run(path, tokenizer_dir, tmp / "out", seq_len, processes)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    contenders: dict[str, Any] = {
        "raw": lambda: dict(zip(("wall_s", "tokens", "cpu_s"), raw_batched(tokenizer, texts))),
        "raw_per_process": lambda: dict(zip(("wall_s", "tokens", "cpu_s"),
                                            raw_per_process(tokenizer_dir, texts, workers))),
        "prep": lambda: prep(None),
        "prep_first_run": lambda: prep(None, cold=True),
    }
    if workers != 1:  # prep's default, threads in one process, beside the --workers figure
        contenders["prep_workers_1"] = lambda: prep(None, processes=1)
    if before is not None:
        contenders["prep_before"] = lambda: prep(before)
    tokens = raw_batched(tokenizer, texts)[1]  # (also a warm-up)
    prep(None, one)  # fills the warm cache
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            load = os.getloadavg()[0]
            result = contenders[k]()
            wall = result.get("prepare_s", result.get("wall_s"))
            runs[k].append(result | {"tokens_per_s": tokens / wall, "cpu_ns_per_token": result["cpu_s"] / tokens * 1e9,
                                     "load_before": load})
            print(f"round {r} {k:16s} {tokens / wall / 1e6:6.2f} M tok/s  (load {load:.1f})", flush=True)
    startup = {"prep": prep(None, one)["prepare_s"], "prep_first_run": prep(None, one, cold=True)["prepare_s"]}
    if before is not None:
        startup["prep_before"] = prep(before, one)["prepare_s"]

    def ratios(a: str, b: str, key: str = "tokens_per_s") -> dict[str, float]:
        pairs = [(x[key], y[key]) for x, y in zip(runs[a], runs[b])]
        return _spread([x / y if key == "tokens_per_s" else y / x for x, y in pairs])

    result = {"tokenizer": name, "tokenizer_dir": str(tokenizer_dir), "vocab_size": len(tokenizer),
              "tokenizer_load_s": load_s, "records": records, "tokens": tokens, "seq_len": seq_len,
              "workers": workers, "rounds": runs,
              "tokens_per_s": {k: _spread([x["tokens_per_s"] for x in v]) for k, v in runs.items()},
              "ratio_prep_to_raw": ratios("prep", "raw"),
              "ratio_prep_to_raw_per_process": ratios("prep", "raw_per_process"),
              "ratio_first_run_to_raw": ratios("prep_first_run", "raw"),
              **({"ratio_workers_1_to_raw": ratios("prep_workers_1", "raw"),
                  "cpu_ratio_raw_to_workers_1": ratios("prep_workers_1", "raw", "cpu_ns_per_token")}
                 if "prep_workers_1" in runs else {}),
              "cpu_ratio_raw_to_first_run": ratios("prep_first_run", "raw", "cpu_ns_per_token"),
              "cpu_ratio_raw_to_prep": ratios("prep", "raw", "cpu_ns_per_token"),
              "cpu_ratio_raw_per_process_to_prep": ratios("prep", "raw_per_process", "cpu_ns_per_token"),
              "startup_s_two_records": startup,
              "utilisation": runs["prep"][-1]["utilisation"],
              "peak_rss_mib": _spread([x["peak_rss_mib"] for x in runs["prep"]]),
              "worker_peak_rss_mib": _spread([x["worker_peak_rss_mib"] for x in runs["prep"]])}
    if before is not None:
        result["ratio_before_to_raw"] = ratios("prep_before", "raw")
        result["ratio_before_to_raw_per_process"] = ratios("prep_before", "raw_per_process")
        result["cpu_ratio_raw_to_before"] = ratios("prep_before", "raw", "cpu_ns_per_token")
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The results as the Markdown table of ``benchmarks/data_prep/real_vocab.md``."""
    def rate(r: dict[str, Any], key: str) -> str:
        s = r["tokens_per_s"][key]
        return f"{s['median'] / 1e6:.2f} M ({s['min'] / 1e6:.2f}-{s['max'] / 1e6:.2f})"

    def ratio(r: dict[str, Any], key: str) -> str:
        s = r.get(key)
        return "" if s is None else f"**{s['median']:.2f}** ({s['min']:.2f}-{s['max']:.2f})"

    def cpu(r: dict[str, Any]) -> str:
        if "cpu_ratio_raw_to_prep" not in r:
            return "not measured"
        first = r.get("cpu_ratio_raw_to_first_run")
        return ratio(r, "cpu_ratio_raw_to_prep") + ("" if first is None else f" ({first['median']:.2f})")

    def startup(r: dict[str, Any]) -> str:
        up = r["startup_s_two_records"]
        return " / ".join(f"{up[k]:.1f} s" for k in ("prep", "prep_first_run", "prep_before") if k in up)

    lines = [("| tokenizer | corpus | raw `tokenizer(texts[k:k+1000])` | raw, a process per core | prep `--workers 2` "
              "| prep / raw | prep / raw per process | first run: prep / raw | `--workers 1`: prep / raw "
              "| before: prep / raw "
              "| CPU per token: raw / prep (first run) | start-up (2 records): prep / first run / before "
              "| peak RSS parent / worker |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['tokenizer']} ({r['vocab_size']:,} tokens) "
            f"| {r['records']:,} records, {r['tokens'] / 1e6:.1f} M tokens "
            f"| {rate(r, 'raw')} | {rate(r, 'raw_per_process')} | {rate(r, 'prep')} "
            f"| {ratio(r, 'ratio_prep_to_raw')} | {ratio(r, 'ratio_prep_to_raw_per_process')} "
            f"| {ratio(r, 'ratio_first_run_to_raw')} | {ratio(r, 'ratio_workers_1_to_raw')} "
            f"| {ratio(r, 'ratio_before_to_raw')} | {cpu(r)} | {startup(r)} "
            f"| {r['peak_rss_mib']['max']:.0f} / {r['worker_peak_rss_mib']['max']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory to benchmark")
    parser.add_argument("--name", help="name of the tokenizer in the results (default: its folder name)")
    parser.add_argument("--make-llama3-like", type=Path, metavar="DIR",
                        help="build the 128k Llama-3-style tokenizer into DIR and exit")
    parser.add_argument("--min-tokens", type=int, default=15_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--before", type=Path, help="a source tree (PYTHONPATH) of an older prep to pair with")
    parser.add_argument("--out", type=Path, help="JSON to write (default benchmarks/data_prep/real_vocab_NAME.json)")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON", help="print results as a Markdown table")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(p.read_text(encoding="utf-8")) for p in args.table]))
        return
    if args.make_llama3_like:
        print(f"wrote {make_llama3_like(args.make_llama3_like)}")
        return
    if args.tokenizer is None:
        parser.error("--tokenizer is required")
    name = args.name or args.tokenizer.name
    with tempfile.TemporaryDirectory(prefix="prep-real-") as tmp:
        result = run(args.tokenizer, name, args.min_tokens, args.rounds, args.seq_len, args.workers, args.before,
                     Path(tmp))
    result = {"benchmark": "data_prep_real_vocab",
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device(),
              "load_average_1min_end": os.getloadavg()[0], "versions": versions(), **result}
    out = args.out or RESULTS_DIR / f"real_vocab_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key in ("ratio_prep_to_raw", "ratio_prep_to_raw_per_process", "ratio_first_run_to_raw",
                "ratio_workers_1_to_raw", "cpu_ratio_raw_to_workers_1", "ratio_before_to_raw",
                "ratio_before_to_raw_per_process", "cpu_ratio_raw_to_prep", "cpu_ratio_raw_per_process_to_prep",
                "cpu_ratio_raw_to_first_run", "cpu_ratio_raw_to_before"):
        if key in result:
            r = result[key]
            print(f"{key:34s} {r['median']:.3f} (rounds {r['min']:.3f}-{r['max']:.3f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
