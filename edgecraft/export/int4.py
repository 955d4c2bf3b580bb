"""The int4 export step: which layers and block size (a 4-bit QAT run's, or post-training), the
int4 graph (int4_graph.py), and its checks: parity with the fake-quant PyTorch model and the
fp32/int4 validation-loss gate, as for int8 (export/int8_check.py, whose decode loop it reuses).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from edgecraft.errors import UserError
from edgecraft.export.graph import state_arrays
from edgecraft.export.int4_graph import ACCURACY_LEVEL, BITS, Int4Plan, build_int4_graph
from edgecraft.export.int8 import GATE_WINDOWS, PTQ_EMBEDDINGS
from edgecraft.export.int8_check import (
    GATE_EXIT_CODE, PARITY_FLOOR, PARITY_RATIO, PARITY_TOKENS, decode_loss, teacher_forced_logits,
)
from edgecraft.export.options import check_keep_float
from edgecraft.export.parity import val_windows
from edgecraft.model import GPT
from edgecraft.quant import attach, quantized_layers
from edgecraft.recipe import QuantConfig, Recipe

BLOCK_SIZES = (16, 32, 64, 128)  # MatMulNBits takes powers of two from 16


def int4_plan(model: GPT, recipe: Recipe, block_size: int | None, keep_float: tuple[str, ...]) -> Int4Plan:
    """The layers and block size: a 4-bit QAT run's own (a different --block-size is refused), or
    post-training with `block_size` (default 32) over the block matrices and the tables."""
    quant, cfg = recipe.quant, model.cfg
    qat = quant.qat and quant.bits == 4
    if qat and block_size is not None and block_size != quant.block_size:
        raise UserError(
            f"--block-size {block_size}: the run was trained for 4-bit blocks of {quant.block_size} "
            f"(quant.block_size); export it without --block-size"
        )
    block = quant.block_size if qat else (32 if block_size is None else block_size)  # 0 is refused, not 32
    if block not in BLOCK_SIZES:
        raise UserError(f"--block-size {block}: expected one of {', '.join(map(str, BLOCK_SIZES))}")
    if cfg.d_model % block or cfg.d_ff % block:
        raise UserError(
            f"--block-size {block}: must divide d_model ({cfg.d_model}) and d_ff ({cfg.d_ff}); choose a smaller one"
        )
    if cfg.cache_head_size != cfg.head_size:
        raise UserError(
            f"int4: head size {cfg.head_size} is padded to {cfg.cache_head_size} in the graph, which moves "
            f"the 4-bit blocks of the output projection; use a head size that is a multiple of 8"
        )
    check_keep_float(keep_float)
    layers = set(quantized_layers(model, quant.embeddings if qat else PTQ_EMBEDDINGS, keep_float))
    if cfg.tie_embeddings and "tok_emb" not in layers:
        layers.discard("head")  # a tied head reads the table as the graph holds it
    return Int4Plan(frozenset(layers), block)


def export_int4(
    model: GPT, recipe: Recipe, val: np.ndarray, fp32_path: Path, int4_path: Path, block_size: int | None,
    keep_float: tuple[str, ...] = (), max_loss_increase: float | None = None, opset: int = 17,
) -> dict:
    """Write the run's int4 graph to `int4_path` and return the manifest's quantization section;
    raises the gate's UserError (exit code 3) when int4 loses more than `max_loss_increase` %."""
    plan = int4_plan(model, recipe, block_size, keep_float)
    graph = build_int4_graph(model.cfg, state_arrays(model), plan, opset)
    onnx.save(graph, str(int4_path))
    windows = val_windows(val, model.cfg.block_size, GATE_WINDOWS)
    report = int4_report(model, plan, int4_path, fp32_path, windows, max_loss_increase)
    fp32_bytes, int4_bytes = fp32_path.stat().st_size, int4_path.stat().st_size
    return {
        "file": int4_path.name,
        "method": "qat" if recipe.quant.qat and recipe.quant.bits == 4 else "ptq",
        "keep_float": list(keep_float),
        "bytes": int4_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": int4_bytes / fp32_bytes,
        "nodes": len(graph.graph.node),
        "op_types": dict(Counter(n.op_type for n in graph.graph.node)),
        **report,
    }


