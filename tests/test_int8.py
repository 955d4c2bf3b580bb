"""The int8 graph: structure (which kernels, which dtypes), parity with the fake-quant model within
the stated bound, keep-float choices, and the validation-loss gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from edgecraft.errors import UserError
from edgecraft.export.graph import build_graph
from edgecraft.export.int8 import calibrate_ranges, plan_layers, ranges_from_state
from edgecraft.export.int8_check import int8_report
from edgecraft.export.int8_graph import Int8Plan, build_int8_graph
from edgecraft.model import GPT, GPTConfig
from edgecraft.quant import attach
from edgecraft.recipe import QuantConfig
from quant_models import BASE, cli, trained_model, windows

VARIANTS = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(model: GPT) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_structure(scheme):
    model = trained_model()
    ranges = calibrate_ranges(model, [(windows()[:, :-1], None)], embeddings=True) if scheme == "static" else {}
    plan = Int8Plan(plan_layers(model, embeddings=True, keep_float=()), scheme, ranges)
    graph = build_int8_graph(model.cfg, weights(model), plan)
    kernel = "DynamicQuantizeMatMul" if scheme == "dynamic" else "MatMulIntegerToFloat"
    assert ops(graph).count(kernel) == 4 * 2 + 1  # every block linear and the head
    assert "MatMul" not in ops(graph) and ops(graph).count("GatherBlockQuantized") == 2  # both tables
    assert ops(graph).count("QuantizeLinear") == (9 if scheme == "static" else 0)
    qkv = next(n for n in graph.graph.node if n.name == "blocks.0.attn.qkv/MatMul")
    assert qkv.op_type == kernel and qkv.input[-1] == "blocks.0.attn.qkv.bias"  # bias folded in
    dtypes = {t.name: t.data_type for t in graph.graph.initializer}
    assert dtypes["blocks.0.attn.qkv.weight.int8"] == TensorProto.INT8
    assert dtypes["tok_emb.weight.uint8"] == TensorProto.UINT8 and "tok_emb.weight" not in dtypes
    fp32 = build_graph(model.cfg, weights(model))
    assert graph.ByteSize() < 0.45 * fp32.ByteSize()  # scales, norms and biases weigh more at this size


def test_keep_float():
    model = trained_model()
    every = plan_layers(model, embeddings=True, keep_float=())
    assert {"tok_emb", "pos_emb", "head", "blocks.0.attn.qkv", "blocks.1.mlp.proj"} <= every
    kept = plan_layers(model, embeddings=True, keep_float=("embeddings", "head", "first"))
    assert kept == {n for n in every if n.startswith("blocks.1.")}
    assert not any(n.startswith("blocks.1.") for n in plan_layers(model, True, ("last",)))
    assert "head" not in plan_layers(model, embeddings=False, keep_float=())
    graph = build_int8_graph(model.cfg, weights(model), Int8Plan(kept, "dynamic", {}))
    assert ops(graph).count("DynamicQuantizeMatMul") == 4 and ops(graph).count("MatMul") == 4 + 1
    odd = GPT(GPTConfig(**{**BASE, "d_model": 24}))  # GatherBlockQuantized needs d_model % 16 == 0
    assert "head" in plan_layers(odd, True, ()) and not {"tok_emb", "pos_emb"} & plan_layers(odd, True, ())
    with pytest.raises(UserError, match="--keep-float 'tail'"):
        plan_layers(model, embeddings=False, keep_float=("tail",))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_int8_graph_computes_what_the_fake_quant_model_computes(tmp_path, variant, scheme):
    model = trained_model(1, **VARIANTS[variant])
    win = windows()
    ranges = calibrate_ranges(model, [(win[:, :-1], None)], embeddings=True) if scheme == "static" else {}
    plan = Int8Plan(plan_layers(model, embeddings=True, keep_float=()), scheme, ranges)
    onnx.save(build_graph(model.cfg, weights(model)), tmp_path / "fp32.onnx")
    onnx.save(build_int8_graph(model.cfg, weights(model), plan), tmp_path / "int8.onnx")
    report = int8_report(model, plan, tmp_path / "int8.onnx", tmp_path / "fp32.onnx", win, None)
    assert report["parity_mean_abs_logit_diff"] <= report["parity_bound"]
    assert report["val_tokens"] == 2 * BASE["block_size"]
    assert abs(report["val_loss_increase_pct"]) < 5  # int8 of a trained model stays close
    assert report["scheme"] == scheme and "blocks.0.attn.qkv" in report["quantized_layers"]


def test_qat_state_exports_static_ranges(tmp_path):
    """A static QAT run's observed ranges become the graph's activation scales."""
    model = trained_model(2)
    handle = attach(model, QuantConfig(qat=True, scheme="static"))
    model.train()
    with torch.no_grad():
        model(torch.as_tensor(windows(4)[:, :-1]))
    model.eval()
    state = handle.state_dict()
    handle.detach()
    plan = Int8Plan(plan_layers(model, embeddings=False, keep_float=()), "static", ranges_from_state(state))
    onnx.save(build_graph(model.cfg, weights(model)), tmp_path / "fp32.onnx")
    onnx.save(build_int8_graph(model.cfg, weights(model), plan), tmp_path / "int8.onnx")
    report = int8_report(model, plan, tmp_path / "int8.onnx", tmp_path / "fp32.onnx", windows(), None)
    assert report["parity_mean_abs_logit_diff"] <= report["parity_bound"]


def test_loss_gate_fails_with_exit_code_3(tmp_path):
    model = trained_model(3)
    plan = Int8Plan(plan_layers(model, embeddings=True, keep_float=()), "dynamic", {})
    onnx.save(build_graph(model.cfg, weights(model)), tmp_path / "fp32.onnx")
    onnx.save(build_int8_graph(model.cfg, weights(model), plan), tmp_path / "int8.onnx")
    with pytest.raises(UserError, match="max-loss-increase") as err:
        int8_report(model, plan, tmp_path / "int8.onnx", tmp_path / "fp32.onnx", windows(), -100.0)
    assert err.value.exit_code == 3


# --- end to end: `edgecraft export --int8` on trained runs ---------------------------------------


def export_cli(*args):
    return cli("export", *args)


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "edgecraft.json").read_text())


def test_export_int8_beside_fp32(trained_run, tmp_path):
    from edgecraft.runtime import load

    result = export_cli(trained_run, "--int8", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "int8 (dynamic): val loss" in result.output
    m = manifest(tmp_path / "b")
    assert set(m["files"]) == {"model.onnx", "model.int8.onnx", "model.int8.1row.onnx", "tokenizer.json",
                               "genai_config.json"}  # 1row: one-row decode steps (tests/test_int4.py)
    q = m["quantization"]["model.int8.onnx"]
    assert q["method"] == "ptq-dynamic" and q["kernel"] == "DynamicQuantizeMatMul"
    assert q["op_types"]["DynamicQuantizeMatMul"] == 2 * 4 + 1 and "MatMul" not in q["op_types"]
    assert q["bytes"] == (tmp_path / "b" / "model.int8.onnx").stat().st_size < q["fp32_bytes"]
    assert q["parity_mean_abs_logit_diff"] <= q["parity_bound"] and 0 <= q["parity_top1_agreement"] <= 1
    assert {"val_loss_fp32", "val_loss_int8", "val_ppl_int8", "val_loss_increase_pct"} <= set(q)
    text = load(tmp_path / "b", int8=True).generate("The", max_new_tokens=8, temperature=0)
    assert isinstance(text, str)


def test_export_int8_only_static_calibrated(trained_run, tmp_path, genai_greedy):
    result = export_cli(trained_run, "--int8-only", "--calibrate", "2", "--keep-float", "last",
                        "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    files = ["edgecraft.json", "genai_config.json", "model.int8.onnx", "tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == files
    genai = json.loads((tmp_path / "b" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.int8.onnx"
    from edgecraft.runtime import load

    model = load(tmp_path / "b")  # genai runs the int8 graph too, with the same greedy tokens
    prompt = model.encode("The cat")
    theirs = genai_greedy(tmp_path / "b", prompt, model.block_size - len(prompt))
    assert model.decode(theirs) == model.generate("The cat", len(theirs), temperature=0)
    q = manifest(tmp_path / "b")["quantization"]
    assert list(q) == ["model.int8.onnx"]
    q = q["model.int8.onnx"]
    assert q["method"] == "ptq-static" and q["calibration_batches"] == 2 and q["keep_float"] == ["last"]
    assert not any(n.startswith("blocks.1.") for n in q["quantized_layers"])


def test_loss_gate_keeps_nothing(trained_run, tmp_path):
    result = export_cli(trained_run, "--int8", "--max-loss-increase", "-100", "--out", tmp_path / "b")
    assert result.exit_code == 3
    assert "--max-loss-increase" in result.output and "nothing written" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--calibrate", "2"], "add --int8"),
    (["--int8", "--keep-float", "tail"], "--keep-float 'tail'"),
])
def test_bad_int8_flags(trained_run, tmp_path, args, message):
    result = export_cli(trained_run, *args, "--out", tmp_path / "b")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_qat_run_exports_what_it_trained(tmp_path, scheme):
    from conftest import write_tiny_recipe

    from edgecraft.recipe import load_recipe
    from edgecraft.train import train_recipe

    extra = f'\n[quant]\nqat = true\nstart_step = 20\nscheme = "{scheme}"\nembeddings = true\n'
    run = train_recipe(load_recipe(write_tiny_recipe(tmp_path, extra)), runs_dir=tmp_path / "runs")
    result = export_cli(run, "--int8-only", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    q = manifest(tmp_path / "b")["quantization"]["model.int8.onnx"]
    assert q["method"] == "qat" and q["scheme"] == scheme
    assert {"tok_emb", "head"} <= set(q["quantized_layers"])
    assert q["parity_mean_abs_logit_diff"] <= q["parity_bound"]
    result = export_cli(run, "--int8", "--calibrate", "2", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "trained with QAT" in result.output


def test_parity_check_catches_a_wrong_graph(tmp_path):
    model = trained_model(4)
    plan = Int8Plan(plan_layers(model, embeddings=False, keep_float=()), "dynamic", {})
    graph = build_int8_graph(model.cfg, weights(model), plan)
    for init in graph.graph.initializer:  # a bug: one layer's weight scales off by 30%
        if init.name == "blocks.1.mlp.fc.weight.scale":
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.3, init.name))
    onnx.save(graph, tmp_path / "int8.onnx")
    onnx.save(build_graph(model.cfg, weights(model)), tmp_path / "fp32.onnx")
    with pytest.raises(UserError, match="does not match the fake-quant model"):
        int8_report(model, plan, tmp_path / "int8.onnx", tmp_path / "fp32.onnx", windows(), None)
