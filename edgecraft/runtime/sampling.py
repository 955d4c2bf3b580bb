"""Choosing the next token from logits: pure numpy, batched, seedable.

Every function takes logits (B, V) and returns new arrays (the engine's logits buffer is reused
by its next call, so nothing here writes into it). The RNG is passed in, never global, so the same
seed gives the same text and two models in one process never disturb each other; each row may
have its own, so a sequence's text does not depend on what else is in its batch. It is the
standard library's `random.Random`, one uniform draw per row and token: importing numpy.random
would cost the `edgecraft generate` process part of its memory budget (tests/test_runtime.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Invalid values raise ValueError naming the parameter; none is clamped.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (ties at the k-th value are kept too).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    repetition_penalty: CTRL-style, over tokens already in the context: positive logits are
        divided by it, negative ones multiplied; 1.0 is off, > 1 discourages repeats.
    """

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        for name in ("temperature", "repetition_penalty"):  # infinity divides every logit away
            if getattr(self, name) == math.inf:
                raise ValueError(f"{name} must be finite, got inf")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits (B, V), seen (B, V) bool: the tokens already in each row's context are penalised."""
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return np.where(seen, penalized, logits)


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """logits (B, V) with everything below each row's k-th largest value set to -inf."""
    V = logits.shape[-1]
    if k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[:, V - k : V - k + 1]  # (B, 1)
    return np.where(logits < kth, -np.inf, logits)


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """logits (B, V) with everything outside each row's nucleus set to -inf: the most likely tokens
    until their probability reaches p (the most likely one always; ties at the edge are kept)."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))  # (B, V) unnormalised
    probs /= probs.sum(axis=-1, keepdims=True)
    ranked = -np.sort(-probs, axis=-1)  # (B, V) descending
    mass_before = np.cumsum(ranked, axis=-1) - ranked  # (B, V) mass of the more likely tokens
    n_keep = (mass_before < p).sum(axis=-1)  # (B,) >= 1
    edge = ranked[np.arange(len(ranked)), n_keep - 1][:, None]  # (B, 1) least likely kept probability
    return np.where(probs >= edge, logits, -np.inf)


def filtered_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Logits (B, V) float64 after temperature, top-k and top-p (-inf outside the support):
    `sample` draws from their softmax (temperature > 0)."""
    z = logits.astype(np.float64) / params.temperature  # (B, V)
    if params.top_k is not None:
        z = top_k_mask(z, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        z = top_p_mask(z, params.top_p)
    return z


def sample(
    logits: np.ndarray,
    rng: random.Random | list[random.Random],
    params: SamplingParams,
    seen: np.ndarray | None = None,
) -> np.ndarray:
    """Next token ids (B,) int64 from logits (B, V); `rng` is one RNG for every row or one per row;
    `seen` (B, V) bool feeds the repetition penalty.

    Inverse-CDF sampling: the first token whose cumulative probability exceeds a uniform draw,
    exactly softmax(z) in a handful of numpy calls. Tokens outside the support have probability 0
    and can never be the first to exceed it.
    """
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the tokens already in each row's context")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(axis=-1)
    z = filtered_logits(logits, params)  # (B, V)
    cdf = np.exp(z - z.max(axis=-1, keepdims=True)).cumsum(axis=-1)  # (B, V) unnormalised
    rngs = rng if isinstance(rng, list) else [rng] * len(cdf)
    # per row, the first token whose cumulative mass exceeds u ~ U[0, total); searching all but the
    # last entry keeps a draw that rounds up to the total inside the vocabulary
    return np.array(
        [row[:-1].searchsorted(r.random() * row[-1], "right") for row, r in zip(cdf, rngs)], dtype=np.int64
    )
