"""Decode speed of edgecraft's exported graph vs a plain torch.onnx.export graph, side by side.

    python benchmarks/decode_speed.py [--run runs/NAME] [--runs 7] [--out benchmarks/results/decode_speed.md]
    python benchmarks/decode_speed.py --save-graphs DIR      # build the three graphs and stop
    python benchmarks/decode_speed.py --graphs DIR ...       # measure prebuilt graphs (another machine)

The model is the 1M-parameter character shape (recipes/char-1m: d_model 128, 6 layers, 8 heads,
d_ff 512, block 256, vocab 65, GPT-2 style) with random weights, or a trained run's weights with
--run. Rows, all measured in this one process, interleaved round by round so that a busy machine
slows every row alike (one thread count after the other: the spinning pool threads of a
multi-thread session disturb one-thread rows):

- edgecraft: the direct-built graph (edgecraft.export.graph) driven by edgecraft.runtime.Engine
  (IO binding, KV buffers shared between past and present)
- edgecraft llama-style: the same shape with RMSNorm, rotary positions, SwiGLU, no biases
- plain: torch.onnx.export (dynamo, the default of torch 2.13) of the same model with an explicit
  cache, onnxruntime's default optimisation, a Python loop over InferenceSession.run feeding the
  previous step's present.* back as past.* -- the 2,789 tok/s anchor in /work/shared/ANCHORS.md

Denormals are flushed to zero for every row: edgecraft's engine asks for it, and onnxruntime
applies the first session's setting to the calling thread for the whole process, so the rows could
not differ anyway; every session here asks for it explicitly so that no creation order decides.
(It matters for prompts: a 64-token prefill of the plain graph without it is ~25% slower too.)

Figures: batch-1 greedy decode tokens/s (a 1-token prompt, 200 new tokens, median of --runs after
a warm-up), time to first token after a 64-token prompt (state reset + prefill + argmax), batch-16
aggregate decode tokens/s, and a breakdown of where one edgecraft decode step's time goes.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # the numpy floor row: one core, like the graphs at 1 thread
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

from edgecraft.export.graph import graph_io
from edgecraft.model import GPTConfig
from edgecraft.runtime.engine import SESSION_CONFIG, Engine

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
        for key, value in SESSION_CONFIG.items():  # see the module docstring
            so.add_session_config_entry(key, value)
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
    """Median figures per runner, rounds interleaved across runners, so a machine that gets
    busier or quieter during the run shifts every row alike."""
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


def _cpu_best(fn, reps: int) -> float:
    """µs per call of fn: CPU time of this process (less sensitive to other processes than the
    wall clock), best of 5 blocks of `reps` calls."""
    times = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        times.append((time.process_time() - t0) / reps * 1e6)
    return min(times)


def _bound(session: ort.InferenceSession, values: dict) -> ort.IOBinding:
    """Inputs bound from `values`; present.* bound to their past buffers, as the Engine does."""
    binding = session.io_binding()
    bound = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()}
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        past = out.name.replace("present.", "past_key_values.", 1)
        if past in bound:
            binding.bind_ortvalue_output(out.name, bound[past])
        else:
            binding.bind_output(out.name)
    return binding


def _subgraph(model: onnx.ModelProto, op_type: str, block: int) -> tuple[onnx.ModelProto, dict]:
    """Only the `op_type` nodes of `model`, each fed from fresh inputs: the same weights and
    kernels, none of the rest. Returns the graph and input values for a batch-1 step at 100."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    declared = {i.name: i for i in g.input}
    # GroupQueryAttention reads seqlens_k squeezed to (B,) by the graph's one Squeeze node
    declared["seqlens"] = helper.make_tensor_value_info("seqlens", onnx.TensorProto.INT32, ["batch_size"])
    nodes, inputs, values, outputs, used = [], {}, {}, [], set()
    for k, node in enumerate(n for n in g.node if n.op_type == op_type):
        ins = list(node.input)
        for j, name in enumerate(ins):
            if not name or name in inits:
                used.add(name)
                continue
            if name in declared:
                inputs[name] = declared[name]
                continue
            width = (inits[ins[1]].dims[0] if op_type == "MatMul" else 3 * model_width(model))
            ins[j] = f"x{width}"
            inputs[ins[j]] = helper.make_tensor_value_info(ins[j], onnx.TensorProto.FLOAT, [1, 1, width])
        outs = [f"out{k}_{j}" if o else "" for j, o in enumerate(node.output)]
        if op_type == "GroupQueryAttention":  # the cache stays shared: present = past, bound alike
            outs[1:3] = list(node.output[1:3])
        nodes.append(helper.make_node(node.op_type, ins, outs, name=node.name, domain=node.domain))
        nodes[-1].attribute.extend(node.attribute)
        outputs += [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs if o]
    graph = helper.make_graph(nodes, op_type, list(inputs.values()), outputs,
                              initializer=[inits[n] for n in used if n])
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    step = {"seqlens": np.array([100], np.int32), "total_sequence_length": np.array([101], np.int32)}
    for name, info in inputs.items():
        if name in step:
            values[name] = step[name]
        elif name.startswith("x"):
            values[name] = np.random.default_rng(0).random((1, 1, int(name[1:])), dtype=np.float32)
        else:  # a KV buffer
            sizes = {"batch_size": 1, "max_sequence_length": block}
            dims = [d.dim_value or sizes[d.dim_param] for d in info.type.tensor_type.shape.dim]
            values[name] = np.zeros(dims, np.float32)
    return sub, values


