"""Decode speed of edgecraft's exported graph vs a plain torch.onnx.export graph, side by side.

    python benchmarks/decode_speed.py [--run runs/NAME] [--runs 7] [--out benchmarks/results/decode_speed.md]
    python benchmarks/decode_speed.py --save-graphs DIR      # build the three graphs and stop
    python benchmarks/decode_speed.py --graphs DIR ...       # measure prebuilt graphs (another machine)

The model is the 1M-parameter character shape (recipes/char-1m: d_model 128, 6 layers, 8 heads,
d_ff 512, block 256, vocab 65, GPT-2 style) with random weights, or a trained run's weights with
--run. Rows, all measured in this one process, interleaved round by round so that a busy machine
slows every row alike:

- edgecraft: the direct-built graph (edgecraft.onnx_graph) driven by edgecraft.runtime.Engine
  (IO binding, KV buffers shared between past and present)
- edgecraft llama-style: the same shape with RMSNorm, rotary positions, SwiGLU, no biases
- plain: torch.onnx.export (dynamo, the default of torch 2.13) of the same model with an explicit
  cache, onnxruntime's default optimisation, a Python loop over InferenceSession.run feeding the
  previous step's present.* back as past.* -- the 2,789 tok/s anchor in /work/shared/ANCHORS.md

Figures: batch-1 greedy decode tokens/s (a 1-token prompt, 200 new tokens, median of --runs after
a warm-up), time to first token after a 64-token prompt (state reset + prefill + argmax), batch-16
aggregate decode tokens/s, and a breakdown of where one edgecraft decode step's time goes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import json

import numpy as np
import onnx
import onnxruntime as ort

from edgecraft.model import GPTConfig
from edgecraft.onnx_graph import graph_io
from edgecraft.runtime.engine import Engine

CHAR_1M = dict(vocab_size=65, d_model=128, n_layers=6, n_heads=8, d_ff=512, block_size=256)
LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
NEW_TOKENS = 200
PROMPT = 64


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if kind != "Instruction":
                caches.append(f"L{level} {(index / 'size').read_text().strip()}")
        except OSError:
            pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {', '.join(caches)} per core; Python "
        f"{platform.python_version()}, onnxruntime {ort.__version__}, numpy {np.__version__}; "
        f"load average at start {load:.2f}"
    )


# ------------------------------------------------------------------------------------ runners


class EdgecraftRunner:
    """The shipped path: Engine over the direct-built graph."""

    def __init__(self, path: Path, cfg: GPTConfig, threads: int) -> None:
        self.engine = Engine(path, {"config": cfg.to_dict(), "onnx": graph_io(cfg)}, threads=threads)

    def decode(self, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
        """Greedy: seconds for n tokens after the prompt (B, P); the first row's tokens."""
        e = self.engine
        e.reset(prompt.shape[0])
        tok = e.prefill(prompt)[:, -1].argmax(-1)
        out = [int(tok[0])]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            tok = e.decode(tok).argmax(-1)
            out.append(int(tok[0]))
        return time.perf_counter() - t0, out

    def ttft(self, prompt: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.engine.reset(prompt.shape[0])
        self.engine.prefill(prompt)[:, -1].argmax(-1)
        return time.perf_counter() - t0


class PlainRunner:
    """The baseline: a traced graph, InferenceSession.run, present.* fed back as past.*."""

    def __init__(self, path: Path, cfg: GPTConfig, threads: int) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs()][1:]
        self.cache = (cfg.n_heads, 0, cfg.head_size)

    def _empty(self, B: int) -> dict:
        return {n: np.zeros((B, *self.cache), dtype=np.float32) for n in self.past_names}

    def decode(self, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
        out = self.session.run(None, {"input_ids": prompt, **self._empty(prompt.shape[0])})
        tok = out[0][:, -1].argmax(-1)
        tokens = [int(tok[0])]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            feeds = {"input_ids": tok[:, None], **dict(zip(self.past_names, out[1:]))}
            out = self.session.run(None, feeds)
            tok = out[0][:, -1].argmax(-1)
            tokens.append(int(tok[0]))
        return time.perf_counter() - t0, tokens

    def ttft(self, prompt: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.session.run(None, {"input_ids": prompt, **self._empty(prompt.shape[0])})[0][:, -1].argmax(-1)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ measuring


def measure(runners: dict, prompts: dict, runs: int) -> dict:
    """Median figures per runner, rounds interleaved across runners."""
    raw = {name: {"b1": [], "ttft": [], "b16": []} for name in runners}
    for r in range(runs + 1):  # round 0 is the warm-up
        for name, runner in runners.items():
            b1 = runner.decode(prompts["b1"], NEW_TOKENS)[0]
            ttft = min(runner.ttft(prompts["ttft"]) for _ in range(5))
            b16 = runner.decode(prompts["b16"], NEW_TOKENS)[0]
            if r:
                raw[name]["b1"].append((NEW_TOKENS - 1) / b1)
                raw[name]["ttft"].append(ttft * 1e3)
                raw[name]["b16"].append(16 * (NEW_TOKENS - 1) / b16)
    return {
        name: {k: statistics.median(v) for k, v in figures.items()} | {"b1_all": figures["b1"]}
        for name, figures in raw.items()
    }


def step_breakdown(runner: EdgecraftRunner, reps: int = 2000) -> dict:
    """Where one batch-1 decode step's time goes (µs, best of 5 blocks of `reps`)."""
    e = runner.engine

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps * 1e6)
        return min(times)

    e.reset(1)
    e.prefill(np.zeros((1, 100), dtype=np.int64))
    ids = np.zeros(1, dtype=np.int64)

    def step():
        e.lengths[:] = 100
        e.decode(ids).argmax(-1)

    def bound_run():
        e.session.run_with_iobinding(e._step_binding)

    # the same step through InferenceSession.run: inputs copied in, outputs allocated and copied out
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "seqlens_k": np.array([100], np.int32),
             "total_sequence_length": np.array(101, np.int32), "query_seqlens": np.ones(1, np.int32)}
    names = {i.name for i in e.session.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.full((1, 1), 100, np.int64)
    kv = {f"past_key_values.{i}.{k}": e._kv[2 * i + j].numpy()
          for i in range(e._n_layers) for j, k in enumerate(("key", "value"))}

    def plain_run():
        e.session.run(["logits"], {**feeds, **kv})

    e._seqlens[:] = 100
    e._total[...] = 101
    e._step_pos[:] = 100
    figures = {
        "decode() + argmax, position 100": best(step),
        "run_with_iobinding alone": best(bound_run),
        "session.run with numpy feeds (copies the 12 cache buffers in)": best(plain_run),
    }
    figures["Python around the call (decode + argmax - bound run)"] = (
        figures["decode() + argmax, position 100"] - figures["run_with_iobinding alone"]
    )
    return figures


GRAPHS = {  # name -> (file, runner, llama-style)
    "edgecraft": ("edgecraft.onnx", "edgecraft", False),
    "edgecraft llama-style": ("llama.onnx", "edgecraft", True),
    "plain torch.onnx.export + session.run": ("plain.onnx", "plain", False),
}


def save_graphs(out: Path, run: Path | None) -> None:
    """Build the three graphs into `out` (needs torch), with the model config beside them."""
    import torch

    from edgecraft.checkpoint import load_model
    from edgecraft.export import export_traced, write_onnx
    from edgecraft.model import GPT

    torch.manual_seed(0)
    gpt = load_model(run / "model.safetensors") if run else GPT(GPTConfig(**CHAR_1M)).eval()
    llama = GPT(GPTConfig(**{**gpt.cfg.to_dict(), **LLAMA})).eval()
    out.mkdir(parents=True, exist_ok=True)
    write_onnx(gpt, out / "edgecraft.onnx", 17)
    write_onnx(llama, out / "llama.onnx", 17)
    export_traced(gpt, out / "plain.onnx")
    (out / "config.json").write_text(json.dumps({"config": gpt.cfg.to_dict(), "weights": str(run or "random")}))


def load_graphs(path: Path, threads: int) -> tuple[dict, dict]:
    """Runners over the graphs in `path`, and the prompts."""
    saved = json.loads((path / "config.json").read_text())
    cfg = GPTConfig(**saved["config"])
    runners = {}
    for name, (file, kind, llama) in GRAPHS.items():
        c = GPTConfig(**{**cfg.to_dict(), **LLAMA}) if llama else cfg
        runners[name] = (EdgecraftRunner if kind == "edgecraft" else PlainRunner)(path / file, c, threads)
    rng = np.random.default_rng(0)
    prompts = {
        "b1": rng.integers(0, cfg.vocab_size, (1, 1)),
        "ttft": rng.integers(0, cfg.vocab_size, (1, PROMPT)),
        "b16": rng.integers(0, cfg.vocab_size, (16, 1)),
    }
    return runners, prompts


def node_count(path: Path, level: str) -> int:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(path) + f".{level}.onnx"
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run directory (default: random weights)")
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (after one warm-up)")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure, e.g. 1 or 1,2")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--save-graphs", type=Path, help="only build the graphs into this directory")
    parser.add_argument("--graphs", type=Path, help="measure the graphs built by --save-graphs")
    args = parser.parse_args()
    if args.save_graphs:
        save_graphs(args.save_graphs, args.run)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        graphs = args.graphs
        if graphs is None:
            graphs = Path(tmp_name)
            save_graphs(graphs, args.run)
        report = measure_all(graphs, args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")


def measure_all(graphs: Path, args: argparse.Namespace) -> str:
    header = machine()
    print(header, file=sys.stderr)
    weights = json.loads((graphs / "config.json").read_text())["weights"]
    lines = [
        "# Decode speed: edgecraft's graph vs a plain torch.onnx.export graph", "",
        f"Machine: {header}.", "",
        f"Model: char-1m shape ({'random weights' if weights == 'random' else 'weights of ' + weights}), "
        f"batch-1 greedy decode of {NEW_TOKENS} tokens after a 1-token prompt, time to first token "
        f"after a {PROMPT}-token prompt, batch 16 aggregate; medians of {args.runs} interleaved rounds "
        f"after a warm-up, wall clock. Command: `python benchmarks/decode_speed.py "
        f"{' '.join(sys.argv[1:])}`.", "",
        "| graph | nodes as shipped | after onnxruntime's ALL-level optimiser |", "|---|---|---|",
    ]
    for name, (file, _, _) in GRAPHS.items():
        path = graphs / file
        lines.append(f"| {name} | {len(onnx.load(str(path)).graph.node)} | {node_count(path, 'ORT_ENABLE_ALL')} |")
    lines.append("")
    for threads in [int(t) for t in args.threads.split(",")]:
        runners, prompts = load_graphs(graphs, threads)
        ours, plain = runners["edgecraft"], runners["plain torch.onnx.export + session.run"]
        same = ours.decode(prompts["b1"], 50)[1] == plain.decode(prompts["b1"], 50)[1]
        results = measure(runners, prompts, args.runs)
        base = results["plain torch.onnx.export + session.run"]["b1"]
        lines += [
            f"## {threads} thread{'s' if threads > 1 else ''}", "",
            "| graph | batch-1 decode tok/s | vs plain | TTFT, 64-token prompt (ms) | batch-16 aggregate tok/s | batch 16 / batch 1 |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['b1']:,.0f} | {r['b1'] / base:.2f}x | {r['ttft']:.2f} | "
                f"{r['b16']:,.0f} | {r['b16'] / r['b1']:.1f}x |"
            )
        lines += ["", f"Greedy tokens of edgecraft and plain identical for 50 steps: {same}. "
                  f"Per-round batch-1 tok/s, edgecraft: {[round(x) for x in results['edgecraft']['b1_all']]}; "
                  f"plain: {[round(x) for x in results['plain torch.onnx.export + session.run']['b1_all']]}.", ""]
        if threads == 1:
            lines += ["Where one edgecraft batch-1 decode step goes (µs, best of 5 x 2,000 steps):", "",
                      "| part | µs |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in step_breakdown(ours).items()]
            lines.append("")
        print("\n".join(lines), file=sys.stderr)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
