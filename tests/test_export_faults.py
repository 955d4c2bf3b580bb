"""export under faults (issue 11): an unwritable --out, a kill -9 mid-export, a diverged run, a
run whose validation text has moved. Each answers with one `error:` line (or says what it did)
and leaves nothing half-made."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgecraft.checkpoint import load_model, save_model
from edgecraft.cli import app
from test_export import make_run

runner = CliRunner()


def one_error_line(result, code: int = 2) -> str:
    """The result's `error:` line, checked to be the only one, last, with exit `code`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, result.output
    return lines[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("faults"))


def test_out_under_a_read_only_folder_is_one_line(run: Path, readonly_dir: Path) -> None:
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(readonly_dir / "b")]))
    assert "cannot write the bundle there" in line and "--out" in line
    assert list(readonly_dir.iterdir()) == []


def test_out_under_a_file_is_one_line(run: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "file" / "b")]))
    assert "cannot write the bundle there" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_export_removes_the_folders_it_created(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "b"
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--int8", "--max-loss-increase", "0"])
    assert result.exit_code == 3, result.output  # the int8 gate: int8 loses something
    assert list(tmp_path.iterdir()) == []


def test_a_kill_during_export_is_cleaned_up_by_the_next_export(run: Path, tmp_path: Path) -> None:
    """kill -9 mid-export leaves export/.tmp-NAME-PID-XXXX; the next export removes it (and
    leaves alone the temporary folder of an export that is still running)."""
    out = tmp_path / "export" / "tiny"
    child = subprocess.Popen(
        [sys.executable, "-m", "edgecraft.cli", "export", str(run), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(".tmp-tiny-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = list(out.parent.glob(".tmp-tiny-*"))
    assert left, "the export finished before it could be killed"
    assert not out.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = out.parent / f".tmp-tiny-{live.pid}-abcd"  # another export, still at work
        running.mkdir()
        result = runner.invoke(app, ["export", str(run), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"removed {left[0]}" in result.output
        assert sorted(out.parent.glob(".tmp-*")) == [running]
    finally:
        live.kill()
        live.wait()


def test_a_run_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    model = load_model(run / "model.safetensors")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    save_model(model, run / "model.safetensors")
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b")]))
    assert "not finite" in line and "train.lr" in line
    assert not (tmp_path / "b").exists()


def test_without_its_validation_text_export_says_so_and_the_int8_gate_refuses(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    text = (tmp_path / "corpus.txt").read_text()
    (tmp_path / "corpus.txt").rename(tmp_path / "moved.txt")
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b"), "--int8"])
    assert result.exit_code == 0, result.output
    assert "the checks run on random token ids" in result.output
    assert "say nothing about quality" in result.output
    manifest = json.loads((tmp_path / "b" / "edgecraft.json").read_text())
    assert manifest["checks"]["text"].startswith("random token ids")

    gate = ["--int8", "--max-loss-increase", "1"]
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "c"), *gate]))
    assert "--text FILE" in line and "validation text unavailable" in line
    assert not (tmp_path / "c").exists()

    (tmp_path / "held-out.txt").write_text(text[: len(text) // 3])
    args = ["export", str(run), "--out", str(tmp_path / "d"), *gate, "--text", str(tmp_path / "held-out.txt")]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 3), result.output  # the gate judges real text now
    if result.exit_code == 0:
        checks = json.loads((tmp_path / "d" / "edgecraft.json").read_text())["checks"]
        assert checks["text"].startswith(str(tmp_path / "held-out.txt"))
    assert "held-out.txt" in result.output


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8", b""])
def test_bad_text_file_is_one_line(run: Path, tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "b"), "--text", str(path)]))
    assert "--text" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_max_loss_increase_must_be_a_finite_percentage(run: Path, tmp_path: Path, value: str) -> None:
    args = ["export", str(run), "--out", str(tmp_path / "b"), "--int8", "--max-loss-increase", value]
    assert "--max-loss-increase" in one_error_line(runner.invoke(app, args))
