"""Where a batch-1 fp32 decode step goes, edgecraft's llama-style graph against llama2.c's run.c.

    python benchmarks/fp32_parts.py --run runs/char-1m-llama --runc llama2c/run-parts [--rounds 11] \
        [--out benchmarks/results/int4-peers/fp32_parts]

Issue 16 asks edgecraft fp32 >= run.c (benchmarks/peers_llama2c.py). This splits both steps in
thread/process CPU time, positions 1..255 of one sequence as there:
- run.c whole, and run.c with its attention loop skipped (NOATT set): the difference is its
  attention. `--runc` is run.c (the version peers_llama2c.py names) with two edits, built with
  the same flags (gcc -O3 -march=native -ffast-math ... -lm): in forward(), the heads loop
  `for (h = 0; h < p->n_heads; h++)` gets `if (!getenv("NOATT"))` in front (the `#pragma omp`
  line above it removed), and generate()'s `if (next == 1) { break; }` is dropped, so that
  every run computes all positions whatever it emits (the weights are written in edgecraft's
  token order here, with no stand-in BOS).
- edgecraft's step (the engine's decode loop); its 31 MatMul nodes alone, one call at one row
  (with onnxruntime's prepacked weights, and without); its 6 GroupQueryAttention nodes alone
  over positions 1..255 (KV buffers bound as in the engine). The remainder of the step is the
  other 27 nodes (norms, SwiGLU, gathers) and onnxruntime's per-node and per-call cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

import harness
from edgecraft.export.graph import build_graph
from edgecraft.runtime.onnx_engine import OnnxEngine, session_options
from peers_llama2c import load_weights, write_llama2c, write_tokenizer


def runc_cpu_per_position(binary: str, tmp: Path, steps: int, noatt: bool) -> float:
    """run.c's CPU seconds per position over positions 1..steps-1: a full run less a 1-position run."""
    env = {k: v for k, v in os.environ.items() if k != "NOATT"} | ({"NOATT": "1"} if noatt else {})

    def cpu(n: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([binary, str(tmp / "model.bin"), "-z", str(tmp / "tokenizer.bin"), "-t", "0", "-n", str(n),
                        "-i", "ROMEO:"], capture_output=True, env=env, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    return (cpu(steps) - cpu(1)) / (steps - 1)


def sub_session(model: onnx.ModelProto, op_types: set[str], no_prepack: bool = False) -> ort.InferenceSession:
    """A session over the graph's nodes of `op_types` alone, each reading graph inputs (the same
    names as in the model, so the engine's inputs and caches bind to it)."""
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    produced = {o for n in nodes for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    names = [i for n in nodes for i in n.input if i and i not in produced and i not in inits]
    dims = {"x128": 128, "x512": 512}
    inputs, rename = [], {}
    for n in nodes:  # an activation input is replaced by a graph input of its width
        if n.op_type == "MatMul":
            k = inits[n.input[1]].dims[0]
            rename[n.input[0]] = f"x{k}"
    for name in dict.fromkeys(rename.values()):
        inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 1, dims[name]]))
    io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for name in dict.fromkeys(names):
        if name not in rename:
            inputs.append(io[name] if name in io else helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        if c.op_type == "MatMul":
            c.input[0] = rename[n.input[0]]
        copies.append(c)
    used = {i for n in copies for i in n.input}
    outputs = [io[o] if o in io else helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
               for n in copies for o in n.output if o not in used]
    graph = helper.make_graph(copies, "part", inputs, outputs, initializer=[t for t in model.graph.initializer if t.name in used])
    part = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    so = session_options(1)
    if no_prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(part.SerializeToString(), so, providers=["CPUExecutionProvider"])


def matmuls_us(session: ort.InferenceSession, calls: int = 200) -> float:
    feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    session.run(None, feed)
    t0 = time.thread_time()
    for _ in range(calls):
        session.run(None, feed)
    return (time.thread_time() - t0) / calls * 1e6


def attention_us(session: ort.InferenceSession, cfg, steps: int) -> float:
    """The attention nodes over positions 1..steps-1 of one sequence, µs a step."""
    qkv = [i.name for i in session.get_inputs() if i.name.endswith("/MatMul")]  # each layer's q, k, v
    kv = [np.zeros((1, cfg.n_kv_heads, cfg.block_size, cfg.cache_head_size), np.float32) for _ in range(2 * cfg.n_layers)]
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.cache_head_size
    x = np.random.default_rng(0).standard_normal((1, 1, width)).astype(np.float32)
    seqlens, total = np.zeros((1, 1), np.int32), np.zeros(1, np.int32)
    binding = session.io_binding()
    for name, array in ((*((q, x) for q in qkv), ("seqlens_k", seqlens), ("total_sequence_length", total))):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for i in range(cfg.n_layers):
        for j, kind in enumerate(("key", "value")):
            value = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
        binding.bind_output(f"blocks.{i}/attn")
    cpu = 0.0
    for pos in range(steps):
        seqlens[0, 0], total[0] = pos, pos + 1
        t0 = time.thread_time()
        session.run_with_iobinding(binding)
        cpu += time.thread_time() - t0 if pos else 0.0
    return cpu / (steps - 1) * 1e6


def step_us(engine: OnnxEngine, steps: int) -> float:
    """The engine's greedy decode loop over positions 1..steps-1, CPU µs a step (as peers_llama2c.py)."""
    engine.reset(1)
    tok = np.array([1], dtype=np.int64)
    engine.decode(tok)
    t0 = time.process_time()
    for _ in range(steps - 1):
        tok[0] = int(engine.decode(tok)[0].argmax())
    return (time.process_time() - t0) / (steps - 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained llama-style run directory")
    parser.add_argument("--runc", required=True, help="run.c with the two edits of the docstring")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    info = harness.RunInfo("Where the batch-1 fp32 step goes: edgecraft's llama-style graph vs llama2.c run.c")
    cfg, weights, vocab = load_weights(args.run)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = build_graph(cfg, weights)
        onnx.save(model, str(tmp / "llama.onnx"))
        write_llama2c(tmp / "model.bin", cfg, weights, np.arange(cfg.vocab_size))
        write_tokenizer(tmp / "tokenizer.bin", vocab)
        engine = OnnxEngine(tmp / "llama.onnx", cfg, threads=1)
        mm, mm_plain = sub_session(model, {"MatMul"}), sub_session(model, {"MatMul"}, no_prepack=True)
        attn = sub_session(model, {"GroupQueryAttention", "Squeeze"})
        rows = {
            "run.c step": lambda: 1e6 * runc_cpu_per_position(args.runc, tmp, args.steps, False),
            "run.c step, attention skipped": lambda: 1e6 * runc_cpu_per_position(args.runc, tmp, args.steps, True),
            "edgecraft step": lambda: step_us(engine, args.steps),
            "edgecraft: its 31 MatMuls alone (prepacked)": lambda: matmuls_us(mm),
            "edgecraft: its 31 MatMuls alone (session.disable_prepacking)": lambda: matmuls_us(mm_plain),
            "edgecraft: its 6 GroupQueryAttention alone": lambda: attention_us(attn, cfg, args.steps),
        }
        loads: list[float] = []
        done = harness.interleave(rows, args.rounds, after_round=lambda _: loads.append(os.getloadavg()[0]))
    med = {k: statistics.median(v) for k, v in done.items()}
    runc_attn = med["run.c step"] - med["run.c step, attention skipped"]
    ours_rest = med["edgecraft step"] - med["edgecraft: its 31 MatMuls alone (prepacked)"] - med["edgecraft: its 6 GroupQueryAttention alone"]
    lines = [f"Model: llama-style, width {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
             f"context {cfg.block_size}; weights of {args.run}. CPU µs per step (thread or process CPU time), "
             f"medians of {args.rounds} rounds after a warm-up, rows interleaved.", "",
             "| part | CPU µs a step (median) | per round |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.1f} | {' '.join(f'{x:.0f}' for x in v)} |" for k, v in done.items()]
    lines += ["", f"run.c's attention: {runc_attn:.1f} µs a step; the rest of its step {med['run.c step, attention skipped']:.1f} µs.",
              f"edgecraft's remainder (27 other nodes, per-node and per-call cost, the Python loop): {ours_rest:.1f} µs.",
              f"1-minute load after each round: {', '.join(f'{x:.2f}' for x in loads)}."]
    body = "\n".join(lines)
    print(info.markdown(body))
    if args.out:
        info.write(args.out, body, {"median_us": med, "rounds_us": done, "loads": loads, "runc": args.runc})


if __name__ == "__main__":
    main()
