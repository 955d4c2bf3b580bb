"""edgecraft against the tools people would use instead, on the same weights, side by side.

    python benchmarks/peers.py --run runs/char-1m [--bundle export/char-1m] [--peer-python PY]
    python benchmarks/peers.py [--corpus PATH]      # trains recipes/char-1m.toml briefly first

Rows, all greedy, all with a KV cache, all from the SAME trained edgecraft run:
- edgecraft fp32 / int8: the bundle's model.onnx / model.int8.onnx through edgecraft's engine;
- transformers: GPT2LMHeadModel with the same shape (exact GELU, LayerNorm eps 1e-5) and the run's
  weights, `generate` in PyTorch eager;
- optimum fp32 / int8: that GPT-2 exported by optimum (ORTModelForCausalLM), and the export
  quantized by onnxruntime's `quantize_dynamic` (QInt8 weights, per tensor).
Each (row, threads) runs in a process of its own per round (peers_models.py); token ids go in and
come out, so tokenization is excluded everywhere, and each peer's `generate()` overhead is part of
what it costs to use it. Figures: time to first token after a P-token prompt, and tokens/s for N
new tokens after a prompt (prefill included). Every row's greedy tokens are compared with
edgecraft fp32's: same weights, same tokens, or the comparison is meaningless.

--corpus defaults to ../shared/data/tinyshakespeare.txt (beside the checkout) where it exists, else the recipe's
built-in corpus. transformers and optimum-onnx live in the `peers` extra; optimum-onnx pins
transformers 4.x (and an older tokenizers), so they may sit in a separate environment: point
--peer-python at its interpreter. One way that reuses edgecraft's torch and onnxruntime:

    python3 -m venv peers-venv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > peers-venv/lib/python3.X/site-packages/zz_edgecraft.pth   # edgecraft venv's packages
    peers-venv/bin/pip install "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58" torch==2.13.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import harness
import peers_models

if TYPE_CHECKING:
    from edgecraft.config import GPTConfig

PEERS = ("transformers", "optimum-fp32", "optimum-int8")
ORDER = ("edgecraft-fp32", "edgecraft-int8", *PEERS)
SAMPLES = ("ttft_ms", "tok_s", "tok_per_cpu_s")  # per measured run
TITLE = "edgecraft vs transformers and optimum, same weights"


# ---------------------------------------------------------------- shared with peers_genai.py


def train_run(args, recipe: str, *sets: str) -> Path:
    """recipes/RECIPE.toml trained --steps steps on --corpus (else its built-in corpus) in --work."""
    if args.corpus is not None:
        sets += ("--set", f"data.source={json.dumps(str(args.corpus))}")
    harness.edgecraft_cli("train", str(harness.REPO / "recipes" / f"{recipe}.toml"), "--set",
                          f"train.max_steps={args.steps}", *sets, "--runs-dir", str(args.work / "runs"), "--force")
    return args.work / "runs" / recipe


def start(args, train) -> tuple[Path, Path, GPTConfig]:
    """The run (--run, else `train(args)`), its bundle with model.onnx and model.int8.onnx (--bundle,
    else `edgecraft export --int8`, fp32 alone when the int8 quality gate refuses), its config."""
    from edgecraft.checkpoint import read_config

    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or train(args)
    bundle = args.bundle or args.work / "bundle"
    if args.bundle is None:
        try:
            harness.edgecraft_cli("export", str(run), "--int8", "--out", str(bundle), "--force")
        except subprocess.CalledProcessError:
            print("int8 export failed (above); measuring fp32 only", file=sys.stderr)
            harness.edgecraft_cli("export", str(run), "--out", str(bundle), "--force")
    return run, bundle, read_config(run / "model.safetensors")


def prompts(run: Path, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens: consecutive slices of the run's validation text."""
    from tokenizers import Tokenizer

    from edgecraft.bench.run import validation_text

    text = validation_text(run, batch * length * 4)[0] or ""
    ids = Tokenizer.from_file(str(run / "tokenizer.json")).encode(text).ids
    if len(ids) < batch * length:
        raise SystemExit(f"{run}: validation split too short for {batch} prompts of {length} tokens")
    return np.array(ids[: batch * length]).reshape(batch, length).tolist()


