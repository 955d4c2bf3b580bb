"""The benchmark harness: statistics, machine description, the report's shape and outputs, one
row per kind of path measured in its own process, and bad input. No timing thresholds."""

import json
import math
import subprocess
import sys

import pytest

from edgecraft.bench.stats import percentiles, rates, summarize
from edgecraft.bench.system import describe, system_info
from edgecraft.errors import UserError

# ------------------------------------------------------------------------------- statistics


def test_summarize_gives_median_mean_sample_stddev_and_range():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "mean": 2.5, "stddev": pytest.approx(math.sqrt(5 / 3)),
                 "min": 1.0, "max": 4.0, "n": 4}


def test_summarize_of_one_value_has_no_spread():
    assert summarize([7.0]) == {"median": 7.0, "mean": 7.0, "stddev": 0.0, "min": 7.0, "max": 7.0, "n": 1}


def test_percentiles_interpolate_between_order_statistics():
    p = percentiles(list(range(1, 101)))
    assert p == {"p50": pytest.approx(50.5), "p95": pytest.approx(95.05), "p99": pytest.approx(99.01)}


def test_statistics_refuse_no_samples():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentiles([])


def test_rates_per_repetition():
    assert rates(10, [1.0, 2.0]) == [10.0, 5.0]
    assert rates([4, 8], [2.0, 2.0]) == [2.0, 4.0]


# ------------------------------------------------------------------------------- machine


def test_system_info_names_cpu_flags_and_versions_without_importing_torch():
    import sys

    had_torch = "torch" in sys.modules
    info = system_info()
    assert {"cpu", "arch", "logical_cores", "usable_cores", "isa", "os", "python", "libraries"} <= set(info)
    assert {"numpy", "onnxruntime", "tokenizers"} <= set(info["libraries"])
    if info["arch"] == "x86_64":
        assert {"avx2", "avx512f", "avx512_vnni", "amx_int8"} <= set(info["isa"])
    assert had_torch or "torch" not in sys.modules
    assert info["cpu"] in describe(info)


# ------------------------------------------------------------------------------- rows, end to end

ROW_KEYS = {
    "name", "path", "kind", "precision", "threads", "batch", "status", "backend", "load_s", "file",
    "file_bytes", "params", "prefill", "decode", "ttft_ms", "step_latency_ms", "peak_rss_mb",
    "quality", "checks", "greedy_tokens", "decode_cpu_per_wall",
}


@pytest.fixture(scope="module")
def run_and_bundle(trained_run, tmp_path_factory):
    """The shared tiny run and its bundle with model.onnx and model.int8.onnx."""
    from edgecraft.export import ExportOptions, export_run

    bundle = export_run(trained_run, tmp_path_factory.mktemp("bench") / "tiny", ExportOptions(int8=True))
    return trained_run, bundle


ROWS = [("onnx", "fp32"), ("onnx", "int8"), ("torch", "fp32")]  # bundle fp32, bundle int8, run dir


def test_every_kind_of_path_gives_checked_rows_in_all_formats(run_and_bundle, tmp_path):
    from edgecraft.bench import BenchOptions, run_bench

    run, bundle = run_and_bundle
    out = {name: tmp_path / "out" / name for name in ("b.json", "b.csv", "b.md", "b.png")}
    options = BenchOptions(threads=[1], batch=2, prompt_len=8, new_tokens=6, runs=2, warmup=1, ppl_tokens=200)
    run_bench([bundle, run], options, json_out=out["b.json"], csv_out=out["b.csv"],
              markdown_out=out["b.md"], plot=out["b.png"])

    report = json.loads(out["b.json"].read_text())
    assert {"format", "created", "machine", "options", "quality_text", "notes", "rows"} <= set(report)
    assert f"validation split of {run}" == report["quality_text"]
    rows = report["rows"]
    assert [(r["kind"], r["precision"]) for r in rows] == ROWS
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["status"] == "ok"
        assert row["prefill"]["test"] == "pp8" and row["decode"]["test"] == "tg6"
        assert row["decode"]["tok_s"]["n"] == 2 and row["decode"]["tok_s"]["min"] > 0
        assert row["checks"] == {"tokens_produced": 2 * 2 * 6, "tokens_expected": 2 * 2 * 6,
                                 "all_in_vocab": True, "same_tokens_every_run": True, "ok": True}
        assert set(row["step_latency_ms"]) == {"p50", "p95", "p99", "mean"}
        assert row["peak_rss_mb"] > 0 and row["file_bytes"] > 0 and row["params"] > 0
        assert row["quality"]["tokens"] > 0 and row["quality"]["ppl"] > 1
    # the same weights and the same text: onnxruntime fp32 and PyTorch agree on quality and tokens
    onnx_fp32, onnx_int8, torch_fp32 = rows
    assert onnx_fp32["quality"]["ppl"] == pytest.approx(torch_fp32["quality"]["ppl"], rel=1e-3)
    assert onnx_fp32["greedy_tokens"] == torch_fp32["greedy_tokens"]
    assert onnx_int8["greedy_prefix_match_fp32"]["of"] == 6
    assert onnx_int8["file_bytes"] < onnx_fp32["file_bytes"]
    # the int8 row carries the export's scheme and loss change, and the table shows them
    assert onnx_int8["quantization"]["method"] == "ptq-dynamic" and onnx_fp32["quantization"] == "none (float32)"
    assert "val_loss_increase_pct" in onnx_int8["quantization"]

    csv_lines = out["b.csv"].read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "decode.tok_s.median" in csv_lines[0]
    md = out["b.md"].read_text()
    assert "| pp8 |" in md and "| tg6 |" in md and md.startswith("Machine: ")
    assert "ptq-dynamic DynamicQuantizeMatMul, loss " in md
    assert out["b.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuda_is_measured_or_clearly_refused(run_and_bundle, tmp_path):
    import onnxruntime as ort
    import torch

    from edgecraft.bench import BenchOptions, run_bench

    run, bundle = run_and_bundle
    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal cannot be seen here")
    options = BenchOptions(device="cuda", batch=1, prompt_len=4, new_tokens=2, runs=1, ppl_tokens=0)
    with pytest.raises(UserError) as err:
        run_bench([bundle, run], options, json_out=tmp_path / "c.json")
    assert err.value.exit_code == 2 and "CUDA" in str(err.value)
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped"] * len(ROWS)
    assert all("CUDA" in r["reason"] for r in rows)


def test_bad_paths_and_options_are_one_line_errors_with_exit_2(run_and_bundle, tmp_path):
    from typer.testing import CliRunner

    from edgecraft.cli import app

    run, bundle = run_and_bundle
    (tmp_path / "empty").mkdir()
    for args, words in [
        ([str(tmp_path / "missing")], "no such bundle or run directory"),
        ([str(tmp_path / "empty")], "neither a bundle"),
        ([str(bundle), "--threads", "one"], "--threads"),
        ([str(bundle), "--new-tokens", "40"], "context"),
        ([str(bundle), "--text", str(tmp_path / "nope.txt")], "--text"),
    ]:
        result = CliRunner().invoke(app, ["bench", *args, "--runs", "1"])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output


def test_bench_on_bundles_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, edgecraft.bench, edgecraft.bench.worker; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_rows_peak_memory_is_its_own_not_its_parents() -> None:
    """A worker started by a large process reports its own peak: getrusage's ru_maxrss would carry
    the parent's 400 MB across fork + exec."""
    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: resident
    code = "from edgecraft.bench.worker import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < float(child.stdout) < 300
    del ballast
