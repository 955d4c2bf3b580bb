"""Corpora: what `data.source` names, resolved to an exact text, and whether it is long enough.

A corpus is the exact concatenation of its text: one file, a folder's text files or a glob's
matches (sorted by path, concatenated as they are), or a built-in corpus that needs no download
(`builtin:python-docs`, the documentation text every CPython ships in `pydoc_data`). Everything
streams in chunks, so a corpus larger than memory is never read whole. The last `val_fraction`
of the token stream is validation (as in nanoGPT).
"""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgecraft.data.tokenizer import check_vocab_size
from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

CHUNK_CHARS = 1 << 18  # text read per step while streaming a corpus
_SNIFF_BYTES = 8192


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
    """The files a path source names, in corpus order; [] when it names nothing."""
    return scan_files(source)[0]


def scan_files(source: str) -> tuple[list[Path], list[Path]]:
    """The files a path source names, in corpus order, and those it skips as not text.

    A file is itself; a folder is its text files (recursively, hidden entries skipped); a glob is
    its text matches (`**` recurses). Folders and globs are sorted by path and skip files that do
    not look like UTF-8 text, so a stray image does not end up in the corpus; the data line says
    how many were skipped.
    """
    if _is_glob(source):
        found = sorted((Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)), key=str)
        found = [p for p in found if p.is_file()]
    else:
        path = Path(source).expanduser()
        if path.is_file():
            return [path], []
        if not path.is_dir():
            return [], []
        found = sorted(
            (p for p in path.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    text = [_looks_like_text(p) for p in found]
    return [p for p, t in zip(found, text) if t], [p for p, t in zip(found, text) if not t]


@dataclass(frozen=True)
class Corpus:
    """A resolved source: either files to concatenate or a built-in text."""

    source: str
    files: tuple[Path, ...] = ()
    text: str | None = None
    skipped: tuple[Path, ...] = ()  # a folder's or glob's files that are not UTF-8 text

    def describe(self) -> str:
        """Which files the corpus is made of, for the data line ('' for one file or a built-in)."""
        if not self.skipped and len(self.files) <= 1:
            return ""
        skipped = f", {len(self.skipped)} skipped as not UTF-8 text (first: {self.skipped[0]})" if self.skipped else ""
        return f" ({len(self.files)} file{'s' if len(self.files) != 1 else ''} used{skipped})"

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


def resolve(source: str) -> Corpus:
    """Resolve data.source; a UserError (starting with 'data.source:') if it names nothing usable."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            known = ", ".join(f"builtin:{n}" for n in sorted(BUILTINS))
            raise UserError(f"data.source: unknown built-in corpus {source!r} (known: {known})")
        return Corpus(source, text=BUILTINS[name]())
    files, skipped = scan_files(source)
    if not files:
        none = f" ({len(skipped)} skipped as not UTF-8 text, first: {skipped[0]})" if skipped else ""
        if _is_glob(source):
            raise UserError(f"data.source: {source!r}: the glob matches no text files{none}")
        if Path(source).expanduser().is_dir():
            raise UserError(f"data.source: {source!r}: the folder holds no text files{none}")
        raise UserError(f"data.source: {source!r}: no such file or folder")
    if len(files) == 1 and not _looks_like_text(files[0]):
        raise UserError(f"data.source: {source!r}: not UTF-8 text")
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"data.source: {source!r}: the corpus is empty")
    return Corpus(source, files=tuple(files), skipped=tuple(skipped))


def read_text(source: str) -> str:
    """The whole corpus text (for small corpora, tests, and sampling validation text)."""
    return "".join(resolve(source).text_chunks())


def split_point(n: int, val_fraction: float) -> int:
    """How many of n tokens (or characters) are training data; the rest is validation."""
    return int(n * (1.0 - val_fraction))


def short_split(n: int, val_fraction: float, block_size: int, unit: str = "tokens") -> str | None:
    """Why n tokens cannot be split into train and val of at least block_size + 1 each, or None."""
    n_train = split_point(n, val_fraction)
    need = block_size + 1
    for part, count in (("train", n_train), ("val", n - n_train)):
        if count < need:
            return (
                f"the corpus is too short: {count:,} {unit} would land in {part} (of {n:,}), "
                f"but one block needs {need:,} (model.block_size + 1); use a longer corpus, "
                f"a smaller model.block_size or another data.val_fraction"
            )
    return None


def check_source(cfg: DataConfig, block_size: int, origin: str) -> None:
    """Reject a data section that cannot work, before any real work starts.

    Cheap: file sizes bound the character count (UTF-8 uses 1 to 4 bytes per character), and only
    a corpus small enough to be in doubt is read to count its characters exactly.
    """
    try:
        check_vocab_size(cfg)
        corpus = resolve(cfg.source)
        if corpus.text is not None:
            n_chars = len(corpus.text)
        else:
            n_bytes = sum(p.stat().st_size for p in corpus.files)
            n_chars = -(-n_bytes // 4)  # at least this many; count exactly only if that is too few
            if short_split(n_chars, cfg.val_fraction, block_size) is not None:
                n_chars = sum(len(c) for c in corpus.text_chunks())
        if (why := short_split(n_chars, cfg.val_fraction, block_size, "characters")) is not None:
            raise UserError(f"data.source: {cfg.source!r}: {why}")
    except UserError as err:
        raise UserError(f"{origin}: {err}") from None