def flags(parser: argparse.ArgumentParser, recipe: str, rows: tuple[str, ...], name: str, threads: list[int],
          rounds: int) -> None:
    """The flags peers.py and peers_genai.py share: the run (or the recipe trained without one),
    its bundle, the rows, prompts, runs and rounds, where the work and the report go."""
    parser.add_argument("--run", type=Path, help=f"a trained run of recipes/{recipe}.toml's style (default: train one)")
    parser.add_argument("--corpus", type=Path, default=harness.default_corpus(),
                        help=f"without --run: train recipes/{recipe}.toml on this (default: tinyshakespeare if present)")
    parser.add_argument("--steps", type=int, default=300, help="training steps without --run")
    parser.add_argument("--bundle", type=Path, help="the run's bundle (default: export it, fp32 and int8)")
    parser.add_argument("--threads", type=harness.int_list, default=threads, help=f"default: {threads}")
    parser.add_argument("--batches", type=harness.int_list, default=[1, 16])
    parser.add_argument("--rows", default=",".join(rows), help="subset of rows to measure")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="measured runs inside each row's process per round")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs inside each row's process")
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds, each a fresh process per row")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / f"edgecraft-{name}")
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help=f"where {name}.md and .json go")
    parser.add_argument("--render", type=Path, help=f"only re-render {name}.md from this {name}.json")


def has_int8(bundle: Path) -> bool:
    return "model.int8.onnx" in json.loads((bundle / "edgecraft.json").read_text())["files"]


# ---------------------------------------------------------------- the comparison


def merge(results: list[dict]) -> list[dict]:
    """One result per (row, threads): every round's samples, summarized; the last round's tokens."""
    from edgecraft.bench.stats import summarize

    merged: dict[tuple, dict] = {}
    for r in results:
        into = merged.setdefault((r["row"], r["threads"]), {"row": r["row"], "threads": r["threads"], "batches": {}})
        for batch, v in r["batches"].items():
            cell = into["batches"].setdefault(batch, {key: [] for key in SAMPLES})
            for key in SAMPLES:
                cell[key] += v[key]
            cell["tokens"] = v["tokens"]
    for r in merged.values():
        for cell in r["batches"].values():
            cell["samples"] = {key: cell[key] for key in SAMPLES}
            cell.update({key: summarize(cell[key]) for key in SAMPLES})
    return list(merged.values())


def compare(results: list[dict]) -> list[dict]:
    """Flat lines (row, threads, batch) with ratios and greedy agreement against edgecraft fp32."""
    base = {(r["threads"], b): v for r in results if r["row"] == "edgecraft-fp32" for b, v in r["batches"].items()}
    lines = [{"row": r["row"], "threads": r["threads"], "batch": int(batch),
              **{key: v[key] for key in SAMPLES},
              "edgecraft_fp32_speedup": base[(r["threads"], batch)]["tok_s"]["median"] / v["tok_s"]["median"],
              "greedy_vs_edgecraft_fp32": harness.agreement(v["tokens"], base[(r["threads"], batch)]["tokens"])}
             for r in results for batch, v in r["batches"].items()]
    return sorted(lines, key=lambda x: (x["batch"], x["threads"], ORDER.index(x["row"])))


