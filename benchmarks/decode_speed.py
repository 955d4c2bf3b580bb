"""Decode speed of edgecraft's runtime against a plain torch.onnx.export graph, side by side.

    python benchmarks/decode_speed.py [--run runs/NAME] [--runs 7] [--threads 1,2] [--out FILE.md]
    python benchmarks/decode_speed.py --save-graphs DIR [--run runs/NAME]   # build the graphs and stop (needs torch)
    python benchmarks/decode_speed.py --graphs DIR ...                      # measure them (another machine)
    python benchmarks/decode_speed.py --tree ../before ...                   # before/after: another checkout's runtime

The model is the run's (--run), else recipes/char-1m.toml's shape (d_model 128, 6 layers, 8 heads,
d_ff 512, block 256, GPT-2 style, tiny-shakespeare's 65 characters) with random weights. Rows,
interleaved round by round so that a busy machine slows every row alike, one thread count after
the other (the spinning pool threads of a multi-thread session disturb one-thread rows):

- edgecraft: the run's bundle (`edgecraft export`) through edgecraft.runtime.load: the bare engine
  loop (reset, prefill, decode + argmax) and Model.generate (greedy, text in and out)
- edgecraft llama-style: the same shape with RMSNorm, rotary positions, SwiGLU, no biases (random
  weights) on edgecraft's engine
- plain: torch.onnx.export (dynamo) of the same model with an explicit cache, onnxruntime's
  default optimisation, a Python loop over InferenceSession.run feeding the previous step's
  present.* back as past.* -- the 2,789 tok/s anchor in the team's shared/ANCHORS.md
- with --tree DIR (a checkout, e.g. `git archive 94b8ee4 | tar -x -C DIR`): the edgecraft row of
  that checkout's code (its own random-weights run and export) beside this checkout's, each in a
  fresh process per round so both are measured alike

Denormals are flushed to zero for every row: edgecraft's engine asks for it, and onnxruntime
applies the first session's setting to the calling thread for the whole process, so the rows could
not differ anyway; every session here asks for it explicitly so that no creation order decides.

Figures: batch-1 greedy decode tokens/s (a 1-token prompt, 200 new tokens, the 199 one-token
steps after the first), Model.generate tokens/s (200 tokens after a 1-token text prompt, all
included), time to first token after a 64-token prompt (reset + prefill + argmax, best of 5),
batch-16 aggregate decode tokens/s, and where one edgecraft decode step's time goes.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # the numpy floor row: one core, like the graphs at 1 thread
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import harness

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
NEW_TOKENS, PROMPT = 200, 64
EDGECRAFT, LLAMA_ROW, PLAIN = "edgecraft", "edgecraft llama-style", "plain torch.onnx.export + session.run"
FILES = {EDGECRAFT: "bundle/model.onnx", LLAMA_ROW: "llama.onnx", PLAIN: "plain.onnx"}


# ------------------------------------------------------------------------------------ runners


class EngineRunner:
    """An edgecraft engine (the bare loop) and, over a bundle, the Model around it."""

    def __init__(self, engine, model=None) -> None:
        self.engine, self.model = engine, model

    def decode(self, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
        """Greedy: seconds of the n - 1 steps after the prompt (B, P); the first row's tokens."""
        tokens, _, seconds, _ = harness.greedy(self.engine, prompt, n)
        return seconds, tokens[0].tolist()

    def ttft(self, prompt: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.engine.reset(prompt.shape[0])
        self.engine.prefill(prompt)[:, -1].argmax(-1)
        return time.perf_counter() - t0


def bundle_runner(bundle: Path, threads: int) -> EngineRunner:
    """Through `load`, the API both this checkout and older ones (--tree) have."""
    from edgecraft.runtime import load

    model = load(bundle, threads=threads)
    return EngineRunner(model.engine, model)


class PlainRunner:
    """The baseline: a traced graph, InferenceSession.run, present.* fed back as past.*."""

    def __init__(self, path: Path, cfg, threads: int) -> None:
        import onnxruntime as ort

        from edgecraft.runtime.onnx_engine import SESSION_CONFIG

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        for key, value in SESSION_CONFIG.items():  # see the module docstring
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs()][1:]
        self.cache = (cfg.n_kv_heads, 0, cfg.head_size)

    def _first(self, prompt: np.ndarray) -> list[np.ndarray]:
        empty = {n: np.zeros((prompt.shape[0], *self.cache), dtype=np.float32) for n in self.past_names}
        return self.session.run(None, {"input_ids": prompt, **empty})

    def decode(self, prompt: np.ndarray, n: int) -> tuple[float, list[int]]:
        out = self._first(prompt)
        tok = out[0][:, -1].argmax(-1)
        tokens = [int(tok[0])]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = self.session.run(None, {"input_ids": tok[:, None], **dict(zip(self.past_names, out[1:]))})
            tok = out[0][:, -1].argmax(-1)
            tokens.append(int(tok[0]))
        return time.perf_counter() - t0, tokens

    def ttft(self, prompt: np.ndarray) -> float:
        t0 = time.perf_counter()
        self._first(prompt)[0][:, -1].argmax(-1)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ measuring


