"""The int8 graph's checks: parity with the fake-quant PyTorch model, and the fp32/int8
validation-loss gate whose figures go into the bundle manifest.

Parity is checked one decode step at a time, each step given the fake-quant model's KV cache of
the earlier positions (teacher forced, so a difference cannot snowball through the cache). Both
round the same numbers the same way, except where float32 differences between onnxruntime's fused
LayerNorm/GELU/attention and PyTorch's put an activation on the other side of a rounding boundary:
a few steps then differ by one flipped element (benchmarks/results/int8.md). So the check bounds
the mean difference by a tenth of the quantization's own effect (or float noise), which a wrong
scale, layout or activation scheme, wrong at every step, fails.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgecraft.config import GPTConfig
from edgecraft.errors import UserError
from edgecraft.export.graph import graph_io, pad_heads
from edgecraft.export.int8_graph import Int8Plan
from edgecraft.export.parity import check_engine
from edgecraft.model import GPT
from edgecraft.quant import QATHandle, attach
from edgecraft.recipe import QuantConfig

GATE_EXIT_CODE = 3
PARITY_TOKENS = 64  # positions compared between the fake-quant model and the int8 graph
PARITY_RATIO = 0.1
PARITY_FLOOR = 1e-4


def fake_quant_model(model: GPT, plan: Int8Plan) -> QATHandle:
    """Hooks on `model` that compute what the plan's int8 graph computes (for the parity check)."""
    embeddings = bool({"tok_emb", "pos_emb", "head"} & plan.layers)
    handle = attach(model, QuantConfig(qat=True, scheme=plan.scheme, embeddings=embeddings), set(plan.layers))
    for name, (lo, hi) in plan.ranges.items():
        if name in handle.ranges:
            handle.ranges[name] = torch.tensor([lo, hi])
    return handle


def teacher_forced_logits(path: Path, cfg: GPTConfig, ids: np.ndarray, cache: list) -> np.ndarray:
    """Logits (T, V) of the graph decoding ids (T,) at batch 1, step t given `cache` (PyTorch's
    per-layer (k, v), each (1, nh, >= T, hs)) for positions < t; later rows are masked out."""
    import onnxruntime as ort

    from edgecraft.runtime.onnx_engine import session_options

    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    names = {spec["name"] for spec in graph_io(cfg)["inputs"]}
    feed = {}
    for i, layer in enumerate(cache):
        for kind, t in zip(("key", "value"), layer):
            buffer = np.zeros((1, cfg.n_kv_heads, cfg.block_size, cfg.cache_head_size), np.float32)
            buffer[:, :, : t.shape[2]] = pad_heads(t.numpy(), cfg, axis=-1)
            feed[f"past_key_values.{i}.{kind}"] = buffer  # (1, n_kv_heads, block, padded hs)
    out = []
    for t, token in enumerate(ids):
        step = {
            "input_ids": np.array([[token]], np.int64), "position_ids": np.array([[t]], np.int64),
            "seqlens_k": np.array([[t]], np.int32), "total_sequence_length": np.array([t + 1], np.int32),
        }
        feed.update({k: v for k, v in step.items() if k in names})
        out.append(session.run(["logits"], feed)[0][0, 0])
    return np.stack(out)


