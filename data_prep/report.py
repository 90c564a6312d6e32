"""What ``mftcoder-coba inspect`` and ``prep`` print: per-task tables of a prepared dataset and one decoded row.

The decoded row shows each packed sample on its own, with the tokens that are loss targets wrapped in
``[[`` ``]]``: the quickest way to see that the loss covers the replies and their end marker, nothing else.
A task without held-out rows is marked ``(!)`` in the valid table and explained under it: training runs
anyway, but a balancer driven by held-out loss has nothing to measure that task by; a task with fewer usable
records than the held-out count asked for is named under the valid table. Under each table come
the tasks' ``--mix`` factors (train) and how many samples were written in fill-in-the-middle form.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mftcoder_coba.data import IGNORE_INDEX, PackedDataset
from mftcoder_coba.data import manifest as manifest_io
from mftcoder_coba.data_prep.pipeline import NO_HELD_OUT, held_out_short_note

COLUMNS = ("task", "samples", "rows", "tokens", "loss tok", "util %", "truncated", "dropped", "skipped")
GAP_MARK = "(!)"


def _count(reasons: dict[str, int]) -> str:
    return str(sum(reasons.values())) + (f" ({', '.join(f'{k}={v}' for k, v in reasons.items())})" if reasons else "")


def held_out_gaps(manifest: dict) -> list[str]:
    """The tasks of a valid split's manifest without a single held-out sample (none for a train split)."""
    if manifest.get("split") != "valid":
        return []
    return [name for name in manifest["tasks"] if not manifest["task_stats"][name]["samples"]]


def task_table(manifest: dict) -> str:
    rows = [COLUMNS]
    gaps = set(held_out_gaps(manifest))
    for name in manifest["tasks"]:
        s = manifest["task_stats"][name]
        rows.append((f"{name} {GAP_MARK}" if name in gaps else name, str(s["samples"]), str(s["rows"]),
                     str(s["tokens"]), str(s["loss_tokens"]), f"{100 * s['utilisation']:.2f}", str(s["truncated"]),
                     _count(s["dropped"]), _count(s["skipped"])))
    totals = manifest["totals"]
    rows.append(("(all)", str(totals["samples"]), str(totals["rows"]), str(totals["tokens"]),
                 str(totals["loss_tokens"]), f"{100 * manifest['utilisation']:.2f}", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def mix_and_fim_lines(manifest: dict) -> list[str]:
    """One line per task with --mix (training samples per unique record) and per task with --fim."""
    lines = [f"mix: task '{name}' x{m['factor']:g}: {m['records']} training records -> {m['samples']} samples"
             for name, m in manifest.get("mix", {}).items()]
    fim = manifest.get("fim")
    if fim:
        tokens = "/".join(fim["tokens"][k] for k in ("prefix", "suffix", "middle"))
        for name, f in fim["tasks"].items():
            lines.append(f"fim: task '{name}' rate {f['rate']:g} (SPM {f['spm_rate']:g}): {f['psm']} PSM + "
                         f"{f['spm']} SPM samples with {tokens}; loss on the middle and EOS")
    return lines


def print_tables(out: Path) -> None:
    for split in ("train", "valid"):
        manifest = manifest_io.load(out / split)
        print(f"{out / split}: {manifest['num_rows']} rows x {manifest['seq_len']} tokens, "
              f"{len(manifest['shards'])} shard(s), template {manifest.get('template')}")
        print(task_table(manifest))
        for name in held_out_gaps(manifest):
            print(f"{GAP_MARK} task '{name}': {NO_HELD_OUT}")
        for name, short in manifest.get("held_out_short", {}).items():
            print(f"task '{name}': {held_out_short_note(short['held_out'], short['asked'])}")
        for line in mix_and_fim_lines(manifest):
            print(line)
        print()


def decode_row(ds: PackedDataset, index: int, tokenizer) -> str:
    """Each packed sample of a row, decoded, loss targets in ``[[...]]``; padding summarised."""
    row = ds[index]
    ids, labels, tasks, pos = row["input_ids"], row["labels"], row["task_ids"], row["position_ids"]
    target = np.zeros(len(ids), dtype=bool)
    target[1:] = labels[:-1] != IGNORE_INDEX
    starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
    lines = []
    for start, end in zip(starts[:-1], starts[1:]):
        if tasks[start] < 0:
            lines.append(f"--- padding: {end - start} tokens")
            continue
        lines.append(f"--- sample, task {ds.tasks[tasks[start]]}, {end - start} tokens, "
                     f"{int(target[start:end].sum())} loss targets")
        text, run_start = [], start
        for t in range(start + 1, end + 1):
            if t == end or target[t] != target[run_start]:
                piece = tokenizer.decode(ids[run_start:t].tolist())
                text.append(f"[[{piece}]]" if target[run_start] else piece)
                run_start = t
        lines.append("".join(text))
    return "\n".join(lines)
