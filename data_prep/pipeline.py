"""``prepare``: tasks' raw records -> ``OUT/train`` and ``OUT/valid`` packed shards with manifests.

The run is one stream: records of all tasks are interleaved in proportion to each task's size (so rows
mix tasks and no task clusters at the end), rendered and tokenised in batches (in this process or in
``workers`` processes, results consumed in submission order so the output never depends on timing),
packed best-fit and written shard by shard. Held-out records are chosen per task by index from the seed
before the stream starts and packed per task, so every validation row holds one task. ``--mix`` repeats or
subsamples a task's training records (:mod:`mix`) and ``--fim`` rewrites a seeded share of its samples
(:mod:`fim`), both decided per record index in this process, so the output never depends on the workers.

Everything is written into a hidden temporary directory beside OUT and renamed into place only after the
last manifest is written: a killed or failed run never leaves an OUT that looks complete, and an existing
OUT (with ``overwrite``) is only replaced once the new one is whole, and only when it is a prep output
(:func:`mftcoder_coba.atomic.check_replaceable`): never a folder holding the inputs or anything else.
A run that ends with a task the trainer could not use (no training rows) is refused; a task without
held-out rows is warned about, in the log and in the printed tables.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import heapq
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mftcoder_coba.atomic import OUTPUT_MARKER, check_replaceable, make_temp_dir, mark_output, publish, remove_stale
from mftcoder_coba.data import manifest as manifest_io
from mftcoder_coba.data.layout import TOKENIZER_FILES, field_dtypes
from mftcoder_coba.data_prep import fim
from mftcoder_coba.data_prep.formats import (
    TOO_DEEP,
    BadRecord,
    Raw,
    Source,
    count_records,
    decode,
    is_hub,
    iter_raw,
    normalise,
    place,
    resolve_sources,
)
from mftcoder_coba.data_prep.mix import MixPlan, plan_mix
from mftcoder_coba.data_prep.pack import BestFitPacker, Row, Sample
from mftcoder_coba.data_prep.render import Renderer, TemplateChoice
from mftcoder_coba.data_prep.shards import ShardWriter
from mftcoder_coba.data_prep.stats import SplitStats
from mftcoder_coba.data_prep.tokenizer_cache import PrepTokenizer, describe, prep_tokenizer, unpickle_state
from mftcoder_coba.data_prep.tokens import (
    encode_threads,
    quiet_worker_threads,
    serial_encode_calls,
    tokenizer_files_sha256,
)
from mftcoder_coba.data_prep.truncate import left_cut
from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
SHARD_BYTES = 256 << 20
OUTPUT_KIND = "prepared-data"
"""The kind of output (:func:`mftcoder_coba.atomic.mark_output`) a prep OUT is marked with."""
NO_HELD_OUT = ("0 held-out rows: a validation-driven balancer such as CoBa cannot measure this task; raise "
               "--valid-samples-per-task / --valid-fraction")
"""What a task without held-out rows means for training, as the log and the tables say it."""
# Options that change how or where prep runs but never what it writes; left out of the manifest so the same
# inputs give byte-identical output directories.
RUNTIME_OPTIONS = ("out", "workers", "overwrite", "progress")


@dataclass
class PrepOptions:
    """Everything ``prepare`` needs; the CLI flags of ``mftcoder-coba prep`` map one to one onto these."""

    tasks: Mapping[str, str | Path] | Sequence[tuple[str, str | Path]]
    """Task name -> input path (a record file: .jsonl or .json, optionally .gz or .bz2, .parquet or .arrow, any
    case; a directory searched for them; a datasets save_to_disk directory; or hf:ORG/DATASET[:CONFIG][@SPLIT]
    from the Hugging Face Hub or its local cache); task ids follow this order."""
    tokenizer: str | Path
    """Local Hugging Face tokenizer directory (loaded offline)."""
    seq_len: int
    """Tokens per packed row."""
    out: str | Path
    """Output directory; gets train/, valid/ and tokenizer/."""
    valid_fraction: float | None = None
    """Share of each task's records held out (at least one when the task has two or more); default 0.05
    unless valid_samples_per_task is given."""
    valid_samples_per_task: int | None = None
    """Exact number of records held out per task (instead of valid_fraction)."""
    seed: int = 1234
    """Seed of the held-out choice."""
    overlong: Literal["truncate", "truncate-left", "drop"] = "truncate"
    """What happens to a sample longer than seq_len: truncate cuts its end, truncate-left keeps the answer and
    cuts the oldest context (earlier turns whole first, then the start of the prompt), drop drops it; every
    one is counted in the manifest."""
    template: TemplateChoice = "auto"
    """auto: the tokenizer's chat template if it has one, else MFTCoder role markers."""
    skip_bad: bool = False
    """Skip bad records (counted by reason in the manifest) instead of stopping at the first."""
    fim: Mapping[str, fim.FimRate] = field(default_factory=dict)
    """Task name -> share of its samples rewritten into fill-in-the-middle form (and the share of those in SPM
    order), with the tokenizer's FIM tokens; held-out samples too, so validation measures the same mix."""
    mix: Mapping[str, float] = field(default_factory=dict)
    """Task name -> how many times each of its training samples is used (2: twice; 0.5: a seeded half; 1.5:
    once, and a seeded half again); held-out samples are chosen first, from the unique records, once each."""
    workers: int = 1
    """Processes that render and tokenise; 1 works in this process, one thread per core."""
    overwrite: bool = False
    """Replace an existing OUT (only after the new one is complete), when it is a prep output."""
    rows_per_shard: int | None = None
    """Rows per shard file; default: as many as fit in 256 MiB."""
    batch_records: int = 512
    """Records per tokenizer batch (and per unit of work sent to a worker)."""
    progress: bool = True
    """Show a progress bar (on a terminal)."""

    def validate(self) -> None:
        def bad(flag: str, message: str) -> UserError:
            return UserError(f"{flag}: {message}")

        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise bad("--seq-len", f"must be an integer >= 2, got {self.seq_len!r}")
        if self.valid_fraction is not None and self.valid_samples_per_task is not None:
            raise bad("--valid-fraction", "give either --valid-fraction or --valid-samples-per-task, not both")
        if self.valid_fraction is not None and not 0.0 <= self.valid_fraction < 1.0:
            raise bad("--valid-fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if self.valid_samples_per_task is not None and self.valid_samples_per_task < 0:
            raise bad("--valid-samples-per-task", f"must be >= 0, got {self.valid_samples_per_task}")
        if self.overlong not in ("truncate", "truncate-left", "drop"):
            raise bad("--overlong", f"must be truncate, truncate-left or drop, got {self.overlong!r}")
        names = {name for name, _ in self.task_list()}
        for flag, given in (("--fim", self.fim), ("--mix", self.mix)):
            unknown = sorted(set(given) - names)
            if unknown:
                raise bad(flag, f"no task named {', '.join(map(repr, unknown))} (tasks: {', '.join(sorted(names))})")
        for name, rate in self.fim.items():
            if not isinstance(rate, fim.FimRate):
                raise bad("--fim", f"task '{name}': expected a FimRate(rate, spm_rate), got {rate!r}")
            rate.validate(name)
        for name, factor in self.mix.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
                raise bad("--mix", f"task '{name}': FACTOR must be a number > 0, got {factor!r}")
        if self.template not in ("auto", "chat", "mftcoder"):
            raise bad("--template", f"must be auto, chat or mftcoder, got {self.template!r}")
        if self.workers < 1:
            raise bad("--workers", f"must be >= 1, got {self.workers}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise bad("--rows-per-shard", f"must be >= 1, got {self.rows_per_shard}")
        if self.batch_records < 1:
            raise bad("batch_records", f"must be >= 1, got {self.batch_records}")

    def task_list(self) -> list[tuple[str, Path]]:
        pairs = list(self.tasks.items()) if isinstance(self.tasks, Mapping) else list(self.tasks)
        if not pairs:
            raise UserError("--task: give at least one task as NAME=PATH")
        seen: set[str] = set()
        for name, _ in pairs:
            if not name or not str(name).replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise UserError(f"--task: task name {name!r} must be letters, digits, '_', '-' or '.'")
            if name in seen:
                raise UserError(f"--task: task name '{name}' given twice")
            seen.add(name)
        return [(str(n), Path(p)) for n, p in pairs]

    def arguments(self) -> dict[str, Any]:
        """The options that determine the output, as plain data for the manifest."""
        args: dict[str, Any] = {}
        for f in fields(self):
            if f.name in RUNTIME_OPTIONS:
                continue
            value = getattr(self, f.name)
            if f.name == "tasks":
                value = {name: str(path) for name, path in self.task_list()}
            elif f.name == "fim":
                value = {name: asdict(rate) for name, rate in self.fim.items()}
            elif f.name == "mix":
                value = {name: float(factor) for name, factor in self.mix.items()}
            args[f.name] = str(value) if isinstance(value, Path) else value
        return args


# ---------------------------------------------------------------------------------------------------------------
# Per-batch work: the same function runs in this process or in a worker.

@dataclass(frozen=True)
class _Work:
    tokenizer_dir: str
    seq_len: int
    overlong: str


_STATE: dict[str, Any] = {}


def _init_worker(work: _Work, parent: int, state: bytes) -> None:
    """Initializer of a ``--workers`` process: bound to the life of prep, then set up for batches with the
    renderer and encoder the parent loaded or found cached (:mod:`tokenizer_cache`): the worker needs neither
    transformers nor torch, which would cost it 2-3 s of CPU to import."""
    _die_with_parent(parent)
    quiet_worker_threads()
    renderer, encoder = unpickle_state(state, work.tokenizer_dir)
    _STATE.update(renderer=renderer, encoder=encoder, work=work)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """End this worker process as soon as ``parent`` (the prep process) is gone, however it ended.

    Why: a worker waits on a task queue that every worker also holds open, so it never sees the queue
    close; a prep killed with SIGKILL (the OOM killer, a scheduler, ``kill -9``) used to leave its workers
    alive for good, each holding a tokenizer. On Linux the kernel kills the worker when its parent dies
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere a daemon thread watches the parent id. A parent that
    died before either was in place is caught by the check after it.
    """
    if not _parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Exit the process once ``parent`` is no longer its parent (it died and the process was adopted)."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


# ("ok"|"truncated", ids, mask, loss tokens) | ("dropped", reason, None, 0) | ("bad", reason, message, 0)
Outcome = tuple[str, Any, Any, int]


Exposure = tuple[int, int, tuple[str, int, int, Raw]]
"""A record as a task's stream yields it: ``(record index, copy, (source label, line, column, raw))``."""
Record = tuple[str, int, int, Raw, "fim.Directive | None"]
"""One record on its way to :func:`_process`: ``(source label, line, column, raw, FIM form or None)``."""


def _process(batch: list[Record]) -> list[Outcome]:
    """Render, tokenise and length-check one batch of records; never raises for bad data.

    Lengths, truncation and loss-token counts are computed for the whole batch at once on the flat
    encoding; each kept sample is a slice of it.
    """
    renderer: Renderer = _STATE["renderer"]
    work: _Work = _STATE["work"]
    outcomes: list[Outcome | None] = [None] * len(batch)
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    slots: list[int] = []
    for i, (label, line, column, raw, how) in enumerate(batch):
        try:
            sample = normalise(decode(raw, label, line, column), place(label, line, column))
            text, sample_spans = renderer.render(sample if how is None else fim.rewrite(sample, how))
        except BadRecord as exc:
            outcomes[i] = ("bad", exc.reason, str(exc), 0)
            continue
        except RecursionError:  # parsed, but too deep to check or render (a tool's arguments, say)
            outcomes[i] = ("bad", "too_deep", f"{place(label, line, column)}: {TOO_DEEP}", 0)
            continue
        texts.append(text)
        spans.append(sample_spans)
        slots.append(i)
    encoded = _STATE["encoder"].encode_flat(texts, spans)
    starts, lengths = encoded.offsets[:-1], np.diff(encoded.offsets)
    kept = np.minimum(lengths, work.seq_len)
    # loss tokens kept: targets of an earlier token of the sample (mask[1:kept]), from a running count
    running = np.zeros(len(encoded.mask) + 1, dtype=np.int64)
    np.cumsum(encoded.mask, out=running[1:])
    loss_tokens = running[starts + kept] - running[starts + np.minimum(kept, 1)]
    for i, start, n, keep, loss in zip(slots, starts.tolist(), lengths.tolist(), kept.tolist(),
                                       loss_tokens.tolist()):
        status = "ok"
        if n > keep:
            if work.overlong == "drop":
                outcomes[i] = ("dropped", "overlong", None, 0)
                continue
            status = "truncated"
            if work.overlong == "truncate-left":  # the window moves to the sample's end, on a turn boundary
                cut = left_cut(encoded.mask[start:start + n], keep)
                # a cut on a round boundary can leave fewer than seq_len tokens: the window ends where the
                # sample ends, never in the next sample of the batch (or past the batch's end)
                start, keep = start + cut, min(keep, n - cut)
                loss = int(running[start + keep] - running[start + 1])
        if not loss:
            outcomes[i] = ("dropped", "no_loss_after_truncation" if status == "truncated" else "no_loss_tokens",
                           None, 0)
            continue
        end = start + keep
        outcomes[i] = (status, encoded.ids[start:end], encoded.mask[start:end], loss)
    return outcomes  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# The record stream.

@dataclass(frozen=True)
class _Task:
    name: str
    sources: list[Source]
    counts: list[int]
    valid: np.ndarray  # bool per record index
    mix: MixPlan
    fim: fim.FimRate | None
    asked: int  # held-out records asked for; more than ``valid.sum()`` when too few records are usable

    @property
    def records(self) -> int:
        return sum(self.counts)


def _held_out_asked(name: str, records: int, opts: PrepOptions) -> int:
    """How many of a task's records ``--valid-samples-per-task`` / ``--valid-fraction`` ask to hold out."""
    if opts.valid_samples_per_task is not None:
        k = opts.valid_samples_per_task
        if k and k >= records:
            raise UserError(f"--valid-samples-per-task: task '{name}' has {records} records; holding out {k} "
                            "leaves none to train on")
        return k
    fraction = 0.05 if opts.valid_fraction is None else opts.valid_fraction
    return min(max(1, round(fraction * records)), records - 1) if fraction > 0 and records >= 2 else 0


def _held_out(name: str, sources: list[Source], records: int, opts: PrepOptions, made: PrepTokenizer,
              work: _Work) -> tuple[np.ndarray, int, bool]:
    """Boolean mask of the held-out records of a task, the count asked, and whether the task ran short.

    Held-out records are the first records of a seeded permutation (stable under task reordering) that
    survive prep: rendered, tokenised and length-checked as the stream will (``--overlong drop``, records
    without loss tokens, bad records under ``--skip-bad``), so a task gets the count asked for whenever it
    has that many usable records. Only a little more than the count asked is processed here, in rounds
    that grow with the share that did not survive; a task with fewer usable records holds out all but one
    of them (at least one must train) and is reported as short.
    """
    k = _held_out_asked(name, records, opts)
    mask = np.zeros(records, dtype=bool)
    if not k:
        return mask, k, False
    order = np.random.default_rng([opts.seed, zlib.crc32(name.encode("utf-8"))]).permutation(records)
    rate = opts.fim.get(name)
    usable: list[int] = []
    scanned = 0
    while len(usable) < k and scanned < records:
        missing = k - len(usable)
        want = missing + missing // 8 + 16 if not scanned else 2 * missing * scanned // max(len(usable), 1) + 16
        chosen = order[scanned:scanned + want].tolist()
        scanned += len(chosen)
        raw = _read_records(name, sources, set(chosen))
        items: list[Record] = [
            (*raw[i], None if rate is None else fim.directive(rate, opts.seed, name, i, 0)) for i in chosen]
        batches = ((chosen[j:j + opts.batch_records], items[j:j + opts.batch_records])
                   for j in range(0, len(items), opts.batch_records))
        for indices, outcomes in _run_batches(batches, work, 1, made):
            usable += [i for i, outcome in zip(indices, outcomes) if outcome[0] in _KEPT]
    short = len(usable) < k
    mask[usable[:len(usable) - 1 if short else k]] = True
    return mask, k, short


def _read_records(name: str, sources: list[Source], wanted: set[int]) -> dict[int, tuple[str, int, int, Raw]]:
    """The records of a task at the indices ``wanted``, as ``(source label, line, column, raw)``."""
    found = {}
    index = 0
    for source in sources:
        for line, column, raw in iter_raw(source):
            if index in wanted:
                found[index] = (source.label, line, column, raw)
            index += 1
    if len(found) != len(wanted):
        raise UserError(f"task '{name}': its files changed while being read (fewer records)")
    return found


def _exposures(task: _Task) -> Iterator[Exposure]:
    """The task's records as the mix takes them: pass by pass over its inputs (one pass without --mix)."""
    plan = task.mix
    plain = plan.plain
    for copy in range(plan.passes):
        index = 0
        for source in task.sources:
            label = source.label
            for line, column, raw in iter_raw(source):
                if index == task.records:
                    raise UserError(f"task '{task.name}': its files changed while being read (more records)")
                if plain or plan.takes(index, copy):
                    yield index, copy, (label, line, column, raw)
                index += 1
        if index != task.records:
            raise UserError(f"task '{task.name}': its files changed while being read (fewer records)")


def _interleave(tasks: list[_Task]) -> Iterator[tuple[int, Exposure]]:
    """``(task id, (record index, copy, record))``: tasks' exposures merged in proportion to their numbers,
    deterministically."""
    streams = [_exposures(t) for t in tasks]
    sizes = [t.mix.exposures for t in tasks]
    heap = [(0.5 / n, tid) for tid, n in enumerate(sizes) if n]
    heapq.heapify(heap)
    taken = [0] * len(tasks)
    while heap:
        tid = heap[0][1]
        item = next(streams[tid], None)
        if item is None:
            raise UserError(f"task '{tasks[tid].name}': its files changed while being read (fewer records)")
        yield tid, item
        taken[tid] = done = taken[tid] + 1
        if done < sizes[tid]:
            heapq.heapreplace(heap, ((done + 0.5) / sizes[tid], tid))
        else:
            heapq.heappop(heap)
            if next(streams[tid], None) is not None:
                raise UserError(f"task '{tasks[tid].name}': its files changed while being read (more records)")


def _batches(stream: Iterator[tuple[int, Exposure]], tasks: list[_Task], size: int, seed: int
             ) -> Iterator[tuple[list[tuple[int, bool, str | None]], list[Record]]]:
    """Batches of records for :func:`_process`, with ``(task id, held out, FIM order or None)`` per record."""
    held_out = [set(np.flatnonzero(t.valid).tolist()) for t in tasks]
    meta: list[tuple[int, bool, str | None]] = []
    work: list[Record] = []
    for tid, (index, copy, (label, line, column, raw)) in stream:
        rate = tasks[tid].fim
        how = None if rate is None else fim.directive(rate, seed, tasks[tid].name, index, copy)
        meta.append((tid, index in held_out[tid], None if how is None else "spm" if how[0] else "psm"))
        work.append((label, line, column, raw, how))
        if len(work) == size:
            yield meta, work
            meta, work = [], []
    if work:
        yield meta, work


_KEPT = ("ok", "truncated")
Flat = tuple[list[Outcome], np.ndarray, np.ndarray]
"""A batch's outcomes as a worker sends them: kept samples carry their length in place of ``ids`` (and None
for ``mask``), their tokens and masks lie end to end in the two arrays."""


def _process_flat(batch: list[Record]) -> Flat:
    """:func:`_process` in a ``--workers`` process, its kept samples sent back as two flat arrays.

    Why: pickling one NumPy array per sample costs some 10 microseconds on each side (header, dtype,
    reconstruction), about as much as tokenising 10 tokens; two arrays per batch cost nothing per sample.
    """
    outcomes = _process(batch)
    kept = [o for o in outcomes if o[0] in _KEPT]
    ids = np.concatenate([o[1] for o in kept]) if kept else np.zeros(0, np.int32)
    mask = np.concatenate([o[2] for o in kept]) if kept else np.zeros(0, np.uint8)
    return [(o[0], len(o[1]), None, o[3]) if o[0] in _KEPT else o for o in outcomes], ids, mask


def _unflatten(flat: Flat) -> list[Outcome]:
    """The outcomes of :func:`_process_flat` with each kept sample's ids and mask as views of the arrays."""
    light, ids, mask = flat
    outcomes: list[Outcome] = []
    pos = 0
    for status, a, b, loss in light:
        if status in _KEPT:
            outcomes.append((status, ids[pos : pos + a], mask[pos : pos + a], loss))
            pos += a
        else:
            outcomes.append((status, a, b, loss))
    return outcomes


def _same(outcomes: list[Outcome]) -> list[Outcome]:
    return outcomes


def _run_batches(batches: Iterator[tuple[list[Any], list[Any]]], work: _Work, workers: int, made: PrepTokenizer
                 ) -> Iterator[tuple[list[tuple[int, bool]], list[Outcome]]]:
    """Outcomes batch by batch, in submission order, with at most two batches per thread or worker in flight.

    ``workers == 1`` uses one helper thread per core (:func:`encode_threads`), each rendering and encoding
    whole batches, with the tokenizer's own thread pool off (:func:`serial_encode_calls`): the Rust
    tokenizer releases the GIL while it encodes, so while some threads encode, another parses and renders
    its next batch and this thread packs and writes, and every core stays busy without the pool's hand-offs
    and per-call tails. More workers are processes, started with spawn (never fork a process that may hold
    threads or a CUDA context) under a ProcessPoolExecutor, so a worker that dies fails the run instead of
    hanging it; they get the pickled renderer and encoder (:func:`_init_worker`) and send each batch back as
    two flat arrays (:func:`_process_flat`).
    """
    serial: contextlib.AbstractContextManager = contextlib.nullcontext()
    if workers == 1:
        renderer, encoder = unpickle_state(made.state, work.tokenizer_dir)
        _STATE.update(renderer=renderer, encoder=encoder, work=work)
        threads = encode_threads()
        executor: Executor = ThreadPoolExecutor(threads)
        serial = serial_encode_calls()
        process: Callable[[list[Record]], Any] = _process
        unpack: Callable[[Any], list[Outcome]] = _same
    else:
        threads = workers
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker,
                                       initargs=(work, os.getpid(), made.state))
        process, unpack = _process_flat, _unflatten
    with serial, executor:
        pending: collections.deque = collections.deque()
        try:
            for meta, items in batches:
                pending.append((meta, executor.submit(process, items)))
                if len(pending) >= 2 * max(threads, 2):
                    meta_done, future = pending.popleft()
                    yield meta_done, unpack(future.result())
            while pending:
                meta_done, future = pending.popleft()
                yield meta_done, unpack(future.result())
        finally:
            for _, future in pending:
                future.cancel()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while streaming (restored after, even on errors).

    The stream allocates millions of short-lived token lists but never builds reference cycles, so the
    collector finds nothing; yet its full passes walk every object of the process (all of transformers,
    torch in a trainer process), which costs several percent of prep time.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------------------------

def prepare(opts: PrepOptions) -> dict[str, Any]:
    """Run data prep; returns the train manifest. Raises :class:`UserError` on bad input (nothing written)."""
    opts.validate()
    task_list = opts.task_list()
    out = Path(opts.out)
    tokenizer_dir = Path(opts.tokenizer)

    def check_out() -> None:
        check_replaceable(out, overwrite=opts.overwrite, kind=OUTPUT_KIND, owned=_made_by_prep,
                          inputs=[path for _, path in task_list if not is_hub(path)] + [tokenizer_dir])
        foreign = _foreign_entries(out) if out.is_dir() else []
        if foreign:
            raise UserError(f"{out}: holds {_names(foreign)}, which prep did not write and --overwrite would "
                            "delete; move them out or choose another output directory")

    check_out()
    # Leftovers of any killed writer in OUT's folder (not only of an earlier run to this OUT): a dead prep's
    # hidden temporary directory can be as large as its output.
    remove_stale(Path(os.path.abspath(out)).parent)
    made = prep_tokenizer(tokenizer_dir, opts.template)
    facts = made.facts
    log.info("tokenizer %s: %s", tokenizer_dir, describe(made))
    vocab_size = facts.vocab_size
    tok_files = [tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    fim_tokens = fim.require_tokens(facts.fim_tokens, str(tokenizer_dir), sorted(opts.fim)) \
        if any(r.rate > 0 for r in opts.fim.values()) else None

    work = _Work(str(tokenizer_dir), opts.seq_len, opts.overlong)
    names = [name for name, _ in task_list]
    tasks: list[_Task] = []
    skipped_files: list[collections.Counter] = []
    for name, path in task_list:
        sources, counts, empty = [], [], collections.Counter()
        for source in resolve_sources(name, path):
            n = count_records(source)
            if n == 0:
                if not opts.skip_bad:
                    raise UserError(f"{source.label}: empty file (task '{name}' has no records there)")
                log.warning("task '%s': skipped the empty file %s (counted as empty_file)", name, source.label)
                empty["empty_file"] += 1
                continue
            sources.append(source)
            counts.append(n)
        if not sources:
            raise UserError(f"{path}: task '{name}' has no records")
        valid, asked, short = _held_out(name, sources, sum(counts), opts, made, work)
        if short:
            log.warning("task '%s': %s", name, held_out_short_note(int(valid.sum()), asked))
        tasks.append(_Task(name, sources, counts, valid, plan_mix(name, opts.mix.get(name, 1.0), valid, opts.seed),
                           opts.fim.get(name), asked))
        skipped_files.append(empty)
    log.info("tasks: %s", ", ".join(f"{t.name}={t.records} records ({int(t.valid.sum())} held out)"
                                    + (f", mixed x{t.mix.factor:g}: {t.mix.train_exposures} training samples"
                                       if not t.mix.plain else "") for t in tasks))

    dtypes = field_dtypes(vocab_size, opts.seq_len, len(tasks))
    row_bytes = sum(np.dtype(d).itemsize for d in dtypes.values()) * opts.seq_len
    rows_per_shard = opts.rows_per_shard or max(1, SHARD_BYTES // row_bytes)
    temp = make_temp_dir(out)
    try:
        stats = {split: SplitStats(len(tasks), opts.seq_len) for split in SPLITS}
        for tid, empty in enumerate(skipped_files):
            stats["train"].tasks[tid].skipped.update(empty)
        writers = {split: ShardWriter(temp / split, opts.seq_len, dtypes, facts.pad_token_id, rows_per_shard)
                   for split in SPLITS}
        train_packer = BestFitPacker(opts.seq_len)
        valid_packers = [BestFitPacker(opts.seq_len, buffer_tokens=32 * opts.seq_len, max_open_rows=16)
                         for _ in tasks]

        def emit(split: str, rows: list[Row]) -> None:
            if rows:
                writers[split].write_rows(rows)
                for row in rows:
                    stats[split].add_row(row)

        total = sum(t.mix.exposures for t in tasks)
        fim_counts = {split: [collections.Counter() for _ in tasks] for split in SPLITS}
        from tqdm import tqdm

        with tqdm(total=total, unit="rec", desc="prep", disable=None if opts.progress else True) as bar, \
                _no_cyclic_gc():
            batches = _batches(_interleave(tasks), tasks, opts.batch_records, opts.seed)
            for meta, outcomes in _run_batches(batches, work, opts.workers, made):
                for (tid, held_out, fim_order), (status, a, b, loss_tokens) in zip(meta, outcomes):
                    split = "valid" if held_out else "train"
                    task_stats = stats[split].tasks[tid]
                    if status == "bad":
                        if not opts.skip_bad:
                            raise UserError(b)
                        task_stats.skipped[a] += 1
                    elif status == "dropped":
                        task_stats.dropped[a] += 1
                    else:
                        task_stats.truncated += status == "truncated"
                        if fim_order is not None:
                            fim_counts[split][tid][fim_order] += 1
                        sample = Sample(tid, a, b, loss_tokens)
                        emit(split, valid_packers[tid].add(sample) if held_out else train_packer.add(sample))
                bar.update(len(meta))
        emit("train", train_packer.finish())
        for packer in valid_packers:
            emit("valid", packer.finish())
        for tid, task in enumerate(tasks):
            if not stats["train"].tasks[tid].samples:
                raise UserError(f"task '{task.name}': 0 training rows: {_fate(task, stats, tid)}; nothing written")
            if not stats["valid"].tasks[tid].samples:
                log.warning("task '%s': %s (%s)", task.name, NO_HELD_OUT, _fate(task, stats, tid))

        tok_out = temp / "tokenizer"
        tok_out.mkdir()
        for file in tok_files:
            shutil.copyfile(file, tok_out / file.name)
        tok_hash, tok_hashes = tokenizer_files_sha256(tok_out)
        tokenizer_info = {
            "dir": "../tokenizer", "source": str(tokenizer_dir.resolve()), "name_or_path": str(tokenizer_dir.name),
            "class": facts.class_name, "vocab_size": vocab_size, "eos_token_id": facts.eos_token_id,
            "sha256": tok_hash, "files": tok_hashes,
        }
        manifests = {}
        for split in SPLITS:
            shards = writers[split].close()
            manifests[split] = {
                "format": manifest_io.FORMAT, "format_version": manifest_io.FORMAT_VERSION, "split": split,
                "seq_len": opts.seq_len, "num_rows": writers[split].rows, "dtypes": dtypes,
                "pad_token_id": facts.pad_token_id, "template": facts.mode, "tokenizer": tokenizer_info, "tasks": names,
                **stats[split].summary(names), "shards": shards, "arguments": opts.arguments(),
                **_mix_and_fim(tasks, split, fim_counts[split], fim_tokens), **_short(tasks, split),
            }
            manifest_io.write(temp / split, manifests[split])
        mark_output(temp, OUTPUT_KIND)
        check_out()  # again: OUT may have appeared, or changed, while prep ran
        publish(temp, out, overwrite=opts.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    train = manifests["train"]
    log.info("wrote %s: %d train rows (utilisation %.2f%%), %d valid rows", out, train["num_rows"],
             100 * train["utilisation"], manifests["valid"]["num_rows"])
    return train


def _made_by_prep(path: Path) -> bool:
    """An OUT written before outputs were marked: its ``train/manifest.json`` is one of ours."""
    try:
        manifest = json.loads((path / "train" / manifest_io.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == manifest_io.FORMAT


def _foreign_entries(out: Path) -> list[str]:
    """Entries of an earlier prep OUT that prep does not write (a user's notes, say), relative to OUT."""
    own: dict[str, Callable[[str], bool]] = {
        "train": _split_file, "valid": _split_file, "tokenizer": TOKENIZER_FILES.__contains__}
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == OUTPUT_MARKER and entry.is_file() and not entry.is_symlink():
            continue
        allowed = own.get(entry.name)
        if allowed is None or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry.name)
            continue
        foreign.extend(f"{entry.name}/{child.name}" for child in sorted(entry.iterdir())
                       if child.is_symlink() or not child.is_file() or not allowed(child.name))
    return foreign


def _split_file(name: str) -> bool:
    return name == manifest_io.MANIFEST or re.fullmatch(r"shard-\d+\.bin", name) is not None


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _fate(task: _Task, stats: dict[str, SplitStats], tid: int) -> str:
    """Where a task's records went: how many were held out, skipped and dropped, by reason."""
    parts = [f"{int(task.valid.sum())} of its {task.records} records held out"]
    for what in ("skipped", "dropped"):
        reasons: collections.Counter = collections.Counter()
        for split in SPLITS:
            reasons.update(getattr(stats[split].tasks[tid], what))
        if reasons:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(reasons.items()))
            parts.append(f"{sum(reasons.values())} {what} ({counts})")
    return ", ".join(parts)


def held_out_short_note(held_out: int, asked: int) -> str:
    """What a task with fewer usable records than the held-out count asked for gets, in words."""
    return (f"{held_out} records held out of the {asked} asked: the task has only {held_out + 1} usable records "
            "(one is kept to train on)")


def _short(tasks: list[_Task], split: str) -> dict[str, Any]:
    """Valid manifest entry of the tasks with fewer usable records than the held-out count asked for."""
    short = {t.name: {"asked": t.asked, "held_out": int(t.valid.sum())} for t in tasks if t.valid.sum() < t.asked}
    return {"held_out_short": short} if short and split == "valid" else {}


def _mix_and_fim(tasks: list[_Task], split: str, fim_counts: list[collections.Counter],
                 tokens: fim.FimTokens | None) -> dict[str, Any]:
    """Manifest entries of the tasks with --mix (train split) and --fim (samples written in FIM form, by order)."""
    entries: dict[str, Any] = {}
    mixed = {t.name: {"factor": t.mix.factor, "records": t.mix.train_records, "samples": t.mix.train_exposures}
             for t in tasks if not t.mix.plain}
    if mixed and split == "train":
        entries["mix"] = mixed
    if tokens is not None:
        entries["fim"] = {"tokens": asdict(tokens), "tasks": {
            t.name: {**asdict(t.fim), "psm": counts["psm"], "spm": counts["spm"]}
            for t, counts in zip(tasks, fim_counts) if t.fim is not None}}
    return entries
