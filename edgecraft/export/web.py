"""Bundle -> bundle/web/: a static page and an ES module that run the bundle in a browser.

    add_web(export/NAME) -> export/NAME/web/ {index.html, edgecraft.js, vendor/, model.{wasm,webgpu}*.onnx}

The page and module are `web_assets/` (the module mirrors runtime/model.py's decode loop, sampling
and streaming rule for rule); `vendor/` is onnxruntime-web and @huggingface/tokenizers, copied out
of the npm packages that web/package-lock.json pins (`npm ci --prefix web` puts them in
web_assets/vendor/, and a wheel built after it ships them, so an installed edgecraft needs no npm).

Each backend gets its own form of each model file, computing the same logits (CHANGES):
onnxruntime-web has no IO binding for WebAssembly, so a call copies its inputs into WebAssembly
memory and its outputs out, tensor by tensor; the WebAssembly graphs take the cache as one tensor
and return only the positions a call wrote. The WebGPU graphs keep the per-layer cache (it stays
on the GPU) and avoid the operators its provider runs on the CPU. The
manifest's `web` section says which file each backend runs and holds the sha256 of every file
under web/; export/README.md specifies it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecraft.errors import UserError
from edgecraft.export.graph import op_types
from edgecraft.files import as_umask_allows
from edgecraft.runtime.bundle import (
    FP32_MODEL, INT8_MODEL, INT8_SINGLE_ROW_MODEL, MANIFEST, BundleError, FileEntry, read_manifest, sha256_file,
)

WEB = "web"
WEB_FORMAT = "edgecraft-web/1"
ASSETS = Path(__file__).with_name("web_assets")
VENDOR = ASSETS / "vendor"
GRAPHS = {  # backend -> bundle model file -> the file the browser runs
    "wasm": {FP32_MODEL: "web/model.wasm.onnx", INT8_MODEL: "web/model.wasm.int8.onnx",
             INT8_SINGLE_ROW_MODEL: "web/model.wasm.int8.1row.onnx"},
    "webgpu": {FP32_MODEL: "web/model.webgpu.onnx", INT8_MODEL: "web/model.webgpu.int8.onnx"},
}
# the manifest's web.graphs keys; "int8_decode" is the graph one-token decode steps run, as the
# Python engine runs them (runtime/onnx_engine.py's single_row_path); WebGPU's int8 graph already is MatMulNBits
PRECISIONS = {FP32_MODEL: "fp32", INT8_MODEL: "int8", INT8_SINGLE_ROW_MODEL: "int8_decode"}
CHANGES = {
    "wasm": "batch 1, one cache tensor each way: past_key_values.{i}.* -> past_key_values (2 * n_layers, kv_heads, "
            "L, head_size), layer i's key then value; present.{i}.* (the whole cache) -> new_key_values (2 * n_layers, "
            "kv_heads, S, head_size), the positions the call wrote; the page keeps the cache. Same logits.",
    "webgpu": "Sum -> Add chains, DynamicQuantizeMatMul -> MatMulNBits (8 bits, the same weights and scales, "
              "float activations) + Add for its bias: onnxruntime-web's WebGPU provider runs Sum and "
              "DynamicQuantizeMatMul on the CPU",
}
NBITS_BLOCK = 32  # MatMulNBits' block along K; every block of a column carries that column's one scale
MAX_NBITS_BLOCK = 256  # the largest MatMulNBits block onnxruntime-web's WebAssembly kernel accepts


def vendored_versions() -> dict[str, str]:
    """The npm packages' versions in web_assets/vendor; UserError naming the fix when absent."""
    versions = VENDOR / "versions.json"
    if not versions.is_file():
        raise UserError(
            f"--web: onnxruntime-web is not in this edgecraft ({VENDOR} is empty); in a checkout of edgecraft "
            "run `npm ci --prefix web` (it copies the locked npm packages there), then export again"
        )
    return json.loads(versions.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the WebGPU graphs


def _add_chains(graph: onnx.GraphProto) -> None:
    """Sum(a, b, c, ...) -> Add(Add(a, b), c) ...: the same left-to-right order, on the GPU."""
    nodes = []
    for node in graph.node:
        if node.op_type != "Sum" or len(node.input) < 2:
            nodes.append(node)
            continue
        acc = node.input[0]
        for i, term in enumerate(node.input[1:], start=1):
            last = i == len(node.input) - 1
            out = node.output[0] if last else f"{node.name}/add{i}"
            nodes.append(helper.make_node("Add", [acc, term], [out], name=f"{node.name}/add{i}"))
            acc = out
    graph.ClearField("node")
    graph.node.extend(nodes)


def _matmul_nbits(graph: onnx.GraphProto) -> None:
    """DynamicQuantizeMatMul (int8 weights (K, N), one scale per column) -> MatMulNBits with 8
    bits: blocks of NBITS_BLOCK along K stored (N, blocks, NBITS_BLOCK) as uint8 q + 128 (its
    default zero point), each block scaled by its column's scale; the bias becomes an Add."""
    inits = {t.name: t for t in graph.initializer}
    nodes, new_inits = [], []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            nodes.append(node)
            continue
        x, w_name, s_name = node.input[:3]
        bias = node.input[4] if len(node.input) > 4 else ""
        w = numpy_helper.to_array(inits[w_name])  # (K, N) int8
        scale = numpy_helper.to_array(inits[s_name]).astype(np.float32).reshape(-1)  # (N,)
        K, N = w.shape
        blocks = -(-K // NBITS_BLOCK)
        q = np.full((N, blocks * NBITS_BLOCK), 128, dtype=np.uint8)  # (N, K padded): padding dequantizes to 0
        q[:, :K] = (w.T.astype(np.int16) + 128).astype(np.uint8)
        packed = numpy_helper.from_array(q.reshape(N, blocks, NBITS_BLOCK), f"{w_name}.nbits")
        scales = numpy_helper.from_array(np.repeat(scale[:, None], blocks, axis=1).reshape(-1), f"{s_name}.nbits")  # (N * blocks,)
        new_inits += [packed, scales]
        out = node.output[0]
        mm_out = f"{out}/nbits" if bias else out
        nodes.append(helper.make_node(
            "MatMulNBits", [x, packed.name, scales.name], [mm_out], name=node.name, domain="com.microsoft",
            K=K, N=N, bits=8, block_size=NBITS_BLOCK,
        ))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}/bias"))
    used = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name in used] + new_inits
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _packed_cache(graph: onnx.GraphProto) -> None:
    """One cache tensor in and one out, for batch 1: onnxruntime-web's per-tensor cost of a call
    (allocate, copy, wrap, and back) is paid twice instead of 4 x n_layers times, and only the
    positions a call wrote come out.

    past_key_values (2 * n_layers, kv_heads, L, head_size): layer i's key then value, Split into
    the graph's past_key_values.{i}.* (through a Reshape to a runtime shape: otherwise onnxruntime's
    planner, seeing GroupQueryAttention's present inferred the same size as its past, reuses one for
    the other and fails). new_key_values (2 * n_layers, kv_heads, S, head_size): each present.{i}.*
    at the S positions this call wrote, present[:, :, total - S : total].
    """
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    present = [o for o in graph.output if o.name.startswith("present.")]
    _, heads, _, head_size = [d.dim_param or d.dim_value for d in past[0].type.tensor_type.shape.dim]
    split = [f"web/past{k}" for k in range(len(past))]
    first = [
        helper.make_node("Split", ["past_key_values"], split, name="web/split", axis=0),
        helper.make_node("Shape", [split[0]], ["web/past_shape"], name="web/past_shape"),
        *[helper.make_node("Reshape", [s, "web/past_shape"], [p.name], name=f"web/{p.name}") for s, p in zip(split, past)],
    ]
    last = [
        helper.make_node("Shape", ["input_ids"], ["web/S"], name="web/S", start=1, end=2),  # (1,) int64
        helper.make_node("Cast", ["total_sequence_length"], ["web/total"], name="web/total", to=TensorProto.INT64),
        helper.make_node("Sub", ["web/total", "web/S"], ["web/start"], name="web/start"),
        helper.make_node("Constant", [], ["web/axis"], name="web/axis", value=numpy_helper.from_array(np.array([2], np.int64))),
        *[helper.make_node("Slice", [o.name, "web/start", "web/total", "web/axis"], [f"web/new.{o.name}"], name=f"web/new.{o.name}")
          for o in present],
        helper.make_node("Concat", [f"web/new.{o.name}" for o in present], ["new_key_values"], name="web/concat", axis=0),
    ]
    for value in past:
        graph.input.remove(value)
    for value in present:
        graph.output.remove(value)
    graph.input.append(helper.make_tensor_value_info("past_key_values", TensorProto.FLOAT, [len(past), heads, "past_sequence_length", head_size]))
    graph.output.append(helper.make_tensor_value_info("new_key_values", TensorProto.FLOAT, [len(present), heads, "sequence_length", head_size]))
    nodes = first + list(graph.node) + last
    graph.ClearField("node")
    graph.node.extend(nodes)


