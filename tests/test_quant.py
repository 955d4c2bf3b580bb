"""QAT hooks: the fake quant is onnxruntime's int8 arithmetic, gradients pass straight through,
and hooks leave no trace on the float model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgecraft.errors import UserError
from edgecraft.model import GPT, GPTConfig
from edgecraft.quant import (
    attach,
    dynamic_qparams,
    fake_quant_activation,
    load_state,
    quantize_weight,
    quantized_layers,
    save_state,
)
from edgecraft.recipe import QuantConfig

CFG = GPTConfig(vocab_size=17, d_model=32, n_layers=2, n_heads=4, d_ff=64, block_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG.to_dict(), **overrides}))
    with torch.no_grad():  # larger-than-init weights so rounding is visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def numpy_dynamic_quantize_matmul(x: np.ndarray, q: np.ndarray, w_scale: np.ndarray, bias) -> np.ndarray:
    """DynamicQuantizeMatMul's integer arithmetic: x (M, K), q (K, N) int8, w_scale (N,)."""
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32((hi - lo) / np.float32(255))
    zp = np.round(np.clip(np.float32(0) - lo / scale, 0, 255))
    xq = np.clip(np.round(x / scale) + zp, 0, 255).astype(np.int32)
    acc = (xq - np.int32(zp)) @ q.astype(np.int32)  # (M, N) exact int32
    return acc.astype(np.float32) * (scale * w_scale) + bias


