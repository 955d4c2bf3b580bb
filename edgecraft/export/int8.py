"""The int8 export step: which layers, which scheme and ranges (a QAT run's state or calibration),
then the int8 graph (int8_graph.py) and its checks (int8_check.py).

A QAT run's int8 graph computes what its fake-quant model computed; a float run gets
post-training quantization (dynamic, or static from calibration batches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from edgecraft.errors import UserError
from edgecraft.export.graph import op_types, state_arrays
from edgecraft.export.int8_check import int8_report, single_row_report
from edgecraft.export.int8_graph import Int8Plan, build_int8_graph, single_row_graph
from edgecraft.export.options import check_keep_float
from edgecraft.export.parity import val_windows
from edgecraft.model import GPT
from edgecraft.quant import attach, quantized_layers
from edgecraft.recipe import QuantConfig, Recipe
from edgecraft.runtime.bundle import INT8_SINGLE_ROW_MODEL, BundleError

QUANT_STATE = "quant.safetensors"  # a QAT run's handle state, beside model.safetensors
GATE_WINDOWS = 8  # validation windows (of block_size tokens) for the fp32/int8 loss comparison
# Post-training quantization covers the embedding tables and the (tied) head too (--keep-float opts
# out): they cost little validation loss and make the int8 file smaller (benchmarks/results/int8.md).
# A QAT run quantizes what it trained with (quant.embeddings).
PTQ_EMBEDDINGS = True


def plan_layers(model: GPT, embeddings: bool, keep_float: tuple[str, ...]) -> frozenset[str]:
    """The layers an int8 export quantizes (quant.quantized_layers decides), after checking the
    user's --keep-float."""
    check_keep_float(keep_float)
    return frozenset(quantized_layers(model, embeddings, keep_float))


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
    qat = quant.qat and quant.bits == 8  # a 4-bit QAT run's int8 graph is post-training
    if qat:
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
    graph = build_int8_graph(model.cfg, state_arrays(model), plan, opset)
    onnx.save(graph, str(int8_path))
    windows = val_windows(val, model.cfg.block_size, GATE_WINDOWS)
    report = int8_report(model, plan, int8_path, fp32_path, windows, max_loss_increase)
    single = single_row_graph(graph) if scheme == "dynamic" else None
    if single is not None:  # one-row decode steps run it (runtime/onnx_engine.py); gated alike
        single_path = int8_path.with_name(INT8_SINGLE_ROW_MODEL)
        onnx.save(single, str(single_path))
        try:
            report["single_row"] = single_row_report(model.cfg, single_path, report, windows, max_loss_increase)
        except BundleError as err:  # an onnxruntime without 8-bit MatMulNBits: the int8 graph does every step
            single_path.unlink()
            print(f"int8: no one-row decode graph ({err})")
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    return {
        "file": int8_path.name,
        "method": "qat" if qat else ("ptq-static" if calibrate else "ptq-dynamic"),
        "calibration_batches": calibrate,
        "keep_float": list(keep_float),
        "bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
        "nodes": len(graph.graph.node),
        "op_types": op_types(graph),
        **report,
    }
