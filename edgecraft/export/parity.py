"""The fp32 graph against PyTorch on held-out text: prefill, cached decode, top-1, KL, perplexity.

The export refuses a graph whose logits differ from PyTorch's by more than PARITY_BOUND: that would
be a bug in the graph builder, not a property of the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from edgecraft.config import GPTConfig
from edgecraft.errors import UserError
from edgecraft.model import GPT
from edgecraft.runtime.onnx_engine import OnnxEngine

PARITY_BOUND = 1e-4  # max |logit difference| fp32 ONNX vs PyTorch: float32 rounding, far below it
CHECK_WINDOWS = 8  # validation windows for the perplexity / KL / top-1 figures


def check_engine(path: Path, cfg: GPTConfig) -> OnnxEngine:
    """One-thread engine over a graph being exported, before the bundle's manifest exists."""
    return OnnxEngine(path, cfg, threads=1)


def val_windows(tokens: np.ndarray, block_size: int, n: int) -> np.ndarray:
    """n windows (n, T + 1), T <= block_size, spread evenly over the validation tokens."""
    length = min(block_size, len(tokens) - 1)
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def parity_checks(model: GPT, engine: OnnxEngine, val: np.ndarray) -> dict:
    """ONNX (through the OnnxEngine) vs PyTorch on held-out text.

    - prefill: right-padded rows of different lengths in one call, logits at every real position
    - decode: a prefix prefilled, the rest one token per step, two rows at different positions,
      against one full PyTorch forward pass (the cache must reproduce it)
    - top-1 agreement, KL(PyTorch || ONNX) and perplexity of both on the same windows
    """
    cfg = model.cfg
    windows = val_windows(val, cfg.block_size, CHECK_WINDOWS)  # (W, T + 1)
    x = windows[:, :-1]  # (W, T)
    W, T = x.shape
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()  # (W, T, V)

    lengths = np.maximum(1, T - np.arange(W) * (T // W))  # (W,) ragged, first row full
    engine.reset(W)
    got = engine.prefill(x, lengths)  # (W, T, V)
    real = np.arange(T)[None, :] < lengths[:, None]  # (W, T)
    prefill_diff = float(np.abs(got - ref)[real].max())

    # decode: row 0 prefilled with 1 token, row 1 with T // 4, then T - T // 4 steps for both,
    # so the two rows sit at different positions and together cover every position
    starts = np.array([1, max(1, T // 4)])  # (2,)
    engine.reset(2)
    pre = engine.prefill(x[:2, : starts.max()], starts)  # (2, S, V)
    diffs = [np.abs(pre[b, : starts[b]] - ref[b, : starts[b]]).max() for b in range(2)]
    rows = np.arange(2)
    for s in range(T - starts.max()):
        out = engine.decode(x[rows, starts + s])  # (2, V)
        diffs.append(np.abs(out - ref[rows, starts + s]).max())
    decode_diff = float(max(diffs))

    lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)  # (W, T, V)
    targets = windows[:, 1:]
    nll_ref = -np.take_along_axis(lp_ref, targets[..., None], -1)[..., 0][real].mean()
    nll_got = -np.take_along_axis(lp_got, targets[..., None], -1)[..., 0][real].mean()
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1)[real]
    checks = {
        "max_abs_logit_diff_prefill": prefill_diff,
        "max_abs_logit_diff_decode": decode_diff,
        "parity_bound": PARITY_BOUND,
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1))[real].mean()),
        "kl_divergence_mean": float(kl.mean()),
        "kl_divergence_max": float(kl.max()),
        "perplexity_pytorch": math.exp(nll_ref),
        "perplexity_onnx": math.exp(nll_got),
        "perplexity_delta": math.exp(nll_got) - math.exp(nll_ref),
        "tokens_checked": int(real.sum()),
    }
    worst = max(prefill_diff, decode_diff)
    if not worst <= PARITY_BOUND:  # also catches NaN
        raise UserError(
            f"the ONNX graph does not match PyTorch (max logit difference {worst:.3g} > "
            f"{PARITY_BOUND}); this is a bug in edgecraft's export, please report it",
            exit_code=1,
        )
    return checks
