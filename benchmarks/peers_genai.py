"""edgecraft's llama-style bundle against onnxruntime-genai on the same weights, side by side.

    python benchmarks/peers_genai.py [--run runs/char-1m-llama] [--corpus PATH] \
        [--genai-python VENV/bin/python] [--threads 1,2] [--rounds 7]

Both sides decode the SAME trained edgecraft llama-style run (recipes/char-1m-llama.toml: RMSNorm,
rotary positions, SwiGLU, width 128, 6 layers, 8 heads, d_ff 512, context 256). Without --run the
recipe is trained briefly (--steps 300 at --batch-size 8 by default) on --corpus (default:
../shared/data/tinyshakespeare.txt (beside the checkout) where it exists, else the recipe's built-in corpus).

Steps:
1. edgecraft side (this Python): the run is exported to a bundle (model.onnx, and model.int8.onnx).
2. genai side (--genai-python, an environment with onnxruntime-genai, transformers 5.x, onnx,
   onnx-ir, torch; it does not share one with edgecraft's transformers 4.x peers; SETUP below
   has the commands that make it, VENV being its folder): the run's weights become a Hugging Face
   LlamaForCausalLM directory (rotary in the half-split "rotate_half" form that both use, RMSNorm eps 1e-5, tied
   embeddings, the run's vocabulary; q/k/v are the rows of edgecraft's fused qkv matrix); its
   logits are checked against edgecraft's PyTorch model; then onnxruntime-genai's model builder
   (`python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32 -e cpu`, and `-p int4`)
   writes its fused graph; genai_config.json gets the thread count in session_options (one copy
   of the model folder per thread count), an empty list of end-of-sequence ids (so every row
   generates exactly the requested tokens; genai rejects ids outside the vocabulary) and the
   tokenizer's unknown-token id as pad_token_id (genai masks a batch's prompt tokens equal to it;
   the builder's 0 is the character tokenizer's newline). The genai graph's prompt logits are
   checked against edgecraft's too.
3. Rounds: every (row, threads) runs in a fresh worker process of its own Python, rows alternating
   within a round, rounds repeated so background load hits every row alike; the first round is a
   warm-up and is dropped; figures are medians over the measured rounds of each worker's median.

Token ids go in and come out, no tokenization anywhere. The figures (decode and total tok/s,
TTFT, batch 16, per CPU-second, paired ratios, greedy agreement with edgecraft fp32) are defined
in the report's own text (markdown() below), so that every results file explains itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import harness
from peers import flags, has_int8, prompts, start, train_run  # shared with peers.py
from peers_models import load_checked, logit_diff, run_weights

SETUP = (
    "python -m venv VENV && VENV/bin/pip install torch==2.13.0 && "
    "VENV/bin/pip install torch==2.13.0 onnxruntime-genai 'transformers>=5,<6' onnx onnx-ir numpy safetensors"
)  # torch pinned first (the local CPU wheel) so pip never resolves another, CUDA-sized torch
GENAI_LIBRARIES = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy")
TITLE = "edgecraft llama-style vs onnxruntime-genai"
# genai's own decode loop over edgecraft's fp32 graph, through the bundle's genai_config.json
# (batch 1 only: genai feeds the graph's sequence counters at batch 1): against genai-fp32 it
# compares the two graphs under one loop, against edgecraft-fp32 the two loops over one graph
GENAI_LOOP = "genai-loop-edgecraft-fp32"
ROWS = ("edgecraft-fp32", "edgecraft-int8", "edgecraft-int4", GENAI_LOOP, "genai-fp32", "genai-int4")
LLAMA_SHAPE = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": True}


# ---------------------------------------------------------------- genai side: HF model and builder


def llama_from_run(run_dir: Path):
    """A transformers LlamaForCausalLM of the run's shape carrying the run's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgecraft.config import ROPE_THETA

    cfg, weights = run_weights(run_dir, LLAMA_SHAPE)
    D, H = cfg["d_model"], cfg["n_heads"]
    KV = cfg.get("n_kv_heads") or H  # grouped-query: fewer key/value heads than query heads
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=cfg["d_ff"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=H, num_key_value_heads=KV, head_dim=D // H,
        hidden_act="silu", max_position_embeddings=cfg["block_size"], rms_norm_eps=1e-5,  # nn.RMSNorm(eps=1e-5)
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        torch_dtype="float32",
    )
    state = {"model.embed_tokens.weight": weights["tok_emb.weight"], "model.norm.weight": weights["norm_f.weight"]}
    for i in range(cfg["n_layers"]):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        # rows: q | k | v, heads in order
        wq, wk, wv = weights[p + "attn.qkv.weight"].split((D, KV * D // H, KV * D // H), dim=0)
        state |= {
            q + "input_layernorm.weight": weights[p + "norm1.weight"],
            q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": weights[p + "attn.proj.weight"],
            q + "post_attention_layernorm.weight": weights[p + "norm2.weight"],
            q + "mlp.gate_proj.weight": weights[p + "mlp.gate.weight"],
            q + "mlp.up_proj.weight": weights[p + "mlp.up.weight"],
            q + "mlp.down_proj.weight": weights[p + "mlp.proj.weight"],
        }
    model = load_checked(LlamaForCausalLM(config), state, ("lm_head.weight",))  # tied to the embedding
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("lm_head is not tied to the embedding")
    return model


def _build(hf: Path, out: Path, precision: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(out.parent))
    if proc.returncode != 0:
        raise SystemExit(f"the model builder failed ({precision}), see {log}: {log.read_text()[-3000:]}")


def _unused_id(tokenizer_json: Path, vocab: int) -> int:
    """The tokenizer's unknown-token id (no text encodes to it), else the last id."""
    model = json.loads(tokenizer_json.read_text())["model"]
    unk = model.get("unk_token")
    return int(model.get("vocab", {}).get(unk, vocab - 1)) if unk else vocab - 1


def genai_dir(work: Path, kind: str, threads: int) -> Path:
    return work / f"genai-{kind}-t{threads}"


def prepare_genai(run_dir: Path, work: Path, probe: list[int], threads: list[int], kinds: list[str]) -> dict:
    """Write work/hf, build work/genai-KIND, copy it per thread count with its session options;
    check the HF model's and genai's logits against edgecraft's PyTorch model."""
    import onnx

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = llama_from_run(run_dir)
    diff, ours = logit_diff(run_dir, model, probe)  # ours: (T, V)
    hf = work / "hf"
    model.save_pretrained(hf)
    # the builder reads the tokenizer (AutoTokenizer) and copies it next to the graph: the run's own
    shutil.copy(run_dir / "tokenizer.json", hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    log = work / "builder.log"
    report = {"max_abs_logit_diff_hf_vs_edgecraft": diff, "builder": {}}
    vocab = model.config.vocab_size
    pad = _unused_id(run_dir / "tokenizer.json", vocab)
    report["pad_token_id"] = pad
    for kind in kinds:
        built = work / f"genai-{kind}"
        t0 = time.perf_counter()
        _build(hf, built, kind, log)
        graph = onnx.load(str(built / "model.onnx"), load_external_data=False)
        ops: dict[str, int] = {}
        for node in graph.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        size = sum(p.stat().st_size for p in built.iterdir() if p.name.startswith("model.onnx"))
        report["builder"][kind] = {"seconds": time.perf_counter() - t0, "nodes": len(graph.graph.node),
                                   "ops": ops, "bytes": size}
        for t in threads:
            d = genai_dir(work, kind, t)
            shutil.copytree(built, d)
            path = d / "genai_config.json"
            config = json.loads(path.read_text())
            decoder = config["model"]["decoder"]
            decoder["session_options"]["intra_op_num_threads"] = t
            decoder["session_options"]["inter_op_num_threads"] = 1
            # no end-of-sequence id (genai rejects ids outside the vocabulary, accepts an empty
            # list): greedy search never stops early, every row generates exactly N tokens
            config["model"]["eos_token_id"] = []
            # genai masks a batch's prompt positions that hold pad_token_id as padding: a token that
            # never occurs in a prompt (the tokenizer's unknown token; the builder copied 0, the
            # character tokenizer's newline)
            config["model"]["pad_token_id"] = pad
            path.write_text(json.dumps(config, indent=4))
        report["builder"][kind]["genai_config"] = json.loads((genai_dir(work, kind, threads[0]) / "genai_config.json").read_text())
        # the genai graph's logits after the probe prompt against edgecraft's, every position's last
        gen = GenaiGen(genai_dir(work, kind, threads[0]))
        g = gen._generator(np.array([probe]), 1)
        g.append_tokens(np.array([probe], dtype=np.int32))
        logits = np.asarray(g.get_logits()).reshape(-1, vocab)[-1]
        report["builder"][kind]["max_abs_last_logit_diff_vs_edgecraft"] = float(np.abs(logits - ours[-1]).max())
    return report


# ---------------------------------------------------------------- generators (one per row kind)


class EdgecraftGen:
    """Greedy decoding through edgecraft's engine (the bundle's graph)."""

    def __init__(self, bundle: Path, quant: str, threads: int) -> None:
        from edgecraft.runtime import load

        self.engine = load(bundle, quant=quant, threads=threads).engine

    def start(self, prompt: np.ndarray) -> None:
        """What starting a sequence costs before any model call."""
        self.engine.reset(prompt.shape[0])

    def ttft(self, prompt: np.ndarray) -> int:
        self.engine.reset(prompt.shape[0])
        return int(self.engine.prefill(prompt)[0, -1].argmax(-1))

    def generate(self, prompt: np.ndarray, n: int) -> tuple[np.ndarray, float, float, float]:
        """(tokens (B, n), seconds for the prefill and first token, seconds for the n - 1 steps,
        CPU seconds of this process for those steps), as harness.greedy gives them."""
        return harness.greedy(self.engine, prompt, n)


class GenaiGen:
    """Greedy decoding through onnxruntime-genai's Generator over the model builder's graph."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))

    def _generator(self, prompt: np.ndarray, n: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=prompt.shape[1] + n, batch_size=prompt.shape[0])
        return self.og.Generator(self.model, params)

    def start(self, prompt: np.ndarray) -> None:
        self._generator(prompt, 1)

    def ttft(self, prompt: np.ndarray) -> int:
        g = self._generator(prompt, 1)
        g.append_tokens(prompt.astype(np.int32))
        g.generate_next_token()
        return int(g.get_next_tokens()[0])

    def generate(self, prompt: np.ndarray, n: int) -> tuple[np.ndarray, float, float, float]:
        B = prompt.shape[0]
        out = np.empty((B, n), dtype=np.int64)
        t0 = time.perf_counter()
        g = self._generator(prompt, n)
        g.append_tokens(prompt.astype(np.int32))  # runs the prompt
        g.generate_next_token()  # picks token 1 from the prompt's logits
        out[:, 0] = g.get_next_tokens()
        t1, c1 = time.perf_counter(), time.process_time()
        for i in range(1, n):
            g.generate_next_token()  # runs the previous token, picks the next
            out[:, i] = g.get_next_tokens()
        return out, t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def _threads_now() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


def measure_row(spec: dict) -> dict:
    """One (row, threads) in this process: warm-up, then `runs` of each figure; medians of the runs."""
    row, threads = spec["row"], spec["threads"]
    before = _threads_now()
    if row.startswith("edgecraft"):
        gen = EdgecraftGen(Path(spec["bundle"]), row.split("-")[1], threads)
    else:
        gen = GenaiGen(Path(spec["genai_dirs"][row][str(threads)]))
    after = _threads_now()
    prompts = np.array(spec["prompts"], dtype=np.int64)
    if (prompts == spec["pad_token_id"]).any():
        raise SystemExit(f"a prompt holds genai's pad_token_id {spec['pad_token_id']}: genai would mask it")
    n = spec["new_tokens"]
    ttft_prompt = prompts[:1, : spec["prompt_len"]]
    for _ in range(spec["warmup"]):
        gen.ttft(ttft_prompt)
    result = {"row": row, "threads": threads, "process_threads": {"before_load": before, "after_load": after},
              "ttft_ms": statistics.median(harness.best_time(lambda: gen.ttft(ttft_prompt)) * 1e3
                                           for _ in range(spec["runs"])),
              "start_ms": harness.best_time(lambda: gen.start(ttft_prompt), 20) * 1e3,
              "ttft_first_token": gen.ttft(ttft_prompt), "batches": {}}
    for batch in spec["batches"]:
        if row == GENAI_LOOP and batch > 1:
            continue
        prompt = prompts[:batch, : spec["gen_prompt_len"]]
        for _ in range(spec["warmup"]):
            gen.generate(prompt, n)
        decode, decode_cpu, total, cpu_ratio = [], [], [], []
        for _ in range(spec["runs"]):
            c0, w0 = time.process_time(), time.perf_counter()
            tokens, first, steps, steps_cpu = gen.generate(prompt, n)
            cpu_ratio.append((time.process_time() - c0) / (time.perf_counter() - w0))
            decode.append(batch * (n - 1) / steps)
            decode_cpu.append(batch * (n - 1) / steps_cpu)
            total.append(batch * n / (first + steps))
        result["batches"][str(batch)] = {
            "decode_tok_s": statistics.median(decode), "decode_tok_per_cpu_s": statistics.median(decode_cpu),
            "total_tok_s": statistics.median(total), "cpu_over_wall": statistics.median(cpu_ratio),
            "tokens": tokens.tolist(), "runs_decode_tok_s": decode,
        }
    result["process_threads"]["after_decoding"] = _threads_now()
    return result


# ---------------------------------------------------------------- the comparison (edgecraft's Python)


def bundle_for_genai(bundle: Path, work: Path, threads: int) -> Path:
    """A copy of the bundle whose genai_config.json asks for `threads` intra-op threads."""
    out = work / f"edgecraft-bundle-t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


def summarize(cells: dict[tuple, list[dict]]) -> list[dict]:
    """Per (row, threads): medians over the measured rounds, all rounds' values, agreement."""
    ref = {t: rs[-1] for (row, t), rs in cells.items() if row == "edgecraft-fp32"}
    lines = []
    for (row, t), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], ROWS.index(kv[0][0]))):
        line = {"row": row, "threads": t, "rounds": len(rs),
                "ttft_ms": statistics.median(r["ttft_ms"] for r in rs), "ttft_ms_all": [r["ttft_ms"] for r in rs],
                "start_ms": statistics.median(r["start_ms"] for r in rs),
                "process_threads": rs[-1]["process_threads"], "batches": {}}
        for b in rs[-1]["batches"]:
            vals = [r["batches"][b] for r in rs]
            line["batches"][b] = {key: statistics.median(v[key] for v in vals) for key in
                                  ("decode_tok_s", "decode_tok_per_cpu_s", "total_tok_s", "cpu_over_wall")}
            line["batches"][b] |= {
                "decode_tok_s_all": [v["decode_tok_s"] for v in vals], "tokens_first_seq": vals[-1]["tokens"][0],
                "greedy_vs_edgecraft_fp32": harness.agreement(vals[-1]["tokens"], ref[t]["batches"][b]["tokens"]),
            }
        lines.append(line)
    return lines


