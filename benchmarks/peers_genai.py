"""edgecraft's llama-style bundle against onnxruntime-genai on the same weights, side by side.

    python benchmarks/peers_genai.py [--run runs/char-1m-llama] [--corpus FILE] \
        [--genai-python /work/genai-venv/bin/python] [--threads 1,2] [--rounds 7]

Both sides decode the SAME trained edgecraft llama-style run (recipes/char-1m-llama.toml: RMSNorm,
rotary positions, SwiGLU, width 128, 6 layers, 8 heads, d_ff 512, context 256). Without --run the
recipe is trained briefly (--steps 300 at --batch-size 8 by default) on --corpus (default:
tinyshakespeare.txt in the shared data folder beside the repository, else the recipe's built-in
corpus).

Steps:
1. edgecraft side (this Python): the run is exported to a bundle (model.onnx, and model.int8.onnx).
2. genai side (--genai-python, an environment with onnxruntime-genai, transformers 5.x, onnx,
   onnx-ir, torch; it does not share one with edgecraft's transformers 4.x peers; SETUP below
   has the commands that made it): the run's weights become a Hugging Face LlamaForCausalLM
   directory (rotary in the half-split "rotate_half" form that both use, RMSNorm eps 1e-5, tied
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

Figures per row (token ids in and out, no tokenization anywhere):
- decode tok/s: greedy batch-1 decode steps after the first token, i.e. (N - 1) / time of the
  N - 1 one-token steps that produce tokens 2..N, N = --new-tokens (200) after a prompt of
  block_size - N tokens (56: the engine's KV buffers hold block_size positions); each step
  includes reading the chosen token back into Python;
- total tok/s: N / (prefill + all steps), the prompt's prefill included;
- TTFT: a fresh sequence of a --prompt-len (64) token prompt to its first greedy token (edgecraft:
  reset + prefill + argmax; genai: new Generator + append_tokens + generate_next_token);
- batch 16: aggregate decode tok/s of 16 sequences (distinct prompts), the same way.
Row genai-loop-edgecraft-fp32 is genai's Generator over edgecraft's own fp32 graph (the bundle's
genai_config.json; batch 1 only): beside genai-fp32 it compares the two graphs under one decode
loop, beside edgecraft-fp32 the two decode loops over one graph.
Greedy tokens of each row are compared with edgecraft fp32's (identical sequences and first
divergence); the thread count is checked from inside each worker (threads of the process and its
CPU time over wall time while decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peers import agreement, child, edgecraft_cli, prompts, start  # shared with peers.py

SETUP = (
    "python -m venv /work/genai-venv && /work/genai-venv/bin/pip install torch==2.13.0 && "
    "/work/genai-venv/bin/pip install torch==2.13.0 onnxruntime-genai 'transformers>=5,<6' onnx onnx-ir numpy "
    "safetensors"
)  # torch pinned first (the local CPU wheel) so pip never resolves another, CUDA-sized torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_GENAI_PYTHON = "/work/genai-venv/bin/python"
# genai's own decode loop over edgecraft's fp32 graph, through the bundle's genai_config.json
# (batch 1 only: genai feeds the graph's sequence counters at batch 1): against genai-fp32 it
# compares the two graphs under one loop, against edgecraft-fp32 the two loops over one graph
GENAI_LOOP = "genai-loop-edgecraft-fp32"
ROWS = ("edgecraft-fp32", "edgecraft-int8", GENAI_LOOP, "genai-fp32", "genai-int4")
LLAMA_SHAPE = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": True}


# ---------------------------------------------------------------- genai side: HF model and builder


def llama_from_run(run_dir: Path):
    """A transformers LlamaForCausalLM of the run's shape carrying the run's weights."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    path = run_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
        weights = {name: f.get_tensor(name) for name in f.keys()}
    shape = {k: cfg.get(k) for k in LLAMA_SHAPE}
    if shape != LLAMA_SHAPE:
        raise SystemExit(f"onnxruntime-genai's Llama builder needs a llama-style run; {path} has {shape}")
    from edgecraft.config import ROPE_THETA

    D, H = cfg["d_model"], cfg["n_heads"]
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=cfg["d_ff"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=H, num_key_value_heads=H, head_dim=D // H,
        hidden_act="silu", max_position_embeddings=cfg["block_size"], rms_norm_eps=1e-5,  # nn.RMSNorm(eps=1e-5)
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        torch_dtype="float32",
    )
    state = {"model.embed_tokens.weight": weights.get("tok_emb.weight", weights.get("head.weight")),
             "model.norm.weight": weights["norm_f.weight"]}
    for i in range(cfg["n_layers"]):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = weights[p + "attn.qkv.weight"].split(D, dim=0)  # rows: q | k | v, heads in order
        state |= {
            q + "input_layernorm.weight": weights[p + "norm1.weight"],
            q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": weights[p + "attn.proj.weight"],
            q + "post_attention_layernorm.weight": weights[p + "norm2.weight"],
            q + "mlp.gate_proj.weight": weights[p + "mlp.gate.weight"],
            q + "mlp.up_proj.weight": weights[p + "mlp.up.weight"],
            q + "mlp.down_proj.weight": weights[p + "mlp.proj.weight"],
        }
    model = LlamaForCausalLM(config).eval()
    state = {k: v.contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
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
    import torch

    from edgecraft.checkpoint import load_model

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = llama_from_run(run_dir)
    ids = torch.tensor([probe])
    with torch.no_grad():
        ours = load_model(run_dir / "model.safetensors").eval()(ids)[0][0]  # (T, V)
        theirs = model(ids).logits[0]
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"LlamaForCausalLM built from {run_dir} disagrees with edgecraft: max |logit diff| {diff:.2e}")
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
        report["builder"][kind]["max_abs_last_logit_diff_vs_edgecraft"] = float(np.abs(logits - ours[-1].numpy()).max())
    return report