def measure(runner, prompts: dict) -> dict:
    """One round of one row: batch-1 and batch-16 decode tok/s, TTFT ms, generate tok/s."""
    b1, tokens = runner.decode(prompts["b1"], NEW_TOKENS)
    out = {"b1": (NEW_TOKENS - 1) / b1, "ttft": harness.best_time(lambda: runner.ttft(prompts["ttft"])) * 1e3,
           "b16": 16 * (NEW_TOKENS - 1) / runner.decode(prompts["b16"], NEW_TOKENS)[0], "tokens": tokens}
    if getattr(runner, "model", None) is not None:
        t0 = time.perf_counter()
        runner.model.generate("\n", NEW_TOKENS, temperature=0)
        out["generate"] = NEW_TOKENS / (time.perf_counter() - t0)
    return out


def make_prompts(vocab_size: int) -> dict:
    rng = np.random.default_rng(0)
    return {"b1": rng.integers(0, vocab_size, (1, 1)), "ttft": rng.integers(0, vocab_size, (1, PROMPT)),
            "b16": rng.integers(0, vocab_size, (16, 1))}


def child_row(spec: dict) -> dict:
    """A fresh process's round of a bundle row (--tree): a warm-up, then one measurement."""
    runner = bundle_runner(Path(spec["bundle"]), spec["threads"])
    prompts = make_prompts(runner.engine.vocab_size)
    measure(runner, prompts)
    return measure(runner, prompts)


def child_export(spec: dict) -> str:
    """In a --tree checkout: a random-weights run made and exported by that checkout's code."""
    work = Path(spec["work"])
    run = harness.random_run(work)
    harness.edgecraft_cli("export", str(run), "--out", str(work / "bundle"), "--force", tree=Path(spec["tree"]))
    return str(work / "bundle")


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


def _subgraph(model, op_type: str, block: int):
    """Only the `op_type` nodes of `model`, each fed from fresh inputs: the same weights and
    kernels, none of the rest. Returns the graph and input values for a batch-1 step at 100."""
    import onnx
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    declared = {i.name: i for i in g.input}
    # GroupQueryAttention reads seqlens_k squeezed to (B,) by the graph's one Squeeze node
    declared["seqlens"] = helper.make_tensor_value_info("seqlens", onnx.TensorProto.INT32, ["batch_size"])
    width = next(t.dims[1] for t in g.initializer if t.name == "tok_emb.weight")
    nodes, inputs, outputs, used = [], {}, [], set()
    for k, node in enumerate(n for n in g.node if n.op_type == op_type):
        ins = list(node.input)
        for j, name in enumerate(ins):
            if not name or name in inits:
                used.add(name)
            elif name in declared:
                inputs[name] = declared[name]
            else:
                ins[j] = f"x{inits[ins[1]].dims[0] if op_type == 'MatMul' else 3 * width}"
                inputs[ins[j]] = helper.make_tensor_value_info(ins[j], onnx.TensorProto.FLOAT, [1, 1, int(ins[j][1:])])
        outs = [f"out{k}_{j}" if o else "" for j, o in enumerate(node.output)]
        if op_type == "GroupQueryAttention":  # the cache stays shared: present = past, bound alike
            outs[1:3] = list(node.output[1:3])
        nodes.append(helper.make_node(node.op_type, ins, outs, name=node.name, domain=node.domain))
        nodes[-1].attribute.extend(node.attribute)
        outputs += [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs if o]
    graph = helper.make_graph(nodes, op_type, list(inputs.values()), outputs, initializer=[inits[n] for n in used if n])
    step = {"seqlens": np.array([100], np.int32), "total_sequence_length": np.array([101], np.int32)}
    values = {}
    for name, info in inputs.items():
        if name in step:
            values[name] = step[name]
        elif name.startswith("x"):
            values[name] = np.random.default_rng(0).random((1, 1, int(name[1:])), dtype=np.float32)
        else:  # a KV buffer
            sizes = {"batch_size": 1, "max_sequence_length": block}
            dims = [d.dim_value or sizes[d.dim_param] for d in info.type.tensor_type.shape.dim]
            values[name] = np.zeros(dims, np.float32)
    # the source graph's IR version: older onnxruntime refuses the onnx package's newest
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version), values


