"""The benchmark harness: statistics, machine description, the report's shape and outputs, one
row per kind of path measured in its own process, and bad input. No timing thresholds."""

import json
import math

import pytest

from edgecraft.bench_report import markdown, print_tables, to_csv
from edgecraft.bench_stats import percentiles, rates, summarize
from edgecraft.bench_system import describe, system_info

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
