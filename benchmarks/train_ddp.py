"""Training throughput of one process against torchrun's DDP on the same machine, same global batch.

    python benchmarks/train_ddp.py [--corpus PATH] [--steps 30] [--rounds 3] [--device cpu]

recipes/char-1m.toml (global batch 32 x 256 tokens) trained through the real command, each row a
fresh run of `--steps` steps:
- "1 process x 2 threads": `python -m edgecraft train ... --set train.threads=2`
- "2 processes x 1 thread": `torchrun --standalone --nproc_per_node=2 -m edgecraft train ...
  --set train.batch_size=16 --set train.threads=1` (the same global batch)
- "1 process x 1 thread": the baseline each of those two processes would be alone
With `--device cuda`: 1 process on one GPU, and torchrun over every GPU when there are several.

Reported per row: training tokens/s as the trainer logs it (every rank's tokens over rank 0's
step time, eval excluded), the median over the run's 5-step windows after the first, then the
median over rounds; and the wall time of the whole command (start-up and data included). Rows
alternate within each round (harness.interleave); a warm-up round fills the token cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

RECIPE = harness.REPO / "recipes" / "char-1m.toml"


def train_row(workdir: Path, launcher: list[str], overrides: list[str]) -> dict:
    """One fresh training run: its median logged tokens/s and its wall seconds."""
    runs = Path(tempfile.mkdtemp(dir=workdir))
    args = [*launcher, "-m", "edgecraft", "train", str(RECIPE), "--runs-dir", str(runs)]
    args += sum((["--set", o] for o in overrides), [])
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = (runs / "char-1m" / "metrics.jsonl").read_text().splitlines()
    speeds = [e["tokens_per_s"] for e in map(json.loads, lines) if e["event"] == "train"][1:]
    return {"tokens_per_s": statistics.median(speeds), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="text file (default: the recipe's builtin:python-docs)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "train_ddp")
    opts = parser.parse_args()

    info = harness.RunInfo("Training throughput: 1 process vs torchrun DDP (recipes/char-1m.toml)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = [
            f"train.max_steps={opts.steps}", "train.log_every=5", "train.eval_batches=1",
            f"train.eval_every={opts.steps}", f"train.sample_every={opts.steps + 1}",
            f"train.checkpoint_every={opts.steps}", f"train.device={opts.device}",
            f"data.cache_dir={json.dumps(str(work / 'cache'))}",
        ]
        if opts.corpus:
            common.append(f"data.source={json.dumps(str(opts.corpus.resolve()))}")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        if opts.device == "cpu":
            rows = {
                "1 process x 2 threads": ([sys.executable], ["train.threads=2"]),
                "1 process x 1 thread": ([sys.executable], ["train.threads=1"]),
                "2 processes x 1 thread": ([*torchrun, "--nproc_per_node=2"], ["train.batch_size=16", "train.threads=1"]),
            }
        else:
            import torch

            gpus = torch.cuda.device_count()
            rows = {"1 process, 1 GPU": ([sys.executable], [])}
            if gpus > 1 and 32 % gpus == 0:
                rows[f"{gpus} processes, {gpus} GPUs"] = ([*torchrun, f"--nproc_per_node={gpus}"], [f"train.batch_size={32 // gpus}"])
        calls = {name: (lambda l=launcher, o=extra: train_row(work, l, common + o)) for name, (launcher, extra) in rows.items()}
        results = harness.interleave(calls, opts.rounds)

    table = ["| layout | tokens/s (median) | per round | wall s (median) |", "|---|---:|---|---:|"]
    summary = {}
    for name, runs in results.items():
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        summary[name] = {"tokens_per_s": speed, "wall_s": wall, "rounds": runs}
        per_round = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
        table.append(f"| {name} | {speed:,.0f} | {per_round} | {wall:.1f} |")
    first, *others = summary
    ratios = "; ".join(f"{o}: {summary[o]['tokens_per_s'] / summary[first]['tokens_per_s']:.2f}x {first}" for o in others)
    body = "\n".join(table) + f"\n\n{opts.steps} steps per run, {opts.rounds} rounds after a warm-up round. {ratios}.\n"
    info.write(opts.out, body, summary)
    print(info.markdown(body))


if __name__ == "__main__":
    main()
