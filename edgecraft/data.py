"""Corpora, tokenizers (char and byte-level BPE), token arrays on disk, and training batches.

A corpus is the exact concatenation of its text: one file, a folder's text files or a glob's
matches (sorted by path, concatenated as they are), or a built-in corpus that needs no download
(`builtin:python-docs`, the documentation text every CPython ships in `pydoc_data`).

`prepare` tokenizes a corpus once and caches the token ids as one flat array on disk, keyed by the
sha256 of the corpus bytes and the tokenizer settings. Everything streams in chunks, so a corpus
larger than memory prepares with a few chunks in flight (plus, for BPE, the trainer's word
counts), and the cache directory is written
under a temporary name and renamed into place, so an interrupted prepare leaves no half-written
cache. The last `val_fraction` of the token stream is validation (as in nanoGPT); since that is
only a slice, changing `val_fraction` reuses the cache.

Batches are a pure function of (seed, step, micro, rank), so a resumed run reads exactly the
batches an uninterrupted run would, and each DDP rank draws its own without any shared state.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

UNK = "<unk>"  # the char tokenizer's unknown-character token; it has the last id
CACHE_FORMAT = 1  # bump when the cache layout or the tokenization changes; part of the cache key
CHUNK_CHARS = 1 << 18  # text read per step while streaming a corpus
PIECE_CHARS = 1 << 16  # BPE works on pieces of about this size, cut after a newline
ENCODE_PIECES = 16  # BPE pieces per encode_batch call (parallel, and bounded memory)
_SNIFF_BYTES = 8192


# ---------------------------------------------------------------- corpora


def _python_docs() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


BUILTINS = {"python-docs": _python_docs}


def _is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def _looks_like_text(path: Path) -> bool:
    """A cheap sniff: no NUL byte and valid UTF-8 in the first few KiB."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def text_files(source: str) -> list[Path]:
    """The files a path source names, in corpus order; [] when it names nothing.

    A file is itself; a folder is its text files (recursively, hidden entries skipped); a glob is
    its text matches (`**` recurses). Folders and globs are sorted by path and skip files that do
    not look like UTF-8 text, so a stray image does not end up in the corpus.
    """
    if _is_glob(source):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        return sorted((p for p in matches if p.is_file() and _looks_like_text(p)), key=str)
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = (
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return sorted((p for p in files if _looks_like_text(p)), key=lambda p: p.relative_to(path).as_posix())
    return []


@dataclass(frozen=True)
class _Corpus:
    """A resolved source: either files to concatenate or a built-in text."""

    source: str
    files: tuple[Path, ...] = ()
    text: str | None = None

    def byte_chunks(self) -> Iterator[bytes]:
        if self.text is not None:
            data = self.text.encode("utf-8")
            for start in range(0, len(data), CHUNK_CHARS):
                yield data[start : start + CHUNK_CHARS]
            return
        for path in self.files:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_CHARS):
                    yield chunk

    def text_chunks(self) -> Iterator[str]:
        """The corpus text in chunks of at most CHUNK_CHARS characters, exactly as stored."""
        if self.text is not None:
            for start in range(0, len(self.text), CHUNK_CHARS):
                yield self.text[start : start + CHUNK_CHARS]
            return
        for path in self.files:
            # newline="" keeps \r\n as it is: the corpus is the files' exact text
            with open(path, encoding="utf-8", newline="") as f:
                try:
                    while chunk := f.read(CHUNK_CHARS):
                        yield chunk
                except UnicodeDecodeError as err:
                    raise UserError(f"data.source: {path}: not UTF-8 text ({err.reason})") from None


