"""Continuous batching in the runtime: sequences join a running batch, decode together and leave,
each with its own options and RNG, and write exactly what they write alone."""

from __future__ import annotations

from edgecraft.runtime import load
from edgecraft.runtime.batch import Batch

REQUESTS = [  # prompt, options: sampled and greedy, stop strings, penalties, windows that slide
    ("The cat", dict(max_new_tokens=40, temperature=0.9, seed=1)),
    ("A dog", dict(max_new_tokens=25, temperature=0, stop=["."])),
    ("", dict(max_new_tokens=50, temperature=1.0, top_k=5, seed=7)),
    ("Big red", dict(max_new_tokens=35, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=3)),
    ("The log", dict(max_new_tokens=10, temperature=0)),
]


def test_joining_and_leaving_sequences_write_what_they_write_alone(tiny_bundle):
    model = load(tiny_bundle)
    alone = [model.generate(prompt, **options) for prompt, options in REQUESTS]
    batch = Batch(model.engine, 3)  # fewer slots than requests: later ones wait for a free slot
    waiting = [model.sequence(prompt, **options) for prompt, options in REQUESTS]
    seqs = list(waiting)
    steps = 0
    while waiting or batch.active:
        if waiting and batch.free and steps % 3 == 0:  # join between steps, one at a time
            batch.join([waiting.pop(0)])
        batch.step()
        steps += 1
        assert len(batch.active) <= 3
        assert all(batch.engine.lengths[len(batch.active) :] == 0)  # active slots stay packed
    assert ["".join(s.pieces) for s in seqs] == alone
    assert [s.finish_reason for s in seqs][4] == "length"


def test_a_sequence_that_leaves_early_frees_its_slot_at_once(tiny_bundle):
    model = load(tiny_bundle)
    batch = Batch(model.engine, 2)
    a = model.sequence("The cat", max_new_tokens=30, temperature=0)
    b = model.sequence("A dog", max_new_tokens=30, temperature=0)
    batch.join([a, b])
    for _ in range(5):
        batch.step()
    batch.leave(a)  # a client disconnected
    assert batch.active == [b] and batch.free == 1
    while batch.active:
        batch.step()
    assert "".join(b.pieces) == model.generate("A dog", max_new_tokens=30, temperature=0)


def test_generate_batch_rows_equal_generate_alone_with_sampling(tiny_bundle):
    model = load(tiny_bundle)
    prompts = ["The cat", "A", "Big red dog"]
    rows = model.generate_batch(prompts, max_new_tokens=40, temperature=1.0, top_k=8, seed=42)
    assert rows == [model.generate(p, max_new_tokens=40, temperature=1.0, top_k=8, seed=42) for p in prompts]