def decode_loss(path: Path, cfg: GPTConfig, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy over windows (W, T + 1), decoding each at batch 1."""
    engine = check_engine(path, cfg)
    total, count = 0.0, 0
    for row in windows:
        engine.reset(1)
        for t in range(len(row) - 1):
            logits = engine.decode(np.array([row[t]]))[0].astype(np.float64)  # (V,)
            m = logits.max()
            total += m + math.log(np.exp(logits - m).sum()) - logits[row[t + 1]]
            count += 1
    return float(total / count)


def quality_report(
    model: GPT, attach_fake: Callable[[], QATHandle], path: Path, fp32_path: Path, windows: np.ndarray, kind: str,
) -> dict:
    """What every quantized graph reports: its parity with the fake-quant model (`attach_fake()`
    puts the hooks on `model`), bounded as the module docstring says, and the fp32 and `kind`
    validation losses on `windows`. UserError (exit 1) when parity fails: a bug in the export."""
    cfg = model.cfg
    probe = torch.from_numpy(windows[0][:-1][:PARITY_TOKENS])[None]  # (1, T) within block_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only contend on a busy CPU
    try:
        with torch.no_grad():
            float_logits = model.eval()(probe)[0][0].numpy()  # (T, V)
            handle = attach_fake()
            try:
                logits, _, cache = model(probe)
            finally:
                handle.detach()
    finally:
        torch.set_num_threads(threads)
    expected = logits[0].numpy()  # (T, V) the fake-quant model
    got = teacher_forced_logits(path, cfg, probe[0].numpy(), cache)  # (T, V)
    per_step = np.abs(got - expected).mean(-1)  # (T,)
    parity = float(per_step.mean())
    effect = float(np.abs(expected - float_logits).mean())  # what quantization itself changes
    bound = max(PARITY_FLOOR, PARITY_RATIO * effect)
    if not parity <= bound:  # also catches NaN
        raise UserError(
            f"{kind} graph does not match the fake-quant model (mean logit difference {parity:.3g}, "
            f"bound {bound:.3g}); this is a bug in edgecraft's {kind} export, please report it",
            exit_code=1,
        )
    loss_fp32 = decode_loss(fp32_path, cfg, windows)
    loss = decode_loss(path, cfg, windows)
    return {
        "parity": f"{kind} graph vs fake-quant PyTorch, decode steps given the same KV cache",
        "parity_mean_abs_logit_diff": parity,
        "parity_max_abs_logit_diff": float(np.abs(got - expected).max()),
        "parity_bound": bound,
        "parity_steps_within_1e-4": float((per_step <= 1e-4).mean()),
        "parity_top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()),
        "quantization_mean_abs_logit_effect": effect,
        "val_loss_fp32": loss_fp32,
        f"val_loss_{kind}": loss,
        "val_ppl_fp32": math.exp(loss_fp32),
        f"val_ppl_{kind}": math.exp(loss),
        "val_loss_increase_pct": float(100.0 * (loss - loss_fp32) / loss_fp32),
        "val_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "eval": "decode, batch 1",
    }


def gate(report: dict, kind: str, label: str, max_loss_increase: float | None, hint: str) -> None:
    """Print the report's line; UserError (exit 3) when `kind` loses more than the gate allows."""
    loss_fp32, loss, increase = report["val_loss_fp32"], report[f"val_loss_{kind}"], report["val_loss_increase_pct"]
    print(
        f"{label}: val loss {loss_fp32:.4f} fp32 -> {loss:.4f} {kind} ({increase:+.2f}%), perplexity "
        f"{math.exp(loss_fp32):.3f} -> {math.exp(loss):.3f} on {report['val_tokens']:,} tokens of the checks' "
        f"text (named below); parity with the fake-quant model {report['parity_mean_abs_logit_diff']:.2g} "
        f"(bound {report['parity_bound']:.2g}, top-1 {report['parity_top1_agreement']:.3f})"
    )
    if max_loss_increase is not None and increase > max_loss_increase:
        raise UserError(
            f"{kind} validation loss is {increase:.2f}% above fp32 ({loss:.4f} vs {loss_fp32:.4f}), "
            f"more than --max-loss-increase {max_loss_increase}%; nothing written. {hint}",
            exit_code=GATE_EXIT_CODE,
        )


def int8_report(
    model: GPT, plan: Int8Plan, int8_path: Path, fp32_path: Path, windows: np.ndarray,
    max_loss_increase: float | None,
) -> dict:
    """Parity with the fake-quant model and the fp32/int8 validation losses; raises UserError
    (exit code 3) when int8 loses more than `max_loss_increase` percent."""
    report = {
        "scheme": plan.scheme,
        "kernel": "DynamicQuantizeMatMul" if plan.scheme == "dynamic" else "MatMulIntegerToFloat",
        "weights": "int8 symmetric per output channel",
        "activations": "uint8 asymmetric, " + ("range per call" if plan.scheme == "dynamic" else "static ranges"),
        "quantized_layers": sorted(plan.layers),
        **quality_report(model, lambda: fake_quant_model(model, plan), int8_path, fp32_path, windows, "int8"),
    }
    gate(report, "int8", f"int8 ({plan.scheme})", max_loss_increase,
         "Try a QAT run (quant.qat = true) or --keep-float")
    return report


def single_row_report(cfg: GPTConfig, path: Path, report: dict, windows: np.ndarray,
                      max_loss_increase: float | None) -> dict:
    """The one-row decode graph's validation loss beside the int8 graph's, under the same gate."""
    loss = decode_loss(path, cfg, windows)
    increase = float(100.0 * (loss - report["val_loss_fp32"]) / report["val_loss_fp32"])
    print(f"int8 one-row decode graph (8-bit MatMulNBits): val loss {loss:.4f} ({increase:+.2f}% vs fp32)")
    if max_loss_increase is not None and increase > max_loss_increase:
        raise UserError(
            f"int8 one-row graph's validation loss is {increase:.2f}% above fp32, more than "
            f"--max-loss-increase {max_loss_increase}%; nothing written",
            exit_code=GATE_EXIT_CODE,
        )
    return {
        "file": path.name,
        "kernel": "MatMulNBits (bits 8, accuracy level 4) over the same int8 weights and scales",
        "activations": "int8 symmetric per block of the row",
        "used_for": "decode steps of one row (the runtime picks it per call); prompts and batches run the int8 graph",
        "bytes": path.stat().st_size,
        "val_loss": loss,
        "val_loss_increase_pct": increase,
    }
