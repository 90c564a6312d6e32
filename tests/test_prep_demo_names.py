"""``prep --task demo --tokenizer demo``: the shipped corpus and tokenizer by names a user can type."""
from pathlib import Path

from mftcoder_coba.commands import prep
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR


def test_demo_names_expand_to_the_shipped_files(tmp_path: Path, monkeypatch) -> None:
    assert prep.parse_tasks(["demo", "mine=data/x.jsonl"]) == [*DEMO_TASKS.items(), ("mine", Path("data/x.jsonl"))]
    assert prep.tokenizer_path("demo") == Path(TOKENIZER_DIR)
    assert prep.tokenizer_path("models/tok") == Path("models/tok")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a real folder named demo is taken as given
    assert prep.tokenizer_path("demo") == Path("demo")
