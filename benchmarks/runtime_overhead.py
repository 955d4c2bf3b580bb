"""What edgecraft.runtime's Python loop costs per token, on top of the ONNX graph.

    python benchmarks/runtime_overhead.py [--runs 7] [--out benchmarks/results/runtime_overhead.md]

Two measurements, each in this one process, rows interleaved round by round so that a busy
machine slows every row alike:

1. An engine that does no work (a fixed logits buffer) under `Model`: what remains is the decode
   loop, sampling, the context-window bookkeeping and text decoding, per token, for each way of
   calling the runtime. This is the runtime's own overhead.
2. The 1M-parameter character shape (d_model 128, 6 layers, 8 heads, d_ff 512, block 256,
   vocab 65; random weights, exported with export_run): `Model.generate`/`stream` against a bare
   loop of `Engine.decode` + argmax with no Model around it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecraft.runtime import load
from edgecraft.runtime.model import Model

PROMPT = "ROMEO:"
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny-shakespeare's 65


class IdleEngine:
    """The Engine interface over a fixed logits buffer: decode costs next to nothing."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        self.vocab_size, self.block_size = vocab_size, block_size
        self.logits = np.random.default_rng(0).standard_normal((1, vocab_size)).astype(np.float32)

    def reset(self, batch_size: int) -> None:
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self.logits = np.resize(self.logits, (batch_size, self.vocab_size))

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        self.lengths += ids.shape[1] if lengths is None else lengths
        return np.repeat(self.logits[:, None], ids.shape[1], axis=1)  # (B, S, V)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        self.lengths += 1
        return self.logits


def char_run(root: Path) -> Path:
    """A run directory with the 1M-parameter shape and random weights (needs the train extra)."""
    import torch

    from edgecraft.checkpoint import save_model
    from edgecraft.data import make_char_tokenizer
    from edgecraft.model import GPT, GPTConfig
    from edgecraft.recipe import to_toml, validate

    run = root / "run"
    run.mkdir(parents=True)
    recipe = validate({"name": "char-1m", "data": {"source": str(root / "absent.txt")}}, "benchmark")
    (run / "recipe.toml").write_text(to_toml(recipe))
    tokenizer = make_char_tokenizer([CHARS])
    tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tokenizer.get_vocab_size(), **recipe.model.model_dump())
    save_model(GPT(cfg), run / "model.safetensors")
    return run


def per_token_us(rows: dict, tokens: int, runs: int) -> dict[str, float]:
    """Median µs per token of each row, rows interleaved round by round (one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(runs + 1):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start) / tokens * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def calls(model: Model, n: int) -> dict:
    return {
        "generate, greedy": lambda: model.generate(PROMPT, n, temperature=0),
        "generate, temperature 0.8": lambda: model.generate(PROMPT, n, seed=1),
        "generate, top_k 40": lambda: model.generate(PROMPT, n, top_k=40, seed=1),
        "generate, top_p 0.9": lambda: model.generate(PROMPT, n, top_p=0.9, seed=1),
        "generate, greedy, repetition_penalty 1.2": lambda: model.generate(PROMPT, n, temperature=0, repetition_penalty=1.2),
        "stream, greedy": lambda: list(model.stream(PROMPT, n, temperature=0)),
        "stream, greedy, a stop string": lambda: list(model.stream(PROMPT, n, temperature=0, stop=["@@"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as markdown")
    args = parser.parse_args()

    from edgecraft.data import make_char_tokenizer

    tokenizer = make_char_tokenizer([CHARS])
    idle = Model(IdleEngine(tokenizer.get_vocab_size(), 256), tokenizer, {"config": {}})
    n_idle = 2000  # crosses the 256-token window: the re-fill bookkeeping is included
    idle_us = per_token_us(calls(idle, n_idle), n_idle, args.runs)

    with tempfile.TemporaryDirectory() as tmp:
        from edgecraft.export import ExportOptions, export_run

        model = load(export_run(char_run(Path(tmp)), Path(tmp) / "bundle", ExportOptions()), threads=1)
    engine, n = model.engine, 200
    prompt_ids = np.array([model.encode(PROMPT)], dtype=np.int64)

    def bare_loop() -> None:
        engine.reset(1)
        token = engine.prefill(prompt_ids)[:, -1].argmax(-1)
        for _ in range(n - 1):
            token = engine.decode(token).argmax(-1)

    real = {"bare Engine.decode + argmax loop": bare_loop, **calls(model, n)}
    real_us = per_token_us(real, n, args.runs)

    lines = [
        "| call | µs/token, idle engine (runtime overhead) | µs/token, 1M-param model, 1 thread |",
        "|---|---|---|",
        f"| bare Engine.decode + argmax loop | – | {real_us['bare Engine.decode + argmax loop']:.1f} |",
    ]
    lines += [f"| {name} | {idle_us[name]:.1f} | {real_us[name]:.1f} |" for name in idle_us]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Runtime overhead per token\n\n`python benchmarks/runtime_overhead.py --runs {args.runs}`, "
            f"medians, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
            "(a shared machine: compare rows with each other, not with other files).\n\n"
            f"{table}\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
