"""``--workers`` processes: set up from the parent's renderer and encoder (no transformers import), batches
sent back flat, and the same outcomes as in this process."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mftcoder_coba.data_prep import pipeline, tokens
from mftcoder_coba.data_prep.formats import normalise
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokenizer_cache import WARM_ROUNDS, prep_tokenizer, unpickle_state
from mftcoder_coba.data_prep.tokens import Encoder, load_tokenizer
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

_CHILD = """
import json, os, sys
from mftcoder_coba.data_prep import pipeline
work = pipeline._Work(*json.loads(sys.argv[2]))
pipeline._init_worker(work, os.getppid(), open(sys.argv[1], "rb").read())
batch = [tuple(r) + (None,) for r in json.loads(open(sys.argv[3]).read())]
light, ids, mask = pipeline._process_flat([(l, n, c, raw.encode(), how) for l, n, c, raw, how in batch])
print(json.dumps({"light": light, "ids": ids.tolist(), "mask": mask.tolist(),
                  "transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules}))
"""


def _records(per_task: int = 8) -> list[bytes]:
    lines = []
    for path in DEMO_TASKS.values():
        lines += [line.encode() for line in path.read_text().splitlines()[:per_task]]
    return lines + [b'{"text": 1}']  # one bad record


def _work(seq_len: int = 256) -> pipeline._Work:
    return pipeline._Work(str(TOKENIZER_DIR), seq_len, "truncate")


@pytest.fixture
def state():
    saved = dict(pipeline._STATE)
    yield pipeline._STATE
    pipeline._STATE.clear()
    pipeline._STATE.update(saved)


def _reference(batch: list[tuple], work: pipeline._Work, state: dict) -> list[tuple]:
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    state.update(renderer=Renderer(tokenizer), encoder=Encoder(tokenizer), work=work)
    return pipeline._process(batch)


def test_worker_needs_no_transformers_and_matches_this_process(tmp_path, state):
    work = _work()
    (tmp_path / "state.pkl").write_bytes(prep_tokenizer(TOKENIZER_DIR, "auto").state)
    records = _records()
    (tmp_path / "batch.json").write_text(json.dumps([("in", i + 1, 1, r.decode()) for i, r in enumerate(records)]))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "state.pkl"),
                             json.dumps([work.tokenizer_dir, work.seq_len, work.overlong]),
                             str(tmp_path / "batch.json")], capture_output=True, text=True, check=True)
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert not child["transformers"] and not child["torch"]
    outcomes = pipeline._unflatten(([tuple(o) for o in child["light"]], np.array(child["ids"], np.int32),
                                    np.array(child["mask"], np.uint8)))
    expected = _reference([("in", i + 1, 1, r, None) for i, r in enumerate(records)], work, state)
    assert [o[0] for o in outcomes] == [o[0] for o in expected]
    assert expected[-1][0] == "bad" and sum(o[0] == "ok" for o in expected) == len(records) - 1
    for got, want in zip(outcomes, expected):
        if want[0] == "ok":
            assert got[1].tolist() == want[1].tolist() and got[2].tolist() == want[2].tolist()
            assert got[3] == want[3]
        else:
            assert got == want


def test_flat_batch_pickles_two_arrays_not_one_per_sample(state):
    work = _work(seq_len=64)  # some records truncated
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    state.update(renderer=Renderer(tokenizer), encoder=Encoder(tokenizer), work=work)
    batch = [("in", i + 1, 1, r, None) for i, r in enumerate(_records())]
    flat = pipeline._process_flat(batch)
    light, ids, mask = flat
    assert not any(isinstance(x, np.ndarray) for o in light for x in o)
    assert {o[0] for o in light} >= {"ok", "truncated", "bad"}
    outcomes = pipeline._unflatten(pickle.loads(pickle.dumps(flat)))
    for got, want in zip(outcomes, pipeline._process(batch)):
        assert got[0] == want[0] and got[3] == want[3]
        if want[0] in ("ok", "truncated"):
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
        else:
            assert got == want


def test_shape_not_planned_by_the_parent_loads_the_tokenizer_in_the_worker():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    renderer, _ = unpickle_state(prep_tokenizer(TOKENIZER_DIR, "auto").state, TOKENIZER_DIR)
    planned = {"chat_rounds": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}]}
    assert renderer.render(normalise(planned, "t")) == Renderer(tokenizer).render(normalise(planned, "t"))
    assert not renderer.tokenizer.loaded
    rounds = WARM_ROUNDS + 1
    long = {"chat_rounds": [{"role": role, "content": f"{role} {i}"} for i in range(rounds)
                            for role in ("user", "assistant")]}
    assert renderer.render(normalise(long, "t")) == Renderer(tokenizer).render(normalise(long, "t"))
    assert renderer.tokenizer.loaded
    assert renderer.tokenizer.name_or_path == tokenizer.name_or_path


def test_threads_that_need_the_tokenizer_at_once_load_it_once(monkeypatch):
    """``--workers 1`` renders in threads; the first records needing the real tokenizer must not each import
    transformers and load it side by side."""
    loads = []

    def counted_load(path):
        loads.append(path)
        time.sleep(0.2)  # a load takes a while: every thread arrives while the first one loads
        return load_tokenizer(path)

    monkeypatch.setattr(tokens, "load_tokenizer", counted_load)
    lazy = tokens.LazyTokenizer(TOKENIZER_DIR, str(TOKENIZER_DIR))
    with ThreadPoolExecutor(4) as pool:
        eos = list(pool.map(lambda _: lazy.eos_token, range(4)))
    assert len(loads) == 1 and eos == [load_tokenizer(TOKENIZER_DIR).eos_token] * 4
