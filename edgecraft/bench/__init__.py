"""`edgecraft bench`: rows measured side by side, each in a process of its own.

    run.py     the rows to measure, one child process each, the JSON and table written
    worker.py  one row in its own process: `python -m edgecraft.bench.worker` (spec in, JSON out)
    stats.py   summaries, percentiles and rates of timings
    system.py  the machine and library versions a result was measured with
    report.py  the table, the CSV and the plot
"""

from edgecraft.bench.run import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]
