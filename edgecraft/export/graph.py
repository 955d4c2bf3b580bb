"""Build the decoder's ONNX graph directly from the trained weights, op by op.

At this model size a token's cost is streaming the weights through the matrix products plus
per-operator overhead, not arithmetic, and a traced graph carries hundreds of shape-bookkeeping
nodes (benchmarks/results/decode_speed.md compares the two). So, like onnxruntime-genai's model
builder, we write the graph by hand with onnxruntime's fused contrib operators, 11 nodes per
GPT-2-style layer:

    residual Sum (+ the previous projection's bias) + norm -> MatMul qkv (+ Add bias)
    -> GroupQueryAttention (packed QKV, KV cache shared between past and present, rotary inside)
    -> MatMul out-proj -> Sum + norm -> MatMul fc -> BiasGelu -> MatMul
    (SwiGLU: MatMul gate, MatMul up -> QuickGelu(gate) * up -> MatMul)

The KV cache is a preallocated buffer per layer, (batch, n_kv_heads, block_size, head_size), bound
as both `past_key_values.i.*` and `present.i.*`; the caller says where each sequence stands with
`seqlens_k` (tokens cached after this step, minus one; (B, 1), squeezed once for all layers, so
that onnxruntime-genai can feed it too). `graph_io()` describes all of it for the bundle
manifest. GroupQueryAttention's newer `query_seqlens` input (right-padded chunks appended to
caches of different lengths in one call) is left out on purpose: it arrived in onnxruntime 1.32
and a graph that names it does not load in 1.30 or 1.31; the engine runs such chunks row by row
instead.

GroupQueryAttention's CPU kernel takes head sizes that are multiples of 8 only. Other heads are
zero-padded to the next multiple inside the weights (GPTConfig.cache_head_size, head_layout): the
padded query and key dims are zero, so attention scores are unchanged (the kernel's scale is set from the
real head size), the padded value dims stay zero and the output projection ignores them. The graph
keeps the same inputs and outputs; only the KV cache's last dimension grows, and the manifest says
so. The cost is the padding's share of attention and KV memory (a head of 12 pads to 16).

Only numpy and onnx here (and the torch-free model config): the exporter hands in a state dict
of numpy arrays.
"""

from __future__ import annotations

import json
from collections import Counter

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecraft.config import ROPE_THETA, GPTConfig
from edgecraft.runtime.bundle import CONFIG_METADATA

if TYPE_CHECKING:
    from edgecraft.model import GPT

MS = "com.microsoft"
NORM_EPS = 1e-5


def head_layout(cfg: GPTConfig) -> np.ndarray:
    """For each dim of a padded head (cache_head_size,), the model's head dim it holds, or -1 for
    a zero. Rotary pairs dim i with i + size / 2, so a rotary head pads each half at its end;
    other heads pad at the end."""
    hs, hp = cfg.head_size, cfg.cache_head_size
    if cfg.pos != "rope":
        return np.concatenate([np.arange(hs), np.full(hp - hs, -1)])
    half, pad = np.arange(hs // 2), np.full((hp - hs) // 2, -1)
    return np.concatenate([half, pad, half + hs // 2, pad])


def pad_heads(array: np.ndarray, cfg: GPTConfig, axis: int) -> np.ndarray:
    """`array` with its head axis (of size head_size) laid out as head_layout says, zeros in the
    padding: weights (n_heads * head_size along `axis`) and caches (..., head_size) alike."""
    layout = head_layout(cfg)
    if len(layout) == cfg.head_size:
        return array
    a = np.moveaxis(array, axis, -1)
    a = a.reshape(*a.shape[:-1], -1, cfg.head_size)  # (..., heads, head_size)
    out = np.where(layout >= 0, a[..., np.maximum(layout, 0)], 0).astype(a.dtype)  # (..., heads, padded)
    return np.moveaxis(out.reshape(*a.shape[:-2], -1), -1, axis)


def rotary_in_attention(cfg: GPTConfig) -> bool:
    """GroupQueryAttention rotates q and k itself only for head sizes that are multiples of 16
    (onnxruntime's CPU kernel rejects others); other rotary models get RotaryEmbedding nodes."""
    return cfg.pos == "rope" and cfg.cache_head_size % 16 == 0


def graph_io(cfg: GPTConfig) -> dict:
    """Names, shapes (symbolic dims named) and dtypes of the graph's inputs and outputs."""
    cache = ["batch_size", cfg.n_kv_heads, "max_sequence_length", cfg.cache_head_size]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}]
    if cfg.pos == "learned" or (cfg.pos == "rope" and not rotary_in_attention(cfg)):
        inputs.append(
            {"name": "position_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
        )
    # (B, 1) and (1,) rather than GroupQueryAttention's (B,) and scalar: the shapes of the counters
    # onnxruntime-genai keeps for graphs that take them (edgecraft/export/genai.py)
    inputs += [
        {"name": "seqlens_k", "dtype": "int32", "shape": ["batch_size", 1]},
        {"name": "total_sequence_length", "dtype": "int32", "shape": [1]},
    ]
    outputs = [
        {"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", cfg.vocab_size]}
    ]
    for i in range(cfg.n_layers):
        for kv in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kv}", "dtype": "float32", "shape": cache})
            outputs.append({"name": f"present.{i}.{kv}", "dtype": "float32", "shape": cache})
    return {"inputs": inputs, "outputs": outputs}