def _bound(session, values: dict):
    """Inputs bound from `values`; present.* bound to their past buffers, as the engine does."""
    import onnxruntime as ort

    binding = session.io_binding()
    bound = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()}
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        past = out.name.replace("present.", "past_key_values.", 1)
        binding.bind_ortvalue_output(out.name, bound[past]) if past in bound else binding.bind_output(out.name)
    return binding


def step_breakdown(e, path: Path, reps: int = 1000) -> dict:
    """Where one batch-1 decode step of OnnxEngine `e` goes at position 100 (CPU µs per step)."""
    import onnx
    import onnxruntime as ort

    e.reset(1)
    e.prefill(np.zeros((1, 100), dtype=np.int64))
    ids = np.zeros(1, dtype=np.int64)

    def step():
        e.lengths[:] = 100
        e.decode(ids).argmax(-1)

    figures = {"decode() + argmax: the whole step": _cpu_best(step, reps)}
    session, binding, out = e._step(1)  # the step's session and binding, inputs as step() left them
    figures["run_with_iobinding: the graph"] = _cpu_best(lambda: session.run_with_iobinding(binding), reps)

    class NoGraph:  # the step's Python alone: decode() with the graph call stubbed out
        def run_with_iobinding(self, binding):
            pass

    e._steps[1] = (NoGraph(), binding, out)
    figures["Python in decode() + argmax"] = _cpu_best(step, reps * 10)
    e._steps[1] = (session, binding, out)
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "seqlens_k": np.array([[100]], np.int32),
             "total_sequence_length": np.array([101], np.int32)}
    if "position_ids" in {i.name for i in session.get_inputs()}:
        feeds["position_ids"] = np.full((1, 1), 100, np.int64)
    kv = {f"past_key_values.{i}.{k}": np.zeros(e._kv[0].shape, np.float32)
          for i in range(e._n_layers) for k in ("key", "value")}
    figures["InferenceSession.run instead (numpy in, cache copied in and out)"] = _cpu_best(
        lambda: session.run(None, {**feeds, **kv}), reps // 4)
    model = onnx.load(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    parts = {}
    for op_type in ("MatMul", "GroupQueryAttention"):
        sub, values = _subgraph(model, op_type, e.block_size)
        s = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        b = _bound(s, values)
        parts[op_type] = _cpu_best(lambda: s.run_with_iobinding(b), reps)
        figures[f"the {len(sub.graph.node)} {op_type} alone (same weights)"] = parts[op_type]
    graph = figures["run_with_iobinding: the graph"]
    figures["the other nodes and the session (by difference)"] = graph - sum(parts.values())
    weights = sum(np.prod(t.dims) * 4 for t in model.graph.initializer if t.name.endswith(".weight.T"))
    matrix = np.random.default_rng(0).random((int(weights // 512), 128), dtype=np.float32)
    vector = np.ones(128, np.float32)
    floor = f"floor: numpy gemv over all matrix weights ({weights / 1e6:.2f} MB)"
    figures[floor] = _cpu_best(lambda: matrix @ vector, reps // 4)
    return figures


# ------------------------------------------------------------------------------------ graphs


def export_traced(model, path: Path) -> None:
    """torch.onnx.export (dynamo) of the model with an explicit cache: the baseline graph.

    Inputs input_ids (B, S), past.i.key/value (B, nkv, P, hs) with P >= 0; outputs logits (B, S, V)
    and present.i.key/value (B, nkv, P + S, hs). The example has P > 0 and S > 1 so the traced
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

    cfg, L = model.cfg, model.cfg.n_layers
    kinds = [f"{i}.{k}" for i in range(L) for k in ("key", "value")]
    past = [torch.zeros(2, cfg.n_kv_heads, 2, cfg.head_size) for _ in range(2 * L)]
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length", max=cfg.block_size)
    n_past = torch.export.Dim("past_sequence_length", max=cfg.block_size)
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: n_past} for _ in range(2 * L)))
    torch.onnx.export(
        CacheIO().eval(), (torch.zeros(2, 3, dtype=torch.long), *past), str(path),
        input_names=["input_ids"] + [f"past.{k}" for k in kinds],
        output_names=["logits"] + [f"present.{k}" for k in kinds],
        dynamic_shapes=shapes, opset_version=18, dynamo=True, verbose=False,
    )


def save_graphs(out: Path, run: Path | None) -> None:
    """The run's bundle, the llama-style graph and the plain graph into `out` (needs torch)."""
    import torch

    from edgecraft.checkpoint import load_model
    from edgecraft.config import GPTConfig
    from edgecraft.export.writer import write_onnx
    from edgecraft.model import GPT

    out.mkdir(parents=True, exist_ok=True)
    source = str(run) if run else "random"
    run = run or harness.random_run(out)
    harness.edgecraft_cli("export", str(run), "--out", str(out / "bundle"), "--force")
    gpt = load_model(run / "model.safetensors").eval()
    torch.manual_seed(0)
    llama_cfg = GPTConfig(**{**gpt.cfg.to_dict(), **LLAMA})
    write_onnx(GPT(llama_cfg).eval(), out / FILES[LLAMA_ROW], 17)
    export_traced(gpt, out / FILES[PLAIN])
    saved = {"config": gpt.cfg.to_dict(), "llama": llama_cfg.to_dict(), "weights": source}
    (out / "config.json").write_text(json.dumps(saved))


def node_count(path: Path, level: str = "ORT_ENABLE_ALL") -> int:
    import onnx
    import onnxruntime as ort

    from edgecraft.runtime.onnx_engine import SESSION_CONFIG

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(path) + f".{level}.onnx"
    so.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():  # see the module docstring
        so.add_session_config_entry(key, value)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


# ------------------------------------------------------------------------------------ main


def measure_all(graphs: Path, args: argparse.Namespace, work: Path) -> str:
    import onnx

    from edgecraft.config import GPTConfig
    from edgecraft.runtime.onnx_engine import OnnxEngine

    saved = json.loads((graphs / "config.json").read_text())
    cfg, llama_cfg = GPTConfig(**saved["config"]), GPTConfig(**saved["llama"])
    trees = {}
    for tree in args.tree:
        label = f"edgecraft @ {tree.resolve().name}"
        spec = {"work": str(work / tree.name), "tree": str(tree)}
        trees[label] = (tree, harness.child(__file__, "export", spec, tree=tree))
    if trees:
        trees["edgecraft @ this checkout"] = (None, str(graphs / "bundle"))
    weights = "random weights" if saved["weights"] == "random" else "weights of " + saved["weights"]
    lines = [
        f"Model: {cfg.d_model} wide, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, block "
        f"{cfg.block_size}, vocab {cfg.vocab_size} ({weights}); batch-1 greedy decode of {NEW_TOKENS} tokens after a "
        f"1-token prompt, Model.generate of {NEW_TOKENS} tokens, time to first token after a {PROMPT}-token "
        f"prompt, batch 16 aggregate; medians of {args.runs} interleaved rounds after a warm-up, wall clock, "
        "one thread count after the other.", "",
        "| graph | nodes as shipped | after onnxruntime's ALL-level optimiser |", "|---|---|---|",
    ]
    lines += [f"| {name} | {len(onnx.load(str(graphs / f)).graph.node)} | {node_count(graphs / f)} |"
              for name, f in FILES.items()]
    prompts = make_prompts(cfg.vocab_size)
    results, breakdown = {}, None
    for threads in args.threads:
        runners = {EDGECRAFT: bundle_runner(graphs / "bundle", threads),
                   LLAMA_ROW: EngineRunner(OnnxEngine(graphs / FILES[LLAMA_ROW], llama_cfg, threads=threads)),
                   PLAIN: PlainRunner(graphs / FILES[PLAIN], cfg, threads)}
        rows = {name: (lambda r=r: measure(r, prompts)) for name, r in runners.items()}
        rows |= {name: (lambda t=t, b=b: harness.child(__file__, "row", {"bundle": b, "threads": threads}, tree=t))
                 for name, (t, b) in trees.items()}
        results[threads] = harness.interleave(rows, args.runs)
        if threads == 1:
            breakdown = step_breakdown(runners[EDGECRAFT].engine, graphs / FILES[EDGECRAFT])
        del runners
    for threads, by_row in results.items():
        base = statistics.median(r["b1"] for r in by_row[PLAIN])
        lines += ["", f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  "| row | batch-1 decode tok/s | vs plain | Model.generate tok/s | TTFT, 64-token prompt (ms) | "
                  "batch-16 aggregate tok/s | batch 16 / batch 1 |", "|---|---|---|---|---|---|---|"]
        for name, rounds in by_row.items():
            med = {k: statistics.median(r[k] for r in rounds) for k in ("b1", "ttft", "b16", "generate")
                   if k in rounds[0]}
            gen = f"{med['generate']:,.0f}" if "generate" in med else "–"
            lines.append(f"| {name} | {med['b1']:,.0f} | {med['b1'] / base:.2f}x | {gen} | {med['ttft']:.2f} | "
                         f"{med['b16']:,.0f} | {med['b16'] / med['b1']:.1f}x |")
        lines += ["", "Per-round batch-1 tok/s: " + "; ".join(
            f"{name} {[round(r['b1']) for r in rounds]}" for name, rounds in by_row.items()) + "."]
    first = results[args.threads[0]]
    same = first[EDGECRAFT][-1]["tokens"] == first[PLAIN][-1]["tokens"]
    lines += ["", f"Greedy tokens of edgecraft and plain identical for {NEW_TOKENS} steps: {same}."]
    if breakdown is not None:
        lines += ["", "Where one edgecraft batch-1 decode step goes at position 100, 1 thread (CPU µs of this "
                  "process, best of 5 blocks):", "", "| part | µs |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in breakdown.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: recipes/char-1m.toml's shape, random weights)")
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (after one warm-up)")
    parser.add_argument("--threads", type=harness.int_list, default=[1, 2], help="thread counts, e.g. 1 or 1,2")
    parser.add_argument("--out", type=Path, help="also write the report here (e.g. benchmarks/results/decode_speed.md)")
    parser.add_argument("--save-graphs", type=Path, help="only build the graphs into this directory")
    parser.add_argument("--graphs", type=Path, help="measure the graphs built by --save-graphs")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another edgecraft checkout whose runtime is measured beside this one's (repeatable)")
    args = parser.parse_args()
    if args.save_graphs:
        save_graphs(args.save_graphs, args.run)
        return
    info = harness.RunInfo("Decode speed: edgecraft's runtime vs a plain torch.onnx.export graph")
    with tempfile.TemporaryDirectory() as tmp:
        graphs = args.graphs
        if graphs is None:
            graphs = Path(tmp) / "graphs"
            save_graphs(graphs, args.run)
        body = measure_all(graphs, args, Path(tmp))
    print(info.markdown(body))
    if args.out:
        info.write(args.out, body)


if __name__ == "__main__":
    if not harness.serve_child({"row": child_row, "export": child_export}):
        main()
