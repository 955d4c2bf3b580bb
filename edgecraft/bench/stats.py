"""Summary statistics for benchmark samples: medians with min–max, mean ± stddev, percentiles.

Kept apart from the measuring code so the numbers a table shows can be tested on fixed inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median, mean, sample stddev (0 for one value), min, max and the count of `values`."""
    if len(values) == 0:
        raise ValueError("summarize needs at least one value")
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "stddev": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...}: linear interpolation between order statistics."""
    if len(values) == 0:
        raise ValueError("percentiles needs at least one value")
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in qs}


def rates(counts: Sequence[int] | int, seconds: Sequence[float]) -> list[float]:
    """Items per second for each timed repetition (one count for all, or one per repetition)."""
    if isinstance(counts, int):
        counts = [counts] * len(seconds)
    return [c / s for c, s in zip(counts, seconds, strict=True)]
