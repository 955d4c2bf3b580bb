"""The embeddable runtime: text streaming, stop strings, bundles, generation over a real exported model."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgecraft.checkpoint import load_model, save_model
from edgecraft.export import ExportOptions, export_run
from edgecraft.model import GPT, GPTConfig
from edgecraft.recipe import to_toml, validate
from edgecraft.runtime import BundleError, describe_bundle, load
from edgecraft.runtime.text import REPLACEMENT, IncrementalDecoder, StopFilter, TextStream

MIXED = "café crème, 中文字 naïve — ok"


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """Byte-level BPE with few merges, so "é" is two tokens and "中" three."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=262, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the cat sat on the mat " * 20], trainer=trainer)
    assert len(tok.encode("é").ids) == 2 and len(tok.encode("中").ids) == 3
    return tok


# ------------------------------------------------------------------------------- text streaming


def test_incremental_decoder_never_emits_a_broken_character(byte_bpe):
    ids = byte_bpe.encode(MIXED).ids
    decoder = IncrementalDecoder(byte_bpe)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == byte_bpe.decode(ids) == MIXED
    assert "" in pieces  # some tokens completed no character and were held back


def test_incremental_decoder_flushes_an_incomplete_tail_like_decode(byte_bpe):
    ids = byte_bpe.encode("ab中").ids[:-1]  # the last byte of 中 is missing
    decoder = IncrementalDecoder(byte_bpe)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == "ab"
    assert "ab" + decoder.finish() == byte_bpe.decode(ids)


def feed(stops, pieces):
    f = StopFilter(stops)
    out = [f.push(p) for p in pieces]
    return out, f


def test_stop_filter_cuts_before_a_stop_string_split_over_pieces():
    out, f = feed(["\n\n", "END"], ["hello E", "N", "D more"])
    assert out == ["hello ", "", ""]
    assert f.stopped


def test_stop_filter_releases_a_held_prefix_that_did_not_become_a_stop():
    out, f = feed(["END"], ["abc E", "Nx", "yz"])
    assert out == ["abc ", "ENx", "yz"]
    assert not f.stopped and f.finish() == ""


def test_stop_filter_holds_a_possible_stop_until_finish():
    out, f = feed(["<|end|>"], ["one <|e"])
    assert out == ["one "]
    assert f.finish() == "<|e"


def test_stop_filter_picks_the_earliest_stop():
    out, f = feed(["b", "a"], ["xxab"])
    assert out == ["xx"] and f.stopped


def test_text_stream_with_stop_inside_a_multibyte_run(byte_bpe):
    ids = byte_bpe.encode("naïve 中文 rest").ids
    stream = TextStream(byte_bpe, ["文"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    assert "".join(pieces) == "naïve 中"
    assert all(REPLACEMENT not in p for p in pieces)


# ------------------------------------------------------------------------------- a real bundle

CORPUS = "the quick brown fox jumps over the lazy dog.\nhello world, said the cat.\n"


@pytest.fixture(scope="module")
def tiny(tiny_bundle, trained_run):
    """(bundle path, the PyTorch model it was exported from, the loaded runtime Model)."""
    torch_model = load_model(trained_run / "model.safetensors").eval()
    return tiny_bundle, torch_model, load(tiny_bundle)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory, byte_bpe):
    """A random-weight model over the byte-level BPE tokenizer, exported like any run."""
    root = tmp_path_factory.mktemp("bpe")
    recipe = validate(
        {"name": "bpe", "data": {"source": str(root / "moved.txt"), "tokenizer": "bpe", "vocab_size": 262},
         "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "block_size": 24}}, "test recipe",
    )
    run = root / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(to_toml(recipe))
    byte_bpe.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=byte_bpe.get_vocab_size(), **recipe.model.model_dump())), run / "model.safetensors")
    return load(export_run(run, root / "bundle", ExportOptions()))


