"""The tinygrad backend beside onnxruntime on one bundle, fp32, int8 and int4: decode tokens/s at
batch 1 and 16, int4 against int8 (paired per round), kernels per step, compile time cold and warm
(first token of a fresh process; the decode warm-up, with and without tinygrad's BEAM search),
peak memory.

    python benchmarks/tinygrad_decode.py [--bundle export/char-1m] [--rounds 3] [--device CPU] [--beam 2]
    python benchmarks/tinygrad_decode.py --tree ../before ...   # before/after: another checkout's tinygrad rows too

Without --bundle the char-1m recipe's model is exported with random weights (speed does not depend
on training). Every row runs in a fresh process per round (harness.child), rounds interleaved; a
row warms up (compiles, captures its steps) before it is timed, so the figures are steady-state
decoding. Greedy argmax on the host is inside the timed loop, as runtime.Model does it. The
`tinygrad+beam` rows set EDGECRAFT_TINYGRAD_BEAM (tinygrad's BEAM search of the decode-step kernels,
kept in the cache folder all rows share: the first such row searches, later ones reuse). With
--tree DIR (a checkout, e.g. `git worktree add DIR REV`) that checkout's engine runs the same bundle
in `tinygrad@DIR` rows at batch 1, interleaved with the others, each against this checkout's row.
Writes benchmarks/results/tinygrad_decode.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import harness
from edgecraft.bench.worker import peak_rss_mb

ROWS = [(backend, quant) for quant in ("fp32", "int8", "int4") for backend in ("onnxruntime", "tinygrad")]
# int4 against int8 (issue 16's target: >= 1.2x at batch 1): each backend's own, and across them
RATIOS = [("tinygrad int4", "tinygrad int8"), ("onnxruntime int4", "onnxruntime int8"), ("tinygrad int4", "onnxruntime int8")]
PROMPT, NEW = 16, 200


def _model(payload: dict):
    from edgecraft.runtime import load

    if payload.get("beam"):
        os.environ["EDGECRAFT_TINYGRAD_BEAM"] = str(payload["beam"])
    if payload["backend"] == "tinygrad":
        return load(payload["bundle"], quant=payload["quant"], backend="tinygrad", device=payload["device"])
    return load(payload["bundle"], quant=payload["quant"], threads=1)


def decode_row(payload: dict) -> dict:
    """Child: steady-state greedy decoding at one batch size (after a warm-up run)."""
    model = _model(payload)
    engine, B = model.engine, payload["batch"]
    prompt = np.random.default_rng(0).integers(0, engine.vocab_size, (B, PROMPT))
    start, cpu0 = time.perf_counter(), time.process_time()
    harness.greedy(engine, prompt, NEW)  # warm-up: compiles (searches) and captures every step shape used
    warmup, warmup_cpu = time.perf_counter() - start, time.process_time() - cpu0
    tokens, _, wall, cpu = harness.greedy(engine, prompt, NEW)
    steps = NEW - 1
    kernels = None
    if payload["backend"] == "tinygrad":  # the largest captured decode step of this batch
        replays = [e[5] for k, e in engine._jits.items() if k[0] == "decode" and k[1] == B and e[5] is not None]
        kernels = max((len(r.kernels) for r in replays), default=None)
        if engine._store is not None and any(e[5] is None for e in engine._jits.values()):  # CPU: a step on TinyJit's replay
            kernels = f"{kernels or 0} (a step not planned)"
    return {"tok_s": B * steps / wall, "tok_cpu_s": B * steps / cpu, "kernels": kernels, "warmup_s": warmup,
            "warmup_cpu_s": warmup_cpu,
            "peak_rss_mb": peak_rss_mb(), "tokens": tokens[:, :64].tolist()}


def first_token(payload: dict) -> dict:
    """Child: a fresh process's import + load + prefill + first token, with the cache it is given."""
    start = time.perf_counter()
    model = _model(payload)
    model.generate("The ", max_new_tokens=1, temperature=0)
    return {"seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle with model.onnx, model.int8.onnx and model.int4.onnx (default: random weights)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="CPU", help="the tinygrad device (onnxruntime rows stay on the CPU)")
    parser.add_argument("--beam", type=int, default=2, help="BEAM width of the tinygrad+beam rows (0: no such rows)")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another edgecraft checkout whose tinygrad rows (batch 1) run beside this one's (repeatable)")
    args = parser.parse_args()
    info = harness.RunInfo("tinygrad backend: decode speed beside onnxruntime (char-1m)")
    with tempfile.TemporaryDirectory(prefix="tinygrad-bench-") as tmp:
        bundle = harness.bundle_or_random(args.bundle, Path(tmp), "--int8", "--int4")
        cache = Path(tmp) / "cache"  # a fresh compile cache: the first process compiles (cold)
        os.environ["EDGECRAFT_TINYGRAD_CACHE"] = str(cache)
        base = {"bundle": str(bundle), "device": args.device}
        cold = [harness.child(__file__, "first", {**base, "backend": "tinygrad", "quant": "fp32"})["seconds"]]
        warm = [harness.child(__file__, "first", {**base, "backend": "tinygrad", "quant": "fp32"})["seconds"]
                for _ in range(3)]
        ort_first = [harness.child(__file__, "first", {**base, "backend": "onnxruntime", "quant": "fp32"})["seconds"]
                     for _ in range(3)]
        rows = {f"{b} {q} b{B}": (lambda b=b, q=q, B=B: harness.child(__file__, "decode", {**base, "backend": b, "quant": q, "batch": B}))
                for B in (1, 16) for b, q in ROWS}
        for B in (1, 16) if args.beam else ():
            rows[f"tinygrad+beam fp32 b{B}"] = (lambda B=B: harness.child(
                __file__, "decode", {**base, "backend": "tinygrad", "quant": "fp32", "batch": B, "beam": args.beam}))
        for tree in args.tree:
            for q in ("fp32", "int8", "int4"):
                rows[f"tinygrad@{tree.resolve().name} {q} b1"] = (lambda q=q, tree=tree: harness.child(
                    __file__, "decode", {**base, "backend": "tinygrad", "quant": q, "batch": 1}, tree=tree))
        results = harness.interleave(rows, args.rounds, warmup=0)
    lines = ["| backend | precision | batch | decode tok/s (median [min-max]) | tok per CPU-s | kernels/step | "
             "warm-up s (first round; later) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        backend, quant, b = name.split()
        tok = [r["tok_s"] for r in runs]
        lines.append(
            f"| {backend} | {quant} | {b[1:]} | {np.median(tok):,.0f} [{min(tok):,.0f}-{max(tok):,.0f}] | "
            f"{np.median([r['tok_cpu_s'] for r in runs]):,.0f} | {runs[0]['kernels'] or ''} | "
            f"{runs[0]['warmup_s']:.1f}; {np.median([r['warmup_s'] for r in runs[1:]] or [0]):.1f} | "
            f"{max(r['peak_rss_mb'] for r in runs):.0f} |"
        )
    same = {f"{b} {q} b{B}": results[f"{b} {q} b{B}"][0]["tokens"] == results[f"onnxruntime {q} b{B}"][0]["tokens"]
            for B in (1, 16) for b, q in ROWS + [("tinygrad+beam", "fp32")] if f"{b} {q} b{B}" in results and b != "onnxruntime"}
    lines += ["", "| int4 ÷ int8, tok per CPU-s (median of per-round ratios [min-max]) | batch 1 | batch 16 |", "|---|---|---|"]
    for a, b in RATIOS:
        cells = [harness.paired_ratio(results[f"{a} b{B}"], results[f"{b} b{B}"]) for B in (1, 16)]
        lines.append(f"| {a} ÷ {b} | {cells[0]} | {cells[1]} |")
    if args.tree:
        lines += ["", "| this checkout ÷ another, tok per CPU-s at batch 1 (median of per-round ratios [min-max]) | fp32 | int8 | int4 |",
                  "|---|---|---|---|"]
        for tree in args.tree:
            name = f"tinygrad@{tree.resolve().name}"
            cells = [harness.paired_ratio(results[f"tinygrad {q} b1"], results[f"{name} {q} b1"]) for q in ("fp32", "int8", "int4")]
            lines.append(f"| tinygrad ÷ {name} | {' | '.join(cells)} |")
    body = "\n".join(lines) + (
        f"\n\nFirst token of a fresh process (import + load + prefill + first token), tinygrad {args.device}: "
        f"cold cache {cold[0]:.2f} s, warm cache {np.median(warm):.2f} s (median of {len(warm)}); "
        f"onnxruntime {np.median(ort_first):.2f} s.  \n"
        f"Greedy tokens identical to onnxruntime's (first 64 of every row): {same}.  \n"
        f"Decode: {NEW - 1} steps after a {PROMPT}-token prompt, greedy argmax on the host; `tok per CPU-s` "
        "is what the row gets per second of CPU, the speed on an idle core. Warm-up: the untimed first "
        "generation of each row's process (compiling, searching and capturing its step shapes), wall seconds; "
        "the first round of a tinygrad+beam row is the cold BEAM search.\n"
    )
    info.write(harness.RESULTS / "tinygrad_decode", body)
    print(body)


if __name__ == "__main__":
    if not harness.serve_child({"decode": decode_row, "first": first_token}):
        sys.exit(main())
