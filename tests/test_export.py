"""export_run: the bundle's contents, its parity figures, driving it with nothing but onnxruntime
and edgecraft.json, and the export's user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from edgecraft.checkpoint import save_model
from edgecraft.cli import app
from edgecraft.data import make_char_tokenizer, prepare
from edgecraft.export import ExportOptions, export_run
from edgecraft.model import GPT, GPTConfig
from edgecraft.recipe import to_toml, validate
from edgecraft.runtime.bundle import sha256_file

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 12
LLAMA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False}


def make_run(root: Path, name: str = "tiny", tokenizer: str = "char", **model) -> Path:
    """A run directory as `edgecraft train` leaves it, with random weights (no training needed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(TEXT)
    shape = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "block_size": 48, **model}
    data = {"source": str(root / "corpus.txt"), "cache_dir": str(root / "cache"), "tokenizer": tokenizer,
            "vocab_size": 300}
    recipe = validate({"name": name, "data": data, "model": shape}, "test recipe")
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(to_toml(recipe))
    tokenizer = make_char_tokenizer([TEXT]) if tokenizer == "char" else prepare(recipe.data, recipe.model.block_size).tokenizer
    tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), **recipe.model.model_dump()))
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.2)
    save_model(gpt, run / "model.safetensors")
    return run


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def bundle(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    run = make_run(root, **(LLAMA if request.param == "llama" else {}))
    return run, export_run(run, root / "bundle", ExportOptions())


def test_bundle_holds_exactly_the_documented_files_with_hashes(bundle):
    run, path = bundle
    files = ["genai_config.json", "model.onnx", "tokenizer.json"]
    assert sorted(p.name for p in path.iterdir()) == ["edgecraft.json", *files]
    manifest = json.loads((path / "edgecraft.json").read_text())
    assert manifest["format"] == "edgecraft-bundle/1"
    assert sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    assert manifest["config"]["vocab_size"] == manifest["vocab_size"]
    assert manifest["quantization"] == {"model.onnx": "none (float32)"}
    assert manifest["runtime"]["threads"] == 1
    assert not list(path.parent.glob(".tmp-*"))  # the temporary directory is gone


def test_parity_figures_are_recorded_and_within_bounds(bundle):
    manifest = json.loads((bundle[1] / "edgecraft.json").read_text())
    checks = manifest["checks"]
    assert checks["text"].startswith("validation split of")
    assert checks["max_abs_logit_diff_prefill"] <= 1e-4
    assert checks["max_abs_logit_diff_decode"] <= 1e-4
    assert checks["top1_agreement"] == 1.0
    assert 0 <= checks["kl_divergence_mean"] < 1e-9
    assert abs(checks["perplexity_delta"]) < 1e-4 * checks["perplexity_pytorch"]


def test_graph_is_valid_and_already_minimal(bundle, tmp_path):
    path = bundle[1] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path))
    # what keeps it loadable by onnxruntime 1.20 to 1.31 (checked by hand with 1.20.1 and 1.30.0):
    # the oldest IR version for opset 17, and no input newer than GroupQueryAttention's 9th
    assert graph.ir_version == 8
    assert all(len(n.input) <= 9 for n in graph.graph.node if n.op_type == "GroupQueryAttention")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    # onnxruntime's optimiser finds nothing to fuse: the shipped graph is what runs
    assert len(onnx.load(so.optimized_model_filepath).graph.node) == len(onnx.load(str(path)).graph.node)


def test_tokenizer_loads_in_plain_tokenizers(bundle):
    run, path = bundle
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert ours.encode("Speak, speak.").ids == Tokenizer.from_file(str(run / "tokenizer.json")).encode("Speak, speak.").ids
    assert ours.decode(ours.encode("hear me").ids) == "hear me"


