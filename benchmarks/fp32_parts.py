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
- edgecraft's step (the engine's decode loop), and its counterpart of NOATT: the graph with each
  GroupQueryAttention replaced by a Slice of its query part and no KV outputs, in a bare session
  loop; its 31 MatMul nodes alone, one call at one row through an IO binding with the outputs
  preallocated, as the engine runs them (with onnxruntime's prepacked weights, and without); its
  6 GroupQueryAttention nodes alone over positions 1..255 (KV buffers bound as in the engine).
- the whole step in other forms, each checked against the shipped graph's logits and compared
  with it round by round: gate and up as one MatMul over the concatenated weights + Split
  (onnxruntime-genai's layout); the attention as com.microsoft DecoderMaskedMultiHeadAttention, a
  one-row kernel, which on the CPU has no rotary and whose packed-QKV path fails, so each layer
  gets Split + 2 RotaryEmbedding nodes in front of it (what a one-row fp32 graph would have to
  hold); each MLP (gate, up, QuickGelu, Mul, down: 5 nodes) as one com.microsoft MoE node with a
  single expert, the CPU's only SwiGLU in one node (onnxruntime's SwiGLU operator has no CPU
  kernel); and, as a control for the rows' noise, the shipped graph again in a session at
  onnxruntime's highest optimisation level (the runtime's is the basic one; the optimiser leaves
  the same 64 nodes at every level).
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
from onnx import TensorProto, helper, numpy_helper

import harness
from edgecraft.export.graph import MS, build_graph
from edgecraft.runtime.onnx_engine import OnnxEngine, session_options
from peers_llama2c import load_weights, write_llama2c, write_tokenizer


NO_ATTENTION = "edgecraft step, attention skipped (each GroupQueryAttention a Slice of q; bare session loop)"
GATE_UP = "gate and up as one MatMul + Split"
DMMHA = "attention as Split + 2 RotaryEmbedding + DecoderMaskedMultiHeadAttention"
MOE = "each MLP as one single-expert MoE node"
ALL_LEVEL = "the shipped graph again, its session at ORT_ENABLE_ALL (the same 64 nodes: a control)"


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
    """One call of the MatMul-only session, µs: inputs and outputs bound to preallocated arrays, as
    the engine binds its step (session.run's numpy outputs would add ~1 µs per output)."""
    rng = np.random.default_rng(0)
    binding, arrays = session.io_binding(), []
    for i in session.get_inputs():
        arrays.append(rng.standard_normal(i.shape).astype(np.float32))
        binding.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(arrays[-1]))
    for o in session.get_outputs():
        binding.bind_output(o.name)
    session.run_with_iobinding(binding)  # outputs allocated by onnxruntime once, then bound as arrays
    for o, value in zip(session.get_outputs(), binding.copy_outputs_to_cpu()):
        arrays.append(np.empty_like(value))
        binding.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_numpy(arrays[-1]))
    session.run_with_iobinding(binding)
    t0 = time.thread_time()
    for _ in range(calls):
        session.run_with_iobinding(binding)
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


# ------------------------------------------------------------------------------------ other forms


