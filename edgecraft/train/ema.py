"""An exponential moving average of the weights (train.ema), used for eval, samples and the result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in its own order (param groups concatenated)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], optimizer: torch.optim.Optimizer, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * weights after optimizer step `step` (1-based), d = min(decay,
    1 - 1/step): the plain mean of all steps so far until the average's window is full, so the
    initial weights never linger in it."""
    torch._foreach_lerp_(ema, optimizer_params(optimizer), 1.0 - min(decay, 1.0 - 1.0 / step))


@contextlib.contextmanager
def averaged(optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None) -> Iterator[None]:
    """The model holds the averaged weights inside the block and its training weights again after."""
    if ema is None:
        yield
        return
    params = optimizer_params(optimizer)
    with torch.no_grad():
        trained = [p.clone() for p in params]
        torch._foreach_copy_(params, ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, trained)
