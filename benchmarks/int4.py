"""int4 against int8 and fp32 on char-1m bundles, and n_kv_heads 8/2/1, side by side.

    python benchmarks/int4.py --bundle float=export/kv8 [--bundle qat4=export/qat4:int4] \
        [--bundle kv2=export/kv2:fp32 --bundle kv1=export/kv1:fp32] [--rounds 7] [--forms]

Each --bundle NAME=PATH[:PRECISIONS] adds a row per model file it holds (model.onnx, model.int8.onnx,
model.int4.onnx), or those of PRECISIONS (comma-separated: fp32, int8, int8-dqmm, int4); an int8 bundle with model.int8.1row.onnx also gets an "int8-dqmm" row, its int8
graph alone (DynamicQuantizeMatMul for every call), beside the "int8" row that runs one-row decode
steps on the 8-bit MatMulNBits graph (runtime/onnx_engine.py): the int8 choice, measured.

Speed: every row is a fresh worker process per round (rows alternate, harness.interleave), one
intra-op thread. Batch 1: a one-token prompt, then greedy decode steps to the full context (255
steps: the cache fills to block_size, "a 256-token context"); decode tok/s = 255 / time of the
steps. Batch 16: 16 distinct one-token prompts, the same steps, 16 x 255 tokens / time. Medians
over rounds; paired ratios are medians of the per-round ratios.

Quality: the figures each bundle's export measured on the same held-out windows (8 windows of the
validation split, decoded at batch 1): validation loss fp32 and quantized, and file sizes. A QAT
bundle's int4 loss is compared with the float bundle's fp32 loss (the same windows; the two runs
share data, seed and steps, the QAT run fine-tuning its last steps with 4-bit fake quant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import harness

TITLE = "int4, int8 and fp32 on char-1m; n_kv_heads"
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx"}


def measure(spec: dict) -> dict:
    """One row in this process: batch-1 and batch-16 decode tok/s over the whole context."""
    from edgecraft.runtime.bundle import INT8_SINGLE_ROW_MODEL, read_manifest
    from edgecraft.runtime.onnx_engine import OnnxEngine

    path = Path(spec["bundle"])
    cfg = read_manifest(path).config
    single = path / INT8_SINGLE_ROW_MODEL if spec["precision"] == "int8" and (path / INT8_SINGLE_ROW_MODEL).is_file() else None
    engine = OnnxEngine(path / FILES[spec["precision"].removesuffix("-dqmm")], cfg, threads=1, single_row_path=single)
    out = {}
    for batch in spec["batches"]:
        prompt = (np.arange(batch)[:, None] * 7 + 1) % cfg.vocab_size  # (B, 1) distinct prompts
        steps = cfg.block_size - 1
        best = []
        for _ in range(1 + spec["runs"]):  # the first is a warm-up
            _, _, wall, cpu = harness.greedy(engine, prompt, steps + 1)
            best.append((batch * steps / wall, batch * steps / max(cpu, 1e-9)))
        rates = best[1:]
        out[str(batch)] = {"tok_s": statistics.median(r[0] for r in rates),
                           "tok_per_cpu_s": statistics.median(r[1] for r in rates)}
    return out


SHAPES = [(128, 384), (128, 128), (128, 512), (512, 128)] * 6  # char-1m's 24 matrices, (K, N)
# "no matrices": the same 24 nodes as Identity/Slice/Tile, the graph's own per-node and per-call cost
FORMS = ("no matrices (24 copy nodes)", "fp32 MatMul", "DynamicQuantizeMatMul", "MatMulNBits 8-bit, block = row",
         "MatMulNBits 8-bit, block 32", "MatMulNBits 4-bit, block 16", "MatMulNBits 4-bit, block 32",
         "MatMulNBits 4-bit, block 32, zero points", "MatMulNBits 4-bit, block 64", "MatMulNBits 4-bit, block 128",
         "MatMulNBits 4-bit, block 32, accuracy 0")


def forms(spec: dict) -> dict:
    """The 24 matrices of char-1m in one graph per kernel form: microseconds a call at 1 and 16 rows."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edgecraft.export.int4_graph import pack_weight
    from edgecraft.quant import quantize_weight

    rng = np.random.default_rng(0)
    out = {}
    for form in FORMS:
        nodes, inits, outs = [], [], []
        for i, (K, N) in enumerate(SHAPES):
            w = rng.normal(0, 0.1, (N, K)).astype(np.float32)
            x, y = ("x" if K == 128 else f"y{i - 1}"), f"y{i}"
            if form.startswith("no matrices"):  # (.., K) -> (.., N) without arithmetic
                if K == N:
                    nodes.append(helper.make_node("Identity", [x], [y]))
                elif N < K:
                    inits += [numpy_helper.from_array(np.array(v), f"{n}{i}") for n, v in (("a", [0]), ("b", [N]), ("c", [1]))]
                    nodes.append(helper.make_node("Slice", [x, f"a{i}", f"b{i}", f"c{i}"], [y]))
                else:
                    inits.append(numpy_helper.from_array(np.array([1, N // K]), f"r{i}"))
                    nodes.append(helper.make_node("Tile", [x, f"r{i}"], [y]))
            elif form == "fp32 MatMul":
                inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
                nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
            elif form == "DynamicQuantizeMatMul":
                q, scale = quantize_weight(torch.from_numpy(w))
                inits += [numpy_helper.from_array(np.ascontiguousarray(q.numpy().T), f"w{i}"),
                          numpy_helper.from_array(scale.numpy(), f"s{i}")]
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}"], [y], domain="com.microsoft"))
            else:
                bits = 8 if "8-bit" in form else 4
                block = K if "row" in form else int(form.split("block ")[1].split(",")[0])
                packed, scales = pack_weight(w, bits, block)
                inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
                inputs = [x, f"w{i}", f"s{i}"]
                if "zero points" in form:  # the default zero point (8) stored explicitly, two a byte
                    inits.append(numpy_helper.from_array(np.full((N, (K // block + 1) // 2), 0x88, np.uint8), f"z{i}"))
                    inputs.append(f"z{i}")
                nodes.append(helper.make_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=K, N=N,
                                              bits=bits, block_size=block, accuracy_level=0 if "accuracy 0" in form else 4))
            if N != 512:
                outs.append(y)
        graph = helper.make_graph(nodes, "forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 128])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                                  ir_version=8)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out[form] = {"bytes": len(model.SerializeToString())}
        for rows in (1, 16):
            feed = {"x": rng.normal(0, 1, (rows, 128)).astype(np.float32)}
            session.run(None, feed)
            out[form][str(rows)] = 1e6 * cpu_best(lambda: [session.run(None, feed) for _ in range(100)], 5) / 100
    return out


def quality(name: str, path: Path) -> dict:
    m = json.loads((path / "edgecraft.json").read_text())
    cfg, q = m["config"], m["quantization"]
    out = {"n_kv_heads": cfg["n_kv_heads"], "bytes": {p: m["files"][f]["bytes"] for p, f in FILES.items() if f in m["files"]}}
    for precision, file in FILES.items():
        if isinstance(q.get(file), dict):
            r = q[file]
            out[precision] = {k: r.get(k) for k in ("method", "val_loss_fp32", f"val_loss_{precision}",
                                                      "val_loss_increase_pct", "block_size", "nodes", "op_types")}
            if "single_row" in r:
                out["int8-1row"] = {k: r["single_row"][k] for k in ("val_loss", "val_loss_increase_pct", "bytes")}
    out["fp32_nodes"] = m["onnx"]["nodes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--batches", type=harness.int_list, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="runs per worker (medianed) after its warm-up")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    parser.add_argument("--forms", action="store_true", help="also time the matrices alone in each kernel form")
    parser.add_argument("--render", type=Path, help="only re-render int4.md from this int4.json")
    args = parser.parse_args()
    info = harness.RunInfo(TITLE)
    if args.render:
        saved = json.loads(args.render.read_text())
        info.data.update({k: saved[k] for k in ("machine", "load_before", "command")})
        args.note = saved.get("notes", args.note)
        rows = saved["rows"]
        args.batches = [int(b) for b in next(v for k, v in rows.items() if k != "kernel forms")[0] if b.isdigit()]
        # the header's "at the end" is the measuring run's, not the re-render's
        harness.os.getloadavg = lambda: tuple(saved["load_after"])
        args.note = [*args.note, "(Re-rendered from int4.json with --render.)"]
        write(info, args, saved["bundles"], saved["quality"], rows, saved["loads"])
        return
    bundles = dict(item.split("=", 1) for item in args.bundle)
    rows, qual = {}, {}
    for name, where in list(bundles.items()):
        path, _, only = where.partition(":")
        bundles[name] = path
        path = Path(path)
        qual[name] = quality(name, path)
        files = json.loads((path / "edgecraft.json").read_text())["files"]
        precisions = [p for p, f in FILES.items() if f in files]
        if "model.int8.1row.onnx" in files:
            precisions.append("int8-dqmm")
        for p in [p for p in precisions if not only or p in only.split(",")]:
            spec = {"bundle": str(path), "precision": p, "batches": args.batches, "runs": args.runs}
            rows[f"{name} {p}"] = (lambda s: lambda: harness.child(__file__, "measure", s))(spec)
    if args.forms:
        rows["kernel forms"] = lambda: harness.child(__file__, "forms")
    loads = []

    def after(done):
        loads.append(round(os.getloadavg()[0], 2))
        write(info, args, bundles, qual, done, loads)

    t0 = time.time()
    done = harness.interleave(rows, args.rounds, args.warmup_rounds, after_round=after)
    print(f"{time.time() - t0:.0f} s", file=sys.stderr)
    print((args.out / "int4.md").read_text())


def cpu_best(fn, repeats: int) -> float:
    """The least thread CPU time of `repeats` calls, in seconds: wall time on a shared machine
    counts other processes' turns (the wall-clock forms of earlier runs doubled some kernels)."""
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times)


def forms_table(runs: list[dict]) -> list[str]:
    lines = ["| kernel form (the 24 matrices of char-1m, one graph) | bytes | µs at 1 row | µs at 16 rows |",
             "|---|---|---|---|"]
    for form in [f for f in FORMS if f in runs[0]]:  # an older int4.json holds fewer forms
        med = {r: statistics.median(run[form][r] for run in runs) for r in ("1", "16")}
        lines.append(f"| {form} | {runs[0][form]['bytes']:,} | {med['1']:.1f} | {med['16']:.1f} |")
    return lines


def speed_table(done: dict, batches: list[int]) -> tuple[list[str], dict, dict]:
    """Wall-clock and per-CPU-second medians: on a loaded machine a worker gets a fraction of a core,
    and tokens per CPU-second is what the row would do on an idle one."""
    med = {(row, b): statistics.median(r[str(b)]["tok_s"] for r in runs) for row, runs in done.items() for b in batches}
    cpu = {(row, b): statistics.median(r[str(b)]["tok_per_cpu_s"] for r in runs) for row, runs in done.items() for b in batches}
    lines = ["| row | " + " | ".join(f"batch-{b} tok/s (median) | per round | tok per CPU-s" for b in batches) + " |",
             "|---|" + "---|---|---|" * len(batches)]
    for row, runs in done.items():
        cells = [f"{med[(row, b)]:,.0f} | " + " ".join(f"{r[str(b)]['tok_s']:,.0f}" for r in runs) + f" | {cpu[(row, b)]:,.0f}"
                 for b in batches]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines, med, cpu


def paired(done: dict, a: str, b: str, batch: int, key: str = "tok_s") -> float:
    return statistics.median(x[str(batch)][key] / y[str(batch)][key] for x, y in zip(done[a], done[b]))


def write(info, args, bundles: dict, qual: dict, done: dict, loads: list) -> None:
    kernel = done.pop("kernel forms", None)
    lines, med, cpu = speed_table(done, args.batches)
    body = [f"Bundles: {', '.join(f'{k} = {v}' for k, v in bundles.items())}.", *args.note, "",
            f"Rounds measured: {len(next(iter(done.values())))}; 1-minute load at each round's end: "
            f"{', '.join(map(str, loads))}.", "", "## Decode speed (1 thread, a 256-token context)", "", *lines, "",
            "| comparison | batch | ratio of medians | paired (per round) | by CPU time | paired by CPU time |",
            "|---|---|---|---|---|---|"]
    names = list(done)
    pairs = [(x, y) for x in names for y in names if x.split()[0] == y.split()[0] and
             (x.split()[1], y.split()[1]) in {("int4", "int8"), ("int4", "fp32"), ("int8", "fp32"), ("int8", "int8-dqmm")}]
    fp32 = [x for x in names if x.endswith(" fp32")]
    if fp32:  # fewer key/value heads against the most, fp32 rows
        most = max(fp32, key=lambda x: qual[x.split()[0]]["n_kv_heads"])
        pairs += [(x, most) for x in fp32 if qual[x.split()[0]]["n_kv_heads"] < qual[most.split()[0]]["n_kv_heads"]]
    for x, y in pairs:
        for b in args.batches:
            body.append(f"| {x} ÷ {y} | {b} | {med[(x, b)] / med[(y, b)]:.2f}x | {paired(done, x, y, b):.2f}x | "
                        f"{cpu[(x, b)] / cpu[(y, b)]:.2f}x | {paired(done, x, y, b, 'tok_per_cpu_s'):.2f}x |")
    body += ["", "## Size and validation loss (the exports' own checks: 8 held-out windows, decoded at batch 1)", "",
             "| bundle | n_kv_heads | file | bytes | of fp32 | val loss | vs its fp32 | method |", "|---|---|---|---|---|---|---|---|"]
    for name, q in qual.items():
        fp32_bytes = q["bytes"].get("fp32")
        for p in ("fp32", "int8", "int8-1row", "int4"):
            if p == "fp32" and "fp32" in q["bytes"]:
                loss = next((q[k]["val_loss_fp32"] for k in ("int8", "int4") if k in q), None)
                body.append(f"| {name} | {q['n_kv_heads']} | fp32 | {q['bytes']['fp32']:,} | 100% | "
                            f"{'' if loss is None else f'{loss:.4f}'} | | |")
            elif p == "int8-1row" and p in q:
                r = q[p]
                body.append(f"| {name} | {q['n_kv_heads']} | int8 1row | {r['bytes']:,} | "
                            f"{100 * r['bytes'] / fp32_bytes:.1f}% | {r['val_loss']:.4f} | {r['val_loss_increase_pct']:+.2f}% | |")
            elif p in q:
                r = q[p]
                size = q["bytes"][p]
                blocks = f", blocks of {r['block_size']}" if p == "int4" else ""
                body.append(f"| {name} | {q['n_kv_heads']} | {p} | {size:,} | "
                            f"{'' if not fp32_bytes else f'{100 * size / fp32_bytes:.1f}%'} | "
                            f"{r[f'val_loss_{p}']:.4f} | {r['val_loss_increase_pct']:+.2f}% | "
                            f"{r['method']}{blocks} |")
    body += ["", "Graph nodes: " + "; ".join(
        f"{name}: fp32 {q['fp32_nodes']}" + "".join(f", {p} {q[p]['nodes']}" for p in ("int8", "int4") if p in q)
        for name, q in qual.items()) + "."]
    if kernel:
        body += ["", "## Kernel forms (least thread CPU time of 5 x 100 calls per round, medians over rounds)", "", *forms_table(kernel)]
        done["kernel forms"] = kernel
    data = {"bundles": bundles, "quality": qual, "rows": done, "loads": loads,
            "notes": [n for n in args.note if not n.startswith("(Re-rendered")]}
    info.write(args.out / "int4", "\n".join(body), data)


if __name__ == "__main__":
    if not harness.serve_child({"measure": measure, "forms": forms}):
        main()
