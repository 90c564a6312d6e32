"""What prep takes from its tokenizer, made once per tokenizer and kept in the user's cache.

Why: loading a Hugging Face tokenizer imports transformers, which imports torch: about 2 s of CPU, a fifth of
a 15 M-token prep on two cores, spent before the first record is tokenised while the other cores idle
(``benchmarks/data_prep/real_vocab.md``). Everything prep needs of the tokenizer is plain data once made: the
Rust tokenizer (:class:`Encoder`), the renderer with its chat-template plans for the common conversation
shapes (:class:`Renderer`), and a few facts (class, vocabulary size, EOS and pad ids, template mode, FIM
tokens). They are pickled into ``$XDG_CACHE_HOME/mftcoder-coba/prep-tokenizer/KEY.pickle``, KEY a sha256 over
the tokenizer's files (names and bytes), the ``--template`` choice, the Python, transformers, tokenizers and
jinja2 versions and the source of this package (whose classes are pickled). A later prep with the same key
unpickles them in a fraction of a second and imports transformers only if a record needs the template
itself (another shape, tool calls, a template that edits contents: :class:`LazyTokenizer`).

Every run, cached or not, uses the objects as unpickled from the same bytes, in this process and in
``--workers`` processes alike, so a cached run cannot differ from the run that filled the cache.

Trust: the cache is the user's own directory, and whoever can write there can already run code as that user
(as with ``~/.bashrc``). A cache file that cannot be read or unpickled is a miss and is rewritten; a cache
that cannot be written is skipped (debug log); neither is an error.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mftcoder_coba.atomic import atomic_write_bytes, remove_stale
from mftcoder_coba.data.layout import TOKENIZER_FILES
from mftcoder_coba.data_prep import fim
from mftcoder_coba.data_prep.formats import BadRecord, normalise
from mftcoder_coba.data_prep.render import Renderer, TemplateChoice
from mftcoder_coba.data_prep.tokens import Encoder, LazyTokenizer, load_tokenizer, tokenizer_files_sha256
from mftcoder_coba.errors import UserError
from mftcoder_coba.user_cache import user_cache_dir

log = logging.getLogger(__name__)

WARM_ROUNDS = 8
"""Conversation shapes (with and without a system prompt, 1 to this many rounds) whose chat-template plans are
made when the tokenizer is loaded, so no process needs the Hugging Face tokenizer for them."""
KEEP = 6
"""Cache files kept (the most recently used); each holds a tokenizer twice (the encoder's joining copy)."""
_LIBRARIES = ("transformers", "tokenizers", "jinja2")


@dataclass(frozen=True)
class TokenizerFacts:
    """What prep decides and records with the tokenizer, besides rendering and encoding."""

    class_name: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int | None
    """The pad token's id, else EOS's: what pads a packed row."""
    mode: Literal["chat", "mftcoder"]
    """How records are rendered: the tokenizer's chat template or MFTCoder's role markers."""
    fim_tokens: fim.FimTokens | None


@dataclass(frozen=True)
class PrepTokenizer:
    facts: TokenizerFacts
    state: bytes
    """``(renderer, encoder)`` pickled, the renderer without its tokenizer: what every process unpickles."""
    cached: bool
    """Whether this came from the cache (the Hugging Face tokenizer was not loaded)."""


def unpickle_state(state: bytes, tokenizer_dir: str | Path) -> tuple[Renderer, Encoder]:
    """The renderer and encoder of :attr:`PrepTokenizer.state`, the renderer given a :class:`LazyTokenizer` of
    ``tokenizer_dir`` (loaded only if a record needs the template itself)."""
    renderer, encoder = pickle.loads(state)
    renderer.tokenizer = LazyTokenizer(str(tokenizer_dir), str(tokenizer_dir))
    return renderer, encoder


def prep_tokenizer(tokenizer_dir: Path, template: TemplateChoice) -> PrepTokenizer:
    """The tokenizer of ``tokenizer_dir`` as prep needs it: from the cache, else loaded (and then cached).

    Raises :class:`UserError` as loading the tokenizer and making the renderer do (a folder that fails to load
    is never cached, so its key always misses and the load reports it).
    """
    try:
        file = user_cache_dir("prep-tokenizer") / f"{cache_key(tokenizer_dir, template)}.pickle"
    except OSError as exc:  # a file that cannot be read: loading it says what is wrong, in one line
        log.debug("prep tokenizer cache: no key for %s (%s)", tokenizer_dir, exc)
        return _make(tokenizer_dir, template)
    cached = _read(file)
    if cached is not None:
        return cached
    made = _make(tokenizer_dir, template)
    _write(file, made)
    return made


def cache_key(tokenizer_dir: Path, template: TemplateChoice) -> str:
    """sha256 of everything the cached objects depend on (see the module docstring)."""
    names = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    files, _ = tokenizer_files_sha256(tokenizer_dir, names)
    digest = hashlib.sha256(f"{files}\0{template}\0{sys.version}\0".encode())
    for library in _LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{library}={importlib.metadata.version(library)}\0".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def _make(tokenizer_dir: Path, template: TemplateChoice) -> PrepTokenizer:
    """Load the tokenizer, make the renderer's plans for the common shapes, pickle renderer and encoder."""
    tokenizer = load_tokenizer(tokenizer_dir)
    renderer = Renderer(tokenizer, template)
    if renderer.mode == "chat":
        for system in (False, True):
            for rounds in range(1, WARM_ROUNDS + 1):
                chat = [{"role": "system", "content": "s"}] if system else []
                chat += [{"role": role, "content": role[0]} for _ in range(rounds) for role in ("user", "assistant")]
                # a shape whose template fails is left unplanned: the record that has it reports the error
                with contextlib.suppress(UserError, BadRecord):
                    renderer.render(normalise({"chat_rounds": chat}, "warm-up"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    facts = TokenizerFacts(type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, pad, renderer.mode,
                           renderer.fim_tokens)
    encoder = Encoder(tokenizer)
    renderer.tokenizer = None
    return PrepTokenizer(facts, pickle.dumps((renderer, encoder), protocol=pickle.HIGHEST_PROTOCOL), cached=False)


def _read(file: Path) -> PrepTokenizer | None:
    try:
        facts, state = pickle.loads(file.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is a miss, whatever it raises
        log.debug("prep tokenizer cache %s unreadable (%s); loading the tokenizer", file, exc)
        return None
    if not isinstance(facts, TokenizerFacts) or not isinstance(state, bytes):
        return None
    with contextlib.suppress(OSError):
        os.utime(file)  # most recently used: kept by _prune
    return PrepTokenizer(facts, state, cached=True)


def _write(file: Path, made: PrepTokenizer) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, pickle.dumps((made.facts, made.state), protocol=pickle.HIGHEST_PROTOCOL))
        _prune(file.parent)
    except OSError as exc:
        log.debug("prep tokenizer cache not written (%s)", exc)


def _prune(folder: Path) -> None:
    """Keep the :data:`KEEP` most recently used entries; drop what writers killed mid-write left behind."""
    remove_stale(folder)
    entries = []
    for file in folder.glob("*.pickle"):
        with contextlib.suppress(OSError):
            entries.append((file.stat().st_mtime_ns, file))
    for _, file in sorted(entries, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            file.unlink()


def describe(made: PrepTokenizer) -> str:
    """One log phrase: where the tokenizer's objects came from."""
    return "from the cache (transformers not imported)" if made.cached else "loaded (and cached)"