# ---------------------------------------------------------------- generators (one per row kind)


class EdgecraftGen:
    """Greedy decoding through edgecraft's engine (the bundle's graph), as decode_speed.py does."""

    def __init__(self, bundle: Path, int8: bool, threads: int) -> None:
        from edgecraft.runtime import load

        self.engine = load(bundle, int8=int8, threads=threads).engine

    def start(self, prompt: np.ndarray) -> None:
        """What starting a sequence costs before any model call."""
        self.engine.reset(prompt.shape[0])

    def ttft(self, prompt: np.ndarray) -> int:
        e = self.engine
        e.reset(prompt.shape[0])
        return int(e.prefill(prompt)[0, -1].argmax(-1))

    def generate(self, prompt: np.ndarray, n: int) -> tuple[np.ndarray, float, float, float]:
        """(tokens (B, n), seconds for the prefill and first token, seconds for the n - 1 steps,
        CPU seconds of this process for those steps)."""
        e = self.engine
        B = prompt.shape[0]
        out = np.empty((B, n), dtype=np.int64)
        t0 = time.perf_counter()
        e.reset(B)
        tok = e.prefill(prompt)[:, -1].argmax(-1)  # (B,)
        out[:, 0] = tok
        t1, c1 = time.perf_counter(), time.process_time()
        for i in range(1, n):
            tok = e.decode(tok).argmax(-1)
            out[:, i] = tok
        return out, t1 - t0, time.perf_counter() - t1, time.process_time() - c1


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
        gen = EdgecraftGen(Path(spec["bundle"]), row.endswith("int8"), threads)
    else:
        gen = GenaiGen(Path(spec["genai_dirs"][row][str(threads)]))
    after = _threads_now()
    prompts = np.array(spec["prompts"], dtype=np.int64)
    if (prompts == spec["pad_token_id"]).any():
        raise SystemExit(f"a prompt holds genai's pad_token_id {spec['pad_token_id']}: genai would mask it")
    n = spec["new_tokens"]
    gen_len = spec["gen_prompt_len"]
    result = {"row": row, "threads": threads, "process_threads": {"before_load": before, "after_load": after},
              "batches": {}}
    ttft_prompt = prompts[:1, : spec["prompt_len"]]
    for _ in range(spec["warmup"]):
        gen.ttft(ttft_prompt)
    ttft = []
    for _ in range(spec["runs"]):
        best = min(_timed(gen.ttft, ttft_prompt) for _ in range(5))
        ttft.append(best * 1e3)
    result["ttft_ms"] = statistics.median(ttft)
    result["start_ms"] = min(_timed(gen.start, ttft_prompt) for _ in range(20)) * 1e3
    result["ttft_first_token"] = gen.ttft(ttft_prompt)
    for batch in spec["batches"]:
        if row == GENAI_LOOP and batch > 1:
            continue
        prompt = prompts[:batch, :gen_len]
        for _ in range(spec["warmup"]):
            gen.generate(prompt, n)
        decode, decode_cpu, total, cpu_ratio, tokens = [], [], [], [], None
        for _ in range(spec["runs"]):
            c0, w0 = time.process_time(), time.perf_counter()
            tokens, first, steps, steps_cpu = gen.generate(prompt, n)
            c1, w1 = time.process_time(), time.perf_counter()
            decode.append(batch * (n - 1) / steps)
            decode_cpu.append(batch * (n - 1) / steps_cpu)
            total.append(batch * n / (first + steps))
            cpu_ratio.append((c1 - c0) / (w1 - w0))
        result["batches"][str(batch)] = {
            "decode_tok_s": statistics.median(decode), "decode_tok_per_cpu_s": statistics.median(decode_cpu),
            "total_tok_s": statistics.median(total),
            "cpu_over_wall": statistics.median(cpu_ratio), "tokens": tokens.tolist(),
            "runs_decode_tok_s": decode,
        }
    result["process_threads"]["after_decoding"] = _threads_now()
    return result


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the comparison (edgecraft's Python)


def train_run(args) -> Path:
    """Without --run: recipes/char-1m-llama.toml trained briefly (on --corpus if given)."""
    sets = ["--set", f"train.max_steps={args.steps}", "--set", f"train.batch_size={args.batch_size}",
            "--set", "train.eval_every=100", "--set", "train.eval_batches=5",
            "--set", f"train.checkpoint_every={args.steps}", "--set", f"train.sample_every={10 * args.steps}"]
    if args.corpus is not None:
        sets += ["--set", f"data.source={args.corpus}"]
    edgecraft_cli("train", str(REPO / "recipes" / "char-1m-llama.toml"), *sets, "--runs-dir", str(args.work / "runs"),
                  "--force")
    return args.work / "runs" / "char-1m-llama"


def bundle_for_genai(bundle: Path, work: Path, threads: int) -> Path:
    """A copy of the bundle whose genai_config.json asks for `threads` intra-op threads."""
    out = work / f"edgecraft-bundle-t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


def summarize(rounds: list[dict], warmup_rounds: int) -> list[dict]:
    """Per (row, threads): medians over the measured rounds, all rounds' values, agreement."""
    cells: dict[tuple, list[dict]] = {}
    for k, r in rounds:
        if k >= warmup_rounds:
            cells.setdefault((r["row"], r["threads"]), []).append(r)
    ref = {t: rs[-1] for (row, t), rs in cells.items() if row == "edgecraft-fp32"}
    lines = []
    for (row, t), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], ROWS.index(kv[0][0]))):
        line = {"row": row, "threads": t, "rounds": len(rs),
                "ttft_ms": statistics.median(r["ttft_ms"] for r in rs), "ttft_ms_all": [r["ttft_ms"] for r in rs],
                "start_ms": statistics.median(r["start_ms"] for r in rs),
                "process_threads": rs[-1]["process_threads"], "batches": {}}
        for b in rs[-1]["batches"]:
            vals = [r["batches"][b] for r in rs]
            line["batches"][b] = {
                "decode_tok_s": statistics.median(v["decode_tok_s"] for v in vals),
                "decode_tok_s_all": [v["decode_tok_s"] for v in vals],
                "decode_tok_per_cpu_s": statistics.median(v["decode_tok_per_cpu_s"] for v in vals),
                "total_tok_s": statistics.median(v["total_tok_s"] for v in vals),
                "cpu_over_wall": statistics.median(v["cpu_over_wall"] for v in vals),
                "greedy_vs_edgecraft_fp32": agreement(vals[-1]["tokens"], ref[t]["batches"][b]["tokens"]),
                "tokens_first_seq": vals[-1]["tokens"][0],
            }
        lines.append(line)
    return lines


