"""Training under bad input and faults (issue 11): recipes that cannot train, a diverging loss, a
model too large for memory, a run trained by two processes, a damaged newest checkpoint, an
extended run, and progress output for logs and terminals."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_recipe
from edgecraft.recipe import load_recipe
from edgecraft.train.lock import lock_path

_SCRIPT = Path(sys.executable).with_name("edgecraft")
EDGECRAFT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "edgecraft.cli"]


def edgecraft(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGECRAFT, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command (progress lines may come before it)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    return errors[0]


@pytest.mark.parametrize("override, words", [
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.lr=nan", "train.lr: Input should be a finite number"),
    ("train.lr=1e4", "train.lr: Input should be less than or equal to 1"),
    ("train.min_lr=-inf", "train.min_lr: Input should be a finite number"),
    ("model.dropout=nan", "model.dropout: Input should be a finite number"),
])
def test_recipes_refuse_non_finite_numbers_and_a_learning_rate_above_1(tmp_path: Path, override: str, words: str) -> None:
    from typer.testing import CliRunner

    from edgecraft.cli import app

    recipe = write_tiny_recipe(tmp_path)
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", override, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and words in error_line(result.output)
    assert not (tmp_path / "runs").exists()


def test_training_stops_at_the_first_non_finite_loss_keeping_the_last_good_checkpoint(tmp_path: Path) -> None:
    """Weight decay of 1000 at lr 1 multiplies every matrix by -999 a step: float32 overflows."""
    recipe = write_tiny_recipe(tmp_path)
    diverge = ["--set", "train.lr=1", "--set", "train.min_lr=1", "--set", "train.warmup_steps=0",
               "--set", "train.weight_decay=1000"]
    result = edgecraft("train", str(recipe), *diverge, cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "the training loss is nan (not finite): training diverged" in line and "Lower train.lr" in line
    assert "no checkpoint had been written" in line
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing to keep: a retry needs no --force

    # diverging after a checkpoint: that checkpoint stays, nothing later is written
    first = edgecraft("train", str(recipe), "--set", "train.max_steps=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "runs" / "tiny" / "checkpoints" / "step-000010")  # keep a resumable state ...
    (tmp_path / "runs" / "tiny" / "model.safetensors").unlink()
    result = edgecraft("train", str(recipe), *diverge, "--set", "train.checkpoint_every=1", "--force", cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr)
    run = tmp_path / "runs" / "tiny"
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps and f"the last good checkpoint is step {int(steps[-1][5:])}" in line
    assert not (run / "model.safetensors").exists() and not (run / "samples.txt").exists()


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_run(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path)
    code = (
        "import resource, sys; limit = 3 * 2**29; resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
        "from edgecraft.cli import app; sys.argv = ['edgecraft'] + sys.argv[1:]; app()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "train", str(recipe), "--set", "model.d_model=8192", "--set", "model.d_ff=64"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "not enough memory on cpu for this model (d_model 8192" in line and "train.batch_size" in line
    assert not (tmp_path / "runs" / "tiny").exists()


def _start_training(recipe: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*EDGECRAFT, "train", str(recipe), "--set", "train.max_steps=100000", "--set", "train.checkpoint_every=50", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def test_a_run_in_training_is_locked_against_force_resume_and_a_second_train(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path)
    first = _start_training(recipe, tmp_path)
    run = tmp_path / "runs" / "tiny"
    try:
        _wait_for(run / "metrics.jsonl", first)
        assert lock_path(run).read_text().strip() == str(first.pid)
        for args in (["train", str(recipe), "--force"], ["train", "--resume", "runs/tiny"], ["train", str(recipe)]):
            other = edgecraft(*args, cwd=tmp_path)
            assert other.returncode == 2, other.stderr
            assert f"runs/tiny is being trained by process {first.pid}" in error_line(other.stderr)
        assert first.poll() is None  # still training, its directory untouched
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert not lock_path(run).exists()  # released on exit


def test_two_trains_of_one_name_at_once_make_one_run(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path)
    procs = [subprocess.Popen([*EDGECRAFT, "train", str(recipe)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is being trained by process" in loser or "already exists" in loser
    run = tmp_path / "runs" / "tiny"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps))  # every step logged once
    assert len(list((run / "tb").iterdir())) == 1


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "runs").mkdir()
    lock_path(tmp_path / "runs" / "tiny").write_text(f"{dead.pid}\n")  # what a kill -9 leaves
    result = edgecraft("train", str(recipe), "--set", "train.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"taking over the lock of process {dead.pid}, which is gone" in result.stderr
    assert not lock_path(tmp_path / "runs" / "tiny").exists()


def test_resume_falls_back_from_a_damaged_newest_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / "runs" / "tiny"))
    (run / "model.safetensors").unlink()  # as if killed before the end
    newest = run / "checkpoints" / "step-000030" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    result = edgecraft("train", "--resume", "runs/tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped step-000030 (" in result.stderr and "damaged optimizer state" in result.stderr
    assert "resuming from step-000020" in result.stderr
    assert (run / "model.safetensors").is_file()


def test_resume_with_more_steps_extends_a_finished_run(trained_run: Path, tmp_path: Path) -> None:
    from edgecraft.train import lr_at

    run = Path(shutil.copytree(trained_run, tmp_path / "runs" / "tiny"))
    result = edgecraft("train", "--resume", "runs/tiny", "--set", "train.max_steps=40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(run / "recipe.toml")
    assert recipe.train.max_steps == 40 and recipe.train.decay_steps == 30  # the cosine keeps its length
    assert lr_at(35, recipe.train) == recipe.train.min_lr
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in events) == 40
    assert [e["lr"] for e in events if e["event"] == "train" and e["step"] > 30] == [recipe.train.min_lr] * 2
    refused = edgecraft("train", "--resume", "runs/tiny", "--set", "train.lr=0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "only train.max_steps" in error_line(refused.stderr)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    from edgecraft.train.log import ProgressLines

    recipe = write_tiny_recipe(tmp_path)
    result = edgecraft("train", str(recipe), "--set", "train.max_steps=12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "step 12/12 (100%), loss " in result.stderr  # the last line, whatever the speed
    assert "val loss" in result.stderr and "tokens of the validation split" in result.stderr
    out = io.StringIO()
    lines = ProgressLines(total=4, initial=0, file=out, interval=0.0)  # a line at every update
    for _ in range(4):
        lines.update(1)
        lines.set_postfix(loss="1.0")
    lines.close()
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]


def test_in_a_terminal_the_header_is_not_glued_to_the_bar(tmp_path: Path) -> None:
    import pty

    recipe = write_tiny_recipe(tmp_path)
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([*EDGECRAFT, "train", str(recipe), "--set", "train.max_steps=5"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    header = text.index("runs/tiny: ")
    assert header == 0 or text[header - 1] in "\r\n", repr(text[max(0, header - 80) : header + 40])
    assert "%|" in text  # the bar itself is drawn
