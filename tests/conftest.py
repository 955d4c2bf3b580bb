"""Shared fixtures: a tiny corpus, a tiny recipe that trains in about a second, a trained run.

Everything is written under pytest's temporary directories (the token cache included).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from pathlib import Path

import pytest

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()

TINY_RECIPE = """\
name = "tiny"
seed = 7

[data]
source = "{source}"
cache_dir = "{cache}"

[model]
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
block_size = 16

[train]
batch_size = 8
max_steps = 30
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5
eval_every = 10
eval_batches = 4
checkpoint_every = 10
keep_checkpoints = 2
sample_every = 10
sample_tokens = 24
log_every = 5
device = "cpu"
threads = 1
"""


def tiny_text(n_lines: int = 400, seed: int = 0) -> str:
    """Short sentences from a 16-word vocabulary: structure a tiny model learns in a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def write_tiny_recipe(folder: Path, extra: str = "", corpus: Path | None = None) -> Path:
    """Write folder/corpus.txt (unless `corpus` is given) and folder/tiny.toml; `extra` is appended
    TOML (e.g. a [quant] section). Returns the recipe path."""
    folder.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = folder / "corpus.txt"
        corpus.write_text(tiny_text(), encoding="utf-8")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(source=corpus.as_posix(), cache=(folder / "cache").as_posix()) + extra)
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe file (name "tiny") for a 2-layer, width-32 model on a ~10 KB corpus in tmp_path."""
    return write_tiny_recipe(tmp_path)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run directory (30 steps), shared by the session: treat it as read-only."""
    from edgecraft.recipe import load_recipe
    from edgecraft.train import train_recipe

    root = tmp_path_factory.mktemp("trained")
    return train_recipe(load_recipe(write_tiny_recipe(root)), runs_dir=root / "runs")


@pytest.fixture(scope="session")
def tiny_bundle(trained_run, tmp_path_factory) -> Path:
    """The tiny trained run exported to a bundle (fp32), shared by the session: treat it as read-only."""
    from edgecraft.export import ExportOptions, export_run

    return export_run(trained_run, tmp_path_factory.mktemp("bundle") / "tiny", ExportOptions())


@contextlib.contextmanager
def read_only(*folders: Path):
    """Folders nobody may create, replace or delete files in for the block, root included (CI runs
    as root, whom file modes do not stop: the folders are made immutable with chattr +i there)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", *map(str, folders)], capture_output=True).returncode:
            subprocess.run(["chattr", "-i", *map(str, folders)], capture_output=True)
            pytest.skip("chattr +i is not available on this filesystem")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, folders)], check=True)
    else:
        for folder in folders:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for folder in folders:
                folder.chmod(0o755)


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """An empty folder nobody may create files in (read_only)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    with read_only(folder):
        yield folder


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second thread only contends (30x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def genai_greedy():
    """genai_greedy(bundle, prompt_ids, n) -> n greedy token ids from onnxruntime-genai's own decode
    loop over the bundle's genai_config.json (the test is skipped where genai is not installed)."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    def run(path: Path, prompt: list[int], n: int) -> list[int]:
        model = og.Model(str(path))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(prompt, dtype=np.int32))
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    return run
