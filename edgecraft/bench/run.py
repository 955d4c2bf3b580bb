"""`edgecraft bench`: measure bundles and runs side by side, each row in a process of its own.

A row is one (path, precision, thread count): a bundle gives an fp32, int8 and/or int4 row (its
model.onnx / model.int8.onnx / model.int4.onnx), a run directory gives a PyTorch eager row. Rows
run one after the other, each in a fresh `python -m edgecraft.bench.worker` (spec in, JSON out),
so one row's memory and thread pools never disturb the next and peak memory is per row. Quality is measured on the same
text for every row, so a speed-up can never hide a quality loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgecraft.bench.report import write_outputs
from edgecraft.bench.system import system_info
from edgecraft.errors import UserError
from edgecraft.runtime.bundle import QUANT_MODELS

FORMAT = "edgecraft-bench/1"
BACKEND_KINDS = {"onnxruntime": "onnx", "tinygrad": "tinygrad"}  # --backend -> a row's kind

NOTES = (
    "pp P: prefill of P prompt tokens per sequence into an empty KV cache; tokens/s = batch * P / time.",
    "tg N: N one-token decode steps per sequence after a one-token context, greedy argmax (numpy) included; "
    "tokens/s = batch * N / time, counting the tokens actually produced.",
    "Both run the model through the engine directly: tokenization, detokenization and sampling are excluded.",
    "TTFT: prefill of P tokens plus the argmax that picks the first new token.",
    "Latency p50/p95/p99: one decode step, which yields one token for each of the batch's sequences.",
    "Load: opening the bundle (sha256 checks, session creation) or the run (weights, model build); "
    "library import time is recorded apart (import_s).",
    "CPU/wall: CPU seconds the row's process got per second while decoding; well below its thread "
    "count means other processes took the cores (a shared machine) and the speeds are pessimistic.",
    "t per CPU-s (tg only): the same tokens per CPU-second the process got; at 1 thread, the speed "
    "the row would reach on an idle core.",
    "Peak RSS: the row's own process (Python, libraries, model, timed runs), before the perplexity pass.",
    "Perplexity: exp(mean next-token loss) over non-overlapping block_size windows of the quality text, "
    "each row with its own tokenizer.",
    "Speeds: mean ± stddev and median [min-max] over the measured runs, after the warm-up runs.",
)


@dataclass
class BenchOptions:
    """What to measure; one row per (path, precision, thread count)."""

    device: str = "cpu"
    threads: list[int] = field(default_factory=lambda: [1])
    batch: int = 1
    prompt_len: int | None = None  # None: bench.worker.DEFAULT_PROMPT_LEN, cut to the model's context
    new_tokens: int | None = None  # None: bench.worker.DEFAULT_NEW_TOKENS, cut to the model's context
    runs: int = 5
    text: Path | None = None
    warmup: int = 1
    ppl_tokens: int = 16384  # quality is scored on at most this many tokens (0 = all)
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])  # bundle rows: onnxruntime and/or tinygrad


def _check(options: BenchOptions) -> None:
    if options.device not in ("cpu", "cuda"):
        raise UserError(f"--device {options.device!r}: expected cpu or cuda")
    if not options.threads or any(t < 0 for t in options.threads):
        raise UserError(f"--threads {options.threads}: expected counts >= 0 (0 = the runtime's default)")
    for name in ("batch", "prompt_len", "new_tokens", "runs"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    unknown = [b for b in options.backends if b not in BACKEND_KINDS]
    if unknown or not options.backends:
        raise UserError(f"--backend {','.join(options.backends)}: expected onnxruntime and/or tinygrad, e.g. onnxruntime,tinygrad")
    if options.warmup < 0 or options.ppl_tokens < 0:
        raise UserError("--warmup and --ppl-tokens must be >= 0")


def _kind(path: Path) -> str:
    """'bundle' or 'run'; a UserError for anything else."""
    if not path.exists():
        raise UserError(f"{path}: no such bundle or run directory")
    if (path / "edgecraft.json").is_file():
        return "bundle"
    if (path / "model.safetensors").is_file() or (path / "recipe.toml").is_file():
        return "run"
    raise UserError(f"{path}: neither a bundle (no edgecraft.json) nor a run directory (no model.safetensors)")


def _bundle_models(path: Path) -> list[str]:
    """The precisions a bundle holds: "fp32", "int8", "int4", in that order."""
    try:
        files = json.loads((path / "edgecraft.json").read_text(encoding="utf-8")).get("files", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path / 'edgecraft.json'}: damaged manifest ({err})") from None
    precisions = [p for p, name in QUANT_MODELS.items() if name in files]
    if not precisions:
        raise UserError(f"{path}: the bundle holds no {', '.join(QUANT_MODELS.values())}")
    return precisions


def row_specs(paths: list[Path], options: BenchOptions, eval_text: Path | None) -> list[dict]:
    """One spec per row, in the order they are measured; validates every path first."""
    specs = []
    common = {k: v for k, v in asdict(options).items() if k not in ("threads", "text", "backends")}
    for path in paths:
        kind = _kind(path)
        variants = [(BACKEND_KINDS[b], p) for b in options.backends for p in _bundle_models(path)] \
            if kind == "bundle" else [("torch", "fp32")]
        for backend, precision in variants:
            for threads in options.threads:
                specs.append({
                    **common, "name": path.resolve().name, "path": str(path), "kind": backend,
                    "int8": precision == "int8", "precision": precision, "threads": threads,
                    "eval_text": str(eval_text) if eval_text else None,
                })
    return specs


def validation_text(run_dir: Path, max_tokens: int) -> tuple[str | None, str]:
    """(text, where from): the first max_tokens + 1 tokens (0 = all) of the run's validation split
    (the last val_fraction of its token stream), or (None, why not)."""
    try:
        from edgecraft.data import prepare
        from edgecraft.recipe import load_recipe
    except ImportError as err:
        return None, f"none: reading {run_dir}'s validation split needs edgecraft[train] ({err.name} missing)"
    try:
        recipe = load_recipe(run_dir / "recipe.toml", [])
        data = prepare(recipe.data, recipe.model.block_size)
    except UserError as err:
        return None, f"none: {run_dir}'s validation split is unreadable here ({err}); pass --text FILE"
    ids = data.val if max_tokens == 0 else data.val[: max_tokens + 1]
    return data.tokenizer.decode([int(i) for i in ids]), f"validation split of {run_dir}"


def _bundle_run(path: Path) -> Path | None:
    """The run directory a bundle was exported from, where the usual layout keeps it: runs/NAME
    beside the bundle's export/ folder, or under the working folder."""
    try:
        name = json.loads((path / "edgecraft.json").read_text(encoding="utf-8"))["name"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    for run in (path.resolve().parent.parent / "runs" / str(name), Path("runs") / str(name)):
        if (run / "recipe.toml").is_file():
            return run
    return None


def quality_text(paths: list[Path], options: BenchOptions) -> tuple[str | None, str]:
    """(text, where it came from): --text, else the first run directory's validation split, else
    that of the run a bundle was exported from, when it can be found."""
    if options.text is not None:
        try:
            return options.text.read_text(encoding="utf-8"), str(options.text)
        except FileNotFoundError:
            raise UserError(f"--text {options.text}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--text {options.text}: not readable UTF-8 text ({err})") from None
    runs = [path for path in paths if _kind(path) == "run"]
    runs += [run for path in paths if _kind(path) == "bundle" and (run := _bundle_run(path)) is not None]
    if runs:
        return validation_text(runs[0], options.ppl_tokens)
    return None, "none (pass --text FILE, or bench a run directory, to measure perplexity)"


def check_writable(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written before any row is measured (rows take
    minutes, and their results must not be lost at the end); creates nothing."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folder that would hold the new ones
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or err}); choose another path") from None


