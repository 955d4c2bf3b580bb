"""Golden cross-implementation test: a run (PyTorch) and its bundle (onnxruntime) write the same
greedy text, through the real `edgecraft generate` command, well past the context length."""

import subprocess
import sys


def generate(path, prompt: str, n: int) -> str:
    cmd = [sys.executable, "-m", "edgecraft.cli", "generate", str(path), prompt, "-n", str(n), "--temperature", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_run_and_bundle_write_the_same_greedy_text(trained_run, tiny_bundle):
    n = 240  # 15x the tiny model's block_size: the window slides many times
    from_run = generate(trained_run, "The cat", n)
    from_bundle = generate(tiny_bundle, "The cat", n)
    assert len(from_run) >= len("The cat") + n  # char model: one character per token
    assert from_run == from_bundle
