"""The int4 export step: which layers and block size (a 4-bit QAT run's, or post-training), the
int4 graph (int4_graph.py), and its checks: parity with the fake-quant PyTorch model and the
fp32/int4 validation-loss gate, as for int8 (export/int8_check.py, whose decode loop it reuses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgecraft.errors import UserError
from edgecraft.export.graph import op_types, state_arrays
from edgecraft.export.int4_graph import ACCURACY_LEVEL, BITS, Int4Plan, build_int4_graph
from edgecraft.export.int8 import GATE_WINDOWS, PTQ_EMBEDDINGS
from edgecraft.export.int8_check import gate, quality_report
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
        "op_types": op_types(graph),
        **report,
    }


def int4_report(
    model: GPT, plan: Int4Plan, int4_path: Path, fp32_path: Path, windows: np.ndarray,
    max_loss_increase: float | None,
) -> dict:
    """Parity with the 4-bit fake-quant model (teacher-forced decode, bounded by a tenth of the
    quantization's own effect, as for int8) and the fp32/int4 validation losses."""
    fake = QuantConfig(qat=True, bits=BITS, block_size=plan.block_size,
                       embeddings=bool({"tok_emb", "pos_emb", "head"} & plan.layers))
    report = {
        "kernel": f"MatMulNBits (bits {BITS}, accuracy level {ACCURACY_LEVEL})",
        "block_size": plan.block_size,
        "weights": f"int4 symmetric, one scale per {plan.block_size} weights along the input dimension",
        "activations": f"int8 symmetric per block of {plan.block_size}, range per call",
        "tables": "8-bit per row (GatherBlockQuantized); the head reads the table's round trip in float",
        "quantized_layers": sorted(plan.layers),
        **quality_report(model, lambda: attach(model, fake, set(plan.layers)), int4_path, fp32_path, windows, "int4"),
    }
    gate(report, "int4", f"int4 (blocks of {plan.block_size})", max_loss_increase,
         "Try a 4-bit QAT run (quant.qat = true, quant.bits = 4), a smaller --block-size or --keep-float")
    return report