def test_onnxruntime_alone_drives_the_graph_from_the_manifest(bundle):
    """What an app without edgecraft does: read edgecraft.json, feed the graph, no IO binding."""
    from edgecraft.checkpoint import load_model

    run, path = bundle
    manifest = json.loads((path / "edgecraft.json").read_text())
    spec = manifest["onnx"]
    assert spec["files"] == ["model.onnx"]
    options = ort.SessionOptions()
    for key, value in manifest["runtime"]["session_config"].items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path / spec["files"][0]), options, providers=["CPUExecutionProvider"])
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in spec["inputs"]}
    cache = spec["kv_cache"]
    B = 2
    shape = [B if d == "batch_size" else d for d in cache["shape"]]
    past = {
        cache["past"].format(layer=i, **{"key|value": kind}): np.zeros(shape, dtype=cache["dtype"])
        for i in range(cache["n_layers"]) for kind in ("key", "value")
    }

    def step(ids: np.ndarray, past_len: np.ndarray, new_len: np.ndarray) -> np.ndarray:
        S = ids.shape[1]
        values = {
            "input_ids": ids,
            "position_ids": np.minimum(past_len[:, None] + np.arange(S), manifest["config"]["block_size"] - 1),
            "seqlens_k": (past_len + new_len - 1)[:, None],
            "total_sequence_length": np.array([max((past_len + new_len).max(), S)]),
        }
        feeds = {name: np.asarray(values[name], dtype=dt) for name, dt in dtypes.items() if name in values}
        outputs = session.run(None, {**feeds, **past})
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, outputs):
            if name.startswith("present."):
                past[name.replace("present.", "past_key_values.", 1)] = value
        return outputs[names.index("logits")]

    assert {s["name"] for s in spec["inputs"]} == {i.name for i in session.get_inputs()}
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    rows = [tok.encode("Before we proceed").ids, tok.encode("All:\nSp").ids]
    lengths = np.array([len(r) for r in rows])
    ids = np.zeros((B, lengths.max()), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    logits = step(ids, np.zeros(B, dtype=np.int64), lengths)
    nxt = logits[np.arange(B), lengths - 1].argmax(-1)
    for b in range(B):
        rows[b].append(int(nxt[b]))
    for _ in range(5):  # greedy decode, rows at different positions
        logits = step(nxt[:, None].astype(np.int64), lengths, np.ones(B, dtype=np.int64))
        lengths = lengths + 1
        nxt = logits[:, 0].argmax(-1)
        for b in range(B):
            rows[b].append(int(nxt[b]))

    model = load_model(run / "model.safetensors")
    for row in rows:
        with torch.no_grad():
            ref = model(torch.tensor([row[:-1]]))[0][0].argmax(-1).tolist()
        assert row[-6:] == ref[-6:]


def test_onnxruntime_genai_drives_the_bundle(bundle, genai_greedy):
    """genai's own decode loop over model.onnx (its past/current_sequence_length counters bound to
    seqlens_k and total_sequence_length) gives edgecraft's greedy text, up to the context length."""
    from edgecraft.runtime import load

    _, path = bundle
    model = load(path)
    prompt = "Before we proceed"
    ids = model.encode(prompt)
    n = model.block_size - len(ids)  # genai stops at max_length = block_size
    assert model.decode(genai_greedy(path, ids, n)) == model.generate(prompt, n, temperature=0)
    config = json.loads((path / "genai_config.json").read_text())
    assert config["model"]["pad_token_id"] == model.vocab_size  # never in a prompt
    assert not (path / "tokenizer_config.json").exists()  # genai's tokenizer misreads char vocabularies


def test_onnxruntime_genai_tokenizer_reads_a_bpe_bundle(tmp_path, genai_greedy):
    og = pytest.importorskip("onnxruntime_genai")
    run = make_run(tmp_path, tokenizer="bpe", block_size=24)
    path = export_run(run, tmp_path / "bundle", ExportOptions())
    assert json.loads((path / "edgecraft.json").read_text())["files"].keys() >= {"tokenizer_config.json"}
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    theirs = og.Tokenizer(og.Model(str(path)))
    for text in ["First Citizen:\nSpeak,  speak.", "ünïcödé ~ {x}\n\n"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert [int(i) for i in theirs.encode(text)] == ids
        assert theirs.decode(np.array(ids, dtype=np.int32)) == text
    prompt = ours.encode("Before we", add_special_tokens=False).ids
    from edgecraft.runtime import load

    model = load(path)
    assert model.decode(genai_greedy(path, prompt, 12)) == model.generate("Before we", 12, temperature=0)


# ------------------------------------------------------------------------------------ errors

runner = CliRunner()


def test_missing_run_is_exit_2_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_or_missing_weights_name_the_file(tmp_path, damage):
    run = make_run(tmp_path)
    weights = run / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "model.safetensors" in result.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".tmp-*"))


def test_damaged_recipe_names_the_file(tmp_path):
    run = make_run(tmp_path)
    (run / "recipe.toml").write_text("name = [")
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "recipe.toml" in result.output


def test_existing_bundle_needs_force(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["edgecraft.json", "genai_config.json", "model.onnx", "tokenizer.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary or replaced bundle left behind


def test_bad_opset_is_a_user_error(tmp_path):
    run = make_run(tmp_path)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b"), "--opset", "16"])
    assert result.exit_code == 2 and "--opset" in result.output


def test_trained_run_exports_within_the_parity_bound(trained_run, tmp_path):
    """Real trained weights (sharper logits than random ones): the bound still holds, on the run's
    own validation text, and the bundle's greedy text is PyTorch's."""
    from edgecraft.rundir import load_run
    from edgecraft.runtime import load

    bundle = export_run(trained_run, tmp_path / "bundle", ExportOptions())
    checks = json.loads((bundle / "edgecraft.json").read_text())["checks"]
    assert checks["text"].startswith("validation split of")
    assert max(checks["max_abs_logit_diff_prefill"], checks["max_abs_logit_diff_decode"]) <= 1e-4
    assert checks["top1_agreement"] == 1.0
    model, tokenizer, _ = load_run(trained_run)
    ids = tokenizer.encode("The cat").ids
    n = model.cfg.block_size - len(ids)  # stay inside one context window
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    text = load(bundle).generate("The cat", max_new_tokens=n, temperature=0)
    assert text == tokenizer.decode(ids[len(tokenizer.encode("The cat").ids) :])
