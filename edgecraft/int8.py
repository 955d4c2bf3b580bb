"""The int8 export step: which layers, which scheme and ranges (QAT state or calibration), the
int8 graph (edgecraft/int8_graph.py), its parity with the fake-quant PyTorch model, and the
fp32/int8 validation-loss gate whose figures go into the bundle manifest.

A QAT run's int8 graph computes what its fake-quant model computed; a float run gets
post-training quantization (dynamic, or static from calibration batches).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from edgecraft.errors import UserError
from edgecraft.int8_graph import TABLE_BLOCK, Int8Plan, build_int8_graph
from edgecraft.model import GPT, GPTConfig
from edgecraft.onnx_graph import graph_io
from edgecraft.quant import QATHandle, attach, quantized_layers
from edgecraft.recipe import QuantConfig, Recipe

KEEP_FLOAT = ("embeddings", "head", "first", "last")
QUANT_STATE = "quant.safetensors"  # a QAT run's handle state, beside model.safetensors
GATE_WINDOWS = 8  # validation windows (of block_size tokens) for the fp32/int8 loss comparison
# Post-training quantization covers the embedding tables and the (tied) head too (--keep-float opts
# out): on char-1m they cost +0.03% validation loss and save 9% of the int8 file
# (benchmarks/results/int8.md). A QAT run quantizes what it trained with (quant.embeddings).
PTQ_EMBEDDINGS = True
GATE_EXIT_CODE = 3
PARITY_TOKENS = 64  # positions compared between the fake-quant model and the int8 graph
# Parity of the int8 graph with the fake-quant model, one decode step at a time, each step given
# the fake-quant model's KV cache of the earlier positions (teacher forced, so a difference cannot
# snowball through the cache). Both round the same numbers the same way, except where float32
# differences between onnxruntime's fused LayerNorm/GELU/attention and PyTorch's (~1e-6) put an
# activation on the other side of a rounding boundary. Measured on char-1m (PTQ dynamic, QAT
# dynamic, QAT static; benchmarks/results/int8.md): 59-63 of 64 steps agree within 1e-4, the
# others differ by one flipped element; mean |logit difference| 1e-4 to 1e-3, against 0.03-0.06
# between the fake-quant and the float model. The check: the mean difference stays under a tenth
# of the quantization's own effect (or under float noise), which a wrong scale, layout or
# activation scheme, wrong at every step, fails.
PARITY_RATIO = 0.1
PARITY_FLOOR = 1e-4


def plan_layers(model: GPT, embeddings: bool, keep_float: tuple[str, ...]) -> frozenset[str]:
    """The layers an int8 export quantizes: every block linear, plus the tables and the head when
    `embeddings`, minus what `keep_float` names."""
    bad = [k for k in keep_float if k not in KEEP_FLOAT]
    if bad:
        raise UserError(f"--keep-float {bad[0]!r}: expected one of {', '.join(KEEP_FLOAT)}")
    layers = set(quantized_layers(model, embeddings))
    last = model.cfg.n_layers - 1
    drop = {
        "embeddings": lambda n: n in ("tok_emb", "pos_emb"),
        "head": lambda n: n == "head",
        "first": lambda n: n.startswith("blocks.0."),
        "last": lambda n: n.startswith(f"blocks.{last}."),
    }
    if model.cfg.d_model % TABLE_BLOCK:
        keep_float = (*keep_float, "embeddings")  # GatherBlockQuantized cannot hold these rows
    for key in keep_float:
        layers = {n for n in layers if not drop[key](n)}
    return frozenset(layers)


# --- plans from a run ---------------------------------------------------------------------------


def calibrate_ranges(model: GPT, batches, embeddings: bool) -> dict[str, tuple[float, float]]:
    """Static input ranges (min, max over all batches) of every quantizable linear layer."""
    handle = attach(model, QuantConfig(qat=True, scheme="static", embeddings=embeddings))
    handle.calibrating = True
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(torch.as_tensor(x))
    finally:
        handle.detach()
    return {name: (float(r[0]), float(r[1])) for name, r in handle.ranges.items()}


def ranges_from_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    return {k.removesuffix(".act_range"): (float(v[0]), float(v[1])) for k, v in state.items()}


def fake_quant_model(model: GPT, plan: Int8Plan) -> QATHandle:
    """Hooks on `model` that compute what the plan's int8 graph computes (for the parity check)."""
    embeddings = bool({"tok_emb", "pos_emb", "head"} & plan.layers)
    handle = attach(model, QuantConfig(qat=True, scheme=plan.scheme, embeddings=embeddings), set(plan.layers))
    for name, (lo, hi) in plan.ranges.items():
        if name in handle.ranges:
            handle.ranges[name] = torch.tensor([lo, hi])
    return handle


# --- checks -------------------------------------------------------------------------------------


