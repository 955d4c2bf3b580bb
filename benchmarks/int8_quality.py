"""int8 for edgecraft's decoder: which onnxruntime kernel, how much quality, how big, how fast.

    python benchmarks/int8_quality.py kernels                       # int8 MatMul forms, 6-layer chain
    python benchmarks/int8_quality.py qat-cost                      # training step with/without hooks
    python benchmarks/int8_quality.py runs --float runs/A --qat runs/B [--qat runs/C] [--windows 16]

`kernels` times every int8 MatMul form onnxruntime offers on the 1M model's matrix shapes
(128x384, 128x128, 128x512, 512x128, six layers) against fp32 MatMul, at 1, 4 and 16 rows, one
thread: fp32 MatMul+Add, DynamicQuantizeMatMul, DynamicQuantizeLinear+MatMulInteger (what
quantize_dynamic writes), QuantizeLinear+MatMulIntegerToFloat (static), a QDQ MatMul, and
MatMulNBits with 8 bits at accuracy level 0 and 4.

`runs` compares on the same validation windows (decode at batch 1 unless said):
fp32; post-training int8 of the float run A in each variant (dynamic, + tables, + head, static from
calibration, onnxruntime's quantize_dynamic with per_channel=True, weight_type=QInt8); and the
int8 export of each QAT run (B: A's recipe continued with quant.qat from a checkpoint of A).
Dynamic-range int8 also gets a prefill column (each window in one call, one range over its 256
rows) and a batch-16 decode column (16 windows per call). Then sizes and decode tokens/s.
Appends a markdown report to benchmarks/results/int8.md (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from edgecraft.checkpoint import load_model
from edgecraft.data import eval_batches, prepare
from edgecraft.export.graph import build_graph
from edgecraft.export.int8 import calibrate_ranges, plan_layers, ranges_from_state
from edgecraft.export.int8_check import decode_loss
from edgecraft.export.int8_graph import Int8Plan, build_int8_graph
from edgecraft.export.parity import val_windows
from edgecraft.quant import load_state
from edgecraft.recipe import load_recipe
from edgecraft.runtime.onnx_engine import OnnxEngine

import harness  # noqa: I001 (benchmarks/, on sys.path when run as a script)


# --- kernels ------------------------------------------------------------------------------------


def _chain(form: str, rng: np.random.Generator) -> bytes:
    """Six layers of the 1M model's four matrices in `form` (see the module docstring)."""
    D, F = 128, 512
    nodes, inits = [], []

    def init(name, a):
        inits.append(numpy_helper.from_array(a, name))
        return name

    def qw(w):  # (K, N) -> int8 per column
        s = (np.abs(w).max(0) / 127).astype(np.float32)
        return np.clip(np.round(w / s), -127, 127).astype(np.int8), s

    def mm(x, n, K, N):
        w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
        b = (rng.standard_normal(N) * 0.01).astype(np.float32)
        y = n + "_y"
        if form == "fp32 MatMul":
            nodes.append(helper.make_node("MatMul", [x, init(n + "w", w)], [n + "m"]))
            nodes.append(helper.make_node("Add", [n + "m", init(n + "b", b)], [y]))
            return y
        q, s = qw(w)
        if form == "DynamicQuantizeMatMul":
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, init(n + "q", q), init(n + "s", s), "", init(n + "b", b)], [y], domain="com.microsoft"))
        elif form == "DynamicQuantizeLinear+MatMulInteger":
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [n + "xq", n + "xs", n + "xz"]))
            nodes.append(helper.make_node("MatMulInteger", [n + "xq", init(n + "q", q), n + "xz", init(n + "z", np.zeros(N, np.int8))], [n + "i"]))
            nodes.append(helper.make_node("Cast", [n + "i"], [n + "f"], to=TP.FLOAT))
            nodes.append(helper.make_node("Mul", [n + "xs", init(n + "s", s)], [n + "ss"]))
            nodes.append(helper.make_node("Mul", [n + "f", n + "ss"], [n + "m"]))
            nodes.append(helper.make_node("Add", [n + "m", init(n + "b", b)], [y]))
        elif form == "QuantizeLinear+MatMulIntegerToFloat":
            nodes.append(helper.make_node("QuantizeLinear", [x, init(n + "as", np.float32(0.05)), init(n + "az", np.uint8(128))], [n + "xq"]))
            nodes.append(helper.make_node("MatMulIntegerToFloat", [n + "xq", init(n + "q", q), n + "as", init(n + "s", s), n + "az", "", init(n + "b", b)], [y], domain="com.microsoft"))
        elif form == "QDQ MatMul":
            nodes.append(helper.make_node("QuantizeLinear", [x, init(n + "as", np.float32(0.05)), init(n + "az", np.uint8(128))], [n + "xq"]))
            nodes.append(helper.make_node("DequantizeLinear", [n + "xq", n + "as", n + "az"], [n + "xd"]))
            nodes.append(helper.make_node("DequantizeLinear", [init(n + "q", q), init(n + "s", s), init(n + "z", np.zeros(N, np.int8))], [n + "wd"], axis=1))
            nodes.append(helper.make_node("MatMul", [n + "xd", n + "wd"], [n + "m"]))
            nodes.append(helper.make_node("Add", [n + "m", init(n + "b", b)], [y]))
        else:  # MatMulNBits 8-bit, blocks of 32 along K, accuracy level from the form's name
            level, bs = int(form[-1]), 32
            blocks = w.T.reshape(N, K // bs, bs)
            sb = np.abs(blocks).max(-1) / 127
            qb = (np.clip(np.round(blocks / sb[..., None]), -127, 127) + 128).astype(np.uint8)
            nodes.append(helper.make_node("MatMulNBits", [x, init(n + "q", qb), init(n + "s", sb.astype(np.float32).ravel()), "", "", init(n + "b", b)], [y], domain="com.microsoft", K=K, N=N, bits=8, block_size=bs, accuracy_level=level))
        return y

    x, outs = "x", []
    for i in range(6):
        y1, y2 = mm(x, f"l{i}qkv", D, 3 * D), mm(x, f"l{i}o", D, D)
        y4 = mm(mm(x, f"l{i}fc", D, F), f"l{i}p", F, D)
        nodes.append(helper.make_node("Sum", [x, y2, y4], [f"l{i}x"]))
        x = f"l{i}x"
        outs.append(y1)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, form, [vi("x", TP.FLOAT, ["M", D])],
                              [vi(x, TP.FLOAT, ["M", D])] + [vi(o, TP.FLOAT, ["M", 3 * D]) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


KERNEL_FORMS = ("fp32 MatMul", "DynamicQuantizeMatMul", "DynamicQuantizeLinear+MatMulInteger",
                "QuantizeLinear+MatMulIntegerToFloat", "QDQ MatMul", "MatMulNBits 8-bit, accuracy 0",
                "MatMulNBits 8-bit, accuracy 4")


def kernels(rounds: int = 7, calls: int = 200) -> str:
    """Median µs per call of each form, interleaved rounds so load drifts hit all forms alike."""
    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sessions = {f: ort.InferenceSession(_chain(f, rng), so, providers=["CPUExecutionProvider"]) for f in KERNEL_FORMS}
    rows = []
    for M in (1, 4, 16):
        x = {"x": rng.standard_normal((M, 128)).astype(np.float32)}

        def timed(s, x=x):
            return lambda: harness.best_time(lambda: [s.run(None, x) for _ in range(calls)], 1) / calls * 1e6

        times = harness.interleave({f: timed(s) for f, s in sessions.items()}, rounds)
        rows.append((M, {f: statistics.median(v) for f, v in times.items()}))
    head = "| form | " + " | ".join(f"{M} row{'s' * (M > 1)} µs" for M, _ in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for f in KERNEL_FORMS:
        lines.append(f"| {f} | " + " | ".join(f"{r[f]:.0f}" for _, r in rows) + " |")
    return "\n".join(lines)


# --- QAT cost -------------------------------------------------------------------------------------


def qat_cost(rounds: int = 5, steps: int = 3) -> str:
    """Training step time of the char-1m shape (batch 12 x 256) with and without the QAT hooks."""
    from edgecraft.model import GPT, GPTConfig
    from edgecraft.quant import attach
    from edgecraft.recipe import QuantConfig

    torch.set_num_threads(1)  # two threads on a shared 2-core machine made the rounds incomparable
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 65, (12, 257))
    rows = {"float": None, "QAT dynamic": QuantConfig(qat=True), "QAT static": QuantConfig(qat=True, scheme="static"),
            "QAT dynamic, embeddings": QuantConfig(qat=True, embeddings=True)}

    def timed(cfg):
        def run() -> float:
            handle = attach(model, cfg) if cfg else None
            t = time.perf_counter()
            for _ in range(steps):
                _, loss, _ = model(x[:, :-1], targets=x[:, 1:].contiguous())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if handle:
                handle.detach()
            return (time.perf_counter() - t) / steps
        return run

    times = harness.interleave({name: timed(cfg) for name, cfg in rows.items()}, rounds, warmup=0)
    base = float(np.median(times["float"]))
    lines = [f"torch threads {torch.get_num_threads()}", "", "| training step | ms | vs float |", "|---|---|---|"]
    for name, v in times.items():
        lines.append(f"| {name} | {1e3 * np.median(v):.0f} | {np.median(v) / base:.2f}x |")
    return "\n".join(lines)


# --- runs ---------------------------------------------------------------------------------------


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _engine(path: Path, cfg) -> OnnxEngine:
    return OnnxEngine(path, cfg, threads=1)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
    return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def prefill_loss(path: Path, cfg, windows: np.ndarray) -> float:
    """Each window in one call at batch 1 (a prompt's arithmetic)."""
    engine = _engine(path, cfg)
    out = []
    for row in windows:
        engine.reset(1)
        out.append(_nll(engine.prefill(row[None, :-1])[0], row[1:]))
    return float(np.mean(out))


def batched_decode_loss(path: Path, cfg, windows: np.ndarray, batch: int = 16) -> float:
    """Windows decoded `batch` at a time, one token per call (a busy server's arithmetic)."""
    engine = _engine(path, cfg)
    out = []
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        engine.reset(len(w))
        for t in range(w.shape[1] - 1):
            out.append(_nll(engine.decode(w[:, t]), w[:, t + 1]))
    return float(np.mean(out))


def decode_speed(paths: dict[str, Path], cfg, batch: int, steps: int = 200, rounds: int = 5) -> dict[str, float]:
    """Decode tokens/s (all rows) per graph, median of interleaved rounds."""
    ids = np.arange(batch) % cfg.vocab_size

    def timed(e):
        return lambda: e.reset(batch) or harness.best_time(lambda: [e.decode(ids) for _ in range(steps)], 1)

    times = harness.interleave({name: timed(_engine(p, cfg)) for name, p in paths.items()}, rounds, warmup=0)
    return {name: batch * steps / statistics.median(v) for name, v in times.items()}


def bundle_sizes(run: Path, tmp: Path) -> list[str]:
    from edgecraft.export import ExportOptions, export_run

    sizes = {}
    for name, options in (("fp32 only", ExportOptions()), ("int8 only (default PTQ)", ExportOptions(int8=True, int8_only=True))):
        bundle = export_run(run, tmp / name.split()[0], options)
        sizes[name] = sum(p.stat().st_size for p in bundle.iterdir())
    fp32 = sizes["fp32 only"]
    return ["| bundle | bytes | vs fp32 bundle |", "|---|---|---|"] + [
        f"| {name} | {size:,} | {size / fp32:.1%} |" for name, size in sizes.items()
    ]


def runs(float_run: Path, qat_runs: list[Path], n_windows: int, tmp: Path) -> str:
    torch.set_num_threads(1)
    model = load_model(float_run / "model.safetensors")
    cfg = model.cfg
    recipe = load_recipe(float_run / "recipe.toml")
    val = np.asarray(prepare(recipe.data, cfg.block_size).val, dtype=np.int64)
    windows = val_windows(val, cfg.block_size, n_windows)
    fp32 = tmp / "fp32.onnx"
    onnx.save(build_graph(cfg, _weights(model)), fp32)

    graphs: dict[str, tuple[Path, str]] = {}  # name -> (path, scheme)

    def add(name, m, plan):
        p = tmp / f"{len(graphs)}.onnx"
        onnx.save(build_int8_graph(m.cfg, _weights(m), plan), p)
        graphs[name] = (p, plan.scheme)

    blocks = plan_layers(model, False, ())
    every = plan_layers(model, True, ())
    add("PTQ dynamic (default: blocks, tables, head)", model, Int8Plan(every, "dynamic", {}))
    add("PTQ dynamic, --keep-float head", model, Int8Plan(every - {"head"}, "dynamic", {}))
    add("PTQ dynamic, --keep-float embeddings", model, Int8Plan(blocks | {"head"}, "dynamic", {}))
    add("PTQ dynamic, --keep-float embeddings --keep-float head", model, Int8Plan(blocks, "dynamic", {}))
    batches = eval_batches(val, recipe.train.batch_size, cfg.block_size, 8, recipe.seed)
    add("PTQ static, --calibrate 8", model, Int8Plan(every, "static", calibrate_ranges(model, batches, True)))
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ortq = tmp / "ort_quantize_dynamic.onnx"
    quantize_dynamic(fp32, ortq, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": TP.FLOAT})
    graphs["onnxruntime quantize_dynamic (per_channel, QInt8; incl. head)"] = (ortq, "dynamic")

    rows = [("float run A", "fp32", decode_loss(fp32, cfg, windows), None, None, fp32.stat().st_size)]
    base = rows[0][2]
    for name, (p, scheme) in graphs.items():
        extra = (prefill_loss(p, cfg, windows), batched_decode_loss(p, cfg, windows)) if scheme == "dynamic" else (None, None)
        rows.append(("float run A", name, decode_loss(p, cfg, windows), *extra, p.stat().st_size))
    for run in qat_runs:
        q_recipe = load_recipe(run / "recipe.toml")
        qm = load_model(run / "model.safetensors")
        f = tmp / f"{run.name}-fp32.onnx"
        onnx.save(build_graph(cfg, _weights(qm)), f)
        rows.append((f"QAT run {run.name}", "fp32 (hooks detached)", decode_loss(f, cfg, windows), None, None, f.stat().st_size))
        quant = q_recipe.quant
        ranges = ranges_from_state(load_state(run / "quant.safetensors")[1]) if quant.scheme == "static" else {}
        plan = Int8Plan(plan_layers(qm, quant.embeddings, ()), quant.scheme, ranges)
        add(f"QAT {run.name}", qm, plan)
        p = graphs[f"QAT {run.name}"][0]
        extra = (prefill_loss(p, cfg, windows), batched_decode_loss(p, cfg, windows)) if quant.scheme == "dynamic" else (None, None)
        rows.append((f"QAT run {run.name}", f"int8 QAT ({quant.scheme}, start_step {quant.start_step}"
                     f"{', embeddings' if quant.embeddings else ''})", decode_loss(p, cfg, windows), *extra, p.stat().st_size))

    def pct(v):
        return "" if v is None else f"{v:.4f} ({100 * (v - base) / base:+.2f}%)"

    lines = [
        f"Validation: {n_windows} windows x {windows.shape[1] - 1} tokens of {recipe.data.source}'s validation split; "
        f"percentages are against float run A's fp32 loss {base:.4f}.",
        "",
        "| run | graph | val loss, decode b1 | prefill (1 call/window) | decode b16 | model file bytes | vs fp32 file |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, name, loss, pre, b16, size in rows:
        lines.append(f"| {run} | {name} | {pct(loss)} | {pct(pre)} | {pct(b16)} | {size:,} | {size / rows[0][5]:.1%} |")

    speed_paths = {"fp32": fp32, **{n: p for n, (p, _) in graphs.items()
                                  if n not in ("PTQ dynamic, --keep-float head", "PTQ dynamic, --keep-float embeddings")}}
    lines += ["", "Bundles written by `edgecraft export` of float run A (model, tokenizer.json, edgecraft.json):", ""]
    lines += bundle_sizes(float_run, tmp)
    lines += ["", "Decode tokens/s (engine, IO binding, 1 thread, median of 5 interleaved rounds of 200 steps):", "",
              "| graph | batch 1 | batch 16 |", "|---|---|---|"]
    s1, s16 = decode_speed(speed_paths, cfg, 1), decode_speed(speed_paths, cfg, 16)
    for name in speed_paths:
        lines.append(f"| {name} | {s1[name]:,.0f} | {s16[name]:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kernels")
    sub.add_parser("qat-cost")
    r = sub.add_parser("runs")
    r.add_argument("--float", dest="float_run", type=Path, required=True)
    r.add_argument("--qat", type=Path, action="append", default=[])
    r.add_argument("--windows", type=int, default=16)
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=harness.RESULTS / "int8.md", help="the report is appended here")
    args = ap.parse_args()
    if args.cmd == "qat-cost":
        info = harness.RunInfo("QAT hooks' training cost, char-1m shape, batch 12 x 256 (median of 5 interleaved rounds)")
        body = qat_cost()
    elif args.cmd == "kernels":
        info = harness.RunInfo("int8 MatMul forms, six layers of the 1M model's matrices, 1 thread (µs per call, median of 7)")
        body = kernels()
    else:
        info = harness.RunInfo(f"quality, size and speed: {args.float_run}" + "".join(f", {q}" for q in args.qat))
        with tempfile.TemporaryDirectory() as tmp:
            body = runs(args.float_run, args.qat, args.windows, Path(tmp))
    print(info.markdown(body, "##"))
    info.append(args.out, body)


if __name__ == "__main__":
    main()
