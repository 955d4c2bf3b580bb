"""Every head size the recipe accepts exports with parity: GroupQueryAttention's CPU kernel takes
multiples of 8 only, so the exporter zero-pads other heads and says so in the manifest (issue 11,
case 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_recipe
from edgecraft.cli import app
from edgecraft.config import GPTConfig
from edgecraft.export import ExportOptions, export_run
from edgecraft.export.graph import pad_heads
from test_export import LLAMA, make_run


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("head_size", [4, 12, 24])
def test_every_head_size_exports_with_parity(tmp_path: Path, head_size: int, arch: str, one_torch_thread) -> None:
    from edgecraft.runtime import load
    from edgecraft.torch_engine import load_run_model

    n_heads = 2
    run = make_run(tmp_path, d_model=head_size * n_heads, n_heads=n_heads, **(LLAMA if arch == "llama" else {}))
    bundle = export_run(run, tmp_path / "bundle", ExportOptions(int8=True))
    manifest = json.loads((bundle / "edgecraft.json").read_text())
    checks = manifest["checks"]
    assert max(checks["max_abs_logit_diff_prefill"], checks["max_abs_logit_diff_decode"]) <= 1e-4
    assert checks["top1_agreement"] == 1.0
    padded = -(-head_size // 8) * 8
    kv = manifest["onnx"]["kv_cache"]
    assert kv["shape"][-1] == padded
    assert ("head_padding" in kv) == (padded != head_size)  # the exporter's choice is recorded
    genai = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["head_size"] == padded
    assert manifest["quantization"]["model.int8.onnx"]["parity_top1_agreement"] >= 0.9
    # the runtime drives the padded graph like any other: the bundle writes the run's greedy text,
    # also past the context (48), where the window re-fills the cache
    prompt = "Before we"
    expected = load_run_model(run).generate(prompt, max_new_tokens=60, temperature=0)
    assert load(bundle).generate(prompt, max_new_tokens=60, temperature=0) == expected


def test_head_layout_pairs_rotary_halves() -> None:
    """A rotary head pads each half, so the kernels' pairs (i, i + size / 2) stay the model's."""
    cfg = GPTConfig(vocab_size=10, d_model=24, n_heads=2, pos="rope")  # head 12 -> 16
    head = np.arange(1, 13, dtype=np.float32)  # (12,)
    out = pad_heads(np.stack([head, -head]), cfg, axis=-1)  # (2 heads, 16)
    assert out[0].tolist() == [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0]
    assert out[1].tolist() == (-out[0]).tolist()
    weight = np.ones((2 * 12, 3), dtype=np.float32)  # (n_heads * head_size, in)
    assert pad_heads(weight, cfg, axis=0).shape == (2 * 16, 3)


def test_cli_trains_and_exports_a_head_size_of_12(tmp_path: Path, monkeypatch) -> None:
    """The issue's reproduction: d_model 48 over 4 heads trains, generates and exports."""
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path)
    runner = CliRunner()
    shape = ["--set", "model.d_model=48", "--set", "model.n_heads=4", "--set", "train.max_steps=5",
             "--set", "train.eval_every=5", "--set", "train.checkpoint_every=5"]
    result = runner.invoke(app, ["train", str(recipe), *shape])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "runs/tiny"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "export/tiny", "The ", "-n", "10", "--seed", "1"])
    assert result.exit_code == 0, result.output


def test_onnxruntime_genai_drives_a_padded_bundle(tmp_path: Path, genai_greedy) -> None:
    """genai allocates its cache from genai_config.json's head_size: the padded one."""
    from edgecraft.runtime import load

    run = make_run(tmp_path, d_model=24, n_heads=2)  # head 12 -> 16
    path = export_run(run, tmp_path / "bundle", ExportOptions())
    model = load(path)
    ids = model.encode("Before we")
    assert model.decode(genai_greedy(path, ids, 20)) == model.generate("Before we", 20, temperature=0)
