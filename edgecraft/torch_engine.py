"""The engine interface (runtime/engine.py) over a PyTorch GPT: a run's model under runtime.Model.

`edgecraft generate runs/NAME`, the training samples and bench's PyTorch row go through this
engine and `runtime.Model`, so sampling, stop strings, streaming and the sliding window are the
runtime's own and a run writes the same text as its bundle. The GPT's cache grows by
concatenation, so slots in lockstep (a prompt batch, bench) share one batched cache, and slots
at different positions (after a window re-fill, a sequence leaving) each keep their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from edgecraft.errors import UserError
from edgecraft.model import GPT, KVCache
from edgecraft.runtime.engine import prefill_lengths
from edgecraft.runtime.model import Model


class TorchEngine:
    """Prefill and one-token decode over a PyTorch GPT in eval mode, numpy in and out."""

    def __init__(self, model: GPT, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.block_size = model.cfg.block_size
        self.vocab_size = model.cfg.vocab_size
        self.lengths = np.zeros(0, dtype=np.int64)  # (B,) tokens cached per slot
        self.reset(1)

    def reset(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self._batched: KVCache | None = None  # every slot's cache, batched, while all are in lockstep
        self._rows: list[KVCache | None] = [None] * batch_size  # per slot otherwise, each (1, n_kv_heads, T, hs)

    def _split(self) -> None:
        """Give every slot its own cache (once slots stop moving in lockstep)."""
        if self._batched is not None:
            self._rows = [[(k[b : b + 1], v[b : b + 1]) for k, v in self._batched] for b in range(len(self.lengths))]
            self._batched = None

    def _forward(self, ids: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        with torch.inference_mode():
            idx = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)  # (B, S)
            logits, _, cache = self.model(idx, cache=cache)  # (B, S, V)
            return logits.float().cpu().numpy(), cache

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        B, S = ids.shape
        n = prefill_lengths(ids, lengths, self.lengths, self.block_size)
        if (n == S).all() and not self.lengths.any():  # fresh prompts of one length: one batched call
            logits, self._batched = self._forward(ids, None)
            self.lengths[:] = S
            return logits
        self._split()
        logits = np.zeros((B, S, self.vocab_size), dtype=np.float32)  # (B, S, V)
        for b in np.flatnonzero(n):
            k = int(n[b])
            logits[b, :k], self._rows[b] = self._forward(ids[b : b + 1, :k], self._rows[b])
            self.lengths[b] += k
        return logits

    def decode(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if not 1 <= n <= len(self.lengths):
            raise ValueError(f"decode got {n} token ids for {len(self.lengths)} slots")
        if (self.lengths[:n] >= self.block_size).any():
            raise ValueError(f"a slot already holds block_size {self.block_size} positions")
        column = np.asarray(ids, dtype=np.int64)[:, None]  # (n, 1)
        if self._batched is not None and n == len(self.lengths):
            logits, self._batched = self._forward(column, self._batched)
        else:
            self._split()
            logits = np.zeros((n, 1, self.vocab_size), dtype=np.float32)  # (n, 1, V)
            for b in range(n):
                logits[b], self._rows[b] = self._forward(column[b : b + 1], self._rows[b])
        self.lengths[:n] += 1
        return logits[:, 0]

    def release(self, slot: int) -> None:
        self._split()
        self._rows[slot] = None
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self._split()
            self._rows[dst], self._rows[src] = self._rows[src], None
            self.lengths[dst], self.lengths[src] = self.lengths[src], 0


def run_model(model: GPT, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> Model:
    """A runtime Model over a PyTorch GPT (switched to eval mode)."""
    model.eval()
    return Model(TorchEngine(model, device), tokenizer)


def load_run_model(run_dir: str | Path, device: str = "cpu", threads: int = 0) -> Model:
    """The runtime Model of a run directory's weights (its newest checkpoint's if unfinished)."""
    from edgecraft.rundir import load_run

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, _ = load_run(run_dir, device=device)
    return run_model(model, tokenizer, device)


def sample_text(model: GPT, tokenizer: Tokenizer, start: list[int], max_new_tokens: int, seed: int) -> str:
    """A training-time sample (temperature 0.8, top-k 40) from `start`, through the runtime's
    loop; the model is left in eval mode. Its own RNG leaves the training RNGs alone."""
    device = next(model.parameters()).device
    runtime = run_model(model, tokenizer, device)
    text = runtime.generate(start, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed)
    return tokenizer.decode(start) + text
