"""The int8 graph: the fp32 decoder graph of export/graph.py with its matrices and tables
rewritten to onnxruntime int8 kernels, rounded by edgecraft.quant's functions.

One DynamicQuantizeMatMul per linear layer is the fastest int8 form for prompts and batches (a QDQ
MatMul and MatMulNBits without int8 compute dequantize the weights on every call and are slower
than fp32; benchmarks/results/int8.md); for one-row decode steps 8-bit MatMulNBits with int8
compute is faster, and single_row_graph() writes that form beside it (benchmarks/results/int4.md).
So:
- scheme "dynamic": MatMul (+ Add bias) -> DynamicQuantizeMatMul(x, int8 W, per-column scale, bias)
- scheme "static":  MatMul (+ Add bias) -> QuantizeLinear(x, a_scale, a_zp) ->
                    MatMulIntegerToFloat(xq, int8 W, a_scale, w scale, a_zp, bias)
- quantized embedding tables: GatherBlockQuantized (8-bit, one scale per row, repeated per block):
  it dequantizes only the gathered rows, where DequantizeLinear -> Gather redoes the whole table
  on every call (onnxruntime does not fold it); its blocks need d_model % 16 == 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from edgecraft.config import GPTConfig
from edgecraft.export.graph import MS, build_graph
from edgecraft.quant import TABLE_BLOCK, activation_qparams, fake_quant_weight, quantize_weight


@dataclass(frozen=True)
class Int8Plan:
    """What to quantize and how: the layer names (edgecraft.quant's), the scheme, static ranges."""

    layers: frozenset[str]
    scheme: str  # "dynamic" | "static"
    ranges: dict[str, tuple[float, float]]  # static only: layer -> (lo, hi) of its input


def _graph_layer(init_name: str) -> str | None:
    """The quant layer name a graph initializer belongs to ('blocks.0.attn.qkv.weight.T' ->
    'blocks.0.attn.qkv')."""
    if not init_name.endswith(".weight.T"):
        return None
    return init_name.removesuffix(".weight.T")


def _dequantized_tables(weights: dict[str, np.ndarray], layers: frozenset[str]) -> dict[str, np.ndarray]:
    """Weights with the quantized embedding tables replaced by their int8 round trip, so tables the
    graph derives from them (a tied head, rotary's normed lookup) see what QAT saw."""
    out = dict(weights)
    for name in ("tok_emb", "pos_emb"):
        if name in layers and f"{name}.weight" in out:
            w = torch.from_numpy(np.ascontiguousarray(out[f"{name}.weight"], dtype=np.float32))
            out[f"{name}.weight"] = fake_quant_weight(w).numpy()
    return out


def quantized_table(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, list]:
    """A Gather from tok_emb/pos_emb rewritten as GatherBlockQuantized over the table in 8 bits
    (one scale per row, repeated per block), and the new initializers."""
    table = node.input[0].removesuffix(".weight")
    q, scale = quantize_weight(torch.tensor(numpy_helper.to_array(inits[node.input[0]])))
    D = q.shape[1]
    block = max(b for b in (2**k for k in range(TABLE_BLOCK.bit_length() - 1, D.bit_length())) if D % b == 0)
    stored = (q.numpy().astype(np.int16) + 128).astype(np.uint8)  # (V, D), zero point 128
    scales = np.repeat(scale.numpy()[:, None], D // block, axis=1)  # (V, D / block)
    tq = numpy_helper.from_array(stored, f"{table}.weight.uint8")
    ts = numpy_helper.from_array(scales, f"{table}.weight.scale")
    gather = helper.make_node(
        "GatherBlockQuantized", [tq.name, node.input[1], ts.name], list(node.output),
        name=node.name, domain=MS, gather_axis=0, quantize_axis=1, block_size=block, bits=8,
    )
    return gather, [tq, ts]


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each value's reading nodes (a bias Add that alone reads a MatMul's output folds into it)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def table_or_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], layers, added: list,
                  dropped: set) -> onnx.NodeProto:
    """`node`, or its quantized_table form when it gathers from a table in `layers` (the new
    initializers join `added`, the float table `dropped`)."""
    if node.op_type != "Gather" or node.input[0].removesuffix(".weight") not in layers:
        return node
    new_node, tables = quantized_table(node, inits)
    added += tables
    dropped.add(node.input[0])
    return new_node


def rewired(model: onnx.ModelProto, nodes: list, added: list, dropped: set) -> onnx.ModelProto:
    """`model` with `nodes` as its graph, the `added` initializers, and the `dropped` ones gone
    unless a node still reads them; checked."""
    graph = model.graph
    still_used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    onnx.checker.check_model(model)
    return model


