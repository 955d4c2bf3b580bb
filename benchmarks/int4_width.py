"""Where 4-bit weights pay: int4 against int8 decode speed as the model widens and its weights leave
the caches, on onnxruntime and tinygrad.

    python benchmarks/int4_width.py [--widths 128,192,256,384,512,768] [--rounds 3] [--batch 1] [--block-size 32] [--forms] [--ceiling]

char-1m's shape (6 layers, 8 heads, d_ff 4 x width, context 256) with random weights at each width,
exported with --int8 --int4 (speed does not depend on training). At width 128 (char-1m itself) a
step's int8 weights (1.2 MB) and int4 weights (0.7 MB) both fit a 2 MiB L2; wider, the int8
weights leave the L2 (then the L3) before the int4 ones. Issue 16 asks
int4 >= 1.2x int8 at char-1m's width; this shows at which widths, on this machine, the halved
bytes turn into speed.

Every row is tinygrad_decode.py's decode child (a fresh process, a warm-up generation, then 199
greedy one-token steps after a 16-token prompt), rounds interleaved; tinygrad rows share one
compile cache. Figures are tokens per CPU-second; int4 ÷ int8 is the median of per-round ratios.
--forms adds int4.py's kernel forms (char-1m's 24 matrices alone in each form, interleaved with the
rows): how much of a step the products are, so what 4 bits can gain at most.
--ceiling (width 128, with --forms) bounds int4 ÷ int8 at char-1m on this machine, for any product
kernel. A 4-bit product does everything an 8-bit one does (the same activations, sums and scales)
plus unpacking its nibbles, so the most it can save is reading the bytes it does not store:
int8's 24 matrices less int4's (the MB columns), read hot in the L2 (the least thread time of a
numpy pass over each size) and read past the L2 (a 64 MB pass, per byte). The rest of an int4 step,
R = its µs a token less its products' (onnxruntime: the 4-bit form alone, its per-node cost
included; tinygrad: the step's matmul and quantize kernels timed alone), is the same work in both
graphs, so even with free 4-bit products int4 ÷ int8 <= 1 + saved read / R.
Writes benchmarks/results/int4_width.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import harness
import int4

DECODE = Path(__file__).with_name("tinygrad_decode.py")  # its "decode" child role measures each row
FORMS = Path(int4.__file__)  # its "forms" child role times the products alone
STEPS = Path(__file__).with_name("tinygrad_weight_forms.py")  # its "steps" child times a step's kernels
BACKENDS = ("onnxruntime", "tinygrad")
QUANTS = ("int8", "int4")
LAYERS = 6


def weight_bytes(width: int, bits: int, block: int) -> int:
    """A step's matrix bytes at `bits` (the 24 products of 6 layers: QKV, output, up, down), with
    int4's one float scale per `block` weights (the head and embeddings are left out: small here)."""
    params = LAYERS * 12 * width * width
    return params * bits // 8 + (params // block * 4 if bits == 4 else 0)


