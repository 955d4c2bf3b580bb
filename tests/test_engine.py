"""The decode engine against PyTorch: prefill, cached decode, ragged batches, rows at different
positions, chunked prefill, and its errors. Graphs are built straight from random tiny models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgecraft.export.graph import build_graph
from edgecraft.model import GPT, GPTConfig
from edgecraft.runtime.onnx_engine import OnnxEngine
from edgecraft.torch_engine import TorchEngine

VARIANTS = {
    "gpt2": {},
    # head size 16: GroupQueryAttention rotates q and k itself
    "llama": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_heads": 2},
    # head size 8: separate RotaryEmbedding nodes
    "llama-hs8": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False},
    "untied-nobias": {"bias": False, "tie_embeddings": False},
}
TOL = 1e-4


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    kw = {"n_heads": 4, **kw}
    cfg = GPTConfig(vocab_size=29, d_model=32, n_layers=2, d_ff=64, block_size=48, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger than init-scale weights so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=[(v, e) for e in ("onnxruntime", "torch") for v in VARIANTS], ids=str)
def pair(request, tmp_path_factory):
    """(PyTorch model, an engine over it): the onnxruntime engine over its graph, or the PyTorch
    engine over the model itself; both implement runtime/engine.py's interface."""
    variant, kind = request.param
    model = tiny_model(**VARIANTS[variant])
    if kind == "torch":
        return model, TorchEngine(model)
    path = tmp_path_factory.mktemp(variant) / "model.onnx"
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    onnx.save(build_graph(model.cfg, weights), str(path))
    return model, OnnxEngine(path, model.cfg)


def reference(model: GPT, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64)))[0].numpy()


def test_prefill_matches_full_forward_for_any_batch_and_length(pair):
    model, engine = pair
    rng = np.random.default_rng(0)
    for B, S in [(1, 1), (1, 48), (3, 7), (5, 1), (2, 30)]:
        ids = rng.integers(0, 29, (B, S))
        engine.reset(B)
        got = engine.prefill(ids)
        assert got.shape == (B, S, 29) and got.dtype == np.float32
        np.testing.assert_allclose(got, reference(model, ids), atol=TOL, rtol=0)
        assert engine.lengths.tolist() == [S] * B


def test_cached_decode_equals_full_forward(pair):
    model, engine = pair
    ids = np.random.default_rng(1).integers(0, 29, (2, 48))
    ref = reference(model, ids)
    engine.reset(2)
    engine.prefill(ids[:, :5])
    for t in range(5, 48):
        np.testing.assert_allclose(engine.decode(ids[:, t]), ref[:, t], atol=TOL, rtol=0)
    assert engine.lengths.tolist() == [48, 48]
    with pytest.raises(ValueError, match="block_size"):
        engine.decode(ids[:, 0])


def test_rows_at_different_positions_in_one_batch(pair):
    """Right-padded prefill of ragged prompts, then decode: each row as if it were alone."""
    model, engine = pair
    rng = np.random.default_rng(2)
    lengths = np.array([3, 11, 1, 7])
    rows = [rng.integers(0, 29, 30) for _ in lengths]
    padded = np.zeros((4, 11), dtype=np.int64)
    for b, n in enumerate(lengths):
        padded[b, :n] = rows[b][:n]
    engine.reset(4)
    got = engine.prefill(padded, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], reference(model, rows[b][None, :n])[0], atol=TOL, rtol=0)
    assert engine.lengths.tolist() == lengths.tolist()
    for step in range(12):
        out = engine.decode(np.array([rows[b][n + step] for b, n in enumerate(lengths)]))
        for b, n in enumerate(lengths):
            ref = reference(model, rows[b][None, : n + step + 1])[0, -1]
            np.testing.assert_allclose(out[b], ref, atol=TOL, rtol=0)


def test_chunked_prefill_appends_to_each_rows_cache(pair):
    model, engine = pair
    ids = np.random.default_rng(3).integers(0, 29, (3, 40))
    engine.reset(3)
    engine.prefill(ids[:, :6], np.array([6, 2, 4]))  # rows now hold 6, 2 and 4 tokens
    chunk = np.stack([ids[0, 6:14], ids[1, 2:10], ids[2, 4:12]])  # 8 more each, one call
    got = engine.prefill(chunk, np.array([8, 8, 5]))
    for b, start, n in [(0, 6, 8), (1, 2, 8), (2, 4, 5)]:
        ref = reference(model, ids[b : b + 1, : start + n])[0, start:]
        np.testing.assert_allclose(got[b, :n], ref, atol=TOL, rtol=0)
    assert engine.lengths.tolist() == [14, 10, 9]
    out = engine.decode(np.array([ids[0, 14], ids[1, 10], ids[2, 9]]))
    for b, t in [(0, 14), (1, 10), (2, 9)]:
        np.testing.assert_allclose(out[b], reference(model, ids[b : b + 1, : t + 1])[0, -1], atol=TOL, rtol=0)


def test_reset_starts_fresh_sequences(pair):
    model, engine = pair
    ids = np.random.default_rng(4).integers(0, 29, (1, 9))
    for _ in range(2):
        engine.reset(1)
        np.testing.assert_allclose(engine.prefill(ids), reference(model, ids), atol=TOL, rtol=0)