def rewrite_matmuls(model: onnx.ModelProto, layers, layer_of: Callable[[str], str | None], quantize) -> onnx.ModelProto:
    """The int8 and int4 builders' one walk over the fp32 graph: each MatMul whose weight
    initializer belongs to a layer in `layers` (`layer_of(name)`) becomes the nodes and
    initializers of `quantize(node, layer, w (N, K), bias, out)`, taking in the bias Add that alone
    follows it; embedding tables in `layers` become table_or_node's GatherBlockQuantized."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers = consumers_of(model.graph)
    new_nodes, dropped, added, folded = [], set(), [], set()  # folded: ids of Add nodes taken in
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        layer = layer_of(weight) if weight in inits else None
        if id(node) in folded:
            continue
        if layer is None or layer not in layers:
            new_nodes.append(table_or_node(node, inits, layers, added, dropped))
            continue
        out, bias = node.output[0], ""
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and users[0].input[1] in inits:
            bias, out = users[0].input[1], users[0].output[0]
            folded.add(id(users[0]))
        nodes, tensors = quantize(node, layer, numpy_helper.to_array(inits[weight]).T, bias, out)
        new_nodes += nodes
        added += tensors
        dropped.add(weight)
    return rewired(model, new_nodes, added, dropped)


def build_int8_graph(cfg: GPTConfig, weights: dict[str, np.ndarray], plan: Int8Plan, opset: int = 17) -> onnx.ModelProto:
    """The fp32 graph of graph.build_graph with the plan's matrices and tables in int8."""
    model = build_graph(cfg, _dequantized_tables(weights, plan.layers), opset)

    def quantize(node: onnx.NodeProto, layer: str, w: np.ndarray, bias: str, out: str) -> tuple[list, list]:
        q, scale = quantize_weight(torch.from_numpy(np.ascontiguousarray(w)))  # (N, K), (N,)
        base = node.input[1].removesuffix(".T")
        wq = numpy_helper.from_array(np.ascontiguousarray(q.numpy().T), base + ".int8")  # (K, N)
        ws = numpy_helper.from_array(scale.numpy(), base + ".scale")
        if plan.scheme == "dynamic":
            return [helper.make_node(
                "DynamicQuantizeMatMul", [node.input[0], wq.name, ws.name, "", bias], [out], name=node.name, domain=MS,
            )], [wq, ws]
        lo, hi = plan.ranges[layer]
        a_scale, a_zp = activation_qparams(torch.tensor(lo), torch.tensor(hi))
        s = numpy_helper.from_array(np.array(a_scale.item(), dtype=np.float32), base + ".act_scale")
        z = numpy_helper.from_array(np.array(int(a_zp.item()), dtype=np.uint8), base + ".act_zero_point")
        xq = node.name + "/x_uint8"
        return [
            helper.make_node("QuantizeLinear", [node.input[0], s.name, z.name], [xq], name=node.name + "/quantize"),
            helper.make_node("MatMulIntegerToFloat", [xq, wq.name, s.name, ws.name, z.name, "", bias], [out],
                             name=node.name, domain=MS),
        ], [wq, ws, s, z]

    return rewrite_matmuls(model, plan.layers, _graph_layer, quantize)


# MatMulNBits blocks: every onnxruntime that has the kernel takes 16 to 128 (1.30 up to 256, web too);
# the block's size did not change the one-row decode speed measured here
MAX_ROW_BLOCK = 128


def single_row_graph(int8_model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The dynamic int8 graph with every DynamicQuantizeMatMul rewritten to an 8-bit MatMulNBits
    (accuracy level 4) over the same int8 weights and per-row scales: faster for one-row decode
    steps, slower for batches and prompts (benchmarks/results/int4.md), so the runtime runs it for
    one-row decode steps only. Its activations are int8 symmetric per block of the row instead of
    uint8 over the row, so its logits differ slightly (the manifest records its loss). None when a
    matrix's input width is not a multiple of 16 (MatMulNBits' smallest block)."""
    model = onnx.ModelProto()
    model.CopyFrom(int8_model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, dropped, added = [], set(), []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            new_nodes.append(node)
            continue
        q = numpy_helper.to_array(inits[node.input[1]]).T.astype(np.int16)  # (N, K)
        scale = numpy_helper.to_array(inits[node.input[2]])  # (N,)
        N, K = q.shape
        if K % 16:
            return None
        block = max(b for b in (16, 32, 64, 128) if K % b == 0 and b <= MAX_ROW_BLOCK)
        base = node.input[1].removesuffix(".int8")
        stored = (q + 128).astype(np.uint8).reshape(N, K // block, block)  # zero point 128, the default
        scales = np.repeat(scale[:, None], K // block, axis=1).reshape(-1)  # (N * K / block,)
        added += [numpy_helper.from_array(stored, base + ".uint8"), numpy_helper.from_array(scales, base + ".scales")]
        dropped |= {node.input[1], node.input[2]}
        bias = node.input[4] if len(node.input) > 4 else ""
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], base + ".uint8", base + ".scales", "", "", bias], list(node.output),
            name=node.name, domain=MS, K=K, N=N, bits=8, block_size=block, accuracy_level=4,
        ))
    return rewired(model, new_nodes, added, dropped)