def _engine(path: Path, cfg: GPTConfig):
    from edgecraft.runtime.engine import Engine

    return Engine(path, {"config": cfg.to_dict(), "onnx": graph_io(cfg)}, threads=1)


def teacher_forced_logits(path: Path, cfg: GPTConfig, ids: np.ndarray, cache: list) -> np.ndarray:
    """Logits (T, V) of the graph decoding ids (T,) at batch 1, step t given `cache` (PyTorch's
    per-layer (k, v), each (1, nh, >= T, hs)) for positions < t; later rows are masked out."""
    import onnxruntime as ort

    from edgecraft.runtime.engine import session_options

    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    names = {spec["name"] for spec in graph_io(cfg)["inputs"]}
    feed = {}
    for i, layer in enumerate(cache):
        for kind, t in zip(("key", "value"), layer):
            buffer = np.zeros((1, cfg.n_heads, cfg.block_size, cfg.head_size), np.float32)
            buffer[:, :, : t.shape[2]] = t.numpy()
            feed[f"past_key_values.{i}.{kind}"] = buffer  # (1, nh, block, hs)
    out = []
    for t, token in enumerate(ids):
        step = {
            "input_ids": np.array([[token]], np.int64), "position_ids": np.array([[t]], np.int64),
            "seqlens_k": np.array([[t]], np.int32), "total_sequence_length": np.array([t + 1], np.int32),
            "query_seqlens": np.array([1], np.int32),
        }
        feed.update({k: v for k, v in step.items() if k in names})
        out.append(session.run(["logits"], feed)[0][0, 0])
    return np.stack(out)


