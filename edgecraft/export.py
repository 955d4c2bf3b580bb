"""Run directory -> bundle: the ONNX decoder with its KV cache, parity-checked against PyTorch.

    export_run(runs/NAME, None, ExportOptions()) -> export/NAME/ {model.onnx, tokenizer.json, edgecraft.json,
                                                                  genai_config.json}

The shipped graph is the one `edgecraft.onnx_graph` writes op by op with onnxruntime's fused
operators (11 nodes per GPT-2-style layer, GroupQueryAttention over a KV buffer shared between
past and present). It decodes 1.7x faster at batch 1 and one thread than `torch.onnx.export` of
the same model driven by `InferenceSession.run` (2.2-2.5x with 2-4 threads;
benchmarks/results/decode_speed.md), with the same greedy tokens, because at this size a token's
cost is weight streaming plus per-node overhead, and a traced graph carries 277 nodes after
onnxruntime's optimiser. The traced path (`export_traced`) stays as the comparison baseline and
a fallback for architectures the builder does not know; it uses torch 2.13's default dynamo
exporter, which gives a correct dynamic-shape cache graph (tests/test_export.py checks it,
including an empty past; the TorchScript exporter, dynamo=False, also works but leaves 683 raw
nodes against dynamo's 290).

The graph needs no optimisation pass at load or export: onnxruntime's optimizer at its highest
level finds nothing left to fuse (a test checks the node count is unchanged), so sessions load
with ORT_ENABLE_BASIC.

Everything is written into a temporary directory beside the target and renamed into place at the
end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

import edgecraft
from edgecraft.errors import UserError
from edgecraft.files import as_umask_allows
from edgecraft.genai_config import GENAI_CONFIG, GENAI_TOKENIZER_CONFIG, genai_config, genai_tokenizer_config
from edgecraft.model import GPT
from edgecraft.onnx_graph import build_graph, graph_io
from edgecraft.recipe import Recipe
from edgecraft.rundir import load_run
from edgecraft.runtime.bundle import FORMAT, FP32_MODEL, INT8_MODEL, MANIFEST, TOKENIZER, sha256_file
from edgecraft.runtime.engine import DEFAULT_THREADS, SESSION_CONFIG, Engine

PARITY_BOUND = 1e-4  # max |logit difference| fp32 ONNX vs PyTorch; measured ~1e-6 on trained runs
CHECK_WINDOWS = 8  # validation windows for the perplexity / KL / top-1 figures
MIN_OPSET = 17  # LayerNormalization


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    force: bool = False
    int8: bool = False
    int8_only: bool = False
    calibrate: int = 0
    keep_float: tuple[str, ...] = ()
    max_loss_increase: float | None = None


# ------------------------------------------------------------------------------------ the run


def _validation_tokens(recipe: Recipe, model: GPT) -> tuple[np.ndarray, str]:
    """Held-out token ids for the checks (the run's own validation split) and where they came from.

    A run whose corpus has moved still exports: the checks then run on random token ids, and the
    manifest says so.
    """
    from edgecraft.data import prepare

    try:
        val = np.asarray(prepare(recipe.data, model.cfg.block_size).val, dtype=np.int64)
        return val, f"validation split of {recipe.data.source} ({len(val):,} tokens)"
    except UserError as err:
        rng = np.random.default_rng(0)
        val = rng.integers(0, model.cfg.vocab_size, size=4 * model.cfg.block_size + 1)
        return val, f"random token ids (validation text unavailable: {err})"


# ------------------------------------------------------------------------------------ graphs


def state_arrays(model: GPT) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays (what onnx_graph builds from)."""
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def write_onnx(model: GPT, path: Path, opset: int) -> onnx.ModelProto:
    """The shipped fp32 graph, built directly from the weights (see the module docstring)."""
    graph = build_graph(model.cfg, state_arrays(model), opset)
    onnx.save(graph, str(path))
    return graph


class _CacheIO(torch.nn.Module):
    """GPT.forward with the cache flattened to positional tensors, as exporters need it."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, _, present = self.model(idx, cache=cache)
        return (logits, *(t for kv in present for t in kv))


def export_traced(model: GPT, path: Path, opset: int = 18) -> None:
    """torch.onnx.export (dynamo) of the model with an explicit cache: the baseline graph.

    Inputs input_ids (B, S), past.i.key/value (B, nh, P, hs) with P >= 0; outputs logits (B, S, V)
    and present.i.key/value (B, nh, P + S, hs). The example has P > 0 and S > 1 so the traced
    attention is the general masked branch, which is also right for P = 0 and S = 1.
    """
    cfg = model.cfg
    L = cfg.n_layers
    names_in = ["input_ids"] + [f"past.{i}.{k}" for i in range(L) for k in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    idx = torch.zeros(2, 3, dtype=torch.long)
    past = [torch.zeros(2, cfg.n_heads, 2, cfg.head_size) for _ in range(2 * L)]
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length", max=cfg.block_size)
    n_past = torch.export.Dim("past_sequence_length", max=cfg.block_size)
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: n_past} for _ in range(2 * L)))
    torch.onnx.export(
        _CacheIO(model).eval(), (idx, *past), str(path), input_names=names_in,
        output_names=names_out, dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True,
        verbose=False,
    )


# ------------------------------------------------------------------------------------ checks


def _windows(val: np.ndarray, block: int, n: int) -> np.ndarray:
    """n windows (n, T + 1), T <= block, spread evenly over the validation tokens."""
    length = min(block, len(val) - 1)
    starts = np.linspace(0, len(val) - length - 1, n).astype(np.int64)
    return np.stack([val[s : s + length + 1] for s in starts])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def parity_checks(model: GPT, engine: Engine, val: np.ndarray) -> dict:
    """ONNX (through the Engine) vs PyTorch on held-out text.

    - prefill: right-padded rows of different lengths in one call, logits at every real position
    - decode: a prefix prefilled, the rest one token per step, two rows at different positions,
      against one full PyTorch forward pass (the cache must reproduce it)
    - top-1 agreement, KL(PyTorch || ONNX) and perplexity of both on the same windows
    """
    cfg = model.cfg
    windows = _windows(val, cfg.block_size, CHECK_WINDOWS)  # (W, T + 1)
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


# ------------------------------------------------------------------------------------ manifest


def onnx_section(model: GPT, graph: onnx.ModelProto, model_files: list[str]) -> dict:
    """What a program that knows only onnxruntime needs to drive the graph (all `model_files`
    share its inputs and outputs; nodes and op types are the float32 graph's)."""
    cfg = model.cfg
    io = graph_io(cfg)
    return {
        "files": model_files,
        "opset": {imp.domain or "ai.onnx": imp.version for imp in graph.opset_import},
        "nodes": len(graph.graph.node),
        "op_types": dict(Counter(n.op_type for n in graph.graph.node)),
        **io,
        "kv_cache": {
            "past": "past_key_values.{layer}.{key|value}",
            "present": "present.{layer}.{key|value}",
            "n_layers": cfg.n_layers,
            "shape": ["batch_size", cfg.n_heads, cfg.block_size, cfg.head_size],
            "dtype": "float32",
            "layout": "BNSH: (batch, heads, position, head_size)",
            "shared_buffer": True,
            "note": (
                "allocate one zeroed float32 buffer per layer and kind of the shape above and bind "
                "it as both past_key_values.i.* and present.i.* (IO binding); the graph writes each "
                "step's keys and values in place at the row's positions. Without IO binding, feed "
                "the previous step's present.* outputs as the next step's past_key_values.*"
            ),
        },
        "drive": {
            "input_ids": "(B, S) token ids of the new chunk per sequence, right-padded",
            "position_ids": (
                "only when listed in inputs (learned positions; rotary with a head size that is "
                "not a multiple of 16): past_length[b] + s for s in 0..S-1, padding clipped to "
                "block_size - 1"
            ),
            "seqlens_k": "int32 (B, 1): past_length[b] + new_length[b] - 1 (at least 0), the last cached position after this call",
            "total_sequence_length": "int32 (1,): max over b of past_length[b] + new_length[b]; exactly S for a prompt",
            "logits": "(B, S, V) float32; rows past new_length[b] are garbage",
            "prompt": (
                "every past_length = 0: one call for the whole batch, rows right-padded to S, "
                "total_sequence_length = S; padding positions are written to the cache and "
                "overwritten by the next tokens, never read"
            ),
            "decode": "S = 1, new_length = 1, past_length[b] = tokens cached in row b (rows may differ)",
            "chunk": "S > 1 after cached tokens: one sequence per call (batch 1, no padding)",
            "limits": "past_length[b] + S <= block_size for every row",
        },
    }


def _manifest(model: GPT, tokenizer: Tokenizer, recipe: Recipe, graph: onnx.ModelProto,
              checks: dict, root: Path, int8: dict | None = None) -> dict:
    cfg = model.cfg
    files = [name for name in (FP32_MODEL, INT8_MODEL, TOKENIZER, GENAI_CONFIG, GENAI_TOKENIZER_CONFIG)
             if (root / name).is_file()]
    quantization = {FP32_MODEL: "none (float32)"} if FP32_MODEL in files else {}
    if int8 is not None:  # int8 step (edgecraft/int8.py): scheme, sizes, parity, fp32/int8 val loss
        quantization[INT8_MODEL] = int8
    return {
        "format": FORMAT,
        "name": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edgecraft_version": edgecraft.__version__,
        "parameters": model.num_params(),
        "config": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "tokenizer": {"file": TOKENIZER, "kind": recipe.data.tokenizer, "tokens": tokenizer.get_vocab_size()},
        "quantization": quantization,
        "files": {
            name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
            for name in files
        },
        "onnx": onnx_section(model, graph, [name for name in files if name in (FP32_MODEL, INT8_MODEL)]),
        "runtime": {
            "threads": DEFAULT_THREADS,
            "why": (
                "one intra-op thread is robust on a busy CPU; on an idle multi-core machine 2-4 "
                "threads cut time to first token and speed up batches (benchmarks/results/decode_speed.md)"
            ),
            "execution_provider": "CPUExecutionProvider",
            "graph_optimization_level": "ORT_ENABLE_BASIC (the graph is already fused)",
            "session_config": SESSION_CONFIG,
            "onnxruntime": ort.__version__,
        },
        "checks": checks,
    }


# ------------------------------------------------------------------------------------ export


def _write_genai_files(model: GPT, tokenizer: Tokenizer, recipe: Recipe, root: Path) -> None:
    """genai_config.json (and, for BPE, tokenizer_config.json): onnxruntime-genai runs the bundle."""
    model_file = FP32_MODEL if (root / FP32_MODEL).is_file() else INT8_MODEL
    config = genai_config(model.cfg, tokenizer, model_file, DEFAULT_THREADS)
    (root / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = genai_tokenizer_config(recipe.data.tokenizer, model.cfg.block_size)
    if tokenizer_config is not None:
        (root / GENAI_TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing one (--force) is replaced."""
    if out.exists():
        old = out.with_name(f".old-{out.name}-{tmp.name}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_run(run_dir: Path, out: Path | None, options: ExportOptions) -> Path:
    """Export `run_dir` to a bundle at `out` (default export/NAME) and return its path."""
    run_dir = Path(run_dir)
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= options.opset <= top:
        raise UserError(f"--opset {options.opset}: expected {MIN_OPSET} to {top}")
    from edgecraft.int8 import check_options  # int8 step (edgecraft/int8.py)

    check_options(options.int8, options.keep_float, options.calibrate, options.max_loss_increase)
    model, tokenizer, recipe = load_run(run_dir)  # UserError naming a missing/damaged file
    out = Path(out) if out is not None else Path("export") / recipe.name
    if out.exists() and not options.force:
        raise UserError(f"{out}: already exists; use --force to replace it")
    val, source = _validation_tokens(recipe, model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    as_umask_allows(tmp)
    try:
        graph = write_onnx(model, tmp / FP32_MODEL, options.opset)
        tokenizer.save(str(tmp / TOKENIZER))
        manifest = {"config": model.cfg.to_dict(), "onnx": graph_io(model.cfg)}
        engine = Engine(tmp / FP32_MODEL, manifest, threads=1)
        checks = {"text": source, **parity_checks(model, engine, val)}
        int8 = None
        if options.int8:  # int8 step (edgecraft/int8.py); its quality gate raises before anything is kept
            from edgecraft.int8 import export_int8

            int8 = export_int8(
                run_dir, model, recipe, val, tmp / FP32_MODEL, tmp / INT8_MODEL, options.keep_float,
                options.calibrate, options.max_loss_increase, options.opset,
            )
            if options.int8_only:
                (tmp / FP32_MODEL).unlink()
        _write_genai_files(model, tokenizer, recipe, tmp)
        manifest = _manifest(model, tokenizer, recipe, graph, checks, tmp, int8)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"export: {out}: parity {max(checks['max_abs_logit_diff_prefill'], checks['max_abs_logit_diff_decode']):.2g} "
        f"(bound {PARITY_BOUND}), top-1 agreement {checks['top1_agreement']:.4f}, "
        f"perplexity {checks['perplexity_pytorch']:.4f} PyTorch vs {checks['perplexity_onnx']:.4f} ONNX"
    )
    return out
