"""Tokenizers: one character per token, or byte-level BPE, both saved as one tokenizer.json.

BPE trains and encodes on pieces of the text cut after a newline, so no word is cut in two and the
cuts depend only on the text, never on how it was read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

UNK = "<unk>"  # the char tokenizer's unknown-character token; it has the last id
PIECE_CHARS = 1 << 16  # BPE works on pieces of about this size, cut after a newline


def check_vocab_size(cfg: DataConfig) -> None:
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 256:
        raise UserError(f"data.vocab_size: byte-level BPE needs at least 256 (one token per byte), got {cfg.vocab_size}")


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


def train_bpe(pieces: Iterable[str], vocab_size: int) -> Tokenizer:
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


def char_encoder(tok: Tokenizer, dtype: np.dtype) -> Callable[[str], np.ndarray]:
    """Encode text with a char tokenizer's vocabulary in numpy: the same ids as `tok.encode`, without
    the Encoding object `tokenizers` builds per token, which dominates preparing a large corpus."""
    vocab = tok.get_vocab()
    points = np.array([ord(ch) for ch in vocab if ch != UNK], dtype=np.uint32)  # (V-1,)
    lut = np.full(int(points.max()) + 2, vocab[UNK], dtype=dtype)  # code point -> id; last slot: unknown
    lut[points] = [vocab[ch] for ch in vocab if ch != UNK]

    def encode(text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n,)
        return lut[np.minimum(codes, len(lut) - 1)]  # (n,) ids in `dtype`

    return encode


def pieces(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
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


def batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
