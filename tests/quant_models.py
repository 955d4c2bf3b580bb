"""What the int8 and int4 tests share: tiny trained models, validation windows, the CLI runner."""

from __future__ import annotations

import numpy as np
import torch

from edgecraft.export.parity import val_windows
from edgecraft.model import GPT, GPTConfig

BASE = dict(vocab_size=19, d_model=32, n_layers=2, n_heads=4, d_ff=64, block_size=24)


def trained_model(seed: int = 0, **overrides) -> GPT:
    """A tiny model after a few real optimizer steps (so weights and activations are not init noise)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **overrides}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.arange(BASE["block_size"] + 1) % 7  # a learnable sequence
    idx = torch.stack([torch.roll(pattern, s) for s in range(8)])  # (8, T + 1)
    for _ in range(30):
        _, loss, _ = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def windows(n: int = 2) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], 400)
    tokens[::3] = 5  # some structure
    return val_windows(tokens, BASE["block_size"], n)


def cli(*args):
    """`edgecraft ARGS...` in this process (Typer's CliRunner)."""
    from typer.testing import CliRunner

    from edgecraft.cli import app

    return CliRunner().invoke(app, [*map(str, args)])
