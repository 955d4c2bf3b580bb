"""Bad input to generate, info and the runtime (issue 11): prompts that are not UTF-8, a damaged
graph whose hashes were updated, an edited manifest; and the small CLI promises (--version,
info --json, --prompt-file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import edgecraft
from edgecraft.cli import app
from edgecraft.export import ExportOptions, export_run
from edgecraft.runtime import load
from edgecraft.runtime.bundle import sha256_file
from test_export import make_run

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(run, bundle) of a small random-weight model: read-only, copy before damaging."""
    root = tmp_path_factory.mktemp("bad-input")
    run = make_run(root)
    return run, export_run(run, root / "bundle", ExportOptions())


def cli(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`edgecraft ARGS` as a user runs it: its own process, argv as bytes."""
    return subprocess.run([sys.executable, "-m", "edgecraft.cli", *args], input=stdin, capture_output=True, timeout=120)


def one_error_line(stderr: bytes | str) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def copy_bundle(bundle: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, to))


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"edgecraft {edgecraft.__version__}"


def test_info_json_of_a_bundle_and_a_run(made) -> None:
    run, bundle = made
    result = runner.invoke(app, ["info", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "bundle" and data["format"] == "edgecraft-bundle/1"
    assert data["config"] == json.loads((bundle / "edgecraft.json").read_text())["config"]
    result = runner.invoke(app, ["info", str(run), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "run" and data["status"] == "finished" and data["recipe"]["name"] == "tiny"
    assert data["parameters"] > 0 and data["files"]["model.safetensors"] > 0


def test_prompt_from_a_file_and_from_stdin(made, tmp_path: Path) -> None:
    _, bundle = made
    args = [str(bundle), "-n", "12", "--seed", "3"]
    expected = runner.invoke(app, ["generate", *args[:1], "Before we", *args[1:]])
    assert expected.exit_code == 0, expected.output
    (tmp_path / "prompt.txt").write_text("Before we", encoding="utf-8")
    from_file = runner.invoke(app, ["generate", *args, "--prompt-file", str(tmp_path / "prompt.txt")])
    assert from_file.output == expected.output
    from_stdin = cli("generate", *args, "--prompt-file", "-", stdin="Before we".encode())
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.decode() == expected.output
    both = runner.invoke(app, ["generate", str(bundle), "hi", "--prompt-file", str(tmp_path / "prompt.txt")])
    assert both.exit_code == 2 and "not both" in both.output


def test_a_prompt_that_is_not_utf8_is_one_line(made, tmp_path: Path) -> None:
    """Bytes that are not UTF-8 in argv reach Python as surrogate escapes; tokenizers raised a
    TypeError for them."""
    run, bundle = made
    for path in (bundle, run):  # onnxruntime and PyTorch engines share Model.encode
        result = cli("generate", str(path).encode(), b"\xff\xfeab", b"-n", b"5")
        assert result.returncode == 2
        line = one_error_line(result.stderr)
        assert "the prompt is not UTF-8 text (byte 0xff at character 0)" in line
    (tmp_path / "prompt.bin").write_bytes(b"ok \xfe")
    result = cli("generate", str(bundle), "--prompt-file", str(tmp_path / "prompt.bin"))
    assert result.returncode == 2
    assert "not UTF-8 text (byte 0xfe at offset 3)" in one_error_line(result.stderr)
    result = cli("generate", str(bundle), "--prompt-file", str(tmp_path / "missing.txt"))
    assert result.returncode == 2 and "cannot read it" in one_error_line(result.stderr)


def test_the_library_raises_value_error_for_a_prompt_that_is_not_text(made) -> None:
    model = load(made[1])
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at character 2"):
        model.generate("ab\ud800", max_new_tokens=2)
    with pytest.raises(ValueError, match="must be text"):
        model.generate(b"ab", max_new_tokens=2)  # not token ids 97, 98
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
        model.generate([1, 97], max_new_tokens=2)


def test_autocomplete_on_stdin_that_is_not_utf8(made) -> None:
    for env in ({}, {"LC_ALL": "C.UTF-8", "PYTHONUTF8": "1"}):  # surrogate escapes or strict UTF-8
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "autocomplete.py"), str(made[1]), "--seed", "1"],
            input=b"\xff\xfeab\n", capture_output=True, timeout=120, env={**__import__("os").environ, **env},
        )
        assert result.returncode == 2
        assert "not UTF-8 text" in one_error_line(result.stderr)


def test_a_truncated_graph_with_updated_hashes_is_one_line(made, tmp_path: Path) -> None:
    bundle = copy_bundle(made[1], tmp_path / "b")
    graph = bundle / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    manifest = json.loads((bundle / "edgecraft.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    (bundle / "edgecraft.json").write_text(json.dumps(manifest))
    result = cli("generate", str(bundle), "hi", "-n", "3")
    assert result.returncode == 2
    assert "onnxruntime cannot load it" in one_error_line(result.stderr)


@pytest.mark.parametrize("field, value", [("block_size", 24), ("n_layers", 1), ("d_model", 64),
                                          ("vocab_size", 99), ("norm", "rmsnorm"), ("mlp", "swiglu")])
def test_an_edited_manifest_config_is_refused_naming_the_field(made, tmp_path: Path, field: str, value) -> None:
    bundle = copy_bundle(made[1], tmp_path / "b")
    manifest = json.loads((bundle / "edgecraft.json").read_text())
    manifest["config"][field] = value
    (bundle / "edgecraft.json").write_text(json.dumps(manifest))
    result = cli("generate", str(bundle), "hi", "-n", "3")
    assert result.returncode == 2
    assert f"config.{field}" in one_error_line(result.stderr)


def test_a_manifest_that_stops_listing_the_tokenizer_is_refused(made, tmp_path: Path) -> None:
    """Dropping a file's entry must not turn its hash check off."""
    bundle = copy_bundle(made[1], tmp_path / "b")
    manifest = json.loads((bundle / "edgecraft.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (bundle / "edgecraft.json").write_text(json.dumps(manifest))
    result = cli("generate", str(bundle), "hi", "-n", "3")
    assert result.returncode == 2
    assert "tokenizer.json is not listed, so not verified" in one_error_line(result.stderr)