def state_arrays(model: GPT) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays (what the graph builders take)."""
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


class _Graph:
    """Collects nodes and initializers; names are unique by construction (prefix per layer)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _norm_table(cfg: GPTConfig, emb: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """The first block's norm applied to every embedding row (V, D): with rotary positions nothing
    is added to the token embedding, so norm1 of layer 0 is a lookup and costs no node."""
    x = emb.astype(np.float64)  # (V, D)
    if cfg.norm == "rmsnorm":
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + NORM_EPS)
    else:
        xc = x - x.mean(-1, keepdims=True)
        y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + NORM_EPS)
    y = y * w[f"{prefix}.weight"]
    if cfg.norm == "layernorm" and cfg.bias:
        y = y + w[f"{prefix}.bias"]
    return _f32(y)


def build_graph(cfg: GPTConfig, weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """The decoder graph for `cfg` with `weights` (the model's state dict as numpy arrays)."""
    w = {k: _f32(v) for k, v in weights.items()}
    g = _Graph()
    nh, nkv, hs, hp = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.cache_head_size
    padded = {"scale": float(hs) ** -0.5} if hp != hs else {}  # GroupQueryAttention's default is hp's
    for i in range(cfg.n_layers):  # heads padded to hp (module docstring); no-ops when hp == hs
        for name, axis in (("attn.qkv.weight", 0), ("attn.qkv.bias", 0), ("attn.proj.weight", 1)):
            if f"blocks.{i}.{name}" in w:  # qkv: q, k and v heads one after the other
                w[f"blocks.{i}.{name}"] = pad_heads(w[f"blocks.{i}.{name}"], cfg, axis)

    def add_norm(x: str, skip: str, prefix: str, bias: str | None, with_sum: bool) -> tuple[str, str]:
        """norm(x + skip + bias) and the sum itself (the new residual stream).

        RMSNorm: one SkipSimplifiedLayerNormalization. LayerNorm: Sum + LayerNormalization, because
        onnxruntime's CPU SkipLayerNormalization is slower per row than the two (its simplified
        sibling is not; benchmarks/results/decode_speed.md, "Choices measured on the way").
        """
        gamma = g.const(f"{prefix}.weight", w[f"{prefix}.weight"])
        extra = [g.const(bias, w[bias])] if bias is not None else []
        if cfg.norm == "rmsnorm":
            outs = [f"{prefix}/out"] + (["", "", f"{prefix}/sum"] if with_sum else [])
            g.op("SkipSimplifiedLayerNormalization", [x, skip, gamma] + extra, outs, prefix, MS, epsilon=NORM_EPS)
            return outs[0], outs[-1]
        res = g.op("Sum" if extra else "Add", [x, skip] + extra, [f"{prefix}/sum"], f"{prefix}/residual")[0]
        beta = [g.const(f"{prefix}.bias", w[f"{prefix}.bias"])] if cfg.bias else []
        out = g.op("LayerNormalization", [res, gamma] + beta, [f"{prefix}/out"], prefix, axis=-1, epsilon=NORM_EPS)[0]
        return out, res

    def linear(x: str, name: str, weight: np.ndarray, bias: str | None = None) -> str:
        """x @ weight.T (+ bias): torch's Linear, with the weight stored pre-transposed (in, out)."""
        y = g.op("MatMul", [x, g.const(f"{name}.weight.T", weight.T)], [f"{name}/MatMul"], f"{name}/MatMul")[0]
        if bias is not None:
            y = g.op("Add", [y, g.const(f"{name}.bias", w[bias])], [f"{name}/Add"], f"{name}/Add")[0]
        return y

    # embeddings and layer 0's first norm
    tok = g.op("Gather", [g.const("tok_emb.weight", w["tok_emb.weight"]), "input_ids"], ["tok"], "tok_emb")[0]
    if cfg.pos == "learned":
        pos = g.op("Gather", [g.const("pos_emb.weight", w["pos_emb.weight"]), "position_ids"], ["pos"], "pos_emb")[0]
        h, res = add_norm(tok, pos, "blocks.0.norm1", None, with_sum=True)  # (B, S, D) each
    else:
        table = _norm_table(cfg, w["tok_emb.weight"], w, "blocks.0.norm1")
        h = g.op("Gather", [g.const("blocks.0.norm1.table", table), "input_ids"], ["h0"], "blocks.0.norm1")[0]
        res = tok

    axis1 = g.const("axis1", np.array([1], dtype=np.int64))
    seqlens = g.op("Squeeze", ["seqlens_k", axis1], ["seqlens"], "seqlens")[0]  # (B,)

    rope: list[str] = []
    if cfg.pos == "rope":
        inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, hs, 2, dtype=np.float32) / hs)
        inv_freq = np.concatenate([inv_freq, np.zeros((hp - hs) // 2, np.float32)])  # padding: angle 0
        angles = np.outer(np.arange(cfg.block_size, dtype=np.float32), inv_freq)  # (block, hp/2)
        rope = [g.const("rope.cos", np.cos(angles)), g.const("rope.sin", np.sin(angles))]
    fused_rope = rotary_in_attention(cfg)

    bias = (lambda name: name) if cfg.bias else (lambda name: None)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        qkv = linear(h, f"{p}.attn.qkv", w[f"{p}.attn.qkv.weight"], bias(f"{p}.attn.qkv.bias"))  # (B, S, (nh + 2 nkv) hp)
        q_k_v = [qkv, "", ""]  # packed
        if rope and not fused_rope:
            split = g.const(f"{p}.attn.split", np.array([nh * hp, nkv * hp, nkv * hp], dtype=np.int64))
            q_k_v = g.op("Split", [qkv, split], [f"{p}/q", f"{p}/k", f"{p}/v"], f"{p}.attn.split", axis=-1)
            for j, heads in ((0, nh), (1, nkv)):  # (B, S, heads * hp) each
                q_k_v[j] = g.op("RotaryEmbedding", [q_k_v[j], "position_ids", *rope], [q_k_v[j] + "_rot"],
                                f"{p}.attn.rotary_{'qk'[j]}", MS, num_heads=heads)[0]
        gqa_inputs = q_k_v + [f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                              seqlens, "total_sequence_length"]
        gqa_inputs += rope if fused_rope else []
        attn = g.op(
            "GroupQueryAttention", gqa_inputs, [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"],
            f"{p}.attn", MS, num_heads=nh, kv_num_heads=nkv, do_rotary=int(fused_rope),
            rotary_interleaved=0, **padded,
        )[0]  # (B, S, nh * hp)
        y = linear(attn, f"{p}.attn.proj", w[f"{p}.attn.proj.weight"])
        h, res = add_norm(y, res, f"{p}.norm2", bias(f"{p}.attn.proj.bias"), with_sum=True)
        if cfg.mlp == "swiglu":
            # two MatMuls rather than one over concatenated weights + Split (onnxruntime-genai's
            # layout): the same bytes streamed, one node kind fewer, the same speed within noise
            # (benchmarks/results/int4-peers/fp32_parts.md, with the other one-row forms measured)
            gate = linear(h, f"{p}.mlp.gate", w[f"{p}.mlp.gate.weight"], bias(f"{p}.mlp.gate.bias"))  # (B, S, F)
            up = linear(h, f"{p}.mlp.up", w[f"{p}.mlp.up.weight"], bias(f"{p}.mlp.up.bias"))  # (B, S, F)
            silu = g.op("QuickGelu", [gate], [f"{p}/silu"], f"{p}.mlp.silu", MS, alpha=1.0)[0]
            f = g.op("Mul", [silu, up], [f"{p}/swiglu"], f"{p}.mlp.mul")[0]  # (B, S, F)
        else:
            f = linear(h, f"{p}.mlp.fc", w[f"{p}.mlp.fc.weight"])
            if cfg.bias:
                f = g.op("BiasGelu", [f, g.const(f"{p}.mlp.fc.bias", w[f"{p}.mlp.fc.bias"])],
                         [f"{p}/gelu"], f"{p}.mlp.gelu", MS)[0]
            else:
                f = g.op("Gelu", [f], [f"{p}/gelu"], f"{p}.mlp.gelu", MS)[0]  # exact (erf)
        y = linear(f, f"{p}.mlp.proj", w[f"{p}.mlp.proj.weight"])
        last = i == cfg.n_layers - 1
        nxt = "norm_f" if last else f"blocks.{i + 1}.norm1"
        h, res = add_norm(y, res, nxt, bias(f"{p}.mlp.proj.bias"), with_sum=not last)

    head = w["tok_emb.weight"] if cfg.tie_embeddings else w["head.weight"]  # (V, D)
    g.op("MatMul", [h, g.const("head.weight.T", head.T)], ["logits"], "head")

    def value_info(spec: dict) -> onnx.ValueInfoProto:
        dtype = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}
        return helper.make_tensor_value_info(spec["name"], dtype[spec["dtype"]], spec["shape"])

    io = graph_io(cfg)
    graph = helper.make_graph(
        g.nodes, "edgecraft-decoder", [value_info(s) for s in io["inputs"]],
        [value_info(s) for s in io["outputs"]], initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    # the oldest IR version the opset allows, not the onnx package's newest: onnxruntime 1.30
    # refuses IR 14, which onnx 1.23 writes by default
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="edgecraft",
        ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True),
    )
    # the config rides in the graph too: a runtime checks the manifest's config against it
    helper.set_model_props(model, {CONFIG_METADATA: json.dumps(cfg.to_dict(), sort_keys=True)})
    onnx.checker.check_model(model)
    return model


def op_types(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each operator type the graph has (the manifest and quantization reports)."""
    return dict(Counter(node.op_type for node in model.graph.node))