def test_bad_calls_raise_clear_errors(pair):
    model, engine = pair
    engine.reset(2)
    with pytest.raises(ValueError, match="call reset"):
        engine.prefill(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="exceed block_size"):
        engine.prefill(np.zeros((2, 49), dtype=np.int64))
    with pytest.raises(ValueError, match="lengths"):
        engine.prefill(np.zeros((2, 4), dtype=np.int64), np.array([5, 1]))
    with pytest.raises(ValueError, match="3 token ids for 2 slots"):
        engine.decode(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        engine.reset(0)


def test_cuda_without_provider_is_a_clear_error(pair):
    model, _ = pair
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        OnnxEngine("unused.onnx", model.cfg, device="cuda")
    with pytest.raises(ValueError, match="device"):
        OnnxEngine("unused.onnx", model.cfg, device="tpu")


def test_engine_imports_no_torch():
    code = "import sys, edgecraft.runtime.onnx_engine; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_sequence_joins_a_running_batch(pair):
    """Continuous batching: slot 1 restarts with a new prompt (lengths[1] = 0) while the other
    rows, mid-sequence, sit out that prefill (length 0) and keep their caches."""
    model, engine = pair
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, 29, 40) for _ in range(3)]
    engine.reset(3)
    engine.prefill(np.stack([r[:6] for r in rows]))
    for t in range(6, 9):
        engine.decode(np.array([r[t] for r in rows]))
    newcomer = rng.integers(0, 29, 40)
    engine.release(1)
    chunk = np.zeros((3, 5), dtype=np.int64)
    chunk[1] = newcomer[:5]
    got = engine.prefill(chunk, np.array([0, 5, 0]))
    np.testing.assert_allclose(got[1], reference(model, newcomer[None, :5])[0], atol=TOL, rtol=0)
    assert engine.lengths.tolist() == [9, 5, 9]
    rows[1] = newcomer
    for step in range(4):
        pos = engine.lengths.copy()
        out = engine.decode(np.array([r[p] for r, p in zip(rows, pos)]))
        for b, p in enumerate(pos):
            np.testing.assert_allclose(out[b], reference(model, rows[b][None, : p + 1])[0, -1], atol=TOL, rtol=0)


def test_graphs_exported_before_genai_config_still_run(tmp_path):
    """Bundles from before genai_config.json declare seqlens_k (B,) and total_sequence_length ()
    and feed GroupQueryAttention directly; the engine reads the graph's inputs and feeds those shapes."""
    model = tiny_model()
    graph = build_graph(model.cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    squeeze = next(n for n in graph.graph.node if n.op_type == "Squeeze")
    graph.graph.node.remove(squeeze)
    for node in graph.graph.node:
        node.input[:] = ["seqlens_k" if name == squeeze.output[0] else name for name in node.input]
    for name in ("seqlens_k", "total_sequence_length"):  # (B,) and ()
        next(i for i in graph.graph.input if i.name == name).type.tensor_type.shape.dim.pop()
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    engine = OnnxEngine(tmp_path / "old.onnx", model.cfg)
    ids = np.random.default_rng(1).integers(0, 29, (2, 20))
    engine.reset(2)
    logits = engine.prefill(ids[:, :12], np.array([12, 9]))
    np.testing.assert_allclose(logits[1, :9], reference(model, ids[1:, :9])[0], atol=TOL, rtol=0)
    for t in range(12, 20):  # row 1 decodes from position 9
        step = engine.decode(ids[:, t])
        np.testing.assert_allclose(step[0], reference(model, ids[:1, : t + 1])[0, -1], atol=TOL, rtol=0)


def test_decode_over_the_first_slots_and_moving_a_slot_keep_every_cache(pair):
    """Slots that sequences leave: a decode over the first n slots leaves the others alone, and a
    slot moved into a freed one carries its cache (the server keeps active slots packed)."""
    model, engine = pair
    rng = np.random.default_rng(9)
    rows = [rng.integers(0, 29, 30) for _ in range(3)]
    engine.reset(3)
    engine.prefill(np.stack([r[:5] for r in rows]))
    engine.decode(np.array([rows[0][5], rows[1][5]]))  # slot 2 sits out
    assert engine.lengths.tolist() == [6, 6, 5]
    engine.release(0)
    engine.move(2, 0)  # slot 2's sequence now lives in slot 0
    assert engine.lengths.tolist() == [5, 6, 0]
    out = engine.decode(np.array([rows[2][5], rows[1][6]]))
    np.testing.assert_allclose(out[0], reference(model, rows[2][None, :6])[0, -1], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1], reference(model, rows[1][None, :7])[0, -1], atol=TOL, rtol=0)


def test_an_edited_config_is_refused_naming_the_field(tmp_path):
    model = tiny_model()
    onnx.save(build_graph(model.cfg, {k: v.numpy() for k, v in model.state_dict().items()}), str(tmp_path / "m.onnx"))
    from dataclasses import replace

    from edgecraft.runtime import BundleError

    with pytest.raises(BundleError, match="config.block_size is 24 but the graph was exported with 48"):
        OnnxEngine(tmp_path / "m.onnx", replace(model.cfg, block_size=24))
