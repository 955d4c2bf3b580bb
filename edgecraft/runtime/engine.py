"""The engine interface: what `Model` drives, whatever runs the graph.

An engine owns a batch of slots, each holding one sequence's KV cache. Sequences join a free slot
(`prefill` of that row alone), decode one token per step together, and leave (`release`); the
active ones are kept packed at the front (`move`), so a step over n active sequences costs a
batch-n call however many slots exist — what the server's continuous batching needs. onnxruntime
(`runtime/onnx_engine.py`), PyTorch (`edgecraft/torch_engine.py`, the training side) and tinygrad
(`runtime/tinygrad/`) implement it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    block_size: int  # positions a slot's cache holds
    vocab_size: int
    lengths: np.ndarray  # (B,) int64: tokens cached per slot, kept current by the engine

    def reset(self, batch_size: int) -> None:
        """`batch_size` empty slots (buffers reallocated only when the size changes)."""

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Append right-padded chunks ids (B, S), lengths (B,) real tokens each, after what each
        slot holds -> logits (B, S, V). A row of length 0 is left untouched; logits past a row's
        length are garbage. ValueError when a slot would pass block_size."""

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One token for each of the slots 0..n-1 (n = len(ids) <= B), each at its own position
        -> logits (n, V), possibly a view that the next call overwrites."""

    def release(self, slot: int) -> None:
        """Empty `slot`; its next prefill starts a new sequence."""

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s cache and length into slot `dst`; `src` is left empty."""


def prefill_lengths(ids: np.ndarray, lengths: np.ndarray | None, cached: np.ndarray, block_size: int) -> np.ndarray:
    """Every engine's prefill arguments checked alike: ids (B, S) for the B slots, `lengths` (B,)
    real tokens per row (None: all S) fitting after what each slot holds. Returns the lengths."""
    B, S = ids.shape
    if B != len(cached):
        raise ValueError(f"prefill got {B} rows for a batch of {len(cached)}; call reset({B})")
    n = np.full(B, S, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
    if n.shape != (B,) or (n < 0).any() or (n > S).any():
        raise ValueError(f"lengths must be (B,) = ({B},) values in 0..{S}, got {n.tolist()}")
    total = cached + n
    if (total > block_size).any():
        b = int(np.argmax(total))
        raise ValueError(f"row {b}: {int(cached[b])} cached + {int(n[b])} new positions exceed block_size {block_size}")
    return n
