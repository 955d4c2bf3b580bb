"""What a decode step's 24 products cost alone, at 8 and 4 bits: the ceiling on int4's gain over int8.

    python benchmarks/int4_products.py [--width 128] [--rows 1] [--rounds 5] [--runs 500]

A chain of 24 MatMulNBits nodes (12 pairs of char-1m's MLP shapes: width -> 4 x width -> width, random
weights), one graph per form (bits, block size, accuracy level), 1 thread, rounds interleaved. When
the products are a small part of a step, halving their bytes cannot move the step much: compare the
int8 and int4 rows here with a whole step (int4_width.py). Writes benchmarks/results/int4_products.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import harness
from edgecraft.export.graph import MS
from edgecraft.export.int4_graph import ACCURACY_LEVEL, pack_weight
from edgecraft.runtime.onnx_engine import session_options

FORMS = [(8, 32, ACCURACY_LEVEL), (8, 32, 0), (4, 16, ACCURACY_LEVEL), (4, 32, ACCURACY_LEVEL), (4, 32, 0),
         (4, 64, ACCURACY_LEVEL), (4, 128, ACCURACY_LEVEL)]  # (bits, block size, accuracy level)
PAIRS = 12


def chain(width: int, bits: int, block: int, accuracy: int) -> ort.InferenceSession:
    """24 MatMulNBits nodes in a row: (width -> 4 width -> width) x PAIRS."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(PAIRS):
        for j, (K, N) in enumerate(((width, 4 * width), (4 * width, width))):
            packed, scales = pack_weight(rng.normal(0, 0.05, (N, K)).astype(np.float32), bits, block)
            name = f"{i}_{j}"
            inits += [numpy_helper.from_array(packed, f"B{name}"), numpy_helper.from_array(scales, f"S{name}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"B{name}", f"S{name}"], [f"y{name}"], domain=MS, K=K,
                                          N=N, bits=bits, block_size=block, accuracy_level=accuracy))
            x = f"y{name}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", width])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    info = harness.RunInfo("A step's 24 products alone: MatMulNBits at 8 and 4 bits")
    sessions = {form: chain(args.width, *form) for form in FORMS}
    x = np.random.default_rng(1).normal(0, 1, (args.rows, args.width)).astype(np.float32)
    times: dict[tuple, list[float]] = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form, session in sessions.items():
            for _ in range(args.runs // 10):  # warm-up
                session.run(None, {"x": x})
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, {"x": x})
            times[form].append((time.perf_counter() - start) / args.runs * 1e6)
    base = np.median(times[FORMS[0]])
    lines = ["| bits | block | accuracy level | µs for 24 products (median) | min | against 8 bits, level 4 |",
             "|---|---|---|---|---|---|"]
    for (bits, block, accuracy), t in times.items():
        lines.append(f"| {bits} | {block} | {accuracy} | {np.median(t):.1f} | {min(t):.1f} | {base / np.median(t):.2f}x |")
    body = "\n".join(lines) + (
        f"\n\nWidth {args.width} (K, N of {args.width} and {4 * args.width}), {args.rows} row(s), 1 thread; "
        f"{args.rounds} rounds of {args.runs} runs, interleaved. Accuracy level {ACCURACY_LEVEL}: int8 "
        "activations (what edgecraft exports); 0: float activations.\n")
    info.write(harness.RESULTS / "int4_products", body)
    print(body)


if __name__ == "__main__":
    sys.exit(main())