def _corpus(source: str) -> _Corpus:
    """Resolve data.source; a UserError (starting with 'data.source:') if it names nothing usable."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            known = ", ".join(f"builtin:{n}" for n in sorted(BUILTINS))
            raise UserError(f"data.source: unknown built-in corpus {source!r} (known: {known})")
        return _Corpus(source, text=BUILTINS[name]())
    files = text_files(source)
    if not files:
        if _is_glob(source):
            raise UserError(f"data.source: {source!r}: the glob matches no text files")
        if Path(source).expanduser().is_dir():
            raise UserError(f"data.source: {source!r}: the folder holds no text files")
        raise UserError(f"data.source: {source!r}: no such file or folder")
    if len(files) == 1 and not _looks_like_text(files[0]):
        raise UserError(f"data.source: {source!r}: not UTF-8 text")
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"data.source: {source!r}: the corpus is empty")
    return _Corpus(source, files=tuple(files))


def read_text(source: str) -> str:
    """The whole corpus text (for small corpora, tests, and sampling validation text)."""
    return "".join(_corpus(source).text_chunks())


def _split_point(n: int, val_fraction: float) -> int:
    """How many of n tokens (or characters) are training data; the rest is validation."""
    return int(n * (1.0 - val_fraction))


def _short_split(n: int, val_fraction: float, block_size: int, unit: str = "tokens") -> str | None:
    """Why n tokens cannot be split into train and val of at least block_size + 1 each, or None."""
    n_train = _split_point(n, val_fraction)
    need = block_size + 1
    for part, count in (("train", n_train), ("val", n - n_train)):
        if count < need:
            return (
                f"the corpus is too short: {count:,} {unit} would land in {part} (of {n:,}), "
                f"but one block needs {need:,} (model.block_size + 1); use a longer corpus, "
                f"a smaller model.block_size or another data.val_fraction"
            )
    return None


def _check_vocab_size(cfg: DataConfig) -> None:
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 256:
        raise UserError(f"data.vocab_size: byte-level BPE needs at least 256 (one token per byte), got {cfg.vocab_size}")


def check_source(cfg: DataConfig, block_size: int, origin: str) -> None:
    """Reject a data section that cannot work, before any real work starts.

    Cheap: file sizes bound the character count (UTF-8 uses 1 to 4 bytes per character), and only
    a corpus small enough to be in doubt is read to count its characters exactly.
    """
    try:
        _check_vocab_size(cfg)
        corpus = _corpus(cfg.source)
        if corpus.text is not None:
            n_chars = len(corpus.text)
        else:
            n_bytes = sum(p.stat().st_size for p in corpus.files)
            n_chars = -(-n_bytes // 4)  # at least this many; count exactly only if that is too few
            if _short_split(n_chars, cfg.val_fraction, block_size) is not None:
                n_chars = sum(len(c) for c in corpus.text_chunks())
        if (why := _short_split(n_chars, cfg.val_fraction, block_size, "characters")) is not None:
            raise UserError(f"data.source: {cfg.source!r}: {why}")
    except UserError as err:
        raise UserError(f"{origin}: {err}") from None


# ---------------------------------------------------------------- tokenizers


def make_char_tokenizer(text_chunks: Iterable[str]) -> Tokenizer:
    """One token per distinct character, ids in sorted (code point) order, then "<unk>" last.

    A BPE model with no merges is exactly a character vocabulary, and `tokenizers` encodes it
    faster than a word-level model with a per-character split; Fuse joins pieces without spaces.
    """
    chars: set[str] = set()
    for chunk in text_chunks:
        chars.update(chunk)
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    return tok


def _train_bpe(pieces: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, no prefix space): any text encodes, decode is exact."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer.json; a UserError naming the file if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for any parse problem
        raise UserError(f"{path}: damaged tokenizer file ({str(err).splitlines()[0]})") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} does not fit in uint32")


def _char_encoder(tok: Tokenizer, dtype: np.dtype) -> Callable[[str], np.ndarray]:
    """Encode text with a char tokenizer's vocabulary in numpy: the same ids as `tok.encode`, about
    20x faster and without the ~100-byte Encoding object `tokenizers` builds per token."""
    vocab = tok.get_vocab()
    points = np.array([ord(ch) for ch in vocab if ch != UNK], dtype=np.uint32)  # (V-1,)
    lut = np.full(int(points.max()) + 2, vocab[UNK], dtype=dtype)  # code point -> id; last slot: unknown
    lut[points] = [vocab[ch] for ch in vocab if ch != UNK]

    def encode(text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n,)
        return lut[np.minimum(codes, len(lut) - 1)]  # (n,) ids in `dtype`

    return encode


def _pieces(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a text stream into pieces of at most `size` characters, ending after a newline when
    there is one, so BPE never sees a word cut in two and the cuts depend only on the text."""
    carry = ""
    for chunk in chunks:
        buf, start = carry + chunk, 0
        while len(buf) - start > size:
            cut = buf.rfind("\n", start, start + size) + 1
            if cut <= start:
                cut = start + size
            yield buf[start:cut]
            start = cut
        carry = buf[start:]
    if carry:
        yield carry


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- the token cache


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


def _fingerprint(corpus: _Corpus) -> tuple[str, int]:
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


