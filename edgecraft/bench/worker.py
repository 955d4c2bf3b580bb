"""One benchmark row, measured in a process of its own: `python -m edgecraft.bench.worker`.

Reads a row spec (JSON) on stdin, writes one JSON result on stdout. A fresh process per row means
one row's memory, thread pools and caches never disturb the next, and the peak resident memory
(peak_rss_mb) is this row's alone.

Every row loads a `runtime.Model` (a bundle's onnxruntime engine, or a run's PyTorch engine from
edgecraft/torch_engine.py) and drives its engine through the interface of runtime/engine.py —
reset(B), prefill(ids (B, S)) -> logits (B, S, V), decode(ids (B,)) -> logits (B, V) — with greedy
argmax in numpy, so the figures count the model's forward passes and the KV cache, and exclude
tokenization and sampling.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgecraft.bench.stats import percentiles, rates, summarize
from edgecraft.errors import UserError
from edgecraft.runtime.bundle import QUANT_MODELS, BundleError

# pp and tg of a row when the command line does not say: llama-bench's usual prompt and a
# generation that fills most of a small model's context, each cut to what the model's context holds
DEFAULT_PROMPT_LEN = 64
DEFAULT_NEW_TOKENS = 200


class Skip(Exception):
    """The row cannot run here (e.g. no CUDA in this build); reported as a skipped row."""


# ---------------------------------------------------------------- loading


def _rss_mb() -> float:
    """Current resident memory of this process, from /proc (0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux /proc's VmHWM, which starts afresh at exec:
    getrusage's ru_maxrss keeps the parent's peak across fork + exec (a worker started by a 500 MB
    process reports at least 500 MB), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def load_bundle(spec: dict) -> tuple[object, object, dict]:
    """(engine, tokenizer, facts) for a bundle row through edgecraft.runtime, on onnxruntime or
    (kind "tinygrad") tinygrad, whose steps compile in the warm-up runs, not in load_s."""
    tinygrad = spec["kind"] == "tinygrad"
    start = time.perf_counter()
    from edgecraft.runtime import load

    if tinygrad:  # the row never imports onnxruntime
        from importlib.metadata import version

        from edgecraft.runtime.tinygrad.engine import check_available

        try:
            check_available(spec["device"])
        except RuntimeError as err:  # no tinygrad, no clang, or no such device here
            raise Skip(str(err)) from None
        backend = f"tinygrad {version('tinygrad')}"
    else:
        import onnxruntime as ort

        if spec["device"] == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(
                f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
            )
        backend = f"onnxruntime {ort.__version__}"
    import_s, rss_baseline = time.perf_counter() - start, _rss_mb()
    path = Path(spec["path"])
    start = time.perf_counter()
    model = load(path, quant=spec["precision"], threads=spec["threads"], device=spec["device"],
                 backend="tinygrad" if tinygrad else "onnxruntime")
    load_s = time.perf_counter() - start
    onnx = path / QUANT_MODELS[spec["precision"]]
    files = [onnx, *path.glob(onnx.name + ".data")]  # external weights, if the exporter wrote any
    manifest = model.manifest
    facts = {
        "backend": f"{backend} {model.engine.device}" if tinygrad else backend,
        "import_s": import_s,
        "rss_after_import_mb": rss_baseline,
        "load_s": load_s,
        "file": onnx.name,
        "file_bytes": sum(f.stat().st_size for f in files),
        "params": manifest.parameters,
        "export_checks": manifest.checks,  # what the exporter measured (parity, its perplexity)
        "quantization": manifest.quantization.get(onnx.name),  # scheme, sizes, loss delta
        "threads_used": 1 if tinygrad else model.engine.threads,
    }
    return model.engine, model.tokenizer, facts


def load_torch(spec: dict) -> tuple[object, object, dict]:
    """(engine, tokenizer, facts) for a run directory row: the trained model in PyTorch eager."""
    start = time.perf_counter()
    import torch

    from edgecraft.rundir import load_run
    from edgecraft.torch_engine import run_model

    import_s, rss_baseline = time.perf_counter() - start, _rss_mb()
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} here cannot use CUDA (a CPU-only build or no GPU)")
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model, tokenizer, _ = load_run(Path(spec["path"]), device=spec["device"])
    runtime = run_model(model, tokenizer, spec["device"])
    load_s = time.perf_counter() - start
    weights = Path(spec["path"]) / "model.safetensors"  # absent while a run is still training
    facts = {
        "backend": f"torch {torch.__version__} eager",
        "import_s": import_s,
        "rss_after_import_mb": rss_baseline,
        "load_s": load_s,
        "file": weights.name if weights.is_file() else "newest checkpoint",
        "file_bytes": weights.stat().st_size if weights.is_file() else None,
        "params": model.num_params(),
        "threads_used": torch.get_num_threads(),
    }
    return runtime.engine, tokenizer, facts