def _fit_nbits_blocks(graph: onnx.GraphProto) -> None:
    """MatMulNBits blocks above MAX_NBITS_BLOCK (the int8 one-row graph has one block per row of K)
    split into blocks of MAX_NBITS_BLOCK, each with its parent's scale: onnxruntime-web's kernel
    takes blocks of 16 to 256 only. The same numbers, and onnxruntime computes the same logits
    (tests/test_web.py). Only 8-bit blocks with the default zero point are written that way."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["block_size"].i <= MAX_NBITS_BLOCK:
            continue
        if attrs["bits"].i != 8 or len(node.input) > 3 and node.input[3]:
            raise UserError(f"--web: {node.name}: MatMulNBits blocks of {attrs['block_size'].i} that onnxruntime-web cannot load")
        N, old = attrs["N"].i, attrs["block_size"].i
        q = numpy_helper.to_array(inits[node.input[1]]).reshape(N, -1)  # (N, blocks * old)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(N, -1)  # (N, blocks)
        split = old // MAX_NBITS_BLOCK
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(q.reshape(N, -1, MAX_NBITS_BLOCK), node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(np.repeat(scales, split, axis=1).reshape(-1), node.input[2]))
        attrs["block_size"].i = MAX_NBITS_BLOCK


def _rewrite(src: Path, dst: Path, *steps) -> dict[str, int]:
    model = onnx.load(str(src))
    for step in steps:
        step(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return op_types(model)


def wasm_graph(src: Path, dst: Path) -> dict[str, int]:
    """Write the WebAssembly form of graph `src` (MatMulNBits blocks it takes, one packed cache in
    and out) to `dst`; its operator counts."""
    return _rewrite(src, dst, _fit_nbits_blocks, _packed_cache)


def webgpu_graph(src: Path, dst: Path) -> dict[str, int]:
    """Write the WebGPU form of graph `src` (Add chains, MatMulNBits) to `dst`; its operator counts."""
    return _rewrite(src, dst, _add_chains, _matmul_nbits)


# ---------------------------------------------------------------- the bundle's web/ folder


def add_web(bundle: Path) -> Path:
    """Write `bundle`/web/ (replacing one already there) and the manifest's `web` section; the
    folder is assembled beside it and renamed into place, and the manifest rewritten atomically."""
    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
    except BundleError as err:
        raise UserError(str(err)) from None
    versions = vendored_versions()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-web-", dir=bundle))
    as_umask_allows(tmp)
    try:
        for name in ("index.html", "edgecraft.js"):
            shutil.copyfile(ASSETS / name, tmp / name)
        shutil.copytree(VENDOR, tmp / "vendor")
        graphs: dict[str, dict[str, str]] = {"wasm": {}, "webgpu": {}}
        derived = {}
        for name in [f for f in (FP32_MODEL, INT8_MODEL, INT8_SINGLE_ROW_MODEL) if f in manifest.files]:
            for backend, write in (("wasm", wasm_graph), ("webgpu", webgpu_graph)):
                if name not in GRAPHS[backend]:
                    continue
                file = GRAPHS[backend][name]
                graphs[backend][PRECISIONS[name]] = file
                derived[file] = {"from": name, "backend": backend, "op_types": write(bundle / name, tmp / Path(file).name)}
        files = {
            f"{WEB}/{p.relative_to(tmp).as_posix()}": FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        section = {
            "format": WEB_FORMAT,
            "page": f"{WEB}/index.html",
            "module": f"{WEB}/edgecraft.js",
            "packages": versions,
            "graphs": graphs,
            "changes": CHANGES,
            "derived": derived,
            "files": {name: dataclasses.asdict(entry) for name, entry in files.items()},
        }
        old = bundle / f".old-web-{tmp.name}"
        if (bundle / WEB).exists():
            (bundle / WEB).rename(old)
        tmp.rename(bundle / WEB)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_manifest(bundle, dataclasses.replace(manifest, web=section))
    return bundle / WEB


def _write_manifest(bundle: Path, manifest) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-manifest-", dir=bundle)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    as_umask_allows(Path(tmp))
    os.replace(tmp, bundle / MANIFEST)