def ort_dynamic_quantize_matmul(x: np.ndarray, q: np.ndarray, w_scale: np.ndarray, bias) -> np.ndarray:
    K, N = q.shape
    node = helper.make_node(
        "DynamicQuantizeMatMul", ["x", "q", "s", "", "b"], ["y"], domain="com.microsoft"
    )
    graph = helper.make_graph(
        [node], "dqmm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(w_scale, "s"),
         numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_quantize_weight_is_symmetric_per_output_channel():
    w = torch.randn(6, 10)
    w[2] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert q.abs().max() <= 127 and (q[[0, 1, 3, 4, 5]].abs().amax(dim=1) == 127).all()
    assert (q[2] == 0).all()
    torch.testing.assert_close(q.float() * scale[:, None], w, atol=float(scale.max()) / 2, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_fake_quant_is_dynamic_quantize_matmul(seed):
    model = tiny_model(seed)
    layer = model.blocks[0].mlp.fc  # (64, 32)
    handle = attach(model, QuantConfig(qat=True))
    torch.manual_seed(100 + seed)
    x = torch.randn(1, 1, 32) * 3 + 0.5  # one decode step: the call's range is the token's range
    with torch.no_grad():
        y = layer(x)[0].numpy()  # (1, 64)
    handle.detach()
    q, s = quantize_weight(layer.weight)
    qt = np.ascontiguousarray(q.numpy().T)  # (K, N) as the graph stores it
    s, b, x = s.numpy(), layer.bias.detach().numpy(), x[0].numpy()
    ref = numpy_dynamic_quantize_matmul(x, qt, s, b)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ort_dynamic_quantize_matmul(x, qt, s, b), ref, rtol=1e-5, atol=1e-5)


def test_dynamic_ranges_are_per_token_row():
    """In a (B, T, K) call each row is quantized as its own decode step would be."""
    model = tiny_model()
    layer = model.blocks[1].attn.qkv
    x = torch.randn(2, 3, 32)
    x[0, 1] *= 50  # an outlier row must not coarsen the other rows' grid
    handle = attach(model, QuantConfig(qat=True))
    with torch.no_grad():
        together = layer(x)
        alone = torch.stack([torch.stack([layer(x[b, t][None, None])[0, 0] for t in range(3)]) for b in range(2)])
    handle.detach()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients():
    model = tiny_model()
    layer = model.blocks[0].attn.proj  # (32, 32)
    handle = attach(model, QuantConfig(qat=True))
    x = torch.randn(1, 4, 32, requires_grad=True)
    layer(x).sum().backward()
    handle.detach()
    q, s = quantize_weight(layer.weight)
    w_fq = q.float() * s[:, None]  # (N, K)
    # d/dx is the fake-quant weight's column sums; d/dW sums the fake-quant input over rows
    torch.testing.assert_close(x.grad[0], w_fq.sum(0).expand(4, 32), rtol=1e-5, atol=1e-6)
    x_fq = fake_quant_activation(x.detach(), *dynamic_qparams(x))[0]  # (4, K)
    torch.testing.assert_close(layer.weight.grad, x_fq.sum(0).expand(32, 32), rtol=1e-5, atol=1e-6)


def test_static_range_clips_and_blocks_gradient():
    model = tiny_model()
    layer = model.blocks[0].mlp.proj  # (32, 64)
    handle = attach(model, QuantConfig(qat=True, scheme="static"))
    model.train()
    with torch.no_grad():
        layer(torch.linspace(-1, 1, 64).view(1, 1, 64))  # first batch sets the range to [-1, 1]
    torch.testing.assert_close(handle.state_dict()["blocks.0.mlp.proj.act_range"], torch.tensor([-1.0, 1.0]))
    model.eval()  # frozen: an out-of-range input is clipped and gets no gradient
    x = torch.zeros(1, 1, 64)
    x[0, 0, :2] = torch.tensor([5.0, -5.0])
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert (x.grad[0, 0, :2] == 0).all() and (x.grad[0, 0, 2:] != 0).all()
    handle.detach()


def test_detach_restores_the_float_model_bit_for_bit():
    model = tiny_model(3)
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    before = model(idx)[0]
    handle = attach(model, QuantConfig(qat=True, embeddings=True))
    during = model(idx)[0]
    assert not torch.equal(before, during)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    handle.detach()
    assert torch.equal(model(idx)[0], before)
    assert all("weight" not in vars(m) for m in model.modules())


def test_layers_and_tied_head():
    model = tiny_model()
    plain = quantized_layers(model, embeddings=False)
    assert len(plain) == 2 * 4 and all(n.startswith("blocks.") for n in plain)
    assert {"tok_emb", "pos_emb", "head"} <= set(quantized_layers(model, embeddings=True))
    handle = attach(model, QuantConfig(qat=True, embeddings=True))
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    _, loss, _ = model(idx, targets=idx)
    loss.backward()
    handle.detach()
    assert model.tok_emb.weight.grad.abs().sum() > 0  # the tied matrix learns through both uses


def test_training_with_hooks_lowers_the_loss():
    model = tiny_model()
    handle = attach(model, QuantConfig(qat=True, scheme="static"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, CFG.vocab_size, (4, 16))
    losses = []
    for _ in range(20):
        _, loss, _ = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    handle.detach()
    assert losses[-1] < losses[0]


def test_state_round_trip(tmp_path):
    model = tiny_model()
    cfg = QuantConfig(qat=True, scheme="static")
    handle = attach(model, cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, CFG.vocab_size, (2, 8)))
    model.eval()
    idx = torch.randint(0, CFG.vocab_size, (1, 8))
    expected = model(idx)[0]
    save_state(handle, tmp_path / "quant.safetensors")
    handle.detach()

    scheme, state = load_state(tmp_path / "quant.safetensors")
    assert scheme == "static" and set(state) == set(handle.state_dict())
    fresh = attach(model, cfg)
    fresh.load_state_dict(state)
    assert torch.equal(model(idx)[0], expected)
    fresh.detach()

    dynamic = attach(model, QuantConfig(qat=True))
    assert dynamic.state_dict() == {}
    with pytest.raises(UserError, match="does not match"):
        dynamic.load_state_dict(state)
    dynamic.detach()


def test_damaged_state_file_is_a_user_error(tmp_path):
    bad = tmp_path / "quant.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="damaged"):
        load_state(bad)


def test_hooks_reach_a_model_compiled_before_they_were_attached():
    """train.compile + quant.start_step > 0: the model is compiled long before QAT starts."""
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing, no code generation
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    float_logits = compiled(idx)[0]
    handle = attach(model, QuantConfig(qat=True))
    torch.testing.assert_close(compiled(idx)[0], model(idx)[0])
    assert not torch.allclose(compiled(idx)[0], float_logits)
    handle.detach()
    assert torch.equal(compiled(idx)[0], float_logits)
