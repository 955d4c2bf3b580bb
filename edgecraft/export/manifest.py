"""The bundle manifest (edgecraft.json): what the bundle holds and how to drive its graph.

`bundle_manifest` is the one place the manifest is assembled; export/README.md specifies it.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

import edgecraft
from edgecraft.export.genai import GENAI_CONFIG, GENAI_TOKENIZER_CONFIG
from edgecraft.export.graph import graph_io, op_types
from edgecraft.model import GPT
from edgecraft.recipe import Recipe
from edgecraft.runtime.bundle import (
    FORMAT, FP32_MODEL, INT4_MODEL, INT8_MODEL, INT8_SINGLE_ROW_MODEL, TOKENIZER, FileEntry, GraphInfo, Manifest, RuntimeSettings, TokenizerInfo,
    sha256_file,
)
from edgecraft.runtime.onnx_engine import DEFAULT_THREADS, SESSION_CONFIG


def onnx_section(model: GPT, graph: onnx.ModelProto, model_files: list[str]) -> dict:
    """What a program that knows only onnxruntime needs to drive the graph (all `model_files`
    share its inputs and outputs; nodes and op types are the float32 graph's)."""
    cfg = model.cfg
    io = graph_io(cfg)
    return {
        "files": model_files,
        "opset": {imp.domain or "ai.onnx": imp.version for imp in graph.opset_import},
        "nodes": len(graph.graph.node),
        "op_types": op_types(graph),
        **io,
        "kv_cache": {
            "past": "past_key_values.{layer}.{key|value}",
            "present": "present.{layer}.{key|value}",
            "n_layers": cfg.n_layers,
            "shape": ["batch_size", cfg.n_kv_heads, cfg.block_size, cfg.cache_head_size],
            "dtype": "float32",
            "layout": "BNSH: (batch, key/value heads, position, head_size)",
            "shared_buffer": True,
            **({"head_padding": (
                f"the model's heads of size {cfg.head_size} are zero-padded to {cfg.cache_head_size} "
                "for GroupQueryAttention (its CPU kernel takes multiples of 8): the padded dims of "
                "the cache hold zeros"
            )} if cfg.cache_head_size != cfg.head_size else {}),
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


def bundle_manifest(model: GPT, tokenizer: Tokenizer, recipe: Recipe, graph: onnx.ModelProto,
                    checks: dict, root: Path, int8: dict | None = None, int4: dict | None = None) -> Manifest:
    """The manifest of the bundle files in `root`: their hashes, the config, the checks' figures."""
    cfg = model.cfg
    graphs = (FP32_MODEL, INT8_MODEL, INT8_SINGLE_ROW_MODEL, INT4_MODEL)
    files = [name for name in (*graphs, TOKENIZER, GENAI_CONFIG, GENAI_TOKENIZER_CONFIG)
             if (root / name).is_file()]
    quantization: dict = {FP32_MODEL: "none (float32)"} if FP32_MODEL in files else {}
    if int8 is not None:  # the int8 step's scheme, sizes, parity and fp32/int8 val loss
        quantization[INT8_MODEL] = int8
    if int4 is not None:  # the int4 step's block size, sizes, parity and fp32/int4 val loss
        quantization[INT4_MODEL] = int4
    return Manifest(
        format=FORMAT,
        name=recipe.name,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        edgecraft_version=edgecraft.__version__,
        parameters=model.num_params(),
        config=cfg,
        vocab_size=cfg.vocab_size,
        tokenizer=TokenizerInfo(file=TOKENIZER, kind=recipe.data.tokenizer, tokens=tokenizer.get_vocab_size()),
        quantization=quantization,
        files={name: FileEntry(sha256=sha256_file(root / name), bytes=(root / name).stat().st_size) for name in files},
        onnx=GraphInfo(**onnx_section(model, graph, [name for name in files if name in graphs])),
        runtime=RuntimeSettings(
            threads=DEFAULT_THREADS,
            why=(
                "one intra-op thread is robust on a busy CPU; on an idle multi-core machine 2-4 "
                "threads cut time to first token and speed up batches (benchmarks/results/decode_speed.md)"
            ),
            execution_provider="CPUExecutionProvider",
            graph_optimization_level="ORT_ENABLE_BASIC (the graph is already fused)",
            session_config=SESSION_CONFIG,
            onnxruntime=ort.__version__,
        ),
        checks=checks,
    )
