"""The corpus and tokenizer the project ships, so the demo and the tests run offline.

Generated deterministically by ``python benchmarks/data_prep/demo_corpus.py`` (see that module for what
each task holds). ``DEMO_TASKS`` maps task name -> jsonl path in task-id order, largest task first.
"""
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = DEMO_DIR / "tokenizer"
DEMO_TASKS: dict[str, Path] = {
    name: DEMO_DIR / f"{name}.jsonl" for name in ("code_completion", "text_to_code", "code_to_text", "unit_tests")
}

__all__ = ["DEMO_DIR", "DEMO_TASKS", "TOKENIZER_DIR"]