def decode_loss(path: Path, cfg: GPTConfig, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy over windows (W, T + 1), decoding each at batch 1."""
    engine = _engine(path, cfg)
    total, count = 0.0, 0
    for row in windows:
        engine.reset(1)
        for t in range(len(row) - 1):
            logits = engine.decode(np.array([row[t]]))[0].astype(np.float64)  # (V,)
            m = logits.max()
            total += m + math.log(np.exp(logits - m).sum()) - logits[row[t + 1]]
            count += 1
    return float(total / count)


def val_windows(tokens: np.ndarray, block_size: int, n: int) -> np.ndarray:
    """n windows of block_size + 1 tokens spread evenly over the validation split."""
    length = min(block_size, len(tokens) - 1)
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64)


def int8_report(
    model: GPT, plan: Int8Plan, int8_path: Path, fp32_path: Path, windows: np.ndarray,
    max_loss_increase: float | None,
) -> dict:
    """Parity with the fake-quant model and the fp32/int8 validation losses; raises UserError
    (exit code 3) when int8 loses more than `max_loss_increase` percent."""
    cfg = model.cfg
    probe = torch.from_numpy(windows[0][:-1][:PARITY_TOKENS])[None]  # (1, T) within block_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only contend on a busy CPU
    try:
        with torch.no_grad():
            float_logits = model.eval()(probe)[0][0].numpy()  # (T, V)
            handle = fake_quant_model(model, plan)
            try:
                logits, _, cache = model(probe)
            finally:
                handle.detach()
    finally:
        torch.set_num_threads(threads)
    expected = logits[0].numpy()  # (T, V) the fake-quant model
    got = teacher_forced_logits(int8_path, cfg, probe[0].numpy(), cache)  # (T, V)
    per_step = np.abs(got - expected).mean(-1)  # (T,)
    parity = float(per_step.mean())
    effect = float(np.abs(expected - float_logits).mean())  # what quantization itself changes
    top1 = float((got.argmax(-1) == expected.argmax(-1)).mean())
    bound = max(PARITY_FLOOR, PARITY_RATIO * effect)
    if not parity <= bound:  # also catches NaN
        raise UserError(
            f"int8 graph does not match the fake-quant model (mean logit difference {parity:.3g}, "
            f"bound {bound:.3g}); this is a bug in edgecraft's int8 export, please report it",
            exit_code=1,
        )
    loss_fp32 = decode_loss(fp32_path, cfg, windows)
    loss_int8 = decode_loss(int8_path, cfg, windows)
    increase = float(100.0 * (loss_int8 - loss_fp32) / loss_fp32)
    report = {
        "scheme": plan.scheme,
        "kernel": "DynamicQuantizeMatMul" if plan.scheme == "dynamic" else "MatMulIntegerToFloat",
        "weights": "int8 symmetric per output channel",
        "activations": "uint8 asymmetric, " + (
            "range per call" if plan.scheme == "dynamic" else "static ranges"
        ),
        "quantized_layers": sorted(plan.layers),
        "parity": "int8 graph vs fake-quant PyTorch, decode steps given the same KV cache",
        "parity_mean_abs_logit_diff": parity,
        "parity_max_abs_logit_diff": float(np.abs(got - expected).max()),
        "parity_bound": bound,
        "parity_steps_within_1e-4": float((per_step <= 1e-4).mean()),
        "parity_top1_agreement": top1,
        "quantization_mean_abs_logit_effect": effect,
        "val_loss_fp32": loss_fp32,
        "val_loss_int8": loss_int8,
        "val_ppl_fp32": math.exp(loss_fp32),
        "val_ppl_int8": math.exp(loss_int8),
        "val_loss_increase_pct": increase,
        "val_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "eval": "decode, batch 1",
    }
    print(
        f"int8 ({plan.scheme}): val loss {loss_fp32:.4f} fp32 -> {loss_int8:.4f} int8 "
        f"({increase:+.2f}%), perplexity {math.exp(loss_fp32):.3f} -> {math.exp(loss_int8):.3f}; "
        f"parity with the fake-quant model {parity:.2g} (bound {bound:.2g}, top-1 {top1:.3f})"
    )
    if max_loss_increase is not None and increase > max_loss_increase:
        raise UserError(
            f"int8 validation loss is {increase:.2f}% above fp32 ({loss_int8:.4f} vs {loss_fp32:.4f}), "
            f"more than --max-loss-increase {max_loss_increase}%; nothing written. Try a QAT run "
            f"(quant.qat = true) or --keep-float",
            exit_code=GATE_EXIT_CODE,
        )
    return report


# --- the export step ----------------------------------------------------------------------------


def check_options(int8: bool, keep_float: tuple[str, ...], calibrate: int, max_loss_increase: float | None) -> None:
    """Refuse int8 flags that would be ignored or are unknown, before any work starts."""
    if not int8:
        given = [flag for flag, on in (("--keep-float", keep_float), ("--calibrate", calibrate),
                                       ("--max-loss-increase", max_loss_increase is not None)) if on]
        if given:
            raise UserError(f"{given[0]} applies to the int8 export; add --int8")
    bad = [k for k in keep_float if k not in KEEP_FLOAT]
    if bad:
        raise UserError(f"--keep-float {bad[0]!r}: expected one of {', '.join(KEEP_FLOAT)}")


def export_int8(
    run_dir: Path, model: GPT, recipe: Recipe, val: np.ndarray, fp32_path: Path, int8_path: Path,
    keep_float: tuple[str, ...] = (), calibrate: int = 0, max_loss_increase: float | None = None,
    opset: int = 17,
) -> dict:
    """Write the run's int8 graph to `int8_path` and return the manifest's quantization section.

    A QAT run is exported with the scheme it trained with (and, for static, the ranges it
    observed); a plain run gets post-training quantization: dynamic, or static from `calibrate`
    validation batches. Raises the gate's UserError (exit code 3) when int8 loses too much.
    """
    quant = recipe.quant
    if quant.qat:
        if calibrate:
            raise UserError(
                f"--calibrate: {run_dir} was trained with QAT (quant.qat = true) and exports with the "
                f"ranges it learned; --calibrate is for runs trained in float"
            )
        scheme, embeddings, ranges = quant.scheme, quant.embeddings, {}
        if scheme == "static":
            from edgecraft.quant import load_state

            if not (run_dir / QUANT_STATE).is_file():
                raise UserError(f"{run_dir / QUANT_STATE}: not found; a static QAT run keeps its ranges there")
            saved_scheme, state = load_state(run_dir / QUANT_STATE)
            if saved_scheme != "static":
                raise UserError(f"{run_dir / QUANT_STATE}: holds {saved_scheme!r} state, the recipe says static")
            ranges = ranges_from_state(state)
    else:
        scheme, embeddings, ranges = ("static" if calibrate else "dynamic"), PTQ_EMBEDDINGS, {}
        if calibrate:
            from edgecraft.data import eval_batches

            batches = eval_batches(val, recipe.train.batch_size, model.cfg.block_size, calibrate, recipe.seed)
            ranges = calibrate_ranges(model, batches, embeddings)
    plan = Int8Plan(plan_layers(model, embeddings, keep_float), scheme, ranges)
    weights = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    graph = build_int8_graph(model.cfg, weights, plan, opset)
    onnx.save(graph, str(int8_path))
    windows = val_windows(val, model.cfg.block_size, GATE_WINDOWS)
    report = int8_report(model, plan, int8_path, fp32_path, windows, max_loss_increase)
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    return {
        "file": int8_path.name,
        "method": "qat" if quant.qat else ("ptq-static" if calibrate else "ptq-dynamic"),
        "calibration_batches": calibrate,
        "keep_float": list(keep_float),
        "bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
        "nodes": len(graph.graph.node),
        "op_types": dict(Counter(n.op_type for n in graph.graph.node)),
        **report,
    }
