"""The prep tokenizer cache: a cached run imports no transformers and writes exactly what an uncached run writes;
any change to the tokenizer's files or the template choice is a new entry; a damaged or unwritable cache is a
miss, never an error."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from prep_helpers import tokenizer_copy

from mftcoder_coba.data_prep import tokenizer_cache
from mftcoder_coba.data_prep.tokenizer_cache import KEEP, cache_key, prep_tokenizer, unpickle_state
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR
from mftcoder_coba.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CHILD = """
import json, sys
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
tasks, tokenizer, out, workers = json.loads(sys.argv[1])
prepare(PrepOptions(tasks=tasks, tokenizer=tokenizer, seq_len=128, out=out, workers=workers, progress=False))
print(json.dumps({"transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules}))
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "mftcoder-coba" / "prep-tokenizer"


def _prep_in_child(tokenizer: Path, out: Path, workers: int) -> dict[str, bool]:
    tasks = {name: str(path) for name, path in DEMO_TASKS.items()}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([tasks, str(tokenizer), str(out), workers])],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_template(tokenizer: Path) -> Path:
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


@pytest.mark.parametrize("template", [None, CHATML], ids=["mftcoder-markers", "chat-template"])
def test_cached_runs_import_no_transformers_and_write_the_same_bytes(tmp_path, cache, template):
    tokenizer = tokenizer_copy(tmp_path / "tok", chat_template=template)
    if template is None:
        _without_template(tokenizer)
    first = _prep_in_child(tokenizer, tmp_path / "a", workers=1)
    assert first["transformers"] and len(list(cache.glob("*.pickle"))) == 1  # a miss loads, then caches
    for workers, out in ((2, tmp_path / "b"), (1, tmp_path / "c")):
        assert _prep_in_child(tokenizer, out, workers) == {"transformers": False, "torch": False}
        assert _tree(out) == _tree(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())
    assert manifest["template"] == ("mftcoder" if template is None else "chat")


def test_a_changed_tokenizer_file_or_template_choice_is_another_entry(tmp_path, cache):
    tokenizer = _without_template(tokenizer_copy(tmp_path / "tok"))
    plain = prep_tokenizer(tokenizer, "auto")
    assert plain.facts.mode == "mftcoder" and not plain.cached
    assert prep_tokenizer(tokenizer, "auto").cached
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    changed = prep_tokenizer(tokenizer, "auto")
    assert not changed.cached and changed.facts.mode == "chat"
    markers = prep_tokenizer(tokenizer, "mftcoder")
    assert not markers.cached and markers.facts.mode == "mftcoder"
    assert len({cache_key(tokenizer, t) for t in ("auto", "chat", "mftcoder")}) == 3


def test_the_same_files_elsewhere_share_an_entry_and_errors_name_the_given_folder(tmp_path, cache):
    prep_tokenizer(tokenizer_copy(tmp_path / "one"), "auto")
    made = prep_tokenizer(tokenizer_copy(tmp_path / "two"), "auto")
    assert made.cached
    renderer, _ = unpickle_state(made.state, tmp_path / "two")
    assert renderer.tokenizer.name_or_path == str(tmp_path / "two") and not renderer.tokenizer.loaded


def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(tmp_path, cache):
    fresh = prep_tokenizer(TOKENIZER_DIR, "auto")
    (file,) = cache.glob("*.pickle")
    for damage in (file.read_bytes()[:100], b"not a pickle", pickle.dumps(("facts", "state"))):
        file.write_bytes(damage)
        again = prep_tokenizer(TOKENIZER_DIR, "auto")
        assert not again.cached and again.facts == fresh.facts and again.state == fresh.state
        assert prep_tokenizer(TOKENIZER_DIR, "auto").cached


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert not prep_tokenizer(TOKENIZER_DIR, "auto").cached
    assert not prep_tokenizer(TOKENIZER_DIR, "auto").cached


def test_a_refused_template_choice_is_refused_every_time_and_never_cached(tmp_path, cache):
    tokenizer = _without_template(tokenizer_copy(tmp_path / "tok"))
    for _ in range(2):
        with pytest.raises(UserError, match="has no chat template"):
            prep_tokenizer(tokenizer, "chat")
    assert not cache.exists() or not list(cache.glob("*.pickle"))


def test_only_the_most_recently_used_entries_are_kept(tmp_path, cache):
    cache.mkdir(parents=True)
    for i in range(KEEP + 3):
        old = cache / f"{i:064x}.pickle"
        old.write_bytes(b"x")
        os.utime(old, ns=(i * 10**9, i * 10**9))
    killed = ("import os, sys; from mftcoder_coba.atomic import atomic_file\n"
              "with atomic_file(sys.argv[1]) as temp:\n    temp.write_bytes(b'half a pickle'); os._exit(9)")
    subprocess.run([sys.executable, "-c", killed, str(cache / f"{'f' * 64}.pickle")])  # a writer killed mid-write
    (torn,) = [p for p in cache.iterdir() if p.name.startswith(".")]
    prep_tokenizer(TOKENIZER_DIR, "auto")
    assert not torn.exists()
    kept = sorted(p.name for p in cache.glob("*.pickle"))
    assert len(kept) == KEEP
    assert f"{cache_key(TOKENIZER_DIR, 'auto')}.pickle" in kept
    assert f"{KEEP + 2:064x}.pickle" in kept and f"{0:064x}.pickle" not in kept


def test_the_key_covers_this_package_source(tmp_path, monkeypatch):
    key = cache_key(TOKENIZER_DIR, "auto")
    package = tmp_path / "pkg"
    package.mkdir()
    for source in Path(tokenizer_cache.__file__).parent.glob("*.py"):
        (package / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(tokenizer_cache, "__file__", str(package / "tokenizer_cache.py"))
    assert cache_key(TOKENIZER_DIR, "auto") == key
    (package / "render.py").write_text((package / "render.py").read_text() + "\n# changed\n")
    assert cache_key(TOKENIZER_DIR, "auto") != key


def test_tokenizer_files_that_cannot_be_hashed_are_loaded_uncached_or_reported_in_one_line(tmp_path, cache,
                                                                                         monkeypatch):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tokenizer_cache, "tokenizer_files_sha256", unreadable)  # as for another user's files
    assert not prep_tokenizer(TOKENIZER_DIR, "auto").cached
    assert not cache.exists()
    broken = tokenizer_copy(tmp_path / "tok")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        prep_tokenizer(broken, "auto")


def test_a_missing_tokenizer_folder_is_one_line_every_time(tmp_path, cache):
    for _ in range(2):
        with pytest.raises(UserError, match="tokenizer directory not found"):
            prep_tokenizer(tmp_path / "nowhere", "auto")