def save_report(report: dict) -> Path:
    """The report as JSON in the temporary folder: where results go when their file cannot be written."""
    fd, name = tempfile.mkstemp(prefix="edgecraft-bench-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    return Path(name)


def run_worker(spec: dict) -> dict:
    """Measure one row in a fresh interpreter; a crash becomes an error row, a user error is raised."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgecraft.bench.worker"], input=json.dumps(spec),
        capture_output=True, text=True,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {**spec, "status": "error", "error": f"worker failed: {why}"}
    if row["status"] == "error" and row.get("exit_code"):
        message = row["error"] if row["error"].startswith(spec["path"]) else f"{spec['path']}: {row['error']}"
        raise UserError(message, row["exit_code"])
    return row


def _greedy_agreement(rows: list[dict]) -> None:
    """Mark each int8/int4 row with how many greedy tokens it shares with its fp32 twin (same path/threads)."""
    fp32 = {(r["path"], r["threads"]): r for r in rows if r["status"] == "ok" and r["precision"] == "fp32"}
    for row in rows:
        twin = fp32.get((row["path"], row["threads"]))
        if row["status"] == "ok" and row["precision"] != "fp32" and twin:
            a, b = row["greedy_tokens"], twin["greedy_tokens"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            row["greedy_prefix_match_fp32"] = {"tokens": same, "of": min(len(a), len(b))}


def run_bench(
    paths: list[Path],
    options: BenchOptions,
    json_out: Path | None = None,
    csv_out: Path | None = None,
    markdown_out: Path | None = None,
    plot: Path | None = None,
) -> dict:
    """Measure every row, print the tables, write the requested files; returns the report dict."""
    from rich.console import Console

    _check(options)
    if not paths:
        raise UserError("give at least one bundle or run directory")
    if plot is not None:
        from edgecraft.bench.report import require_matplotlib

        require_matplotlib()
    err = Console(stderr=True)
    for path in paths:
        _kind(path)
    for flag, path in (("--json", json_out), ("--csv", csv_out), ("--markdown", markdown_out), ("--plot", plot)):
        if path is not None:
            check_writable(path, flag)
    text, text_source = quality_text(paths, options)
    with tempfile.TemporaryDirectory(prefix="edgecraft-bench-") as tmp:
        eval_path = None
        if text is not None:
            eval_path = Path(tmp) / "quality.txt"
            eval_path.write_text(text, encoding="utf-8")
        specs = row_specs(paths, options, eval_path)
        rows = []
        for i, spec in enumerate(specs, 1):
            label = f"{spec['name']} {spec['precision']} {spec['threads']}t"
            with err.status(f"[{i}/{len(specs)}] measuring {label} ..."):
                row = run_worker(spec)
            row.pop("eval_text")  # a temporary file, gone with this directory
            rows.append(row)
    _greedy_agreement(rows)
    report = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": system_info(),
        "options": {**asdict(options), "text": str(options.text) if options.text else None},
        "quality_text": text_source,
        "notes": list(NOTES),
        "rows": rows,
    }
    # piped or redirected output gets a width that keeps the tables on one line per row
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        write_outputs(report, console, json_out=json_out, csv_out=csv_out, markdown_out=markdown_out, plot=plot)
    except OSError as error:  # the folder changed while measuring: keep the measurements
        raise UserError(
            f"writing the results failed ({error.strerror or error}); they are saved in {save_report(report)}"
        ) from None
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        raise UserError(f"{len(failed)} row(s) failed: {failed[0]['error']}", exit_code=1)
    if all(r["status"] == "skipped" for r in rows):
        raise UserError(f"no row could run: {rows[0]['reason']}")
    return report
