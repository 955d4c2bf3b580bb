"""The embeddable runtime: text streaming, stop strings, bundles, generation over a real exported model."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgecraft.runtime.text import REPLACEMENT, IncrementalDecoder, StopFilter, TextStream

MIXED = "café crème, 中文字 naïve — ok"


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """Byte-level BPE with few merges, so "é" is two tokens and "中" three."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=262, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the cat sat on the mat " * 20], trainer=trainer)
    assert len(tok.encode("é").ids) == 2 and len(tok.encode("中").ids) == 3
    return tok


# ------------------------------------------------------------------------------- text streaming


def test_incremental_decoder_never_emits_a_broken_character(byte_bpe):
    ids = byte_bpe.encode(MIXED).ids
    decoder = IncrementalDecoder(byte_bpe)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == byte_bpe.decode(ids) == MIXED
    assert "" in pieces  # some tokens completed no character and were held back


def test_incremental_decoder_flushes_an_incomplete_tail_like_decode(byte_bpe):
    ids = byte_bpe.encode("ab中").ids[:-1]  # the last byte of 中 is missing
    decoder = IncrementalDecoder(byte_bpe)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == "ab"
    assert "ab" + decoder.finish() == byte_bpe.decode(ids)


def feed(stops, pieces):
    f = StopFilter(stops)
    out = [f.push(p) for p in pieces]
    return out, f


def test_stop_filter_cuts_before_a_stop_string_split_over_pieces():
    out, f = feed(["\n\n", "END"], ["hello E", "N", "D more"])
    assert out == ["hello ", "", ""]
    assert f.stopped


def test_stop_filter_releases_a_held_prefix_that_did_not_become_a_stop():
    out, f = feed(["END"], ["abc E", "Nx", "yz"])
    assert out == ["abc ", "ENx", "yz"]
    assert not f.stopped and f.finish() == ""


def test_stop_filter_holds_a_possible_stop_until_finish():
    out, f = feed(["<|end|>"], ["one <|e"])
    assert out == ["one "]
    assert f.finish() == "<|e"


def test_stop_filter_picks_the_earliest_stop():
    out, f = feed(["b", "a"], ["xxab"])
    assert out == ["xx"] and f.stopped


def test_text_stream_with_stop_inside_a_multibyte_run(byte_bpe):
    ids = byte_bpe.encode("naïve 中文 rest").ids
    stream = TextStream(byte_bpe, ["文"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    assert "".join(pieces) == "naïve 中"
    assert all(REPLACEMENT not in p for p in pieces)
