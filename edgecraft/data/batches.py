"""Training and validation batches drawn from a token array.

Batches are a pure function of (seed, step, micro-step, global row), so a resumed run reads
exactly the batches an uninterrupted run would, and each DDP rank draws its own rows of the
global batch without any shared state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


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
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    micro: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks x (B, T) and their next tokens y (B, T), int64: rows [rank*B, (rank+1)*B) of
    the micro-step's global batch of B * world_size rows.

    The global batch is a pure function of (seed, step, micro, its size): no RNG state to save or
    restore, a resumed run reads exactly the batches it would have read, ranks never coordinate,
    and 2 processes of 8 rows read what 1 process of 16 rows reads.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    rng = np.random.default_rng([_entropy(seed), step, micro, 0])  # 0: the stream 1-process runs always had
    offsets = rng.integers(0, _n_offsets(tokens, block_size), size=batch_size * world_size)  # (B * world,)
    return _gather(tokens, offsets[rank * batch_size : (rank + 1) * batch_size], block_size)


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