def markdown(report: dict) -> str:
    s, prep = report["settings"], report["prepare"]
    builder = prep["builder"].items()
    out = [
        "genai's Python: " + ", ".join(f"{k} {v}" for k, v in report["genai_libraries"].items()) + "  ",
        f"genai's environment: `{SETUP}`.  ",
        f"Load average per round: {', '.join(f'{x:.2f}' for x in report['load_per_round'])}.", "",
        f"Model: {report['model']}. {report['run_note']}", "",
        f"Both sides run the same weights. The Hugging Face LlamaForCausalLM made from the run matches "
        f"edgecraft's PyTorch model to {prep['max_abs_logit_diff_hf_vs_edgecraft']:.1e} (max |logit diff| over a "
        f"{s['prompt_len']}-token prompt); genai's graphs' last-position logits after that prompt differ from "
        "edgecraft's by " + ", ".join(f"{k} {v['max_abs_last_logit_diff_vs_edgecraft']:.1e}" for k, v in builder)
        + ". Graphs: " + "; ".join(
            f"genai {k}: {v['nodes']} nodes ({', '.join(f'{n} {op}' for op, n in sorted(v['ops'].items(), key=lambda x: -x[1]))}), "
            f"{v['bytes'] / 1e6:.2f} MB" for k, v in builder) + ".", "",
        f"Figures: decode tok/s = greedy one-token steps after the first token ({s['new_tokens'] - 1} steps for "
        f"{s['new_tokens']} new tokens after a {s['gen_prompt_len']}-token prompt, each step's token read back); "
        f"total = {s['new_tokens']} tokens / (prefill + steps); TTFT = fresh sequence, {s['prompt_len']}-token prompt "
        "to its first token (best of 5 per run); start = starting a sequence before any model call (edgecraft: "
        "engine reset; genai: GeneratorParams + Generator, which allocates its KV buffers), best of 20. Each (row, "
        f"threads) is a fresh worker process per round ({s['runs']} runs after {s['warmup']} warm-up inside it); rows "
        f"alternate within a round; {report['rounds_measured']} measured rounds after {s['warmup_rounds']} warm-up "
        "round(s); medians over rounds. per CPU-s: the same decode steps per CPU-second the worker got (at 1 thread, "
        "what the row would do on an idle core; at 2 threads it counts the pool thread's spinning too). CPU/wall: the "
        "worker's CPU time over wall time for a whole generation (about 1 at 1 thread on an idle machine; up to 2 "
        "when a second thread works). Paired ratios: the median over rounds of the two rows' ratio within the same "
        f"round. {GENAI_LOOP}: genai's Generator over edgecraft's own fp32 graph (the bundle's genai_config.json, "
        "batch 1 only): beside genai-fp32 it compares the two graphs under one decode loop, beside edgecraft-fp32 "
        "the two decode loops over one graph.", "",
        "| threads | row | batch-1 decode tok/s | per round | per CPU-s | total tok/s | TTFT ms (of it: start) | CPU/wall | "
        "batch-16 decode tok/s | greedy = edgecraft fp32 (b1; b16) | process threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def agree(cell):
        if cell is None:
            return "–"
        g = cell["greedy_vs_edgecraft_fp32"]
        return "all" if g["identical"] == g["of"] else f"{g['identical']}/{g['of']} (first diff at {g['min_prefix']})"

    for x in report["lines"]:
        b1, b16 = x["batches"].get("1"), x["batches"].get("16")
        out.append(
            f"| {x['threads']} | {x['row']} | {b1['decode_tok_s']:,.0f} | "
            f"{' '.join(f'{v:,.0f}' for v in b1['decode_tok_s_all'])} | {b1['decode_tok_per_cpu_s']:,.0f} | "
            f"{b1['total_tok_s']:,.0f} | {x['ttft_ms']:.2f} ({x['start_ms']:.3f}) | {b1['cpu_over_wall']:.2f} | "
            f"{'–' if b16 is None else format(b16['decode_tok_s'], ',.0f')} | {agree(b1)}; {agree(b16)} | "
            f"{x['process_threads']['after_decoding']} |"
        )
    out += ["", "| comparison | ratio of medians | paired (per round) | by CPU time |", "|---|---|---|---|"]
    fmt = lambda x: "–" if x is None else f"{x:.2f}×"  # noqa: E731
    out += [f"| {c['what']} | {fmt(c['ratio'])} | {fmt(c['paired'])} | {fmt(c['by_cpu_time'])} |" for c in report["ratios"]]
    target = next((c for c in report["ratios"] if c["what"].startswith("edgecraft fp32 ÷ genai fp32, batch-1 decode, 1 ")), None)
    if target is not None:
        out += ["", f"Issue target, edgecraft fp32 >= genai fp32 (batch-1 decode, 1 thread): {target['ratio']:.3f}× "
                    f"(paired {target['paired']:.3f}×, by CPU time {target['by_cpu_time']:.3f}×): "
                    f"{'met' if target['ratio'] >= 1 else 'MISSED'}."]
    out += [f"\nNote: {n}" for n in report["notes"]]
    return "\n".join(out)


def ratios(lines: list[dict]) -> list[dict]:
    """Row-over-row ratios: of medians, paired within rounds (the median of per-round ratios), by CPU time."""
    cells = {(x["row"], x["threads"], b): v for x in lines for b, v in x["batches"].items()}
    ttft = {(x["row"], x["threads"]): x["ttft_ms"] for x in lines}
    pairs = (("edgecraft-fp32", "genai-fp32"), ("edgecraft-int8", "genai-int4"), ("edgecraft-int4", "genai-int4"),
             ("edgecraft-int4", "edgecraft-int8"), (GENAI_LOOP, "genai-fp32"), ("edgecraft-fp32", GENAI_LOOP))
    out = []
    for (row, t, b), v in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        for ours, theirs in pairs:
            w = cells.get((theirs, t, b))
            if row == ours and w is not None:
                paired = statistics.median(x / y for x, y in zip(v["decode_tok_s_all"], w["decode_tok_s_all"]))
                out.append({"what": f"{ours.replace('-', ' ')} ÷ {theirs.replace('-', ' ')}, batch-{b} decode, "
                                    f"{t} thread(s)", "ratio": v["decode_tok_s"] / w["decode_tok_s"], "paired": paired,
                            "by_cpu_time": v["decode_tok_per_cpu_s"] / w["decode_tok_per_cpu_s"]})
    for (row, t), v in ttft.items():
        if row == "edgecraft-fp32" and ("genai-fp32", t) in ttft:
            out.append({"what": f"genai fp32 TTFT ÷ edgecraft fp32 TTFT, {t} thread(s)",
                        "ratio": ttft[("genai-fp32", t)] / v, "paired": None, "by_cpu_time": None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flags(parser, "char-1m-llama", ROWS, "peers_genai", [1, 2], rounds=7)
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size without --run")
    parser.add_argument("--genai-python", default=sys.executable, help="Python with onnxruntime-genai (SETUP makes one)")
    parser.add_argument("--genai-precisions", default="fp32,int4")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    args = parser.parse_args()
    if args.render:
        report = {"title": TITLE, **json.loads(args.render.read_text())}
        report["ratios"] = ratios(report["lines"])
        report["notes"] += [n for n in args.note if n not in report["notes"]]
        write_report(report, args.out)
        return

    def train(a):
        return train_run(a, "char-1m-llama", "--set", f"train.batch_size={a.batch_size}", "--set", "train.eval_every=100",
                         "--set", "train.eval_batches=5", "--set", f"train.checkpoint_every={a.steps}",
                         "--set", f"train.sample_every={10 * a.steps}")

    run, bundle, cfg = start(args, train)
    threads, batches = args.threads, args.batches
    kinds = [k for k in args.genai_precisions.split(",") if k]
    rows = [r for r in args.rows.split(",")
            if r and (r == GENAI_LOOP or not r.startswith("genai") or r.split("-")[1] in kinds)]
    notes = list(args.note)
    if "edgecraft-int8" in rows and not has_int8(bundle):
        rows.remove("edgecraft-int8")
        notes.append(f"edgecraft-int8 not measured: {bundle} has no model.int8.onnx")
    if "edgecraft-int4" in rows and "model.int4.onnx" not in json.loads((bundle / "edgecraft.json").read_text())["files"]:
        rows.remove("edgecraft-int4")
        notes.append(f"edgecraft-int4 not measured: {bundle} has no model.int4.onnx (export it with --int4)")
    gen_len = min(args.prompt_len, cfg.block_size - args.new_tokens)
    all_prompts = prompts(run, max(batches), args.prompt_len)
    print("preparing the genai models ...", file=sys.stderr, flush=True)
    prep = harness.child(__file__, "prepare", {"run": str(run), "work": str(args.work / "genai"), "probe": all_prompts[0],
                                               "threads": threads, "kinds": kinds}, python=args.genai_python)
    print(json.dumps({k: v for k, v in prep.items() if k != "builder"}), file=sys.stderr)
    dirs = {f"genai-{k}": {str(t): str(genai_dir(args.work / "genai", k, t)) for t in threads} for k in kinds}
    dirs[GENAI_LOOP] = {str(t): str(bundle_for_genai(bundle, args.work / "genai", t)) for t in threads}
    recipe_note = (f"{run}" if args.run else f"recipes/char-1m-llama.toml trained {args.steps} steps at batch "
                   f"{args.batch_size} on {args.corpus or 'the built-in corpus'}")
    header = {
        **harness.RunInfo(TITLE).data, "format": "edgecraft-peers-genai/1", "prepare": prep, "notes": notes,
        "genai_libraries": harness.child(__file__, "versions", python=args.genai_python),
        "model": f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, context "
                 f"{cfg.block_size}, vocab {cfg.vocab_size}, {cfg.norm}/{cfg.pos}/{cfg.mlp}",
        "run_note": f"Weights: {recipe_note}.",
        "settings": {"prompt_len": args.prompt_len, "gen_prompt_len": gen_len, "new_tokens": args.new_tokens,
                     "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds,
                     "warmup_rounds": args.warmup_rounds, "threads": threads, "batches": batches, "rows": rows},
    }
    loads = []

    def row(name: str, t: int):
        spec = {"row": name, "threads": t, "batches": batches, "bundle": str(bundle), "genai_dirs": dirs,
                "pad_token_id": prep["pad_token_id"], "prompts": all_prompts, "prompt_len": args.prompt_len,
                "gen_prompt_len": gen_len, "new_tokens": args.new_tokens, "runs": args.runs, "warmup": args.warmup}
        python = sys.executable if name.startswith("edgecraft") else args.genai_python

        def measure():
            if (name, t) == (rows[0], threads[0]):
                loads.append(os.getloadavg()[0])
            r = harness.child(__file__, "row", spec, python=python)
            print(f"{name} t{t}: b1 {r['batches']['1']['decode_tok_s']:,.0f} tok/s, ttft {r['ttft_ms']:.2f} ms",
                  file=sys.stderr, flush=True)
            return r
        return measure

    def report(done: dict[tuple, list]) -> dict:
        lines = summarize(done)
        return {**header, "rounds_measured": len(next(iter(done.values()))), "load_after": os.getloadavg(),
                "load_per_round": loads, "lines": lines, "ratios": ratios(lines)}

    done = harness.interleave({(n, t): row(n, t) for t in threads for n in rows}, args.rounds, args.warmup_rounds,
                              after_round=lambda d: write_report(report(d), args.out))
    print(markdown(report(done)))


def write_report(report: dict, out: Path) -> None:
    harness.write_atomic(out / "peers_genai.json", json.dumps(report, indent=1) + "\n")
    harness.write_atomic(out / "peers_genai.md", harness.render(report, markdown(report)))


if __name__ == "__main__":
    if not harness.serve_child({
        "row": measure_row,
        "prepare": lambda p: prepare_genai(Path(p["run"]), Path(p["work"]), p["probe"], p["threads"], p["kinds"]),
        "versions": lambda p: harness.versions(GENAI_LIBRARIES),
    }):
        main()