def _rewired(model: onnx.ModelProto, nodes: list, inits: list, drop: set[str] = frozenset(),
             outputs: bool = True) -> onnx.ModelProto:
    """`model` with `nodes`, `inits` added to its initializers and those named in `drop` removed;
    without its present outputs unless `outputs`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in out.graph.initializer if t.name not in drop]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + inits)
    if not outputs:
        kept = [o for o in out.graph.output if not o.name.startswith("present.")]
        del out.graph.output[:]
        out.graph.output.extend(kept)
    onnx.checker.check_model(out)
    return out


def gate_up_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each layer's gate and up MatMuls as one over [gate | up] and a Split."""
    w = {t.name: t for t in model.graph.initializer}
    nodes, inits, unused = [], [], set()
    for node in model.graph.node:
        if node.name.endswith(".mlp.up/MatMul"):
            continue
        if not node.name.endswith(".mlp.gate/MatMul"):
            nodes.append(node)
            continue
        p = node.name.removesuffix(".mlp.gate/MatMul")
        gate, up = (numpy_helper.to_array(w[f"{p}.mlp.{k}.weight.T"]) for k in ("gate", "up"))  # (D, F) each
        unused |= {f"{p}.mlp.gate.weight.T", f"{p}.mlp.up.weight.T"}
        inits += [numpy_helper.from_array(np.concatenate([gate, up], axis=1), f"{p}.mlp.gate_up.weight.T"),
                  numpy_helper.from_array(np.array([gate.shape[1], up.shape[1]], np.int64), f"{p}.mlp.split")]
        nodes += [helper.make_node("MatMul", [node.input[0], f"{p}.mlp.gate_up.weight.T"], [f"{p}/gate_up"],
                                   name=f"{p}.mlp.gate_up/MatMul"),
                  helper.make_node("Split", [f"{p}/gate_up", f"{p}.mlp.split"], [node.output[0], f"{p}.mlp.up/MatMul"],
                                   name=f"{p}.mlp.split", axis=-1)]
    return _rewired(model, nodes, inits, unused)


def dmmha_form(model: onnx.ModelProto, cfg) -> onnx.ModelProto:
    """The graph with each GroupQueryAttention (packed QKV, rotary inside) replaced by Split, two
    RotaryEmbedding and a DecoderMaskedMultiHeadAttention over the same shared KV buffers: a
    one-row-only graph (the kernel takes one position); positions from seqlens_k."""
    width = cfg.n_heads * cfg.cache_head_size
    nodes = [helper.make_node("Cast", ["seqlens_k"], ["position"], name="position", to=TensorProto.INT64)]
    inits = [numpy_helper.from_array(np.array([width] * 3, np.int64), "qkv.split")]
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        p, (qkv, cos, sin) = node.name, (node.input[0], node.input[7], node.input[8])
        q, k, v = f"{p}/q", f"{p}/k", f"{p}/v"
        nodes += [helper.make_node("Split", [qkv, "qkv.split"], [q, k, v], name=f"{p}.split", axis=-1)]
        nodes += [helper.make_node("RotaryEmbedding", [x, "position", cos, sin], [x + "_rot"], name=f"{p}.rotary_{x[-1]}",
                                   domain=MS, num_heads=cfg.n_heads) for x in (q, k)]
        nodes.append(helper.make_node(
            "DecoderMaskedMultiHeadAttention", [q + "_rot", k + "_rot", v, "", "", node.input[3], node.input[4], node.input[5]],
            list(node.output), name=p, domain=MS, num_heads=cfg.n_heads, past_present_share_buffer=1))
    return _rewired(model, nodes, inits)