def read_times(payload: dict) -> dict:
    """Child: least thread µs of a numpy pass (a max) over each of `sizes` bytes, hot in the caches,
    and µs per MB of a pass over 64 MB (past the L2)."""
    passes = {}
    for size in [*payload["sizes"], 64_000_000]:
        data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        calls = max(5, 200_000_000 // size)
        passes[size] = 1e6 * int4.cpu_best(lambda: [data.max() for _ in range(calls)], 9) / calls
    return {"hot": {str(s): passes[s] for s in payload["sizes"]}, "past_l2_per_mb": passes[64_000_000] / 64}


def ceiling_table(results: dict, forms: list[dict], block: int) -> list[str]:
    """The bound of --ceiling, per backend, from the rows at width 128."""
    med = lambda runs, key: float(np.median([key(r) for r in runs]))  # noqa: E731
    int8_bytes, int4_bytes = weight_bytes(128, 8, block), weight_bytes(128, 4, block)
    saved = int8_bytes - int4_bytes
    hot = med(results["read"], lambda r: r["hot"][str(int8_bytes)] - r["hot"][str(int4_bytes)])
    past = med(results["read"], lambda r: r["past_l2_per_mb"]) * saved / 1e6
    products = {"onnxruntime": med(forms, lambda r: r[f"MatMulNBits 4-bit, block {block}"]["1"]),
                "tinygrad": med(results["tinygrad int4 kernels"], lambda r: sum(
                    us for name, (_, us) in r["kernels"].items() if name.startswith(("matmul", "quantize"))))}
    lines = [f"int8's 24 matrices are {saved:,} bytes more than int4's (blocks of {block}): {hot:.1f} µs more to read hot "
             f"in the L2, {past:.1f} µs past it.", "",
             "| backend | int4 µs a token | its 4-bit products µs | the rest, R µs | most int4 ÷ int8, saved bytes in L2 | past L2 | R for 1.2x (past L2) |",
             "|---|---|---|---|---|---|---|"]
    for backend in BACKENDS:
        step = 1e6 / med(results[f"128 {backend} int4"], lambda r: r["tok_cpu_s"])
        rest = step - products[backend]
        lines.append(f"| {backend} | {step:.0f} | {products[backend]:.0f} | {rest:.0f} | {1 + hot / rest:.2f}x | "
                     f"{1 + past / rest:.2f}x | <= {5 * past:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=harness.int_list, default=[128, 192, 256, 384, 512, 768])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=32, help="int4's block (export --block-size)")
    parser.add_argument("--forms", action="store_true", help="also time char-1m's matrices alone in each kernel form")
    parser.add_argument("--ceiling", action="store_true", help="bound int4 ÷ int8 at char-1m for any product kernel (width 128, implies --forms)")
    args = parser.parse_args()
    if args.ceiling and 128 not in args.widths:
        parser.error("--ceiling bounds char-1m: --widths must include 128")
    args.forms = args.forms or args.ceiling
    info = harness.RunInfo("int4 against int8 as the model widens (char-1m's shape, random weights)")
    with tempfile.TemporaryDirectory(prefix="int4-width-") as tmp:
        os.environ["EDGECRAFT_TINYGRAD_CACHE"] = str(Path(tmp) / "cache")
        bundles = {}
        for width in args.widths:
            bundles[width] = harness.bundle_or_random(None, Path(tmp) / f"w{width}", "--int8", "--int4",
                                                      "--block-size", str(args.block_size),
                                                      overrides=(f"model.d_model={width}", f"model.d_ff={4 * width}"))
        rows = {f"{w} {b} {q}": (lambda w=w, b=b, q=q: harness.child(
                    DECODE, "decode", {"bundle": str(bundles[w]), "backend": b, "quant": q, "batch": args.batch, "device": "CPU"}))
                for w in args.widths for b in BACKENDS for q in QUANTS}
        if args.forms:
            rows["kernel forms"] = lambda: harness.child(FORMS, "forms")
        if args.ceiling:
            sizes = [weight_bytes(128, 8, args.block_size), weight_bytes(128, 4, args.block_size)]
            rows["read"] = lambda: harness.child(__file__, "read", {"sizes": sizes})
            rows["tinygrad int4 kernels"] = lambda: harness.child(STEPS, "steps", {
                "bundle": str(bundles[128]), "quant": "int4", "weights": "float16", "cache": os.environ["EDGECRAFT_TINYGRAD_CACHE"]})
        results = harness.interleave(rows, args.rounds, warmup=0)
    kernel = results.pop("kernel forms", None)
    head = " | ".join(f"{b} {q}" for b in BACKENDS for q in QUANTS)
    lines = [f"| width | int8 MB | int4 MB | {head} | " + " | ".join(f"{b} int4 ÷ int8" for b in BACKENDS) + " |",
             "|---|---|---|" + "---|" * (len(BACKENDS) * (len(QUANTS) + 1))]
    for w in args.widths:
        speed = [np.median([r["tok_cpu_s"] for r in results[f"{w} {b} {q}"]]) for b in BACKENDS for q in QUANTS]
        ratios = [harness.paired_ratio(results[f"{w} {b} int4"], results[f"{w} {b} int8"]) for b in BACKENDS]
        lines.append(f"| {w} | {weight_bytes(w, 8, args.block_size) / 1e6:.1f} | {weight_bytes(w, 4, args.block_size) / 1e6:.1f} | "
                     + " | ".join(f"{s:,.0f}" for s in speed) + " | " + " | ".join(ratios) + " |")
    body = "\n".join(lines) + (
        f"\n\nBatch {args.batch}, int4 blocks of {args.block_size}, {args.rounds} rounds, tokens per CPU-second (medians); int4 ÷ int8: median of the "
        "per-round ratios [min-max]. MB: the 24 products' weights a step reads (int4 with its block scales). "
        "tinygrad holds both int8's and int4's integers as float16 on the CPU "
        "(edgecraft/runtime/tinygrad/model.py, quantized_dtype): 2 bytes a weight for either.\n")
    if args.ceiling:
        body += ("\n## The ceiling at char-1m's width (any product kernel; medians over rounds)\n\n"
                 + "\n".join(ceiling_table(results, kernel, args.block_size)) + "\n")
    if kernel:
        body += ("\n## Kernel forms (char-1m's 24 matrices alone, one graph a form; least thread CPU time of "
                 "5 x 100 calls a round, medians over rounds)\n\n" + "\n".join(int4.forms_table(kernel)) + "\n")
    info.write(harness.RESULTS / "int4_width", body)
    print(body)


if __name__ == "__main__":
    if not harness.serve_child({"read": read_times}):
        sys.exit(main())
