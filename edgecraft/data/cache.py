"""The token cache: a corpus tokenized once, its ids kept as one flat array on disk.

`prepare` keys an entry by the sha256 of the corpus bytes and the tokenizer settings, streams the
corpus in chunks (a few in flight, plus for BPE the trainer's word counts), and writes the entry
under a temporary name renamed into place, so an interrupted prepare leaves no half-written cache.
Validation is only a slice of the ids, so changing `val_fraction` reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from edgecraft.data.corpus import Corpus, resolve, short_split, split_point
from edgecraft.data.tokenizer import (
    PIECE_CHARS,
    batched,
    char_encoder,
    check_vocab_size,
    make_char_tokenizer,
    pieces,
    token_dtype,
    train_bpe,
)
from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

CACHE_FORMAT = 1  # bump when the cache layout or the tokenization changes; part of the cache key
ENCODE_PIECES = 16  # BPE pieces per encode_batch call (parallel, and bounded memory)


@dataclass(frozen=True)
class PreparedData:
    """A tokenized corpus: the tokenizer and its train/val token ids (1-D memmaps, read-only)."""

    tokenizer: Tokenizer
    train: np.ndarray  # (n_train,) token ids
    val: np.ndarray  # (n_val,) token ids
    vocab_size: int


def default_cache_dir() -> Path:
    """~/.cache/edgecraft/data, or under $XDG_CACHE_HOME when set (read at call time)."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "edgecraft" / "data"


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="char", unit_scale=True, file=sys.stderr, disable=None, leave=False)


def _counted(texts: Iterable[str], bar: tqdm) -> Iterator[str]:
    for text in texts:
        yield text
        bar.update(len(text))


def _fingerprint(corpus: Corpus) -> tuple[str, int]:
    """sha256 of the corpus bytes and its character count, in one streamed pass."""
    digest, n_chars = hashlib.sha256(), 0
    for chunk in corpus.byte_chunks():
        digest.update(chunk)
        # every UTF-8 character has exactly one byte that is not a continuation byte (10xxxxxx)
        n_chars += int(np.count_nonzero((np.frombuffer(chunk, dtype=np.uint8) & 0xC0) != 0x80))
    return digest.hexdigest(), n_chars


def _cache_name(cfg: DataConfig, corpus_sha: str) -> str:
    settings = {"format": CACHE_FORMAT, "tokenizer": cfg.tokenizer, "corpus": corpus_sha}
    if cfg.tokenizer == "bpe":
        settings |= {"vocab_size": cfg.vocab_size, "piece_chars": PIECE_CHARS}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    kind = f"bpe{cfg.vocab_size}" if cfg.tokenizer == "bpe" else "char"
    return f"{kind}-{key}"


def _build(cfg: DataConfig, corpus: Corpus, n_chars: int, corpus_sha: str, out: Path) -> None:
    """Train the tokenizer and write tokenizer.json, tokens.bin and meta.json into `out`."""
    if cfg.tokenizer == "char":
        with _progress(n_chars, "data: scanning characters") as bar:
            tok = make_char_tokenizer(_counted(corpus.text_chunks(), bar))
    else:
        with _progress(n_chars, "data: training BPE") as bar:
            tok = train_bpe(_counted(pieces(corpus.text_chunks()), bar), cfg.vocab_size)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    n_tokens = 0
    with open(out / "tokens.bin", "wb") as f, _progress(n_chars, "data: encoding") as bar:
        if cfg.tokenizer == "char":
            encode = char_encoder(tok, dtype)
            for chunk in corpus.text_chunks():
                ids = encode(chunk)
                ids.tofile(f)
                n_tokens += len(ids)
                bar.update(len(chunk))
        else:
            # encode_batch_fast (tokenizers >= 0.20) skips the offsets we never read: faster, less memory
            encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
            for batch in batched(pieces(corpus.text_chunks()), ENCODE_PIECES):
                for enc in encode_batch(batch):
                    ids = np.array(enc.ids, dtype=dtype)
                    ids.tofile(f)
                    n_tokens += len(ids)
                bar.update(sum(len(p) for p in batch))
    tok.save(str(out / "tokenizer.json"))
    meta = {
        "format": CACHE_FORMAT,
        "source": corpus.source,
        "corpus_sha256": corpus_sha,
        "n_chars": n_chars,
        "tokenizer": cfg.tokenizer,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _open_cache(path: Path) -> tuple[Tokenizer, np.ndarray, dict] | None:
    """The cached tokenizer, token ids and metadata, or None if the entry is absent or damaged."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if (path / "tokens.bin").stat().st_size != meta["n_tokens"] * dtype.itemsize:
            return None
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    except Exception:  # a missing file, bad JSON, a tokenizer parse error: all mean "rebuild"
        return None
    return tok, tokens, meta


def _write_entry(cfg: DataConfig, corpus: Corpus, n_chars: int, corpus_sha: str, path: Path) -> None:
    """Build the cache entry `path` under a temporary name and rename it into place."""
    root = path.parent
    if path.exists():  # damaged by something outside edgecraft: rebuild it
        shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=root))
    try:
        _build(cfg, corpus, n_chars, corpus_sha, tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same entry first: use theirs
            if _open_cache(path) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(cfg: DataConfig, block_size: int) -> PreparedData:
    """Tokenize the corpus (or reuse the cache) and split it into train and val token arrays."""
    check_vocab_size(cfg)
    corpus = resolve(cfg.source)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    corpus_sha, n_chars = _fingerprint(corpus)
    path = root / _cache_name(cfg, corpus_sha)
    cached = _open_cache(path)
    if cached is None:
        try:
            _write_entry(cfg, corpus, n_chars, corpus_sha, path)
        except OSError as err:  # a read-only or full cache folder
            raise UserError(
                f"data.cache_dir: cannot write the token cache in {root} ({err.strerror or err}); set "
                f"data.cache_dir (or XDG_CACHE_HOME) to a writable folder"
            ) from None
        cached = _open_cache(path)
        assert cached is not None, f"cache entry {path} unreadable right after writing it"
        state = "prepared"
    else:
        state = "cached"
    tok, tokens, meta = cached
    n = len(tokens)
    if (why := short_split(n, cfg.val_fraction, block_size)) is not None:
        raise UserError(f"data.source: {cfg.source!r}: {why}")
    split = split_point(n, cfg.val_fraction)
    print(
        f"data: {cfg.source}{corpus.describe()}: {meta['n_chars']:,} chars -> {n:,} tokens "
        f"({cfg.tokenizer}, vocab {meta['vocab_size']:,}, {meta['dtype']}); "
        f"train {split:,}, val {n - split:,}; {state} in {path}",
        file=sys.stderr,
    )
    return PreparedData(tokenizer=tok, train=tokens[:split], val=tokens[split:], vocab_size=tok.get_vocab_size())