@torch.no_grad()
def reference_greedy(torch_model, ids: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """PyTorch greedy decoding with the runtime's documented window (full cache -> keep block // 2)
    and CTRL repetition penalty over every token of the prompt and the output so far."""
    block = torch_model.cfg.block_size
    ctx, out = ids[-block:], []
    for _ in range(n):
        logits = torch_model(torch.tensor([ctx]))[0][0, -1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[ids + out] = True
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        tok = int(torch.where(seen, penalized, logits).argmax())
        out.append(tok)
        ctx = (ctx + [tok])[-(block // 2) :] if len(ctx) == block else ctx + [tok]
    return out


def test_greedy_matches_pytorch_past_the_context_length(tiny):
    _, torch_model, model = tiny
    ids = model.encode("the lazy dog")
    n = 3 * model.block_size  # slides the window several times
    expected = model.decode(reference_greedy(torch_model, ids, n))
    assert model.generate("the lazy dog", max_new_tokens=n, temperature=0) == expected


def test_long_prompt_keeps_its_last_block(tiny):
    _, torch_model, model = tiny
    prompt = CORPUS * 3  # longer than block_size
    expected = model.decode(reference_greedy(torch_model, model.encode(prompt), 20))
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == expected


def test_repetition_penalty_matches_pytorch(tiny):
    _, torch_model, model = tiny
    ids = model.encode("The cat")
    expected = model.decode(reference_greedy(torch_model, ids, 40, penalty=1.5))
    got = model.generate("The cat", max_new_tokens=40, temperature=0, repetition_penalty=1.5)
    assert got == expected
    assert got != model.generate("The cat", max_new_tokens=40, temperature=0)


def test_thread_count_is_an_option(tiny):
    assert load(tiny[0], threads=2).engine.threads == 2
    assert load(tiny[0]).engine.threads == 1  # the bundle's recommendation


def test_same_seed_same_text(tiny):
    model = tiny[2]
    a = model.generate("hello", max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    assert a == model.generate("hello", max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    assert a != model.generate("hello", max_new_tokens=40, temperature=1.0, top_k=10, seed=4)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": 1.0, "seed": 5, "top_p": 0.9}])
def test_stream_pieces_join_to_generate(tiny, kwargs):
    model = tiny[2]
    pieces = list(model.stream("hello", max_new_tokens=70, **kwargs))
    assert "".join(pieces) == model.generate("hello", max_new_tokens=70, **kwargs)


def test_stream_over_byte_level_bpe_joins_to_generate(bpe_model):
    for seed in range(3):
        text = bpe_model.generate("naïve 中", max_new_tokens=60, temperature=1.0, seed=seed)
        assert "".join(bpe_model.stream("naïve 中", max_new_tokens=60, temperature=1.0, seed=seed)) == text


def test_stop_string_ends_the_text_before_it(tiny):
    model = tiny[2]
    full = model.generate("hello", max_new_tokens=60, temperature=1.0, seed=1)
    stop = full[20:23]
    expected = full[: full.index(stop)]
    kwargs = dict(max_new_tokens=60, temperature=1.0, seed=1, stop=["@@@", stop])
    assert model.generate("hello", **kwargs) == expected
    pieces = list(model.stream("hello", **kwargs))
    assert "".join(pieces) == expected


def test_unknown_characters_become_unk(tiny):
    model = tiny[2]
    unk = model.tokenizer.token_to_id("<unk>")
    assert model.encode("h☃é") == [model.tokenizer.token_to_id("h"), unk, unk]
    assert len(model.generate("snow ☃ man", max_new_tokens=5, temperature=0)) > 0


def test_empty_prompt_starts_from_newline(tiny):
    model = tiny[2]
    assert model.generate("", max_new_tokens=30, temperature=0) == model.generate("\n", max_new_tokens=30, temperature=0)


def test_batch_equals_one_by_one_greedy(tiny):
    model = tiny[2]
    prompts = ["hello", "the quick brown fox jumps over", "", "x", CORPUS * 2]
    n = 45  # rows fill their cache at different steps
    assert model.generate_batch(prompts, max_new_tokens=n, temperature=0) == [
        model.generate(p, max_new_tokens=n, temperature=0) for p in prompts
    ]


def test_batch_with_stop_strings_equals_one_by_one(tiny):
    model = tiny[2]
    prompts = ["hello", "the dog", "said"]
    kwargs = dict(max_new_tokens=40, temperature=0, stop=["e", "o"])
    assert model.generate_batch(prompts, **kwargs) == [model.generate(p, **kwargs) for p in prompts]


@torch.no_grad()
def test_score_matches_a_direct_computation(tiny):
    _, torch_model, model = tiny
    short = "The cat sat."  # shorter than block_size: one forward pass
    ids = torch.tensor([model.encode(short)])
    logits = torch_model(ids)[0][0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    got = model.score(short)
    assert len(short) <= model.block_size and got.n_tokens == len(short) - 1
    assert got.nll == pytest.approx(nll, rel=1e-4)
    assert got.perplexity == pytest.approx(np.exp(nll), rel=1e-4)


@torch.no_grad()
def test_score_of_a_long_text_uses_windows_of_the_context(tiny):
    _, torch_model, model = tiny
    text = CORPUS * 2
    ids = model.encode(text)
    block, stride = model.block_size, model.block_size // 2
    total, pos = 0.0, 1
    while pos < len(ids):  # each token predicted once, from a window of at most block tokens
        end = min(len(ids), block if pos == 1 else pos + stride)
        begin = max(0, end - block)
        logits = torch_model(torch.tensor([ids[begin:end]]))[0][0].double()
        logp = torch.log_softmax(logits, -1)
        total -= sum(logp[t - 1 - begin, ids[t]].item() for t in range(pos, end))
        pos = end
    got = model.score(text)
    assert got.n_tokens == len(ids) - 1
    assert got.nll == pytest.approx(total / (len(ids) - 1), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [""]}, "stop"), ({"temperature": -1}, "temperature"),
     ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k")],
)
def test_invalid_options_raise_before_generating(tiny, kwargs, name):
    model = tiny[2]
    for call in (model.generate, model.stream):
        with pytest.raises(ValueError, match=name):
            call("hello", **kwargs)


def test_score_needs_two_tokens(tiny):
    with pytest.raises(ValueError, match="2 tokens"):
        tiny[2].score("h")


# ------------------------------------------------------------------------------- bundle checks


@pytest.fixture
def bundle_copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny[0], tmp_path / "copy"))


def test_a_tampered_file_is_named(bundle_copy):
    onnx_file = bundle_copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: damaged \(sha256"):
        load(bundle_copy)


def test_a_truncated_or_missing_file_is_named(bundle_copy):
    tok = bundle_copy / "tokenizer.json"
    tok.write_text(tok.read_text()[:-10])
    with pytest.raises(BundleError, match=r"tokenizer\.json: damaged \(\d+ bytes"):
        load(bundle_copy)
    tok.unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        load(bundle_copy)


def test_verify_false_skips_the_hashes(bundle_copy):
    tok = bundle_copy / "tokenizer.json"
    tok.write_text(tok.read_text() + "\n")  # still a valid tokenizer, no longer the recorded bytes
    with pytest.raises(BundleError, match="tokenizer.json"):
        load(bundle_copy)
    assert load(bundle_copy, verify=False).generate("The", max_new_tokens=5, temperature=0)


def test_an_unknown_format_version_is_refused(bundle_copy):
    manifest_path = bundle_copy / "edgecraft.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = "edgecraft-bundle/99"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edgecraft-bundle/99.*not supported"):
        load(bundle_copy)
    manifest_path.write_text("{not json")
    with pytest.raises(BundleError, match="damaged manifest"):
        load(bundle_copy)


def test_asking_for_a_missing_int8_model_says_how_to_get_it(tiny):
    with pytest.raises(BundleError, match="--int8"):
        load(tiny[0], int8=True)


def test_cuda_without_a_cuda_onnxruntime_says_so(tiny):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        load(tiny[0], device="cuda")


def test_describe_bundle_shows_format_config_and_files(tiny):
    text = describe_bundle(tiny[0])
    for expected in ("edgecraft-bundle/1", f"block_size: {tiny[2].block_size}", "model.onnx", "tokenizer.json"):
        assert expected in text


# ------------------------------------------------------------------------------- the process


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_generating_from_a_bundle_never_imports_torch(tiny):
    code = f"""
import sys
from edgecraft.cli import app
try:
    app(["generate", {str(tiny[0])!r}, "hello", "-n", "20", "--stream", "--seed", "1"])
except SystemExit as e:
    assert e.code in (0, None), e.code
from edgecraft.runtime import load
load({str(tiny[0])!r}).generate_batch(["a", "b"], max_new_tokens=5)
assert "torch" not in sys.modules, "torch was imported"
# the generate process's 80 MB budget: OpenSSL's libcrypto and numpy.random stay out too
assert "_hashlib" not in sys.modules and "numpy.random" not in sys.modules, "a heavy module was imported"
print("\\nok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello") and result.stdout.endswith("ok\n")


def test_manifest_hashes_are_plain_sha256(tiny):
    """The built-in SHA-256 the runtime uses gives what hashlib (and sha256sum) give."""
    manifest = json.loads((tiny[0] / "edgecraft.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((tiny[0] / name).read_bytes()).hexdigest(), name


def test_cli_generate_reports_a_damaged_bundle_in_one_line(bundle_copy):
    from typer.testing import CliRunner

    from edgecraft.cli import app

    (bundle_copy / "model.onnx").write_bytes(b"junk")
    result = CliRunner().invoke(app, ["generate", str(bundle_copy), "hi"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "model.onnx" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["info", str(bundle_copy)])
    assert result.exit_code == 0 and "model.onnx" in result.output


def test_cli_generate_rejects_bad_option_values_in_one_line(tiny):
    from typer.testing import CliRunner

    from edgecraft.cli import app

    result = CliRunner().invoke(app, ["generate", str(tiny[0]), "hi", "--top-p", "0"])
    assert result.exit_code == 2 and result.output.startswith("error: top_p")


def test_int8_bundles_load_and_an_int8_only_bundle_is_used_without_asking(trained_run, tmp_path):
    only = export_run(trained_run, tmp_path / "int8", ExportOptions(int8=True, int8_only=True))
    assert not (only / "model.onnx").exists()
    greedy = load(only, int8=True).generate("The cat", max_new_tokens=20, temperature=0)
    assert len(greedy) > 0
    assert load(only).generate("The cat", max_new_tokens=20, temperature=0) == greedy
