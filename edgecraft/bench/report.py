"""Showing benchmark results: rich tables in the terminal, JSON, CSV, markdown and a PNG chart.

The tables are built once as plain strings (`speed_table`, `row_table`) and rendered by rich or
as markdown, so the terminal and the README show the same figures.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from edgecraft.bench.system import describe
from edgecraft.errors import UserError

Table = tuple[list[str], list[list[str]]]  # header, rows of cells


def _backend(row: dict) -> str:
    """Short: the versions are in the machine line."""
    return {"torch": "torch eager", "tinygrad": "tinygrad"}.get(row["kind"], "onnxruntime")


def _threads(row: dict) -> str:
    """Threads asked for, and what the backend chose when that was 0 (its default)."""
    used = row.get("threads_used")
    return str(row["threads"]) if used in (None, row["threads"]) else f"{row['threads']} (={used})"


def _mean_sd(summary: dict) -> str:
    return f"{summary['mean']:,.1f} ± {summary['stddev']:,.1f}"


def _median_range(summary: dict) -> str:
    return f"{summary['median']:,.1f} [{summary['min']:,.1f}–{summary['max']:,.1f}]"


def speed_table(report: dict) -> Table:
    """llama-bench style: one line per (row, test), pp P and tg N, tokens/s."""
    header = ["model", "backend", "prec", "threads", "batch", "test", "t/s mean ± sd", "median [min–max]", "t per CPU-s"]
    lines = []
    for row in report["rows"]:
        head = [row["name"], _backend(row), row["precision"], _threads(row), str(row["batch"])]
        if row["status"] != "ok":
            lines.append([*head, row["status"], row.get("reason") or row.get("error", ""), "", ""])
            continue
        for test in ("prefill", "decode"):
            rate, per_cpu = row[test]["tok_s"], row[test].get("tok_per_cpu_s")
            cpu = "" if per_cpu is None else f"{per_cpu['median']:,.1f}"
            lines.append([*head, row[test]["test"], _mean_sd(rate), _median_range(rate), cpu])
    return header, lines


def _quantization(row: dict) -> str:
    """The int8/int4 method and kernel and the validation-loss change the export measured; "" for float rows."""
    quant = row.get("quantization")
    if not isinstance(quant, dict):
        return ""
    delta = quant.get("val_loss_increase_pct")
    loss = "" if delta is None else f", loss {delta:+.2f}%"
    return f"{quant.get('method', '?')} {quant.get('kernel', '')}".strip() + loss


def row_table(report: dict) -> Table:
    """Everything else per row: load, size, parameters, TTFT, step latency, memory, quality, checks."""
    header = [
        "model", "backend", "prec", "threads", "batch", "load ms", "file MB", "params", "TTFT ms",
        "step ms p50/p95/p99", "CPU/wall", "peak RSS MB", "ppl", "tokens checked", "greedy = fp32",
        "quantized (export)",
    ]
    lines = []
    for row in report["rows"]:
        head = [row["name"], _backend(row), row["precision"], _threads(row), str(row["batch"])]
        if row["status"] != "ok":
            lines.append([*head] + ["–"] * (len(header) - len(head)))
            continue
        lat, quality, checks = row["step_latency_ms"], row.get("quality"), row["checks"]
        match = row.get("greedy_prefix_match_fp32")
        lines.append([
            *head,
            f"{row['load_s'] * 1e3:,.0f}",
            "–" if row["file_bytes"] is None else f"{row['file_bytes'] / 1e6:.2f}",
            "–" if row.get("params") is None else f"{row['params']:,}",
            f"{row['ttft_ms']['median']:.2f}",
            f"{lat['p50']:.3f} / {lat['p95']:.3f} / {lat['p99']:.3f}",
            "–" if row.get("decode_cpu_per_wall") is None else f"{row['decode_cpu_per_wall']:.2f}",
            f"{row['peak_rss_mb']:,.0f}",
            "–" if quality is None else f"{quality['ppl']:.3f}",
            f"{checks['tokens_produced']:,} ok" if checks["ok"] else "FAILED",
            "" if match is None else f"{match['tokens']}/{match['of']}",
            _quantization(row),
        ])
    return header, lines


def markdown(report: dict) -> str:
    """Both tables as GitHub markdown, with the machine and what the figures include."""
    o = report["options"]
    out = [
        f"Machine: {describe(report['machine'])}".replace("\n", "  \n") + "  ",
        f"Device: {o['device']}; {o['runs']} measured runs after {o['warmup']} warm-up per row.", "",
    ]
    for header, lines in (speed_table(report), row_table(report)):
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        out.append("")
    out.append(f"Quality text: {report['quality_text']}.")
    out += [f"- {note}" for note in report["notes"]]
    return "\n".join(out) + "\n"


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else key, item, out)
    elif not isinstance(value, list):
        out[prefix] = value


def to_csv(report: dict) -> str:
    """One line per row, nested figures flattened to dotted columns (lists such as tokens left out)."""
    flat_rows = []
    for row in report["rows"]:
        flat: dict = {}
        _flat("", row, flat)
        flat_rows.append(flat)
    columns = list(dict.fromkeys(key for flat in flat_rows for key in flat))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat_rows)
    return buffer.getvalue()


def require_matplotlib() -> None:
    """Fail before any measuring if a chart is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'edgecraft[bench]'") from None


def plot_png(report: dict, path: Path) -> None:
    """Prefill and decode tokens/s per row as horizontal bars, median with min–max whiskers."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    labels = [f"{r['name']} {r['kind']} {r['precision']} {r['threads']}t b{r['batch']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(rows)), sharey=True)
    for ax, test in zip(axes, ("prefill", "decode")):
        stats = [r[test]["tok_s"] for r in rows]
        med = [s["median"] for s in stats]
        err = [[m - s["min"] for m, s in zip(med, stats)], [s["max"] - m for m, s in zip(med, stats)]]
        ax.barh(range(len(rows)), med, xerr=err, color="#4c72b0" if test == "prefill" else "#dd8452", capsize=3)
        ax.set_title(f"{rows[0][test]['test'] if rows else test} tokens/s (median, min–max)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(report["machine"]["cpu"] + f", {report['options']['device']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def print_tables(report: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table as RichTable

    console.print(f"machine: {describe(report['machine'])}", highlight=False, markup=False)
    o = report["options"]
    console.print(f"device: {o['device']}; {o['runs']} measured runs after {o['warmup']} warm-up per row",
                  highlight=False, markup=False)
    for title, (header, lines) in (("speed", speed_table(report)), ("per row", row_table(report))):
        table = RichTable(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(escape(name), justify="left" if i < 2 or name == "tokens checked" else "right")
        for cells in lines:
            table.add_row(*map(escape, cells))
        console.print(table)
    console.print(f"quality text: {report['quality_text']}", highlight=False, markup=False)
    for note in report["notes"]:
        console.print(f"  · {note}", highlight=False, markup=False)


def write_outputs(report: dict, console, json_out=None, csv_out=None, markdown_out=None, plot=None) -> None:
    """Print the tables, then write each file that was asked for."""
    print_tables(report, console)
    if json_out:
        _write(json_out, json.dumps(report, indent=2) + "\n")
    if csv_out:
        _write(csv_out, to_csv(report))
    if markdown_out:
        _write(markdown_out, markdown(report))
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_png(report, plot)
    for path in (json_out, csv_out, markdown_out, plot):
        if path:
            console.print(f"wrote {path}", highlight=False)