def targets(lines: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured ratio and met / missed (or not measured)."""
    med = {(x["row"], x["threads"], x["batch"]): x["tok_s"]["median"] for x in lines}
    cpu = {(x["row"], x["threads"], x["batch"]): x["tok_per_cpu_s"]["median"] for x in lines}
    wanted = [
        ("edgecraft fp32 >= 5x optimum fp32 (batch 1, 1 thread)", "edgecraft-fp32", "optimum-fp32", 1, 1, 5.0),
        ("edgecraft fp32 >= 10x transformers eager (batch 1, 1 thread)", "edgecraft-fp32", "transformers", 1, 1, 10.0),
        ("edgecraft int8 >= edgecraft fp32 (batch 1, 1 thread)", "edgecraft-int8", "edgecraft-fp32", 1, 1, 1.0),
    ] + [(f"edgecraft fp32 >= 3x optimum fp32 (batch 16, {t} thread(s))", "edgecraft-fp32", "optimum-fp32", t, 16, 3.0)
         for t in sorted({x["threads"] for x in lines})]
    out = []
    for name, ours, theirs, threads, batch, needed in wanted:
        a, b = med.get((ours, threads, batch)), med.get((theirs, threads, batch))
        ratio = None if a is None or b is None else a / b
        ratio_cpu = None if ratio is None else cpu[(ours, threads, batch)] / cpu[(theirs, threads, batch)]
        out.append({"target": name, "ratio": ratio, "ratio_by_cpu_time": ratio_cpu, "needed": needed,
                    "met": ratio is not None and ratio >= needed})
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    out = [
        "Peers' Python: " + ", ".join(f"{k} {v}" for k, v in report["peer_libraries"].items()
                                      if k in ("transformers", "optimum", "optimum-onnx", "torch", "onnxruntime")), "",
        f"Model: {report['model']}. Greedy, KV cache on everywhere; token ids in and out (no tokenization). "
        f"TTFT: `generate` of 1 token after a {s['prompt_len']}-token prompt. tok/s: {s['new_tokens']} new tokens "
        f"after a {s['gen_prompt_len']}-token prompt, prefill included; median [min–max] of {report['rounds_done']} "
        f"rounds × {s['runs']} runs, each round a fresh process per (row, threads) with {s['warmup']} warm-up run(s) "
        "per batch size, rounds interleaved so background load hits every row alike. tok per CPU-s: the same "
        "tokens per CPU-second the process got (at 1 thread, what the row would do on an idle core)."
        + (f" {report['note']}" if report.get("note") else ""), "",
        "| batch | threads | row | TTFT ms | tok/s median [min–max] | tok per CPU-s | edgecraft fp32 ÷ row | "
        "greedy = edgecraft fp32 |", "|---|---|---|---|---|---|---|---|",
    ]
    for x in report["lines"]:
        t, g = x["tok_s"], x["greedy_vs_edgecraft_fp32"]
        agree = "all" if g["identical"] == g["of"] else f"{g['identical']}/{g['of']} seqs (first diff at token {g['min_prefix']})"
        out.append(f"| {x['batch']} | {x['threads']} | {x['row']} | {x['ttft_ms']['median']:.2f} | "
                   f"{t['median']:,.0f} [{t['min']:,.0f}–{t['max']:,.0f}] | {x['tok_per_cpu_s']['median']:,.0f} | "
                   f"{x['edgecraft_fp32_speedup']:.2f}× | {agree} |")
    out += ["", "| target | measured (wall) | by CPU time | result |", "|---|---|---|---|"]
    for t in report["targets"]:
        out.append(f"| {t['target']} | not measured | | – |" if t["ratio"] is None else
                   f"| {t['target']} | {t['ratio']:.2f}× | {t['ratio_by_cpu_time']:.2f}× | {'met' if t['met'] else 'MISSED'} |")
    out += [f"\nNot measured: {note}" for note in report["missing"]]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(x["batch"], x["threads"]) for x in report["lines"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4), squeeze=False)
    for ax, (batch, threads) in zip(axes[0], groups):
        lines = [x for x in report["lines"] if (x["batch"], x["threads"]) == (batch, threads)]
        med = [x["tok_s"]["median"] for x in lines]
        ax.bar(range(len(lines)), med, color=["#c44e52" if x["row"].startswith("edgecraft") else "#8c8c8c" for x in lines])
        ax.set_xticks(range(len(lines)), [x["row"] for x in lines], rotation=45, ha="right")
        ax.set_title(f"batch {batch}, {threads} thread(s): tokens/s")
        for i, m in enumerate(med):
            ax.annotate(f"{m:,.0f}", (i, m), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{report['model']} — {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """peers.json (each cell keeping its first sequence's greedy tokens), peers.md, peers.png."""
    slim = json.loads(json.dumps(report))
    for r in slim["raw"]:
        for cell in r["batches"].values():
            cell["tokens"] = cell["tokens"][:1]
    harness.write_atomic(out / "peers.json", json.dumps(slim, indent=1) + "\n")
    harness.write_atomic(out / "peers.md", harness.render(report, markdown(report)))
    plot(report, out / "peers.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flags(parser, "char-1m", ORDER, "peers", [1, len(os.sched_getaffinity(0))], rounds=3)
    parser.add_argument("--peer-python", default=sys.executable, help="Python with transformers and optimum-onnx")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how the run was trained")
    args = parser.parse_args()
    if args.render:
        report = {"title": TITLE, "command": "not recorded", **json.loads(args.render.read_text())}
        report["note"] = args.note or report.get("note", "")
        write_report(report, args.out)
        return

    run, bundle, cfg = start(args, lambda a: train_run(a, "char-1m"))
    threads, batches = args.threads, args.batches
    rows = [r for r in args.rows.split(",") if r]
    missing = []
    if "edgecraft-int8" in rows and not has_int8(bundle):
        rows.remove("edgecraft-int8")
        missing.append(f"edgecraft-int8: {bundle} has no model.int8.onnx")
    # a learned-position model holds block_size positions: the generation prompt shrinks to fit
    gen_prompt_len = min(args.prompt_len, cfg.block_size - args.new_tokens)
    all_prompts = prompts(run, max(batches), args.prompt_len)
    script = Path(peers_models.__file__)
    if any(r in PEERS for r in rows):
        check = harness.child(script, "prepare", {"run": str(run), "work": str(args.work / "peers"),
                                                  "probe": all_prompts[0]}, python=args.peer_python)
        print(f"peers prepared: GPT-2 vs edgecraft max |logit diff| {check['max_abs_logit_diff_gpt2_vs_edgecraft']:.2e}",
              file=sys.stderr)
    info = harness.RunInfo(TITLE)
    header = {
        **info.data, "format": "edgecraft-peers/1", "missing": missing, "note": args.note,
        "peer_libraries": harness.child(script, "versions", python=args.peer_python),
        "model": f"{run.name}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
                 f"context {cfg.block_size}, vocab {cfg.vocab_size}",
        "settings": {"prompt_len": args.prompt_len, "gen_prompt_len": gen_prompt_len, "new_tokens": args.new_tokens,
                     "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup, "threads": threads,
                     "batches": batches},
    }

    def row(name: str, t: int):
        spec = {"row": name, "threads": t, "batches": batches, "bundle": str(bundle), "work": str(args.work / "peers"),
                "prompts": all_prompts, "prompt_len": args.prompt_len, "gen_prompt_len": gen_prompt_len,
                "new_tokens": args.new_tokens, "runs": args.runs, "warmup": args.warmup}
        python = sys.executable if name.startswith("edgecraft") else args.peer_python
        return lambda: harness.child(script, "row", spec, python=python)

    def report(done: dict[str, list]) -> dict:
        results = merge([r for rounds in done.values() for r in rounds])
        lines = compare(results)
        return {**header, "rounds_done": len(next(iter(done.values()))), "load_after": os.getloadavg(),
                "lines": lines, "targets": targets(lines), "raw": results}

    # rewritten after every round, so a run cut short still leaves its numbers
    done = harness.interleave({f"{n} t{t}": row(n, t) for t in threads for n in rows}, args.rounds, warmup=0,
                              after_round=lambda d: write_report(report(d), args.out))
    final = report(done)
    print(harness.render(final, markdown(final)))


if __name__ == "__main__":
    main()
