"""The first token of a fresh process on the tinygrad backend (CPU), with a warm cache (compiled
kernels and stored step plans from an earlier process) and a cold one, beside onnxruntime.

    python benchmarks/tinygrad_first_token.py [--bundle export/char-1m] [--rounds 5]

Without --bundle the char-1m recipe's model is exported (with --int8) with random weights. Each measurement is a
fresh Python (`harness.child`): wall seconds from the process's start (interpreter start-up, imports,
load, a 4-character prompt's prefill, the first greedy token) and the CPU seconds the process used
by then. Cold rows start from an empty cache folder; warm rows share one that a first process
filled by generating the check's text. Rows are interleaved over the rounds. Every warm process
then generates 200 greedy tokens, compared with onnxruntime's. Writes
benchmarks/results/tinygrad_first_token.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import harness

PROMPT, CHECK = "The ", 200
ENTRY = time.perf_counter()  # where /proc is missing: the child's start, less the interpreter's


def _since_start() -> float:
    """Wall seconds since this process started (Linux: /proc), else since the child's entry."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - ENTRY


def first_token(payload: dict) -> dict:
    """Child: import, load, the first token; then (warm rows) the check's greedy tokens."""
    from edgecraft.runtime import load

    quant = payload.get("quant", "fp32")
    if payload["backend"] == "tinygrad":
        model = load(payload["bundle"], quant=quant, backend="tinygrad")
    else:
        model = load(payload["bundle"], quant=quant, threads=1)
    model.generate(PROMPT, max_new_tokens=1, temperature=0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"wall": _since_start(), "cpu": usage.ru_utime + usage.ru_stime}
    if payload.get("check"):
        out["text"] = model.generate(PROMPT, max_new_tokens=CHECK, temperature=0)
        out["logits"] = _teacher_forced(model.engine).tolist()
    if payload["backend"] == "tinygrad":
        out["planned"], out["loaded"] = model.engine.steps_planned, model.engine.steps_loaded
    return out


def _teacher_forced(engine) -> np.ndarray:
    """Logits (CHECK, V) of decode steps fed random ids after a 4-token prefill: every step of a
    warm process compared with onnxruntime's, not only the argmax (random weights' greedy text is
    mostly one character)."""
    ids = np.random.default_rng(0).integers(0, engine.vocab_size, CHECK + 4)
    engine.reset(1)
    engine.prefill(ids[None, :4])
    return np.stack([engine.decode(ids[i : i + 1])[0].copy() for i in range(4, CHECK + 4)])  # a view the next step overwrites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle (default: char-1m with random weights)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    info = harness.RunInfo("tinygrad backend: first token of a fresh process (char-1m, CPU)")
    with tempfile.TemporaryDirectory(prefix="tinygrad-first-") as tmp:
        bundle = harness.bundle_or_random(args.bundle, Path(tmp), "--int8")
        base = {"bundle": str(bundle), "backend": "tinygrad"}
        caches = iter(range(10**6))

        def tinygrad(cache: str, check: bool = False, quant: str = "fp32") -> dict:
            os.environ["EDGECRAFT_TINYGRAD_CACHE"] = cache
            return harness.child(__file__, "first", {**base, "check": check, "quant": quant})

        warm_cache = str(Path(tmp) / "warm")
        filling = tinygrad(warm_cache, check=True)  # the earlier process that fills the warm cache
        tinygrad(warm_cache, check=True, quant="int8")
        ort_int8 = harness.child(__file__, "first", {**base, "backend": "onnxruntime", "check": True, "quant": "int8"})
        rows = {
            "tinygrad, warm cache": lambda: tinygrad(warm_cache, check=True),
            "tinygrad int8, warm cache": lambda: tinygrad(warm_cache, check=True, quant="int8"),
            "tinygrad, cold cache": lambda: tinygrad(str(Path(tmp) / f"cold{next(caches)}")),
            "onnxruntime": lambda: harness.child(__file__, "first", {**base, "backend": "onnxruntime", "check": True}),
        }
        results = harness.interleave(rows, args.rounds, warmup=0)
    lines = ["| backend | wall s, start to first token (median [min-max]) | CPU s (median [min-max]) | steps planned / loaded |",
             "|---|---|---|---|"]
    for name, runs in [("tinygrad, filling the cache", [filling]), *results.items()]:
        wall, cpu = [r["wall"] for r in runs], [r["cpu"] for r in runs]
        steps = f"{runs[0]['planned']} / {runs[0]['loaded']}" if "planned" in runs[0] else ""
        lines.append(f"| {name} | {np.median(wall):.2f} [{min(wall):.2f}-{max(wall):.2f}] | "
                     f"{np.median(cpu):.2f} [{min(cpu):.2f}-{max(cpu):.2f}] | {steps} |")
    expected = results["onnxruntime"][0]["text"]
    same = all(r["text"] == expected for r in [filling, *results["tinygrad, warm cache"]])
    same_int8 = all(r["text"] == ort_int8["text"] for r in results["tinygrad int8, warm cache"])
    gap = max(np.abs(np.array(r["logits"]) - np.array(results["onnxruntime"][0]["logits"])).max()
              for r in results["tinygrad, warm cache"])
    gap_int8 = max(np.abs(np.array(r["logits"]) - np.array(ort_int8["logits"])).max() for r in results["tinygrad int8, warm cache"])
    body = "\n".join(lines) + (
        f"\n\nPrompt {PROMPT!r}, greedy; tinygrad on its CPU device (clang), onnxruntime fp32 with 1 thread. "
        f"{CHECK} greedy tokens of every warm tinygrad process identical to onnxruntime's: {same} (fp32), "
        f"{same_int8} (int8, beside onnxruntime's int8 graph); their logits over {CHECK} teacher-forced decode steps "
        f"within {gap:.1e} (fp32) and {gap_int8:.1e} (int8) of onnxruntime's. "
        "CPU s is the process's own (user + system, all its threads); in the cold rows tinygrad's lowering "
        "worker processes and clang are not in it: wall is the cold figure.\n"
    )
    info.write(harness.RESULTS / "tinygrad_first_token", body)
    print(body)


if __name__ == "__main__":
    if not harness.serve_child({"first": first_token}):
        sys.exit(main())