# ---------------------------------------------------------------- measuring


def run_once(engine, prompt: np.ndarray, new_tokens: int) -> dict:
    """One repetition: pp (prefill the prompt, then the first argmax = time to first token) and
    tg (new_tokens single-token decode steps from a one-token context, each timed)."""
    B, P = prompt.shape
    engine.reset(B)
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)  # (B, P, V)
    t1 = time.perf_counter()
    logits[:, -1].argmax(-1)  # (B,) the first new token
    t2 = time.perf_counter()
    if logits.shape[:2] != (B, P) or not np.isfinite(logits[:, -1]).all():
        raise RuntimeError(f"prefill returned logits of shape {logits.shape} or non-finite values")

    engine.reset(B)
    nxt = engine.prefill(prompt[:, :1])[:, -1].argmax(-1)  # (B,)
    tokens = np.empty((B, new_tokens), dtype=np.int64)  # (B, N) what greedy decoding produced
    steps = []
    cpu0 = time.process_time()
    for i in range(new_tokens):
        s = time.perf_counter()
        logits = engine.decode(nxt)  # (B, V)
        nxt = logits.argmax(-1)  # (B,)
        steps.append(time.perf_counter() - s)
        if logits.shape[0] != B or not np.isfinite(logits).all():
            raise RuntimeError(f"decode step {i} returned logits of shape {logits.shape} or non-finite values")
        tokens[:, i] = nxt
    cpu_s = time.process_time() - cpu0
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "step_s": steps, "cpu_s": cpu_s, "tokens": tokens}


def measure(engine, prompt: np.ndarray, new_tokens: int, warmup: int, runs: int) -> dict:
    """Warm-up repetitions (discarded), then `runs` measured ones, summarized."""
    B, P = prompt.shape
    vocab = engine.vocab_size
    for _ in range(warmup):
        run_once(engine, prompt, new_tokens)
    results = [run_once(engine, prompt, new_tokens) for _ in range(runs)]
    produced = sum(r["tokens"].size for r in results)
    in_vocab = all(((r["tokens"] >= 0) & (r["tokens"] < vocab)).all() for r in results)
    same = all(np.array_equal(r["tokens"], results[0]["tokens"]) for r in results)
    prefill_s = [r["prefill_s"] for r in results]
    decode_s = [sum(r["step_s"]) for r in results]
    steps_ms = [s * 1e3 for r in results for s in r["step_s"]]
    return {
        "prefill": {
            "test": f"pp{P}", "tokens_per_run": B * P,
            "tok_s": summarize(rates(B * P, prefill_s)), "seconds": summarize(prefill_s),
        },
        "decode": {
            "test": f"tg{new_tokens}", "tokens_per_run": B * new_tokens,
            "tok_s": summarize(rates([r["tokens"].size for r in results], decode_s)),
            "seconds": summarize(decode_s),
            # tokens per CPU-second the process got: at 1 thread, the speed on an otherwise idle core
            "tok_per_cpu_s": summarize(rates([r["tokens"].size for r in results], [r["cpu_s"] for r in results])),
        },
        "ttft_ms": summarize([r["ttft_s"] * 1e3 for r in results]),
        "step_latency_ms": {**percentiles(steps_ms), "mean": float(np.mean(steps_ms))},
        # CPU seconds the process got per wall second while decoding: well under the thread count
        # means other processes took the cores and the speeds above are pessimistic
        "decode_cpu_per_wall": sum(r["cpu_s"] for r in results) / sum(decode_s),
        "checks": {
            "tokens_produced": produced,
            "tokens_expected": runs * B * new_tokens,
            "all_in_vocab": bool(in_vocab),
            "same_tokens_every_run": bool(same),
            "ok": produced == runs * B * new_tokens and bool(in_vocab) and bool(same),
        },
        "greedy_tokens": results[0]["tokens"][0, :64].tolist(),
    }


