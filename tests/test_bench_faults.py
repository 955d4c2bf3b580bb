"""bench for a newcomer and under faults (issue 11): defaults that fit a small model, output files
refused before any row is measured, and the run's validation text found from a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgecraft.cli import app
from edgecraft.export import ExportOptions, export_run
from test_export import make_run

runner = CliRunner()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, Path]:
    """(run, bundle) as the quickstart lays them out: ROOT/runs/tiny and ROOT/export/tiny; the
    model's context (48) is shorter than bench's default 200 new tokens."""
    root = tmp_path_factory.mktemp("bench-layout")
    run = make_run(root)
    return run, export_run(run, root / "export" / "tiny", ExportOptions())


def test_the_default_bench_fits_the_model_and_finds_the_run_s_validation_text(layout, tmp_path: Path) -> None:
    run, bundle = layout
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(bundle), "--device", "cpu", "--runs", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["prefill"]["test"] == "pp48" and row["decode"]["test"] == "tg47"  # 64 and 200 cut to the context
    assert report["quality_text"] == f"validation split of {run.resolve()}"
    assert row["quality"]["tokens"] > 0
    assert "tokens checked" in result.output


def test_given_lengths_that_do_not_fit_are_refused_not_clamped(layout) -> None:
    result = runner.invoke(app, ["bench", str(layout[1]), "--new-tokens", "200", "--runs", "1"])
    assert result.exit_code == 2 and "--new-tokens 200 needs a context of 201; the model has 48" in result.output


@pytest.mark.parametrize("flag, name", [("--json", "b.json"), ("--plot", "b.png"), ("--csv", "b.csv"), ("--markdown", "b.md")])
def test_an_output_that_cannot_be_written_is_refused_before_measuring(layout, readonly_dir: Path, flag: str, name: str) -> None:
    result = runner.invoke(app, ["bench", str(layout[1]), "--runs", "1", flag, str(readonly_dir / "sub" / name)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"error: {flag} {readonly_dir / 'sub' / name}: cannot write there" in result.output
    assert "machine:" not in result.output  # no row was measured (the tables print after the rows)
    assert list(readonly_dir.iterdir()) == []


def test_an_output_that_is_a_folder_is_refused(layout, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(layout[1]), "--runs", "1", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output
