"""Recipe validation through the real CLI: every mistake is exit 2, one line naming the file and
the key path, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_tiny_recipe
from edgecraft.cli import app
from edgecraft.recipe import load_recipe

runner = CliRunner()


def _train(tmp_path: Path, *args: str):
    return runner.invoke(app, ["train", *args, "--runs-dir", str(tmp_path / "runs")])


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("d_ff = 64", "d_ff = 64\nd_modle = 32", "model.d_modle: unknown key"),
        ("batch_size = 8", 'batch_size = "eight"', "train.batch_size"),
        ("n_heads = 4", "n_heads = 5", "model: d_model (32) must be divisible by n_heads (5)"),
        ("max_steps = 30", "max_steps = -3", "train.max_steps"),
        ('source = "', 'source = "/nonexistent/corpus.txt" #', "data.source"),
        ("block_size = 16", "block_size = 20000", "data.source"),
        ("max_steps = 30", "max_steps = 30\nema = 1.0", "train.ema"),
    ],
    ids=["unknown-key", "wrong-type", "heads", "negative-steps", "missing-corpus", "block-too-long", "ema-of-1"],
)
def test_recipe_mistakes_are_one_line_exit_2_nothing_written(tmp_path, old, new, key):
    recipe = write_tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace(old, new, 1))
    result = _train(tmp_path, str(recipe))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {recipe}: ") and key in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache").exists()


def test_overrides_are_type_checked_and_land_in_the_resolved_recipe(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    bad = _train(tmp_path, str(recipe), "--set", "train.lr=fast")
    assert bad.exit_code == 2 and "train.lr" in bad.output and "'fast'" in bad.output
    unknown = _train(tmp_path, str(recipe), "--set", "train.speed=3")
    assert unknown.exit_code == 2 and "train.speed: unknown key" in unknown.output
    malformed = _train(tmp_path, str(recipe), "--set", "train.lr")
    assert malformed.exit_code == 2 and "section.key=value" in malformed.output
    assert not (tmp_path / "runs").exists()

    good = _train(tmp_path, str(recipe), "--set", "train.max_steps=2", "--set", "name=over", "--set", "model.dropout=0.1")
    assert good.exit_code == 0, good.output
    resolved = load_recipe(tmp_path / "runs" / "over" / "recipe.toml")
    assert (resolved.name, resolved.train.max_steps, resolved.model.dropout) == ("over", 2, 0.1)


def test_missing_recipe_and_resume_misuse(tmp_path):
    result = _train(tmp_path, str(tmp_path / "nope.toml"))
    assert result.exit_code == 2 and "recipe file not found" in result.output
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, ["train", "x.toml", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "run directory only" in result.output


def test_schema_is_json_schema_of_every_section():
    result = runner.invoke(app, ["recipe", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert {"data", "model", "train", "quant", "name", "seed"} <= set(schema["properties"])
    assert schema["$defs"]["TrainConfig"]["additionalProperties"] is False


@pytest.mark.parametrize("name", ["quickstart", "char-1m", "char-1m-llama", "shakespeare-baby"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / f"{name}.toml")
    assert recipe.name == name
