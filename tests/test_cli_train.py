"""The real `edgecraft` command on a run directory: train, generate, info, Ctrl-C and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import write_tiny_recipe
from edgecraft.recipe import load_recipe
from edgecraft.rundir import describe_run, load_run
from edgecraft.torch_engine import load_run_model
from edgecraft.train import resume_run, train_recipe

_SCRIPT = Path(sys.executable).with_name("edgecraft")  # the installed console script
EDGECRAFT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "edgecraft.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGECRAFT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_generate_info_through_the_command(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    trained = _run("train", str(recipe), "--set", "train.max_steps=10", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "runs" / "tiny"
    assert "run written to runs/tiny" in trained.stdout and (run / "model.safetensors").is_file()

    again = _run("train", str(recipe), cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "already exists" in again.stderr and "Traceback" not in again.stderr

    gen = _run("generate", str(run), "The cat", "-n", "20", "--seed", "3", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The cat") and len(gen.stdout.rstrip("\n")) == len("The cat") + 20

    info = _run("info", str(run), cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "parameters: 18,656" in info.stdout and "step-000010" in info.stdout and "last val" in info.stdout

    missing = _run("generate", str(tmp_path / "nothing"), "x", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_generate_from_run_is_seeded_greedy_and_tolerates_unknown_characters(trained_run):
    run = load_run_model(trained_run)
    a = run.generate("The dog", max_new_tokens=40, temperature=1.0, seed=5)
    assert a == run.generate("The dog", max_new_tokens=40, temperature=1.0, seed=5)
    greedy = run.generate("The dog", max_new_tokens=40, temperature=0.0, seed=1)
    assert greedy == run.generate("The dog", max_new_tokens=40, temperature=0.0, seed=2)
    assert len(run.generate("Zébra ✓", max_new_tokens=10, seed=1)) == 10
    assert len(run.generate("", max_new_tokens=10, seed=1)) == 10
    model, tokenizer, recipe = load_run(trained_run)
    assert recipe.name == "tiny" and not model.training
    assert "checkpoints: step-000020, step-000030" in describe_run(trained_run)


def test_damaged_run_pieces_are_named(tmp_path, trained_run):
    import shutil

    from edgecraft.errors import UserError

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "tokenizer.json").write_text("{broken")
    try:
        load_run(run)
    except UserError as err:
        assert "tokenizer.json" in str(err)
    else:
        raise AssertionError("a damaged tokenizer.json must be a UserError")
    (run / "tokenizer.json").unlink()
    shutil.copy(trained_run / "tokenizer.json", run / "tokenizer.json")
    (run / "model.safetensors").write_bytes(b"junk")
    try:
        load_run(run)
    except UserError as err:
        assert "model.safetensors" in str(err)
    else:
        raise AssertionError("damaged weights must be a UserError")


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_matches_a_straight_one(tmp_path):
    """SIGINT to a real training process after its first checkpoint: exit 130 with a message, a
    checkpoint at the step it stopped, and resuming ends bit-identical to an uninterrupted run."""
    overrides = ["train.max_steps=400", "train.checkpoint_every=5", "train.eval_every=1000", "train.sample_every=1000", "model.dropout=0.1"]
    recipe = write_tiny_recipe(tmp_path)
    args = [*EDGECRAFT, "train", str(recipe), *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-000005").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    stopped = int(err.split("interrupted at step ")[1].split(";")[0])
    assert 5 <= stopped < 400
    assert (run / "checkpoints" / f"step-{stopped:06d}").is_dir() and not (run / "model.safetensors").exists()

    resume_run(run)
    straight = train_recipe(load_recipe(recipe, overrides), runs_dir=tmp_path / "straight")
    a, b = load_file(str(run / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_stays_resumable(tmp_path):
    """SIGKILL at an arbitrary moment (maybe mid-checkpoint): resume picks the newest whole
    checkpoint, ignores a torn metrics line, and finishes."""
    recipe = write_tiny_recipe(tmp_path)
    overrides = ["train.max_steps=300", "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=1000"]
    args = [*EDGECRAFT, "train", str(recipe), *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-000006").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "st')  # as if killed mid-write
    assert not (run / "model.safetensors").exists()
    resume_run(run)
    assert (run / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301)) + [300]  # one train event per step, then the final eval
