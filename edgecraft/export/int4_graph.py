"""The int4 graph: the fp32 decoder graph of export/graph.py with every block matrix rewritten to
onnxruntime's MatMulNBits (4-bit block-wise weights, accuracy level 4: int8 activations per block,
int32 accumulation), rounded by edgecraft.quant's functions, so a QAT run's graph computes what
its fake-quant model computed.

- block linear: MatMul (+ Add bias) -> MatMulNBits(x, packed uint4 W, scales, bias); the bias
  rides in the node (one node fewer per biased matrix than the fp32 graph)
- embedding tables: GatherBlockQuantized in 8 bits, as in the int8 graph (export/int8_graph.py);
  the head reads the (tied) table's 8-bit round trip as a float MatMul. With the 8-bit tables the
  char-1m int4 file is 17.6% of fp32 (benchmarks/results/int4.md); a 4-bit head and tables were
  not tried: at a character vocabulary they are about 1% of the weights

MatMulNBits's layout: B (N, K / block, block / 2) uint8, two weights a byte, the lower nibble
first, each stored as q + 8 (the default zero point); scales (N * K / block,) float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from edgecraft.config import GPTConfig
from edgecraft.export.graph import MS, build_graph
from edgecraft.export.int8_graph import rewrite_matmuls
from edgecraft.quant import block_grid, fake_quant_weight

BITS = 4
ACCURACY_LEVEL = 4  # int8 compute: level 0 (float compute) is 1.6x slower (benchmarks/results/int4.md)


@dataclass(frozen=True)
class Int4Plan:
    """What to quantize: the layer names (edgecraft.quant's) and the block size along K."""

    layers: frozenset[str]
    block_size: int


def pack_weight(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) -> MatMulNBits' B (N, K / block, block * bits / 8) uint8 and scales (N * K / block,)."""
    q, scale = block_grid(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), bits, block)
    stored = q.numpy().astype(np.int32) + 2 ** (bits - 1)  # (N, nb, block) in [0, 2^bits)
    if bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return stored.astype(np.uint8), scale.numpy().reshape(-1).astype(np.float32)


def _float_tables(weights: dict[str, np.ndarray], layers: frozenset[str]) -> dict[str, np.ndarray]:
    """Weights with the quantized tables (and a quantized head) replaced by their 8-bit round trip,
    so the graph's float head and rotary's normed lookup see what QAT saw."""
    out = dict(weights)
    for name in ("tok_emb", "pos_emb", "head"):
        if name in layers and f"{name}.weight" in out:
            w = torch.from_numpy(np.ascontiguousarray(out[f"{name}.weight"], dtype=np.float32))
            out[f"{name}.weight"] = fake_quant_weight(w).numpy()
    return out


def build_int4_graph(cfg: GPTConfig, weights: dict[str, np.ndarray], plan: Int4Plan, opset: int = 17) -> onnx.ModelProto:
    """The fp32 graph of graph.build_graph with the plan's block matrices in 4 bits."""
    model = build_graph(cfg, _float_tables(weights, plan.layers), opset)

    def block_layer(init: str) -> str | None:  # the head stays a float MatMul over the 8-bit table
        return init.removesuffix(".weight.T") if init.startswith("blocks.") and init.endswith(".weight.T") else None

    def quantize(node: onnx.NodeProto, layer: str, w: np.ndarray, bias: str, out: str) -> tuple[list, list]:
        N, K = w.shape
        packed, scales = pack_weight(w, BITS, plan.block_size)
        base = node.input[1].removesuffix(".T")
        return [helper.make_node(
            "MatMulNBits", [node.input[0], base + ".uint4", base + ".scales", "", "", bias], [out],
            name=node.name, domain=MS, K=K, N=N, bits=BITS, block_size=plan.block_size,
            accuracy_level=ACCURACY_LEVEL,
        )], [numpy_helper.from_array(packed, base + ".uint4"), numpy_helper.from_array(scales, base + ".scales")]

    return rewrite_matmuls(model, plan.layers, block_layer, quantize)
