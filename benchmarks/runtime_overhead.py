"""What edgecraft.runtime's Python loop costs per token, on top of the ONNX graph.

    python benchmarks/runtime_overhead.py [--runs 7] [--out benchmarks/results/runtime_overhead.md]

Two measurements, each in this one process, rows interleaved round by round so that a busy
machine slows every row alike:

1. An engine that does no work (a fixed logits buffer) under `Model`: what remains is the decode
   loop, sampling, the context-window bookkeeping and text decoding, per token, for each way of
   calling the runtime. This is the runtime's own overhead.
2. recipes/char-1m.toml's shape with random weights, exported: `Model.generate`/`stream` against
   a bare loop of engine decode + argmax with no Model around it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import harness

PROMPT = "ROMEO:"


class IdleEngine:
    """The engine interface (edgecraft/runtime/engine.py) over a fixed logits buffer: decode
    costs next to nothing."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        self.vocab_size, self.block_size = vocab_size, block_size
        self.row = np.random.default_rng(0).standard_normal(vocab_size).astype(np.float32)  # (V,)
        self.reset(1)

    def reset(self, batch_size: int) -> None:
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self.logits = np.tile(self.row, (batch_size, 1))  # (B, V)

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        self.lengths += ids.shape[1] if lengths is None else lengths
        return np.repeat(self.logits[:, None], ids.shape[1], axis=1)  # (B, S, V)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.lengths[: len(ids)] += 1
        return self.logits[: len(ids)]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0


def calls(model, n: int) -> dict:
    return {
        "generate, greedy": lambda: model.generate(PROMPT, n, temperature=0),
        "generate, temperature 0.8": lambda: model.generate(PROMPT, n, seed=1),
        "generate, top_k 40": lambda: model.generate(PROMPT, n, top_k=40, seed=1),
        "generate, top_p 0.9": lambda: model.generate(PROMPT, n, top_p=0.9, seed=1),
        "generate, greedy, repetition_penalty 1.2": lambda: model.generate(PROMPT, n, temperature=0, repetition_penalty=1.2),
        "stream, greedy": lambda: list(model.stream(PROMPT, n, temperature=0)),
        "stream, greedy, a stop string": lambda: list(model.stream(PROMPT, n, temperature=0, stop=["@@"])),
    }


def per_token_us(rows: dict, tokens: int, runs: int) -> dict[str, float]:
    """Median µs per token of each row over interleaved rounds (one warm-up round)."""
    def timed(fn):
        return lambda: harness.best_time(fn, 1) / tokens * 1e6

    rounds = harness.interleave({name: timed(fn) for name, fn in rows.items()}, runs)
    return {name: statistics.median(t) for name, t in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (after one warm-up)")
    parser.add_argument("--out", type=Path, help="also write the report here (benchmarks/results/runtime_overhead.md)")
    args = parser.parse_args()
    info = harness.RunInfo("Runtime overhead per token")

    from edgecraft.runtime import Model, load

    with tempfile.TemporaryDirectory() as tmp:
        from edgecraft.export import ExportOptions, export_run

        model = load(export_run(harness.random_run(Path(tmp)), Path(tmp) / "bundle", ExportOptions()), threads=1)
    idle = Model(IdleEngine(model.vocab_size, model.block_size), model.tokenizer)
    n_idle = 2000  # crosses the 256-token window: the re-fill bookkeeping is included
    idle_us = per_token_us(calls(idle, n_idle), n_idle, args.runs)
    engine, n = model.engine, 200
    prompt = np.array([model.encode(PROMPT)], dtype=np.int64)
    bare = "bare engine decode + argmax loop"
    real_us = per_token_us({bare: lambda: harness.greedy(engine, prompt, n), **calls(model, n)}, n, args.runs)
    lines = ["| call | µs/token, idle engine (runtime overhead) | µs/token, 1M-param model, 1 thread |",
             "|---|---|---|", f"| {bare} | – | {real_us[bare]:.1f} |"]
    lines += [f"| {name} | {idle_us[name]:.1f} | {real_us[name]:.1f} |" for name in idle_us]
    body = f"Medians of {args.runs} interleaved rounds, {time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(lines)
    print(info.markdown(body))
    if args.out:
        info.write(args.out, body)


if __name__ == "__main__":
    main()