def _build(cfg: DataConfig, corpus: _Corpus, n_chars: int, corpus_sha: str, out: Path) -> None:
    """Train the tokenizer and write tokenizer.json, tokens.bin and meta.json into `out`."""
    if cfg.tokenizer == "char":
        with _progress(n_chars, "data: scanning characters") as bar:
            tok = make_char_tokenizer(_counted(corpus.text_chunks(), bar))
    else:
        with _progress(n_chars, "data: training BPE") as bar:
            tok = _train_bpe(_counted(_pieces(corpus.text_chunks()), bar), cfg.vocab_size)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    n_tokens = 0
    with open(out / "tokens.bin", "wb") as f, _progress(n_chars, "data: encoding") as bar:
        if cfg.tokenizer == "char":
            encode = _char_encoder(tok, dtype)
            for chunk in corpus.text_chunks():
                ids = encode(chunk)
                ids.tofile(f)
                n_tokens += len(ids)
                bar.update(len(chunk))
        else:
            # encode_batch_fast (tokenizers >= 0.20) skips offsets: ~1.7x faster, less memory
            encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
            for batch in _batched(_pieces(corpus.text_chunks()), ENCODE_PIECES):
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


def prepare(cfg: DataConfig, block_size: int) -> PreparedData:
    """Tokenize the corpus (or reuse the cache) and split it into train and val token arrays."""
    _check_vocab_size(cfg)
    corpus = _corpus(cfg.source)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    corpus_sha, n_chars = _fingerprint(corpus)
    path = root / _cache_name(cfg, corpus_sha)
    cached = _open_cache(path)
    if cached is None:
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
        cached = _open_cache(path)
        assert cached is not None, f"cache entry {path} unreadable right after writing it"
        state = "prepared"
    else:
        state = "cached"
    tok, tokens, meta = cached
    n = len(tokens)
    if (why := _short_split(n, cfg.val_fraction, block_size)) is not None:
        raise UserError(f"data.source: {cfg.source!r}: {why}")
    split = _split_point(n, cfg.val_fraction)
    print(
        f"data: {cfg.source}: {meta['n_chars']:,} chars -> {n:,} tokens "
        f"({cfg.tokenizer}, vocab {meta['vocab_size']:,}, {meta['dtype']}); "
        f"train {split:,}, val {n - split:,}; {state} in {path}",
        file=sys.stderr,
    )
    return PreparedData(tokenizer=tok, train=tokens[:split], val=tokens[split:], vocab_size=tok.get_vocab_size())


# ---------------------------------------------------------------- batches


def _entropy(seed: int) -> int:
    return seed % (1 << 64)  # SeedSequence wants non-negative ints; recipes allow negative seeds


def _n_offsets(tokens: np.ndarray, block_size: int) -> int:
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens cannot fill a block of {block_size} plus one target")
    return len(tokens) - block_size


def _gather(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    index = offsets[:, None] + np.arange(block_size)  # (B, T)
    return tokens[index].astype(np.int64), tokens[index + 1].astype(np.int64)  # x, y: (B, T) each


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0, rank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks x (B, T) and their next tokens y (B, T), int64.

    The offsets are a pure function of (seed, step, micro, rank): no RNG state to save or restore,
    a resumed run reads exactly the batches it would have read, and ranks never coordinate.
    """
    rng = np.random.default_rng([_entropy(seed), step, micro, rank])
    offsets = rng.integers(0, _n_offsets(tokens, block_size), size=batch_size)  # (B,)
    return _gather(tokens, offsets, block_size)


def eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same `n_batches` batches on every call, so validation losses are comparable."""
    rng = np.random.default_rng([_entropy(seed), 0xE7A1])
    offsets = rng.integers(0, _n_offsets(tokens, block_size), size=(n_batches, batch_size))  # (N, B)
    for row in offsets:
        yield _gather(tokens, row, block_size)


def val_blocks(
    tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the split's distinct, non-overlapping blocks (the last batch may be short).

    Every complete block when `max_batches * batch_size` blocks cover the split, so the mean loss
    over them is the split's exact loss (only the < block_size tokens after the last complete
    block go unscored); a larger split gets the same fixed, seeded subset of blocks on every call.
    """
    n_blocks = (len(tokens) - 1) // block_size  # each block needs one more token as its last target
    if n_blocks < 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill a block of {block_size} plus one target")
    starts = np.arange(n_blocks) * block_size  # (n_blocks,)
    if n_blocks > max_batches * batch_size:
        rng = np.random.default_rng([_entropy(seed), 0xB10C])
        starts = np.sort(rng.choice(starts, size=max_batches * batch_size, replace=False))
    for first in range(0, len(starts), batch_size):
        yield _gather(tokens, starts[first : first + batch_size], block_size)