def model_width(model: onnx.ModelProto) -> int:
    return next(t.dims[1] for t in model.graph.initializer if t.name == "tok_emb.weight")


def step_breakdown(runner: EdgecraftRunner, path: Path, reps: int = 1000) -> dict:
    """Where one batch-1 decode step's time goes at position 100 (CPU µs per step)."""
    e = runner.engine
    e.reset(1)
    e.prefill(np.zeros((1, 100), dtype=np.int64))
    ids = np.zeros(1, dtype=np.int64)

    def step():
        e.lengths[:] = 100
        e.decode(ids).argmax(-1)

    figures = {"decode() + argmax: the whole step": _cpu_best(step, reps)}
    e._seqlens[:] = 100
    e._total[...] = 101
    e._step_pos[:] = 100
    figures["run_with_iobinding: the graph"] = _cpu_best(lambda: e.session.run_with_iobinding(e._step_binding), reps)
    session = e.session

    class NoGraph:  # the step's Python alone: decode() with the graph call stubbed out
        def run_with_iobinding(self, binding):
            pass

    e.session = NoGraph()
    figures["Python in decode() + argmax"] = _cpu_best(step, reps * 10)
    e.session = session

    feeds = {"input_ids": np.zeros((1, 1), np.int64), "seqlens_k": np.array([[100]], np.int32),
             "total_sequence_length": np.array([101], np.int32)}
    if "position_ids" in {i.name for i in session.get_inputs()}:
        feeds["position_ids"] = np.full((1, 1), 100, np.int64)
    kv = {f"past_key_values.{i}.{k}": np.zeros(e._kv[0].shape, np.float32)
          for i in range(e._n_layers) for k in ("key", "value")}
    figures["InferenceSession.run instead (numpy in, cache copied in and out)"] = _cpu_best(
        lambda: session.run(None, {**feeds, **kv}), reps // 4
    )

    model = onnx.load(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for op_type, label in (("MatMul", "the 25 MatMuls alone (same weights)"),
                           ("GroupQueryAttention", "the 6 GroupQueryAttention alone")):
        sub, values = _subgraph(model, op_type, e.block_size)
        s = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        binding = _bound(s, values)
        figures[label] = _cpu_best(lambda: s.run_with_iobinding(binding), reps)
    figures["the other nodes and the session (by difference)"] = (
        figures["run_with_iobinding: the graph"] - figures["the 25 MatMuls alone (same weights)"]
        - figures["the 6 GroupQueryAttention alone"]
    )
    weights = sum(np.prod(t.dims) * 4 for t in model.graph.initializer if t.name.endswith(".weight.T"))
    matrix = np.random.default_rng(0).random((int(weights // 512), 128), dtype=np.float32)
    vector = np.ones(128, np.float32)
    figures[f"floor: numpy gemv over all matrix weights ({weights / 1e6:.2f} MB)"] = _cpu_best(
        lambda: matrix @ vector, reps // 4
    )
    return figures


GRAPHS = {  # name -> (file, runner, llama-style)
    "edgecraft": ("edgecraft.onnx", "edgecraft", False),
    "edgecraft llama-style": ("llama.onnx", "edgecraft", True),
    "plain torch.onnx.export + session.run": ("plain.onnx", "plain", False),
}


def export_traced(model, path: Path, opset: int = 18) -> None:
    """torch.onnx.export (dynamo) of the model with an explicit cache: the baseline graph.

    Inputs input_ids (B, S), past.i.key/value (B, nh, P, hs) with P >= 0; outputs logits (B, S, V)
    and present.i.key/value (B, nh, P + S, hs). The example has P > 0 and S > 1 so the traced
    attention is the general masked branch, which is also right for P = 0 and S = 1.
    """
    import torch

    class CacheIO(torch.nn.Module):  # GPT.forward with the cache as positional tensors
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, idx: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, _, present = self.model(idx, cache=cache)
            return (logits, *(t for kv in present for t in kv))

    cfg = model.cfg
    L = cfg.n_layers
    names_in = ["input_ids"] + [f"past.{i}.{k}" for i in range(L) for k in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    idx = torch.zeros(2, 3, dtype=torch.long)
    past = [torch.zeros(2, cfg.n_heads, 2, cfg.head_size) for _ in range(2 * L)]
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length", max=cfg.block_size)
    n_past = torch.export.Dim("past_sequence_length", max=cfg.block_size)
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: n_past} for _ in range(2 * L)))
    torch.onnx.export(
        CacheIO().eval(), (idx, *past), str(path), input_names=names_in,
        output_names=names_out, dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True,
        verbose=False,
    )


def save_graphs(out: Path, run: Path | None) -> None:
    """Build the three graphs into `out` (needs torch), with the model config beside them."""
    import torch

    from edgecraft.checkpoint import load_model
    from edgecraft.export.writer import write_onnx
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
    for key, value in SESSION_CONFIG.items():  # see the module docstring
        so.add_session_config_entry(key, value)
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
        f"after a warm-up, wall clock, one thread count after the other. Command: `python benchmarks/decode_speed.py "
        f"{' '.join(sys.argv[1:])}`.", "",
        "| graph | nodes as shipped | after onnxruntime's ALL-level optimiser |", "|---|---|---|",
    ]
    for name, (file, _, _) in GRAPHS.items():
        path = graphs / file
        lines.append(f"| {name} | {len(onnx.load(str(path)).graph.node)} | {node_count(path, 'ORT_ENABLE_ALL')} |")
    lines.append("")
    thread_counts = [int(t) for t in args.threads.split(",")]
    results, breakdown, same = {}, None, None
    # one thread count at a time, its graphs interleaved: the idle pool threads of a multi-thread
    # session spin after each run and took 3% of one-thread decode and 13% of its TTFT when the
    # counts were interleaved in one process
    for threads in thread_counts:
        by_name, prompts = load_graphs(graphs, threads)
        runners = {(name, threads): runner for name, runner in by_name.items()}
        results.update(measure(runners, prompts, args.runs))
        if threads == 1:
            ours, plain = by_name["edgecraft"], by_name["plain torch.onnx.export + session.run"]
            same = ours.decode(prompts["b1"], 50)[1] == plain.decode(prompts["b1"], 50)[1]
            breakdown = step_breakdown(ours, graphs / "edgecraft.onnx")
        del by_name, runners
    for threads in thread_counts:
        base = results[("plain torch.onnx.export + session.run", threads)]["b1"]
        lines += [
            f"## {threads} thread{'s' if threads > 1 else ''}", "",
            "| graph | batch-1 decode tok/s | vs plain | TTFT, 64-token prompt (ms) | batch-16 aggregate tok/s | batch 16 / batch 1 |",
            "|---|---|---|---|---|---|",
        ]
        for (name, t), r in results.items():
            if t == threads:
                lines.append(
                    f"| {name} | {r['b1']:,.0f} | {r['b1'] / base:.2f}x | {r['ttft']:.2f} | "
                    f"{r['b16']:,.0f} | {r['b16'] / r['b1']:.1f}x |"
                )
        lines += ["", f"Per-round batch-1 tok/s, edgecraft: "
                  f"{[round(x) for x in results[('edgecraft', threads)]['b1_all']]}; plain: "
                  f"{[round(x) for x in results[('plain torch.onnx.export + session.run', threads)]['b1_all']]}.", ""]
    if breakdown is not None:
        lines += [f"Greedy tokens of edgecraft and plain identical for 50 steps: {same}.", "",
                  "Where one edgecraft batch-1 decode step goes at position 100, 1 thread (CPU µs of "
                  "this process, best of 5 blocks):", "", "| part | µs |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in breakdown.items()]
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