def int4_report(
    model: GPT, plan: Int4Plan, int4_path: Path, fp32_path: Path, windows: np.ndarray,
    max_loss_increase: float | None,
) -> dict:
    """Parity with the 4-bit fake-quant model (teacher-forced decode, bounded by a tenth of the
    quantization's own effect, as for int8) and the fp32/int4 validation losses."""
    cfg = model.cfg
    probe = torch.from_numpy(windows[0][:-1][:PARITY_TOKENS])[None]  # (1, T) within block_size
    fake = QuantConfig(qat=True, bits=BITS, block_size=plan.block_size,
                       embeddings=bool({"tok_emb", "pos_emb", "head"} & plan.layers))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only contend on a busy CPU
    try:
        with torch.no_grad():
            float_logits = model.eval()(probe)[0][0].numpy()  # (T, V)
            handle = attach(model, fake, set(plan.layers))
            try:
                logits, _, cache = model(probe)
            finally:
                handle.detach()
    finally:
        torch.set_num_threads(threads)
    expected = logits[0].numpy()  # (T, V) the fake-quant model
    got = teacher_forced_logits(int4_path, cfg, probe[0].numpy(), cache)  # (T, V)
    parity = float(np.abs(got - expected).mean())
    effect = float(np.abs(expected - float_logits).mean())
    top1 = float((got.argmax(-1) == expected.argmax(-1)).mean())
    bound = max(PARITY_FLOOR, PARITY_RATIO * effect)
    if not parity <= bound:  # also catches NaN
        raise UserError(
            f"int4 graph does not match the fake-quant model (mean logit difference {parity:.3g}, "
            f"bound {bound:.3g}); this is a bug in edgecraft's int4 export, please report it",
            exit_code=1,
        )
    loss_fp32 = decode_loss(fp32_path, cfg, windows)
    loss_int4 = decode_loss(int4_path, cfg, windows)
    increase = float(100.0 * (loss_int4 - loss_fp32) / loss_fp32)
    report = {
        "kernel": f"MatMulNBits (bits {BITS}, accuracy level {ACCURACY_LEVEL})",
        "block_size": plan.block_size,
        "weights": f"int4 symmetric, one scale per {plan.block_size} weights along the input dimension",
        "activations": f"int8 symmetric per block of {plan.block_size}, range per call",
        "tables": "8-bit per row (GatherBlockQuantized); the head reads the table's round trip in float",
        "quantized_layers": sorted(plan.layers),
        "parity": "int4 graph vs fake-quant PyTorch, decode steps given the same KV cache",
        "parity_mean_abs_logit_diff": parity,
        "parity_max_abs_logit_diff": float(np.abs(got - expected).max()),
        "parity_bound": bound,
        "parity_top1_agreement": top1,
        "quantization_mean_abs_logit_effect": effect,
        "val_loss_fp32": loss_fp32,
        "val_loss_int4": loss_int4,
        "val_ppl_fp32": math.exp(loss_fp32),
        "val_ppl_int4": math.exp(loss_int4),
        "val_loss_increase_pct": increase,
        "val_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "eval": "decode, batch 1",
    }
    print(
        f"int4 (blocks of {plan.block_size}): val loss {loss_fp32:.4f} fp32 -> {loss_int4:.4f} int4 "
        f"({increase:+.2f}%), perplexity {math.exp(loss_fp32):.3f} -> {math.exp(loss_int4):.3f}; "
        f"parity with the fake-quant model {parity:.2g} (bound {bound:.2g}, top-1 {top1:.3f})"
    )
    if max_loss_increase is not None and increase > max_loss_increase:
        raise UserError(
            f"int4 validation loss is {increase:.2f}% above fp32 ({loss_int4:.4f} vs {loss_fp32:.4f}), "
            f"more than --max-loss-increase {max_loss_increase}%; nothing written. Try a 4-bit QAT run "
            f"(quant.qat = true, quant.bits = 4), a smaller --block-size or --keep-float",
            exit_code=GATE_EXIT_CODE,
        )
    return report
