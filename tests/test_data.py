"""Corpora, tokenizers, the token cache and batches: real files under tmp_path, no mocks."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgecraft import data
from edgecraft.data.tokenizer import PIECE_CHARS, UNK, pieces
from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

SAMPLE = "First line\nsecond line, with é→中 and a tab\t\r\nthird: 42 + 7 = 49!\n\n" * 40


def cfg_for(source, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))  # write_bytes: keep \r\n exactly as given
    return path


def entry_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- sources


def test_file_folder_and_glob_sources(tmp_path):
    f = write(tmp_path / "one.txt", SAMPLE)
    assert data.read_text(str(f)) == SAMPLE

    folder = tmp_path / "corpus"
    write(folder / "b.txt", "bee\n")
    write(folder / "a.txt", "ay\n")
    write(folder / "sub" / "c.md", "sea\n")
    write(folder / ".hidden.txt", "secret\n")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    assert [p.name for p in data.text_files(str(folder))] == ["a.txt", "b.txt", "c.md"]
    assert data.read_text(str(folder)) == "ay\nbee\nsea\n"

    assert data.read_text(str(folder / "*.txt")) == "ay\nbee\n"
    assert data.read_text(str(folder / "**" / "*.md")) == "sea\n"


def test_builtin_python_docs_is_sorted_topics():
    from pydoc_data.topics import topics

    text = data.read_text("builtin:python-docs")
    assert text == "\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000
    data.check_source(DataConfig(source="builtin:python-docs"), 256, "r.toml")


@pytest.mark.parametrize(
    "source, words",
    [
        ("missing.txt", "no such file"),
        ("builtin:nope", "unknown built-in corpus"),
        ("nothing-*.txt", "matches no text files"),
    ],
)
def test_bad_sources_name_data_source(tmp_path, monkeypatch, source, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"^r\.toml: data\.source: .*{words}"):
        data.check_source(DataConfig(source=source), 8, "r.toml")
    with pytest.raises(UserError, match=r"^data\.source: "):
        data.prepare(cfg_for(source, tmp_path), 8)


def test_empty_binary_and_too_short_corpora(tmp_path):
    write(tmp_path / "empty.txt", "")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    write(tmp_path / "short.txt", "x" * 100)
    with pytest.raises(UserError, match="data.source: .*empty"):
        data.check_source(cfg_for(tmp_path / "empty.txt", tmp_path), 8, "r.toml")
    with pytest.raises(UserError, match="data.source: .*not UTF-8"):
        data.check_source(cfg_for(tmp_path / "blob.bin", tmp_path), 8, "r.toml")
    # 100 chars, val_fraction 0.1: 10 land in val, a block of 8 needs 9, of 16 needs 17
    data.check_source(cfg_for(tmp_path / "short.txt", tmp_path), 8, "r.toml")
    with pytest.raises(UserError, match=r"r\.toml: data\.source: .*10 characters would land in val"):
        data.check_source(cfg_for(tmp_path / "short.txt", tmp_path), 16, "r.toml")
    with pytest.raises(UserError, match="would land in val"):
        data.prepare(cfg_for(tmp_path / "short.txt", tmp_path), 16)
    with pytest.raises(UserError, match="data.vocab_size"):
        data.check_source(cfg_for(tmp_path / "short.txt", tmp_path, tokenizer="bpe", vocab_size=100), 8, "r.toml")


def test_bad_bytes_deep_in_a_file_leave_no_cache_behind(tmp_path):
    """The sniff only reads the head; the error surfaces mid-prepare and nothing half-written stays."""
    f = tmp_path / "late.txt"
    f.write_bytes(b"fine text\n" * 30_000 + b"\xff\xfe oops\n")
    data.check_source(cfg_for(f, tmp_path), 8, "r.toml")  # cheap: does not read it all
    with pytest.raises(UserError, match=r"data\.source: .*late\.txt: not UTF-8 text"):
        data.prepare(cfg_for(f, tmp_path), 8)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_order_and_unknowns(tmp_path):
    tok = data.make_char_tokenizer(["ba\n", "é→中\r\n\t"])
    vocab = tok.get_vocab()
    chars = sorted(set("ba\né→中\r\t"))
    assert [vocab[c] for c in chars] == list(range(len(chars)))
    assert vocab[UNK] == len(chars)  # "<unk>" is last
    text = "ab\r\n\tä中→é\n<unk>"
    ids = tok.encode(text).ids
    assert len(ids) == len(text)
    assert ids[5] == vocab[UNK]  # "ä" was never seen
    assert ids[-5:] == [vocab[UNK]] * 5  # a literal "<unk>" is five unknown characters here
    assert tok.decode(tok.encode("ab\n中\r\n").ids) == "ab\n中\r\n"  # pieces joined with no spaces

    tok.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode(text).ids == ids
    assert data.load_tokenizer(tmp_path / "tokenizer.json").decode(ids) == tok.decode(ids)


def test_prepared_char_ids_match_the_tokenizer(tmp_path):
    """prepare encodes char corpora with a numpy fast path: it must agree with tokenizer.encode."""
    f = write(tmp_path / "c.txt", SAMPLE + "astral 😀 char\n")
    p = data.prepare(cfg_for(f, tmp_path), 8)
    ids = np.concatenate([p.train, p.val])
    assert ids.tolist() == p.tokenizer.encode(data.read_text(str(f))).ids
    assert p.tokenizer.decode(ids.tolist()) == data.read_text(str(f))
    assert p.vocab_size == len(set(SAMPLE + "astral 😀 char\n")) + 1


def test_bpe_round_trip(tmp_path):
    f = write(tmp_path / "b.txt", SAMPLE)
    p = data.prepare(cfg_for(f, tmp_path, tokenizer="bpe", vocab_size=300), 8)
    assert 256 < p.vocab_size <= 300  # a repetitive corpus may run out of merges
    ids = np.concatenate([p.train, p.val])
    assert len(ids) < len(SAMPLE) / 2  # merges learned
    assert p.tokenizer.decode(ids.tolist()) == SAMPLE
    unseen = "ünïcödé 😀 never seen\r\n\n  spaces"
    assert p.tokenizer.decode(p.tokenizer.encode(unseen).ids) == unseen


def test_bpe_pieces_cut_after_newlines_whatever_the_chunking():
    text = "".join(f"line {i} " + "word " * (i % 37) + "\n" for i in range(3000)) + "x" * 500
    expected = list(pieces([text], 1000))
    assert "".join(expected) == text
    assert all(len(p) <= 1000 for p in expected)
    assert all(p.endswith("\n") for p in expected[:-2])  # the tail of 500 x's has no newline
    rechunked = [text[i : i + 777] for i in range(0, len(text), 777)]
    assert list(pieces(rechunked, 1000)) == expected


def test_bpe_round_trip_over_many_pieces(tmp_path):
    text = "".join(f"{i}: the cat sat on the mat, é→中\n" * (i % 5 + 1) for i in range(2000))
    assert len(text) > 2 * PIECE_CHARS
    f = write(tmp_path / "many.txt", text)
    p = data.prepare(cfg_for(f, tmp_path, tokenizer="bpe", vocab_size=400), 8)
    assert p.tokenizer.decode(np.concatenate([p.train, p.val]).tolist()) == text


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.json: tokenizer file not found"):
        data.load_tokenizer(tmp_path / "nope.json")
    write(tmp_path / "bad.json", '{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="bad.json: damaged tokenizer file"):
        data.load_tokenizer(tmp_path / "bad.json")


def test_token_dtype():
    assert data.token_dtype(65) == np.uint8
    assert data.token_dtype(256) == np.uint8
    assert data.token_dtype(257) == np.uint16
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32


# ---------------------------------------------------------------- the cache


def test_cache_is_reused_and_keyed_by_content_and_settings(tmp_path):
    f = write(tmp_path / "c.txt", SAMPLE)
    first = data.prepare(cfg_for(f, tmp_path), 8)
    (entry,) = entry_dirs(tmp_path)
    stamp = (entry / "tokens.bin").stat().st_mtime_ns
    assert first.train.dtype == np.uint8 and isinstance(first.train, np.memmap)

    again = data.prepare(cfg_for(f, tmp_path, val_fraction=0.2), 8)  # split only: same entry
    assert entry_dirs(tmp_path) == [entry]
    assert (entry / "tokens.bin").stat().st_mtime_ns == stamp
    assert len(again.train) + len(again.val) == len(first.train) + len(first.val)

    data.prepare(cfg_for(f, tmp_path, tokenizer="bpe", vocab_size=300), 8)
    data.prepare(cfg_for(f, tmp_path, tokenizer="bpe", vocab_size=320), 8)
    write(f, SAMPLE.replace("49", "50"))
    data.prepare(cfg_for(f, tmp_path), 8)
    assert len(entry_dirs(tmp_path)) == 4
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    f = write(tmp_path / "c.txt", SAMPLE)
    first = data.prepare(cfg_for(f, tmp_path), 8)
    expected = np.concatenate([first.train, first.val])
    (entry,) = entry_dirs(tmp_path)
    (entry / "tokens.bin").write_bytes(b"\0\0\0")
    again = data.prepare(cfg_for(f, tmp_path), 8)
    assert np.array_equal(np.concatenate([again.train, again.val]), expected)


def test_split_is_the_last_fraction_and_deterministic(tmp_path):
    f = write(tmp_path / "c.txt", SAMPLE)
    p = data.prepare(cfg_for(f, tmp_path, val_fraction=0.25), 8)
    n = len(SAMPLE)
    assert len(p.train) == int(n * 0.75) and len(p.val) == n - int(n * 0.75)
    expected = np.array(p.tokenizer.encode(SAMPLE).ids)
    assert np.array_equal(p.train, expected[: len(p.train)])
    assert np.array_equal(p.val, expected[len(p.train) :])


def test_large_corpus_prepares_in_bounded_memory(tmp_path):
    """20 MB of text prepares while Python-side allocations stay far below the corpus size."""
    line = "The quick brown fox jumps over the lazy dog. é→中 0123456789\n"
    f = tmp_path / "big.txt"
    with open(f, "w", encoding="utf-8") as out:
        for i in range(20_000_000 // (len(line.encode()) * 1000)):
            out.write(f"{i}: " + line * 1000)
    size = f.stat().st_size
    n_chars = len(data.read_text(str(f)))
    tracemalloc.start()
    try:
        p = data.prepare(cfg_for(f, tmp_path), 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(p.train) + len(p.val) == n_chars
    assert peak < size / 3, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB corpus"


# ---------------------------------------------------------------- batches


def test_get_batch_is_a_pure_function():
    tokens = np.arange(1000, dtype=np.uint16) % 251
    x, y = data.get_batch(tokens, 4, 16, seed=1, step=7)
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (4, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # y is x shifted by one in the token stream
        start = int(np.flatnonzero(tokens == row_x[0])[0])
        assert np.array_equal(row_y, tokens[start + 1 : start + 17])
    again = data.get_batch(tokens, 4, 16, seed=1, step=7)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    for other in [dict(seed=1, step=8), dict(seed=2, step=7), dict(seed=1, step=7, micro=1), dict(seed=1, step=7, rank=1, world_size=2)]:
        assert not np.array_equal(x, data.get_batch(tokens, 4, 16, **other)[0])
    x_neg, _ = data.get_batch(tokens, 4, 16, seed=-5, step=0)
    assert x_neg.shape == (4, 16)
    last = data.get_batch(np.arange(17), 3, 16, seed=0, step=0)  # exactly one block fits
    assert np.array_equal(last[1][0], np.arange(1, 17))
    with pytest.raises(ValueError):
        data.get_batch(np.arange(16), 1, 16, seed=0, step=0)


def test_eval_batches_are_fixed():
    tokens = np.arange(5000, dtype=np.uint32)
    first = list(data.eval_batches(tokens, 3, 8, n_batches=4, seed=1))
    second = list(data.eval_batches(tokens, 3, 8, n_batches=4, seed=1))
    assert len(first) == 4
    for (x1, y1), (x2, y2) in zip(first, second):
        assert x1.shape == (3, 8) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert np.array_equal(y1, x1 + 1)


def test_val_blocks_cover_the_whole_split_or_a_fixed_subset():
    tokens = np.arange(1000, dtype=np.uint32)  # (1000 - 1) // 16 = 62 complete blocks
    whole = list(data.val_blocks(tokens, 8, 16, max_batches=8, seed=1))  # 64 blocks fit
    assert [len(x) for x, _ in whole] == [8] * 7 + [6]  # the last batch is short
    x = np.concatenate([x for x, _ in whole])
    y = np.concatenate([y for _, y in whole])
    assert np.array_equal(x.ravel(), tokens[: 62 * 16]) and np.array_equal(y, x + 1)
    subset = list(data.val_blocks(tokens, 8, 16, max_batches=3, seed=1))
    starts = np.concatenate([x[:, 0] for x, _ in subset])
    assert len(starts) == 24 and len(set(starts)) == 24 and np.all(starts % 16 == 0)
    again = np.concatenate([x[:, 0] for x, _ in data.val_blocks(tokens, 8, 16, max_batches=3, seed=1)])
    assert np.array_equal(starts, again)
    assert np.array_equal(list(data.val_blocks(np.arange(17), 4, 16, 1, 0))[0][1][0], np.arange(1, 17))
    with pytest.raises(ValueError):
        next(data.val_blocks(np.arange(16), 1, 16, 1, 0))