def markdown(report: dict) -> str:
    from edgecraft.bench.system import describe

    s = report["settings"]
    prep = report["prepare"]
    libs = report["genai_libraries"]
    out = [
        "# edgecraft llama-style vs onnxruntime-genai", "",
        f"Machine: {describe(report['machine'])}".replace("\n", "  \n") + "  ",
        "genai's Python: " + ", ".join(f"{k} {v}" for k, v in libs.items()), "",
        f"Load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in report['load_before'])}, after: "
        f"{'/'.join(f'{x:.2f}' for x in report['load_after'])}; per round: "
        f"{', '.join(f'{x:.2f}' for x in report['load_per_round'])}.", "",
        f"Model: {report['model']}. {report['run_note']}", "",
        f"Command: `{report['command']}` (edgecraft's Python; genai's environment: `{SETUP}`).", "",
        f"Both sides run the same weights. The Hugging Face LlamaForCausalLM made from the run matches "
        f"edgecraft's PyTorch model to {prep['max_abs_logit_diff_hf_vs_edgecraft']:.1e} (max |logit diff| over a "
        f"{s['prompt_len']}-token prompt); genai's graphs' last-position logits after that prompt differ from "
        "edgecraft's by " + ", ".join(f"{k} {v['max_abs_last_logit_diff_vs_edgecraft']:.1e}" for k, v in prep["builder"].items())
        + ". Graphs: " + "; ".join(
            f"genai {k}: {v['nodes']} nodes ({', '.join(f'{n} {op}' for op, n in sorted(v['ops'].items(), key=lambda x: -x[1]))}), "
            f"{v['bytes'] / 1e6:.2f} MB" for k, v in prep["builder"].items()) + ".", "",
        f"Figures: decode tok/s = greedy one-token steps after the first token ({s['new_tokens'] - 1} steps for "
        f"{s['new_tokens']} new tokens after a {s['gen_prompt_len']}-token prompt, each step's token read back); "
        f"total = {s['new_tokens']} tokens / (prefill + steps); TTFT = fresh sequence, {s['prompt_len']}-token prompt to "
        f"its first token (best of 5 per run); start = starting a sequence before any model call (edgecraft: "
        "Engine.reset; genai: GeneratorParams + Generator, which allocates its KV buffers), best of 20. Each (row, threads) is a fresh worker process per round "
        f"({s['runs']} runs after {s['warmup']} warm-up inside it); rows alternate within a round; "
        f"{report['rounds_measured']} measured rounds after {s['warmup_rounds']} warm-up round(s); medians over rounds. "
        "per CPU-s: the same decode steps per CPU-second the worker got (at 1 thread, what the row would do on "
        "an idle core; at 2 threads it counts the pool thread's spinning too). CPU/wall: the worker's CPU time "
        "over wall time for a whole generation (about 1 at 1 thread on an idle machine; up to 2 when a second "
        "thread works). Paired ratios: the median over rounds of the two rows' ratio within the same round. "
        f"{GENAI_LOOP}: genai's Generator over edgecraft's own fp32 graph (the bundle's genai_config.json, batch 1 "
        "only): beside genai-fp32 it compares the two graphs under one decode loop, beside edgecraft-fp32 the two "
        "decode loops over one graph.", "",
        "| threads | row | batch-1 decode tok/s | per round | per CPU-s | total tok/s | TTFT ms (of it: start) | CPU/wall | "
        "batch-16 decode tok/s | greedy = edgecraft fp32 (b1; b16) | process threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in report["lines"]:
        b1, b16 = x["batches"].get("1"), x["batches"].get("16")

        def agree(cell):
            if cell is None:
                return "–"
            g = cell["greedy_vs_edgecraft_fp32"]
            return "all" if g["identical"] == g["of"] else f"{g['identical']}/{g['of']} (first diff at {g['min_prefix']})"

        out.append(
            f"| {x['threads']} | {x['row']} | {b1['decode_tok_s']:,.0f} | "
            f"{' '.join(f'{v:,.0f}' for v in b1['decode_tok_s_all'])} | {b1['decode_tok_per_cpu_s']:,.0f} | {b1['total_tok_s']:,.0f} | {x['ttft_ms']:.2f} ({x['start_ms']:.3f}) | "
            f"{b1['cpu_over_wall']:.2f} | {'–' if b16 is None else format(b16['decode_tok_s'], ',.0f')} | "
            f"{agree(b1)}; {agree(b16)} | {x['process_threads']['after_decoding']} |"
        )
    out += ["", "| comparison | ratio of medians | paired (per round) | by CPU time |", "|---|---|---|---|"]

    def fmt(x):
        return "–" if x is None else f"{x:.2f}×"

    for c in report["ratios"]:
        out.append(f"| {c['what']} | {fmt(c['ratio'])} | {fmt(c['paired'])} | {fmt(c['by_cpu_time'])} |")
    target = next((c for c in report["ratios"] if c["what"].startswith("edgecraft fp32 ÷ genai fp32, batch-1 decode, 1 ")), None)
    if target is not None:
        out += ["", f"Issue target, edgecraft fp32 >= genai fp32 (batch-1 decode, 1 thread): {target['ratio']:.3f}× "
                    f"(paired {target['paired']:.3f}×, by CPU time {target['by_cpu_time']:.3f}×): "
                    f"{'met' if target['ratio'] >= 1 else 'MISSED'}."]
    out += [f"\nNote: {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def paired(lines: list[dict], a: str, b: str, threads: int, batch: str, key: str = "decode_tok_s_all") -> float | None:
    """Median over rounds of row a's figure over row b's in the same round."""
    cells = {x["row"]: x for x in lines if x["threads"] == threads}
    if a not in cells or b not in cells or batch not in cells[a]["batches"] or batch not in cells[b]["batches"]:
        return None
    xs, ys = cells[a]["batches"][batch][key], cells[b]["batches"][batch][key]
    return statistics.median(x / y for x, y in zip(xs, ys))


def ratios(lines: list[dict]) -> list[dict]:
    med = {(x["row"], x["threads"], b): v["decode_tok_s"] for x in lines for b, v in x["batches"].items()}
    cpu = {(x["row"], x["threads"], b): v["decode_tok_per_cpu_s"] for x in lines for b, v in x["batches"].items()}
    ttft = {(x["row"], x["threads"]): x["ttft_ms"] for x in lines}
    out = []
    for (row, t, b), v in sorted(med.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        pairs = (("edgecraft-fp32", "genai-fp32"), ("edgecraft-int8", "genai-int4"), (GENAI_LOOP, "genai-fp32"),
                 ("edgecraft-fp32", GENAI_LOOP))
        for ours, theirs in pairs:
            if row == ours and (theirs, t, b) in med:
                out.append({"what": f"{ours.replace('-', ' ')} ÷ {theirs.replace('-', ' ')}, batch-{b} decode, "
                                    f"{t} thread(s)", "ratio": v / med[(theirs, t, b)],
                            "paired": paired(lines, ours, theirs, t, b),
                            "by_cpu_time": cpu[(ours, t, b)] / cpu[(theirs, t, b)]})
    for (row, t), v in ttft.items():
        if row == "edgecraft-fp32" and ("genai-fp32", t) in ttft:
            out.append({"what": f"genai fp32 TTFT ÷ edgecraft fp32 TTFT, {t} thread(s)", "ratio": ttft[("genai-fp32", t)] / v,
                        "paired": None, "by_cpu_time": None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A trained llama-style edgecraft run (default: train one).")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS if DEFAULT_CORPUS.exists() else None,
                        help="Without --run: train recipes/char-1m-llama.toml on this.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps without --run.")
    parser.add_argument("--batch-size", type=int, default=8, help="Training batch size without --run.")
    parser.add_argument("--bundle", type=Path, help="The run's bundle (default: export it, fp32 and int8).")
    parser.add_argument("--genai-python", default=DEFAULT_GENAI_PYTHON, help="Python with onnxruntime-genai.")
    parser.add_argument("--genai-precisions", default="fp32,int4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="Runs per worker (medianed) after its warm-up.")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up runs inside each worker.")
    parser.add_argument("--rounds", type=int, default=7, help="Measured rounds (each a fresh worker per row).")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgecraft-peers-genai")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", action="append", default=[], help="A line for the report (repeatable).")
    parser.add_argument("--render", type=Path, help="Only re-render peers_genai.md from this peers_genai.json.")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        report["ratios"] = ratios(report["lines"])
        report["notes"] += [n for n in args.note if n not in report["notes"]]
        write_report(report, args.out)
        return

    from edgecraft.bench.system import system_info

    run, bundle, cfg, threads, batches = start(args, train_run)
    kinds = [k for k in args.genai_precisions.split(",") if k]
    rows = [r for r in args.rows.split(",")
            if r and (r == GENAI_LOOP or not r.startswith("genai") or r.split("-")[1] in kinds)]
    notes = list(args.note)
    if "edgecraft-int8" in rows and "model.int8.onnx" not in json.loads((bundle / "edgecraft.json").read_text())["files"]:
        rows.remove("edgecraft-int8")
        notes.append(f"edgecraft-int8 not measured: {bundle} has no model.int8.onnx")
    gen_len = min(args.prompt_len, cfg.block_size - args.new_tokens)
    all_prompts = prompts(run, max(batches), args.prompt_len)
    print("preparing the genai models ...", file=sys.stderr, flush=True)
    prep = child(args.genai_python, ["--prepare"], {"run": str(run), "work": str(args.work / "genai"),
                                                    "probe": all_prompts[0], "threads": threads, "kinds": kinds},
                 script=__file__)
    print(json.dumps({k: v for k, v in prep.items() if k != "builder"}), file=sys.stderr)
    dirs = {f"genai-{k}": {str(t): str(genai_dir(args.work / "genai", k, t)) for t in threads} for k in kinds}
    dirs[GENAI_LOOP] = {str(t): str(bundle_for_genai(bundle, args.work / "genai", t)) for t in threads}
    recipe_note = (f"{run}" if args.run else f"recipes/char-1m-llama.toml trained {args.steps} steps at batch "
                   f"{args.batch_size} on {args.corpus or 'the built-in corpus'}")
    header = {
        "format": "edgecraft-peers-genai/1", "machine": system_info(), "load_before": os.getloadavg(),
        "genai_libraries": child(args.genai_python, ["--versions"], script=__file__),
        "model": f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, context "
                 f"{cfg.block_size}, vocab {cfg.vocab_size}, {cfg.norm}/{cfg.pos}/{cfg.mlp}",
        "run_note": f"Weights: {recipe_note}.",
        "command": "python benchmarks/peers_genai.py " + shlex.join(sys.argv[1:]),
        "settings": {"prompt_len": args.prompt_len, "gen_prompt_len": gen_len, "new_tokens": args.new_tokens,
                     "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds,
                     "warmup_rounds": args.warmup_rounds, "threads": threads, "batches": batches, "rows": rows},
        "prepare": prep, "notes": notes,
    }
    rounds, loads = [], []
    total = args.warmup_rounds + args.rounds
    for k in range(total):
        loads.append(os.getloadavg()[0])
        order = rows if k % 2 == 0 else rows[::-1]  # alternate which row goes first
        for t in threads:
            for row in order:
                spec = {"row": row, "threads": t, "batches": batches, "bundle": str(bundle), "genai_dirs": dirs,
                        "pad_token_id": prep["pad_token_id"],
                        "prompts": all_prompts, "prompt_len": args.prompt_len, "gen_prompt_len": gen_len,
                        "new_tokens": args.new_tokens, "runs": args.runs, "warmup": args.warmup}
                python = sys.executable if row.startswith("edgecraft") else args.genai_python
                r = child(python, ["--row"], spec, script=__file__)
                print(f"round {k + 1}/{total} {row} t{t}: b1 {r['batches']['1']['decode_tok_s']:,.0f} tok/s, "
                      f"ttft {r['ttft_ms']:.2f} ms, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                rounds.append((k, r))
        if k >= args.warmup_rounds:
            lines = summarize(rounds, args.warmup_rounds)
            report = {**header, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "rounds_measured": k + 1 - args.warmup_rounds, "load_after": os.getloadavg(),
                      "load_per_round": loads, "lines": lines, "ratios": ratios(lines)}
            write_report(report, args.out)
    print(markdown(report))


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("peers_genai.json", json.dumps(report, indent=1) + "\n"), ("peers_genai.md", markdown(report))):
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--row", "--prepare", "--versions"):
        payload = json.loads(sys.stdin.read() or "{}")
        out, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not corrupt the JSON line
        if sys.argv[1] == "--row":
            result = measure_row(payload)
        elif sys.argv[1] == "--prepare":
            result = prepare_genai(Path(payload["run"]), Path(payload["work"]), payload["probe"],
                                   payload["threads"], payload["kinds"])
        else:
            result = _versions()
        out.write(json.dumps(result) + "\n")
    else:
        main()
