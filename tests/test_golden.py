"""Golden cross-implementation test: a run (PyTorch) and its bundle (onnxruntime) write the same
text, through the real `edgecraft generate` command, well past the context length, for every
generate option: both go through runtime.Model's one decode loop."""

import subprocess
import sys

import pytest


def generate(path, prompt: str, n: int, *options: str) -> str:
    cmd = [sys.executable, "-m", "edgecraft.cli", "generate", str(path), prompt, "-n", str(n), *options]
    if "--temperature" not in options:
        cmd += ["--temperature", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_run_and_bundle_write_the_same_greedy_text(trained_run, tiny_bundle):
    n = 240  # 15x the tiny model's block_size: the window slides many times
    from_run = generate(trained_run, "The cat", n)
    from_bundle = generate(tiny_bundle, "The cat", n)
    assert len(from_run) >= len("The cat") + n  # char model: one character per token
    assert from_run == from_bundle


OPTION_SETS = {
    "sampled": ["--temperature", "0.9", "--seed", "3"],
    "top-k-top-p": ["--temperature", "1.0", "--top-k", "5", "--top-p", "0.9", "--seed", "11"],
    "penalty-stop-stream": ["--repetition-penalty", "1.3", "--stop", "dog", "--stop", "\n\n", "--stream", "--threads", "1"],
    "empty-prompt": ["--temperature", "0.7", "--seed", "5"],
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_run_and_bundle_agree_for_every_option(trained_run, tiny_bundle, name):
    prompt = "" if name == "empty-prompt" else "The cat"
    options = OPTION_SETS[name]
    assert generate(trained_run, prompt, 60, *options) == generate(tiny_bundle, prompt, 60, *options)


def test_flags_a_run_cannot_honour_are_refused(trained_run):
    cmd = [sys.executable, "-m", "edgecraft.cli", "generate", str(trained_run), "x", "--int8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --int8") and "Traceback" not in done.stderr
