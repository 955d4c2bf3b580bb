"""Data preparation under faults (issue 11): an unwritable token cache is one line, and a folder or
glob corpus says how many files it used and skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_text, write_tiny_recipe
from edgecraft.data import prepare
from edgecraft.errors import UserError
from edgecraft.recipe import DataConfig

_SCRIPT = Path(sys.executable).with_name("edgecraft")
EDGECRAFT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "edgecraft.cli"]


def test_an_unwritable_cache_folder_is_one_line(tmp_path: Path, readonly_dir: Path) -> None:
    (tmp_path / "corpus.txt").write_text(tiny_text())
    cfg = DataConfig(source=str(tmp_path / "corpus.txt"), cache_dir=str(readonly_dir / "cache"))
    with pytest.raises(UserError, match="cannot write the token cache in .*readonly/cache .*XDG_CACHE_HOME"):
        prepare(cfg, 16)


def test_train_with_a_read_only_xdg_cache_home_is_one_line(tmp_path: Path, readonly_dir: Path) -> None:
    """The issue's reproduction: no data.cache_dir, XDG_CACHE_HOME read-only."""
    recipe = write_tiny_recipe(tmp_path)
    recipe.write_text("\n".join(line for line in recipe.read_text().splitlines() if not line.startswith("cache_dir")))
    result = subprocess.run(
        [*EDGECRAFT, "train", str(recipe)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": str(readonly_dir)},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cannot write the token cache" in errors[0], result.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing half-made to --force away


def test_the_data_line_counts_files_used_and_skipped(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(tiny_text(200, seed=1))
    (folder / "b.txt").write_text(tiny_text(200, seed=2))
    (folder / "c.bin").write_bytes(b"\xff\xfe\x00binary" * 10)
    (folder / "d.txt").write_bytes("latin-1 caf\xe9\n".encode("latin-1"))
    prepare(DataConfig(source=str(folder), cache_dir=str(tmp_path / "cache")), 16)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"data: {folder} (2 files used, 2 skipped as not UTF-8 text (first: {folder / 'c.bin'}))" in line
    prepare(DataConfig(source=str(folder / "*.txt"), cache_dir=str(tmp_path / "cache")), 16)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"(2 files used, 1 skipped as not UTF-8 text (first: {folder / 'd.txt'}))" in line


def test_a_folder_of_only_binary_files_names_what_it_skipped(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"holds no text files \(1 skipped as not UTF-8 text, first: .*x.bin\)"):
        prepare(DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache")), 16)
