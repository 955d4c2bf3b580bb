"""Grouped- and multi-query attention (model.n_kv_heads): the recipe's check, the PyTorch model
against multi-head attention with shared heads, and the exported graph against PyTorch
(Δlogit <= 1e-4, the same greedy text) with the KV cache sized by n_kv_heads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from edgecraft.errors import UserError
from edgecraft.export.genai import genai_config
from edgecraft.export.graph import build_graph, graph_io
from edgecraft.model import GPT, GPTConfig
from edgecraft.recipe import validate
from edgecraft.runtime.onnx_engine import OnnxEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
VARIANTS = {
    "gpt2": {},
    # head size 16: GroupQueryAttention rotates q and k itself
    "llama": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "d_model": 64},
    # head size 8: RotaryEmbedding nodes for q (n_heads) and k (n_kv_heads)
    "llama-hs8": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False},
}


def tiny(n_kv_heads: int, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": 23, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
                       "block_size": 40, "n_kv_heads": n_kv_heads, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger than init-scale weights so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def full(model: GPT, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids))[0].numpy()


@pytest.mark.parametrize("kv, message", [(3, "must divide n_heads"), (8, "must divide n_heads"),
                                          (0, "greater than or equal to 1")])
def test_recipe_refuses_n_kv_heads_that_do_not_divide_n_heads(kv, message):
    with pytest.raises(UserError, match=message):
        validate({"model": {"n_heads": 4, "d_model": 32, "n_kv_heads": kv}}, "r.toml")


def test_config_without_the_key_is_multi_head():
    cfg = GPTConfig.from_dict({"vocab_size": 5, "n_heads": 4, "d_model": 32})
    assert cfg.n_kv_heads == 4 and cfg.to_dict()["n_kv_heads"] == 4


@pytest.mark.parametrize("kv", [2, 1])
def test_grouped_heads_equal_multi_head_with_shared_key_value_weights(kv):
    """Query head h reads key/value head h // (n_heads / n_kv_heads): a multi-head model whose
    k and v rows repeat each group's head gives the same logits."""
    gqa = tiny(kv)
    mha = tiny(4)
    hs, group = gqa.cfg.head_size, 4 // kv
    sd = {k: v.clone() for k, v in gqa.state_dict().items()}
    for i in range(gqa.cfg.n_layers):
        for name in ("weight", "bias"):
            t = sd[f"blocks.{i}.attn.qkv.{name}"]
            q, k, v = t.split((32, kv * hs, kv * hs))
            rep = [x.reshape(kv, hs, *x.shape[1:]).repeat_interleave(group, 0).reshape(4 * hs, *x.shape[1:])
                   for x in (k, v)]
            sd[f"blocks.{i}.attn.qkv.{name}"] = torch.cat([q, *rep])
    mha.load_state_dict(sd)
    ids = np.random.default_rng(0).integers(0, 23, (2, 17))
    np.testing.assert_allclose(full(gqa, ids), full(mha, ids), atol=1e-5, rtol=0)
    assert gqa.blocks[0].attn.qkv.weight.shape == (32 + 2 * kv * hs, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_graph_matches_pytorch_with_a_cache_sized_by_n_kv_heads(tmp_path, variant, kv):
    model = tiny(kv, **VARIANTS[variant])
    cfg = model.cfg
    path = tmp_path / "model.onnx"
    graph = build_graph(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    onnx.save(graph, str(path))
    cache = next(s["shape"] for s in graph_io(cfg)["inputs"] if s["name"] == "past_key_values.0.key")
    assert cache[1] == kv
    attn = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.i for n in attn for a in n.attribute if a.name == "kv_num_heads"} == {kv}
    tokenizer = Tokenizer(WordLevel({"\x00": 0, "a": 1}, unk_token="\x00"))
    assert genai_config(cfg, tokenizer, "model.onnx", 1)["model"]["decoder"]["num_key_value_heads"] == kv

    engine = OnnxEngine(path, cfg)
    ids = np.random.default_rng(1).integers(0, 23, (2, 40))
    ref = full(model, ids)
    engine.reset(2)
    assert engine._kv[0].shape == (2, kv, 40, cfg.cache_head_size)
    np.testing.assert_allclose(engine.prefill(ids[:, :6]), ref[:, :6], atol=TOL, rtol=0)
    for t in range(6, 40):
        np.testing.assert_allclose(engine.decode(ids[:, t]), ref[:, t], atol=TOL, rtol=0)

    # greedy text: the graph's loop and PyTorch's pick the same tokens
    engine.reset(1)
    seq = [3, 1, 4]
    logits = engine.prefill(np.array([seq]))[0, -1]
    for _ in range(20):
        seq.append(int(logits.argmax()))
        logits = engine.decode(np.array([seq[-1]]))[0]
    torch_seq = [3, 1, 4]
    for _ in range(20):
        torch_seq.append(int(full(model, np.array([torch_seq]))[0, -1].argmax()))
    assert seq == torch_seq