def moe_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each layer's gate, up, QuickGelu, Mul and down nodes as one com.microsoft MoE
    node of a single expert (the CPU's only fused SwiGLU: interleaved gate/up rows, router logit 0
    for the one expert, so its routing weight is exactly 1); one-row only here (router_probs is a
    (1, 1) constant)."""
    w = {t.name: t for t in model.graph.initializer}
    nodes, inits, unused = [], [numpy_helper.from_array(np.zeros((1, 1), np.float32), "router")], set()
    for node in model.graph.node:
        if ".mlp." not in node.name:
            nodes.append(node)
            continue
        if not node.name.endswith(".mlp.proj/MatMul"):
            continue
        p = node.name.removesuffix(".mlp.proj/MatMul")
        names = [f"{p}.mlp.{k}.weight.T" for k in ("gate", "up", "proj")]
        gate, up, down = (numpy_helper.to_array(w[n]).T for n in names)  # (F, D), (F, D), (D, F)
        unused |= set(names)
        inits += [numpy_helper.from_array(np.stack([gate, up], axis=1).reshape(1, -1, gate.shape[1]), f"{p}.mlp.fc1"),
                  numpy_helper.from_array(np.ascontiguousarray(down[None]), f"{p}.mlp.fc2")]
        nodes.append(helper.make_node(
            "MoE", [f"{p}.norm2/out", "router", f"{p}.mlp.fc1", "", f"{p}.mlp.fc2", ""], list(node.output), name=f"{p}.mlp",
            domain=MS, k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
            normalize_routing_weights=1))
    return _rewired(model, nodes, inits, unused)


def no_attention_form(model: onnx.ModelProto, cfg) -> onnx.ModelProto:
    """run.c's NOATT for the graph: each GroupQueryAttention replaced by a Slice of its packed
    input's query part (the output projection reads q instead of the attention's output), and no
    present outputs (the KV buffers are neither read nor written)."""
    width = cfg.n_heads * cfg.cache_head_size
    inits = [numpy_helper.from_array(np.array([v], np.int64), name) for name, v in (("q.start", 0), ("q.end", width), ("q.axis", 2))]
    nodes = [helper.make_node("Slice", [n.input[0], "q.start", "q.end", "q.axis"], [n.output[0]], name=n.name)
             if n.op_type == "GroupQueryAttention" else n for n in model.graph.node]
    return _rewired(model, nodes, inits, outputs=False)


def session_loop_us(session: ort.InferenceSession, cfg, steps: int) -> float:
    """A graph without present outputs over positions 1..steps-1, µs a step: the bare session loop
    (its inputs bound once, seqlens_k and total_sequence_length written each step), no engine."""
    ids, seqlens, total = np.ones((1, 1), np.int64), np.zeros((1, 1), np.int32), np.zeros(1, np.int32)
    arrays = [np.zeros((1, cfg.n_kv_heads, cfg.block_size, cfg.cache_head_size), np.float32) for _ in range(2 * cfg.n_layers)]
    logits = np.zeros((1, 1, cfg.vocab_size), np.float32)
    binding = session.io_binding()
    for name, array in (("input_ids", ids), ("seqlens_k", seqlens), ("total_sequence_length", total)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for i in range(cfg.n_layers):
        for j, kind in enumerate(("key", "value")):
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ort.OrtValue.ortvalue_from_numpy(arrays[2 * i + j]))
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    session.run_with_iobinding(binding)
    t0 = time.thread_time()
    for pos in range(1, steps):
        seqlens[0, 0], total[0] = pos, pos + 1
        session.run_with_iobinding(binding)
    return (time.thread_time() - t0) / (steps - 1) * 1e6


def max_logit_difference(a: OnnxEngine, b: OnnxEngine, steps: int) -> float:
    """Largest |logit difference| of two engines fed the same greedy sequence (a's tokens)."""
    a.reset(1)
    b.reset(1)
    tok, worst = np.array([1], dtype=np.int64), 0.0
    for _ in range(steps):
        la, lb = a.decode(tok), b.decode(tok)
        worst = max(worst, float(np.abs(la - lb).max()))
        tok[0] = int(la[0].argmax())
    return worst


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
        forms = {GATE_UP: gate_up_form(model), DMMHA: dmmha_form(model, cfg), MOE: moe_form(model)}
        engines, differences = {}, {}
        for name, form in forms.items():
            onnx.save(form, str(tmp / "form.onnx"))
            engines[name] = OnnxEngine(tmp / "form.onnx", cfg, threads=1)
            differences[name] = max_logit_difference(engine, engines[name], args.steps)
        # the shipped graph in a session at onnxruntime's highest optimisation level (the runtime uses
        # the basic level: the graph is written fused); a reset to another batch size makes the
        # engine bind its buffers again, to the swapped session
        so = session_options(1)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        engines[ALL_LEVEL] = OnnxEngine(tmp / "llama.onnx", cfg, threads=1)
        engines[ALL_LEVEL].session = ort.InferenceSession(str(tmp / "llama.onnx"), so, providers=["CPUExecutionProvider"])
        engines[ALL_LEVEL].reset(2)
        differences[ALL_LEVEL] = max_logit_difference(engine, engines[ALL_LEVEL], args.steps)
        mm, mm_plain = sub_session(model, {"MatMul"}), sub_session(model, {"MatMul"}, no_prepack=True)
        attn = sub_session(model, {"GroupQueryAttention", "Squeeze"})
        no_attn = ort.InferenceSession(no_attention_form(model, cfg).SerializeToString(), session_options(1),
                                       providers=["CPUExecutionProvider"])
        rows = {
            "run.c step": lambda: 1e6 * runc_cpu_per_position(args.runc, tmp, args.steps, False),
            "run.c step, attention skipped": lambda: 1e6 * runc_cpu_per_position(args.runc, tmp, args.steps, True),
            "edgecraft step": lambda: step_us(engine, args.steps),
            NO_ATTENTION: lambda: session_loop_us(no_attn, cfg, args.steps),
            "edgecraft: its 31 MatMuls alone (prepacked)": lambda: matmuls_us(mm),
            "edgecraft: its 31 MatMuls alone (session.disable_prepacking)": lambda: matmuls_us(mm_plain),
            "edgecraft: its 6 GroupQueryAttention alone": lambda: attention_us(attn, cfg, args.steps),
        } | {f"edgecraft step, {name}": lambda e=e: step_us(e, args.steps) for name, e in engines.items()}
        loads: list[float] = []
        done = harness.interleave(rows, args.rounds, after_round=lambda _: loads.append(os.getloadavg()[0]))
    med = {k: statistics.median(v) for k, v in done.items()}
    runc_attn = med["run.c step"] - med["run.c step, attention skipped"]
    ours_rest = med["edgecraft step"] - med["edgecraft: its 31 MatMuls alone (prepacked)"] - med["edgecraft: its 6 GroupQueryAttention alone"]
    ours_attn = med["edgecraft step"] - med[NO_ATTENTION]
    ours_glue = med[NO_ATTENTION] - med["edgecraft: its 31 MatMuls alone (prepacked)"]
    lines = [f"Model: llama-style, width {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
             f"context {cfg.block_size}; weights of {args.run}. CPU µs per step (thread or process CPU time), "
             f"medians of {args.rounds} rounds after a warm-up, rows interleaved.", "",
             "| part | CPU µs a step (median) | per round |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.1f} | {' '.join(f'{x:.0f}' for x in v)} |" for k, v in done.items()]
    lines += ["", f"run.c's attention: {runc_attn:.1f} µs a step; the rest of its step {med['run.c step, attention skipped']:.1f} µs.",
              f"edgecraft's remainder (27 other nodes, per-node and per-call cost, the Python loop): {ours_rest:.1f} µs.",
              f"edgecraft's attention in the step (step less the step without it; that loop lacks the engine's few "
              f"µs of Python): {ours_attn:.1f} µs; its step without attention less the 31 MatMuls alone (the other "
              f"27 nodes and the Slices, with the framework's state cold after the weights streamed through the "
              f"caches): {ours_glue:.1f} µs."]
    paired = {name: statistics.median(x - y for x, y in zip(done[f"edgecraft step, {name}"], done["edgecraft step"]))
              for name in differences}
    lines += [f"Step, {name}: {paired[name]:+.1f} µs against the shipped graph (median of the "
              f"rounds' paired differences); largest |logit difference| {differences[name]:.1e} over the "
              f"{args.steps} greedy positions." for name in differences]
    lines += ["The control runs the same 64 nodes as the shipped graph in another session: its difference "
              "is where that session's buffers landed in memory, and a form's difference no larger than "
              "it says nothing."]
    lines += [f"1-minute load after each round: {', '.join(f'{x:.2f}' for x in loads)}."]
    body = "\n".join(lines)
    print(info.markdown(body))
    if args.out:
        info.write(args.out, body, {"median_us": med, "rounds_us": done, "loads": loads, "runc": args.runc,
                                   "forms_paired_us": paired, "forms_max_logit_difference": differences})


if __name__ == "__main__":
    main()
