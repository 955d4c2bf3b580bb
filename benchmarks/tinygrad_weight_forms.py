"""How the tinygrad backend holds quantized weights on the CPU, measured: the one-row product kernel
for each form of the weights, and whole decode steps with each form the engine can hold.

    python benchmarks/tinygrad_weight_forms.py [--bundle export/char-1m] [--rounds 3]

1. Kernels: char-1m's four product shapes at one row, the weights as float32 tiles (the fp32
   graph), and as the 4-bit graph's integers in float16 (what the engine holds), int8, or packed
   eight to a 32-bit word (nibbles: the bytes MatMulNBits stores; a kernel written here only, since
   the engine does not hold them). Each kernel is captured as the engine captures a step
   (replay.capture) and its call repeated from one table, timed in thread CPU time, in a fresh
   process per round.
2. Steps: decode tokens per CPU-second at batch 1 (200 greedy tokens after a 16-token prompt, after
   a warm-up) for the fp32, int8 and int4 graphs, the quantized weights held as float16 (the
   engine's form) or as int8 (model.quantized_dtype replaced in that row's process), with the step's
   kernels timed one by one from its stored plan (summed by kernel name).
Without --bundle the char-1m recipe's model is exported with random weights and --int8 --int4.
Writes benchmarks/results/tinygrad_weight_forms.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import harness

SHAPES = [(128, 384), (128, 128), (128, 512), (512, 128)]  # (K, N): qkv, proj, fc, mlp proj
FORMS = ["float32", "float16", "int8", "nibbles"]
BLOCK = 32


def _time_table(replay, entries: list[np.ndarray], calls: int) -> float:
    """Thread CPU microseconds of one pass over `entries` (table rows of replay.py's layout)."""
    table = np.concatenate([*entries, np.array([~0 & (2**64 - 1)], dtype=np.uint64)])
    address = table.ctypes.data
    for _ in range(max(calls // 20, 10)):
        replay._run(address)
    start = time.thread_time()
    for _ in range(calls):
        replay._run(address)
    return (time.thread_time() - start) / calls * 1e6


def _rows(replay) -> list[tuple[str, np.ndarray]]:
    """(kernel name, its table row) for each call of a replay's table."""
    rows, pos = [], 0
    for kernel in replay.kernels:
        for _ in range(kernel.cores):
            n = int(replay._table[pos])
            rows.append((kernel.name, replay._table[pos : pos + 2 + n].copy()))
            pos += 2 + n
    return rows


def _nibble_product(q, step, words, scale, K: int, N: int):
    """The 4-bit product with weights packed eight to a uint32 (tiles (N / T, K / 8, T), weight k of
    a word in bits 4 (k % 8)): each block's sum of q * (nibble - 8) exact in float32, then scaled."""
    from tinygrad import Tensor, UOp, dtypes
    from tinygrad.codegen.opt import Opt, OptOps
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    from edgecraft.runtime.tinygrad.products import _upcasts

    groups, _, T = words.shape
    cols, more = _upcasts(N)

    def kernel(C, A, S, W, SW):
        c, u = UOp.range(groups, 0), UOp.range(T, 1)
        b, j = UOp.range(K // BLOCK, 2, axis_type=AxisType.REDUCE), UOp.range(BLOCK, 3, axis_type=AxisType.REDUCE)
        k = b * BLOCK + j
        nibble = ((W[c, k // 8, u] >> ((k % 8) * 4).cast(dtypes.uint32)) & 15).cast(dtypes.float32)
        dot = (A[0, k] * nibble).reduce(j, arg=Ops.ADD) - A[0, k].reduce(j, arg=Ops.ADD) * 8.0
        acc = (dot * (S[0, b] * SW[c, b, u])).reduce(b, arg=Ops.ADD)
        opts = (Opt(OptOps.UPCAST, 1, cols), Opt(OptOps.UPCAST, 1, more), Opt(OptOps.UNROLL, 1, 8))
        return C[0, c * T + u].store(acc).end(c, u).sink(arg=KernelInfo(name=f"nibbles_{N}_{K}", opts_to_apply=opts))

    return Tensor.empty(1, N).custom_kernel(q, step, words, scale, fxn=kernel)[0]


def kernels_row(payload: dict) -> dict:
    """Child: µs per call of each shape's product kernel with the weights in `payload["form"]`."""
    from tinygrad import Tensor, TinyJit

    from edgecraft.runtime.tinygrad.products import _matmul, tile_width
    from edgecraft.runtime.tinygrad.replay import CpuReplay, capture, span

    form, out = payload["form"], {}
    rng = np.random.default_rng(0)
    for K, N in SHAPES:
        T = tile_width(N)
        tiles = lambda m: np.ascontiguousarray(m.reshape(m.shape[0], N // T, T).transpose(1, 0, 2))  # noqa: E731
        x = Tensor(np.rint(rng.uniform(-127, 127, (1, 1, K))).astype(np.float32)).realize()
        step = Tensor(rng.uniform(0.01, 0.1, (1, K // BLOCK)).astype(np.float32)).realize()
        scale = Tensor(tiles(rng.uniform(0.01, 0.1, (K // BLOCK, N)).astype(np.float32))).realize()
        q = rng.integers(-8, 8, (K, N))
        if form == "float32":
            w = Tensor(tiles(rng.standard_normal((K, N)).astype(np.float32))).realize()
            fn = lambda x, w=w: _matmul(x, w).realize()  # noqa: E731
        elif form == "nibbles":
            packed = (q + 8).astype(np.uint32).reshape(K // 8, 8, N)
            words = np.bitwise_or.reduce([packed[:, s] << (4 * s) for s in range(8)], axis=0).astype(np.uint32)
            w = Tensor(tiles(words)).realize()
            fn = lambda x, w=w: _nibble_product(x.reshape(1, K), step, w, scale, K, N).realize()  # noqa: E731
        else:
            w = Tensor(tiles(q.astype(form))).realize()
            fn = lambda x, w=w: _matmul(x, w, blocks=(step, scale, BLOCK)).realize()  # noqa: E731
        jit = TinyJit(fn)
        for _ in range(3):
            jit(x)
        roles = {"x": span(x), "w": span(w), "step": span(step), "scale": span(scale)}
        plan = capture(jit, (x,), roles)
        replay = CpuReplay(plan, "CPU", roles)
        out[f"{K}x{N}"] = _time_table(replay, [row for _, row in _rows(replay)], 20_000)
    return out


def steps_row(payload: dict) -> dict:
    """Child: decode tok per CPU-s at batch 1 and the step's kernels timed one by one."""
    import os

    import edgecraft.runtime.tinygrad.model as tinygrad_model
    from edgecraft.runtime import load

    os.environ["EDGECRAFT_TINYGRAD_CACHE"] = payload["cache"]
    if payload["weights"] == "int8":  # the form the engine held before
        tinygrad_model.quantized_dtype = lambda device: np.int8
    engine = load(payload["bundle"], quant=payload["quant"], backend="tinygrad").engine
    prompt = np.random.default_rng(0).integers(0, engine.vocab_size, (1, 16))
    harness.greedy(engine, prompt, 200)  # warm-up: compiles and captures
    rates = []
    for _ in range(3):
        _, _, _, cpu = harness.greedy(engine, prompt, 200)
        rates.append(199 / cpu)
    replays = [e[5] for k, e in engine._jits.items() if k[0] == "decode" and k[1] == 1 and e[5] is not None]
    replay = max(replays, key=lambda r: len(r.kernels))  # the widest window's step
    rows = _rows(replay)
    by_name, calls = defaultdict(float), defaultdict(int)
    for name, row in rows:
        by_name[name] += _time_table(replay, [row], 2_000)
        calls[name] += 1
    return {"tok_cpu_s": statistics.median(rates), "kernels": {n: (calls[n], us) for n, us in by_name.items()},
            "step_us": _time_table(replay, [row for _, row in rows], 500), "count": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle with model.onnx, model.int8.onnx and model.int4.onnx (default: random weights)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    info = harness.RunInfo("tinygrad backend: the quantized weights' form on the CPU (char-1m)")
    with tempfile.TemporaryDirectory(prefix="tinygrad-forms-") as tmp:
        bundle = harness.bundle_or_random(args.bundle, Path(tmp), "--int8", "--int4")
        rows = {f"kernel {form}": (lambda form=form: harness.child(__file__, "kernels", {"form": form})) for form in FORMS}
        steps = [("fp32", "float16")] + [(q, w) for q in ("int8", "int4") for w in ("float16", "int8")]
        for quant, weights in steps:
            rows[f"step {quant} {weights}"] = lambda quant=quant, weights=weights: harness.child(
                __file__, "steps", {"bundle": str(bundle), "quant": quant, "weights": weights, "cache": str(Path(tmp) / "cache")})
        results = harness.interleave(rows, args.rounds, warmup=0)
    lines = ["One-row product kernel, thread CPU µs per call (median of rounds; 4-bit weights in blocks of 32):", "",
             "| weights | " + " | ".join(f"{K} x {N}" for K, N in SHAPES) + " | a step's 24 products |",
             "|---|" + "---|" * (len(SHAPES) + 1)]
    for form in FORMS:
        runs = results[f"kernel {form}"]
        medians = [statistics.median(r[f"{K}x{N}"] for r in runs) for K, N in SHAPES]
        label = {"float32": "float32 (fp32 graph)", "float16": "float16 integers (held now)", "int8": "int8 integers",
                 "nibbles": "4-bit nibbles, 8 a uint32"}[form]
        lines.append(f"| {label} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {6 * sum(medians):.1f} |")
    lines += ["", "Decode at batch 1 (tok per CPU-s, median of rounds) and the widest step's kernels, thread CPU µs "
              "(the last round; kernels timed alone, so their weights are hot):", "",
              "| graph | weights held as | tok per CPU-s | kernels | step µs | products µs | int4 `quantize_` kernels µs | top kernels µs |",
              "|---|---|---|---|---|---|---|---|"]
    for quant, weights in steps:
        runs = results[f"step {quant} {weights}"]
        last = runs[-1]
        kernels = last["kernels"]
        products = sum(us for name, (_, us) in kernels.items() if name.startswith("matmul"))
        quantize = sum(us for name, (_, us) in kernels.items() if name.startswith("quantize"))
        top = ", ".join(f"{name} x{n} {us:.1f}" for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:4])
        lines.append(f"| {quant} | {'float32' if quant == 'fp32' else weights} | "
                     f"{statistics.median(r['tok_cpu_s'] for r in runs):,.0f} | {last['count']} | {last['step_us']:.1f} | "
                     f"{products:.1f} | {quantize:.1f} | {top} |")
    body = "\n".join(lines) + "\n"
    info.write(harness.RESULTS / "tinygrad_weight_forms", body)
    print(body)


if __name__ == "__main__":
    if not harness.serve_child({"kernels": kernels_row, "steps": steps_row}):
        sys.exit(main())