def perplexity(engine, ids: np.ndarray, max_tokens: int) -> dict:
    """Mean next-token loss over non-overlapping windows of block_size, each from an empty cache."""
    block = engine.block_size
    ids = ids[: max_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, block):
        y = ids[start + 1 : start + block + 1]  # (T,) targets
        x = ids[start : start + len(y)]  # (T,) inputs
        engine.reset(1)
        logits = engine.prefill(x[None]).astype(np.float64)[0]  # (T, V)
        m = logits.max(-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))  # (T,)
        nll += float((logz - logits[np.arange(len(y)), y]).sum())
        count += len(y)
    loss = nll / count
    return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": count}


def prompt_ids(eval_ids: np.ndarray | None, batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """(B, P) prompts: consecutive slices of the evaluation text when it is long enough, else
    seeded random token ids (the speed of a forward pass does not depend on which ids it sees)."""
    if eval_ids is not None and len(eval_ids) >= batch * length:
        return eval_ids[: batch * length].reshape(batch, length).astype(np.int64)
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def run_row(spec: dict) -> dict:
    """Measure one row as described by `spec` (see edgecraft.bench.run.row_specs)."""
    loader = load_torch if spec["kind"] == "torch" else load_bundle
    engine, tokenizer, facts = loader(spec)
    block, vocab = engine.block_size, engine.vocab_size
    # defaults fit the model; values given on the command line are checked, never clamped
    prompt_len = spec["prompt_len"] or min(DEFAULT_PROMPT_LEN, block)
    new_tokens = spec["new_tokens"] or min(DEFAULT_NEW_TOKENS, block - 1)
    if prompt_len > block:
        raise UserError(f"--prompt-len {prompt_len} exceeds the model's context of {block} tokens")
    if new_tokens + 1 > block:
        raise UserError(f"--new-tokens {new_tokens} needs a context of {new_tokens + 1}; the model has {block}")
    eval_ids = None
    if spec.get("eval_text"):
        text = Path(spec["eval_text"]).read_text(encoding="utf-8")
        eval_ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    prompt = prompt_ids(eval_ids, spec["batch"], prompt_len, vocab, spec["seed"])
    result = measure(engine, prompt, new_tokens, spec["warmup"], spec["runs"])
    result["peak_rss_mb"] = peak_rss_mb()  # load + the timed runs, before the quality pass
    if eval_ids is not None and len(eval_ids) > 1:
        result["quality"] = perplexity(engine, eval_ids, spec["ppl_tokens"])
    return {**facts, **result, "prompt_len": prompt_len, "new_tokens": new_tokens, "status": "ok"}


def main() -> int:
    spec = json.loads(sys.stdin.read())
    out, sys.stdout = sys.stdout, sys.stderr  # libraries that print must not corrupt the JSON line
    try:
        result = {**spec, **run_row(spec)}
    except Skip as reason:
        result = {**spec, "status": "skipped", "reason": str(reason)}
    except UserError as err:
        result = {**spec, "status": "error", "error": str(err), "exit_code": err.exit_code}
    except BundleError as err:  # a missing or damaged bundle file: the user's to fix
        result = {**spec, "status": "error", "error": str(err), "exit_code": 2}
    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
