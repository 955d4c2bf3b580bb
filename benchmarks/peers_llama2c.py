"""llama2.c's hand-written C (run.c) against edgecraft's llama-style fp32 graph, same weights, same machine.

    python benchmarks/peers_llama2c.py --runc llama2c/run [--runc-omp llama2c/run-omp] \
        [--run runs/char-1m-llama] [--rounds 11] [--prompt ROMEO:] [--out benchmarks/results/peers_llama2c] \
        [--backend onnxruntime,tinygrad] [--beam 0,2]

The repository does not ship llama2.c. Get run.c from https://github.com/karpathy/llama2.c (the
plain fp32 `run.c`, the version whose CLI has -t -p -s -n -i -z and prints "achieved tok/s"; this
script's results used the version stored at commit bd182289c596fa6059eb7b3b7c8ccd04b5c90fc3) and
build it as ANCHORS.md's figures were built, single-threaded and with OpenMP:

    gcc -O3 -march=native -ffast-math -o llama2c/run llama2c/run.c -lm
    gcc -O3 -march=native -ffast-math -fopenmp -o llama2c/run-omp llama2c/run.c -lm

The model is the llama-style char-1m shape (recipes/char-1m-llama.toml: RMSNorm, rotary, SwiGLU,
no biases, width 128, 6 layers, 8 heads, d_ff 512, context 256) with random weights (--seed), or
the weights and vocabulary of a trained llama-style run (--run). The same weights are written
twice:
- for run.c, in llama2.c's legacy checkpoint format (what run.c's checkpoint_init_weights reads):
  7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
  vocab_size means an unshared classifier), then float32 token embedding (V, D), rms_att (L, D),
  wq, wk, wv, wo (L, D, D), rms_ffn (L, D), w1 = gate (L, F, D), w2 = down (L, D, F),
  w3 = up (L, F, D), rms_final (D), freq_cis_real and _imag (seq_len, hs / 2; read by older
  run.c versions, skipped by newer ones), and the classifier (V, D) when unshared. edgecraft
  rotates the two halves of each head (x[j], x[j + hs/2]); run.c rotates adjacent pairs
  (x[2j], x[2j + 1]) at the same frequency, so the rows of wq and wk are permuted within each head
  (new 2j <- old j, new 2j+1 <- old j + hs/2); q.k is unchanged since both get the same order. A
  tokenizer.bin (int32 max_token_length, then per token: float32 score, int32 length, bytes) holds
  the character vocabulary.
- for edgecraft, as the direct-built graph (edgecraft.export.graph.build_graph), driven by
  edgecraft.runtime.onnx_engine.OnnxEngine (IO binding, shared KV buffers, denormals flushed),
  and with `--backend ...,tinygrad` also by the tinygrad engine on the CPU (the same graph's
  weights, its stored step plans; one row per `--beam` width, EDGECRAFT_TINYGRAD_BEAM set around
  that row's calls; tinygrad's caches in their default folder, so a first run compiles and a BEAM
  width searches in the warm-up round). Its greedy tokens must equal onnxruntime's.

What run.c does with `RUN model.bin -z tokenizer.bin -t 0 -n 256 -i PROMPT`: it feeds token 1
(Llama's BOS) at position 0, then the prompt encoded with a dummy-prefix space (" " + PROMPT, one
token per character here), each position one full forward pass, then greedy tokens until 256
positions (-n counts every position, prompt included; 256 is the context); it stops early if
token 1 comes out, and times the forward passes of positions 1..255 (its clock starts after the
first), printing "achieved tok/s" from a millisecond clock (a short run's figure is quantised).
A character vocabulary has no BOS, so the token that run.c sees as
id 1 is chosen (ids swapped with the vocabulary's id 1 in run.c's files, the model unchanged) as
one that is neither the space nor in the prompt and that edgecraft's greedy continuation never
emits. edgecraft's loop does the same work: the engine's decode one token at a time from position
0 through 255 (the same forced tokens, then greedy argmax in Python), its clock started after the
first step, tok/s = 255 / time. Rounds alternate run.c and edgecraft (and the OpenMP pair), the
first round is a warm-up; the wall-clock and CPU-time figures and the greedy agreement are defined
in the report's own text (render() below).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

import harness
from edgecraft.config import ROPE_THETA, GPTConfig
from edgecraft.export.graph import build_graph
from edgecraft.runtime.onnx_engine import OnnxEngine

ANCHOR_FLAGS = "-O3 -march=native -ffast-math"


# ------------------------------------------------------------------------------------ weights


def load_weights(run: Path) -> tuple[GPTConfig, dict[str, np.ndarray], list[str]]:
    """(config, state dict as numpy, token strings by id) of a llama-style run."""
    from edgecraft.checkpoint import load_model
    from edgecraft.data import load_tokenizer

    model = load_model(run / "model.safetensors")
    tok = load_tokenizer(run / "tokenizer.json")
    vocab = [tok.decode([i]) or tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    cfg = model.cfg
    if (cfg.norm, cfg.pos, cfg.mlp, cfg.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise SystemExit(f"{run}: run.c needs a llama-style model (rmsnorm, rope, swiglu, no "
                         f"biases), got norm={cfg.norm} pos={cfg.pos} mlp={cfg.mlp} bias={cfg.bias}")
    if len(vocab) != cfg.vocab_size or len(set(vocab)) != len(vocab):
        raise SystemExit(f"{run}: the vocabulary's {len(vocab)} token strings must be distinct "
                         f"and match vocab_size {cfg.vocab_size}")
    return cfg, {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}, vocab


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a (n_heads * hs, D) q or k matrix from half-split to adjacent-pair rotary order."""
    hs = w.shape[0] // n_heads
    within = np.stack([np.arange(hs // 2), np.arange(hs // 2) + hs // 2], axis=1).reshape(-1)  # (hs,)
    rows = (np.arange(n_heads)[:, None] * hs + within[None, :]).reshape(-1)  # (D,)
    return w[rows]


def write_llama2c(path: Path, cfg: GPTConfig, w: dict[str, np.ndarray], order: np.ndarray) -> None:
    """llama2.c's legacy checkpoint; `order[r]` is the edgecraft token id that run.c calls r."""
    D, L, nh, hs = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_size
    layers = range(L)
    qkv = [w[f"blocks.{i}.attn.qkv.weight"] for i in layers]  # (3D, D) each: q, k, v rows
    tied = cfg.tie_embeddings
    vocab = cfg.vocab_size if tied else -cfg.vocab_size
    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, hs, 2, dtype=np.float32) / hs)
    angles = np.outer(np.arange(cfg.block_size, dtype=np.float32), inv_freq)  # (block, hs/2)
    arrays = [
        w["tok_emb.weight"][order],  # (V, D)
        np.stack([w[f"blocks.{i}.norm1.weight"] for i in layers]),  # (L, D)
        np.stack([interleave_rows(m[:D], nh) for m in qkv]),  # wq (L, D, D)
        np.stack([interleave_rows(m[D : 2 * D], nh) for m in qkv]),  # wk
        np.stack([m[2 * D :] for m in qkv]),  # wv
        np.stack([w[f"blocks.{i}.attn.proj.weight"] for i in layers]),  # wo (L, D, D)
        np.stack([w[f"blocks.{i}.norm2.weight"] for i in layers]),  # (L, D)
        np.stack([w[f"blocks.{i}.mlp.gate.weight"] for i in layers]),  # w1 (L, F, D)
        np.stack([w[f"blocks.{i}.mlp.proj.weight"] for i in layers]),  # w2 (L, D, F)
        np.stack([w[f"blocks.{i}.mlp.up.weight"] for i in layers]),  # w3 (L, F, D)
        w["norm_f.weight"],  # (D,)
        np.cos(angles), np.sin(angles),  # freq_cis_real, freq_cis_imag (block, hs/2)
    ]
    if not tied:
        arrays.append(w["head.weight"][order])  # (V, D)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", D, cfg.d_ff, L, nh, nh, vocab, cfg.block_size))
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def write_tokenizer(path: Path, pieces: list[str]) -> None:
    """run.c's tokenizer.bin: max_token_length, then (score, length, bytes) per token."""
    raw = [p.encode("utf-8") for p in pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(b) for b in raw)))
        for b in raw:
            f.write(struct.pack("fi", 0.0, len(b)) + b)


# ------------------------------------------------------------------------------------ runners


class EdgecraftLoop:
    """run.c's loop on edgecraft's Engine: one position per call, forced tokens then greedy.
    `beam` None: onnxruntime; else the tinygrad engine (CPU, 1 thread) with that BEAM width."""

    def __init__(self, path: Path, cfg: GPTConfig, threads: int, beam: int | None = None) -> None:
        self.beam = beam
        if beam is None:
            self.engine = OnnxEngine(path, cfg, threads=threads)
        else:
            from edgecraft.runtime.tinygrad.engine import BEAM_ENV, TinygradEngine

            self._beam_env = BEAM_ENV
            with self._beam():
                self.engine = TinygradEngine(path, cfg, device="cpu")

    def _beam(self):
        """EDGECRAFT_TINYGRAD_BEAM as this loop's width while it runs (the engine reads it per step shape)."""
        if self.beam is None:
            return contextlib.nullcontext()
        return mock.patch.dict(os.environ, {self._beam_env: str(self.beam)})

    def generate(self, first: int, forced: list[int], steps: int) -> tuple[float, float, list[int]]:
        """(tok/s over positions 1..steps-1, the CPU seconds of this process over them, the greedy
        tokens after the forced ones)."""
        with self._beam():
            return self._generate(first, forced, steps)

    def _generate(self, first: int, forced: list[int], steps: int) -> tuple[float, float, list[int]]:
        e = self.engine
        e.reset(1)
        tok = np.array([first], dtype=np.int64)
        out: list[int] = []
        t0 = c0 = 0.0
        for pos in range(steps):
            logits = e.decode(tok)  # (1, V)
            if pos < len(forced):
                nxt = forced[pos]
            else:
                nxt = int(logits[0].argmax())
                out.append(nxt)
            tok[0] = nxt
            if pos == 0:
                t0, c0 = time.perf_counter(), time.process_time()
        return (steps - 1) / (time.perf_counter() - t0), time.process_time() - c0, out


def run_runc(binary: str, model: Path, tokenizer: Path, prompt: str, steps: int, threads: int) -> tuple[float | None, float, str]:
    """(run.c's "achieved tok/s" (None for a 1-step run, which prints none), the CPU seconds of
    the whole process (user + system, from the kernel's accounting of children), its stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [binary, str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", prompt]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = re.search(rb"achieved tok/s: ([0-9.]+)", done.stderr)
    if not found and steps > 1:
        raise SystemExit(f"{' '.join(cmd)}: no 'achieved tok/s' in its output:\n{done.stderr.decode()}")
    return (float(found.group(1)) if found else None), cpu, done.stdout.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------ setup


def choose_bos(loop: EdgecraftLoop, vocab: list[str], prompt_ids: list[int], steps: int) -> tuple[int, list[int]]:
    """An edgecraft token to play run.c's id 1: not the space, not in the prompt, never emitted by
    the greedy continuation (run.c stops at id 1). Returns it and that continuation."""
    space = vocab.index(" ")
    for c in sorted(range(len(vocab)), key=lambda i: (vocab[i].isalnum(), i)):  # punctuation first
        if c == space or c in prompt_ids:
            continue
        _, _, out = loop.generate(c, [space] + prompt_ids, steps)
        if c not in out:
            return c, out
    raise SystemExit("no token can stand in for run.c's BOS: every candidate is emitted greedily")


def agreement(ours: list[int], vocab: list[str], text: str) -> tuple[int, int]:
    """(how many of edgecraft's greedy tokens run.c's continuation text reproduces in a row,
    how many edgecraft produced)."""
    at = 0
    for n, t in enumerate(ours):
        if not text.startswith(vocab[t], at):
            return n, len(ours)
        at += len(vocab[t])
    return len(ours), len(ours)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runc", required=True, help="run.c built single-threaded (see the docstring)")
    parser.add_argument("--runc-omp", help="run.c built with -fopenmp: adds the 2-thread pair")
    parser.add_argument("--flags", default=ANCHOR_FLAGS, help="the gcc flags the binaries were built with (for the report)")
    parser.add_argument("--run", type=Path, help="a trained llama-style run directory (default: random weights)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights without --run")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--steps", type=int, default=256, help="run.c's -n: positions, prompt included")
    parser.add_argument("--rounds", type=int, default=11, help="measured rounds (after one warm-up)")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    parser.add_argument("--backend", default="onnxruntime",
                        help="edgecraft rows: onnxruntime, tinygrad or both, comma-separated (tinygrad: 1 thread only)")
    parser.add_argument("--beam", default="0", help="tinygrad rows' EDGECRAFT_TINYGRAD_BEAM widths, comma-separated (0: none)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends or set(backends) - {"onnxruntime", "tinygrad"}:
        raise SystemExit(f"--backend takes onnxruntime and/or tinygrad, got {args.backend!r}")
    try:
        beams = [int(b) for b in args.beam.split(",")]
    except ValueError:
        raise SystemExit(f"--beam takes whole numbers, comma-separated, got {args.beam!r}") from None
    if any(b < 0 for b in beams):
        raise SystemExit(f"--beam widths must be >= 0, got {args.beam!r}")
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()
    info = harness.RunInfo("llama2.c run.c vs edgecraft's llama-style fp32 graph, same weights, same machine",
                           f"; {gcc[0] if gcc else 'gcc: not found'}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = args.run or harness.random_run(tmp, "char-1m-llama", args.seed)
        source = f"trained run {args.run}" if args.run else f"random weights (torch.manual_seed({args.seed}), GPT init)"
        cfg, weights, vocab = load_weights(run)
        if args.steps > cfg.block_size:
            raise SystemExit(f"--steps {args.steps} exceeds the context {cfg.block_size}")
        if " " not in vocab:
            raise SystemExit("run.c prepends a space to the prompt: the vocabulary needs ' '")
        missing = sorted(set(args.prompt) - set(vocab))
        if missing:
            raise SystemExit(f"--prompt has characters outside the vocabulary: {missing}")
        prompt_ids = [vocab.index(ch) for ch in args.prompt]
        import onnx

        onnx.save(build_graph(cfg, weights), str(tmp / "llama.onnx"))
        loops = {t: EdgecraftLoop(tmp / "llama.onnx", cfg, t) for t in ((1, 2) if args.runc_omp else (1,))}
        bos, ours = choose_bos(loops[1], vocab, prompt_ids, args.steps)
        tinygrad = {f"edgecraft tinygrad fp32{f' BEAM={b}' if b else ''} (1t)": EdgecraftLoop(tmp / "llama.onnx", cfg, 1, b)
                    for b in (beams if "tinygrad" in backends else [])}
        order = np.arange(cfg.vocab_size)  # run.c id -> edgecraft id: swap `bos` into run.c's 1
        order[[1, bos]] = order[[bos, 1]]
        write_llama2c(tmp / "model.bin", cfg, weights, order)
        write_tokenizer(tmp / "tokenizer.bin", [vocab[i] for i in order])
        files = (tmp / "model.bin", tmp / "tokenizer.bin", args.prompt)
        binaries = {("run.c", 1): args.runc} | ({("run.c OpenMP", 2): args.runc_omp} if args.runc_omp else {})
        # run.c's CPU time for positions 1..255: the whole process's, less that of a 1-position
        # run (start, mmap, tokenizer, position 0), its median over 7 runs
        startup = {name: statistics.median(run_runc(binary, *files, 1, 1)[1] for _ in range(7))
                   for (name, threads), binary in binaries.items() if threads == 1}
        forced = [vocab.index(" ")] + prompt_ids
        rows = {}
        for (name, threads), binary in binaries.items():
            rows[f"{name} ({threads}t)"] = lambda b=binary, t=threads: run_runc(b, *files, args.steps, t)
            if "onnxruntime" in backends:
                rows[f"edgecraft llama-style fp32 ({threads}t)"] = lambda t=threads: loops[t].generate(bos, forced, args.steps)
            if threads == 1:
                for name, loop in tinygrad.items():
                    rows[name] = lambda lp=loop: lp.generate(bos, forced, args.steps)
        loads: list[float] = []  # 1-minute load average after each measured round
        rounds = harness.interleave(rows, args.rounds, after_round=lambda _: loads.append(os.getloadavg()[0]))
        model_bytes = (tmp / "model.bin").stat().st_size

    raw = {k: [r[0] for r in v] for k, v in rounds.items()}
    # tokens per CPU-second, 1 thread only: at 2 threads CPU time counts spinning (OpenMP's start
    # alone can outweigh a run)
    cpu = {k: [(args.steps - 1) / (r[1] - startup.get(k.rsplit(" (", 1)[0], 0.0)) for r in v]
           for k, v in rounds.items() if k.endswith("(1t)")}
    agree = {}
    for name, _ in binaries:
        text = next(r[2] for k, v in rounds.items() if k.startswith(name + " (") for r in v)
        if not text.startswith(args.prompt):
            raise SystemExit(f"{name} printed {text[:40]!r}, not the prompt {args.prompt!r}")
        cont = text[len(args.prompt):].removesuffix("\n")
        n, total = agreement(ours, vocab, cont)
        agree[name] = {"matching_tokens": n, "of": total, "runc_chars": len(cont),
                       "runc_text": cont, "edgecraft_text": "".join(vocab[t] for t in ours)}
    result = {
        "weights": source, "config": cfg.to_dict(), "prompt": args.prompt, "steps": args.steps,
        "runc_bos_stand_in": vocab[bos], "flags": args.flags, "rounds": args.rounds, "model_bin_bytes": model_bytes,
        "tok_s_median": {k: statistics.median(v) for k, v in raw.items()}, "tok_s_rounds": raw,
        "tok_per_cpu_s_median": {k: statistics.median(v) for k, v in cpu.items()}, "tok_per_cpu_s_rounds": cpu,
        "runc_startup_cpu_s": startup, "load_1min_rounds": loads, "greedy_agreement": agree,
        "tinygrad_greedy_equal_onnxruntime": {k: all(r[2] == ours for r in rounds[k]) for k in tinygrad},
    }
    body = render(result, args)
    print(info.markdown(body))
    if args.out:
        info.write(args.out, body, result)


def render(res: dict, args: argparse.Namespace) -> str:
    med, c = res["tok_s_median"], res["config"]
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
    binaries = f"`{args.runc}`" + (f", `{args.runc_omp}` (+ -fopenmp)" if args.runc_omp else "")
    lines = [
        f"Model: llama-style, width {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, d_ff {c['d_ff']}, "
        f"context {c['block_size']}, vocab {c['vocab_size']}, tied embeddings {c['tie_embeddings']}; {res['weights']}. "
        f"model.bin {res['model_bin_bytes']:,} bytes.", "",
        f"run.c binaries {binaries}, built with `gcc {res['flags']} ... -lm`; each round runs "
        f"`RUN model.bin -z tokenizer.bin -t 0 -n {res['steps']} -i '{res['prompt']}'`"
        + (" (the OpenMP build with OMP_NUM_THREADS=2, against edgecraft at 2 threads)" if args.runc_omp else "")
        + " and then edgecraft's engine over the same positions (see the "
        "script's docstring: both time positions 1..255 of one sequence, one forward pass each, "
        f"token {res['runc_bos_stand_in']!r} standing in for run.c's BOS). Medians of "
        f"{res['rounds']} rounds after a warm-up.", "",
        "Wall: tokens per second of wall clock (run.c's own \"achieved tok/s\"; edgecraft's loop timed the "
        "same way). CPU: tokens per CPU-second over the same positions (run.c: the process's user + "
        "system time less a 1-position run's, "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res["runc_startup_cpu_s"].items())
        + "; edgecraft: this process's CPU time over its loop), less sensitive to other processes on a "
        "busy machine; 1-thread rows only (at 2 threads it would count spinning threads).", "",
        "| row | wall tok/s (median) | vs run.c | tok per CPU-second (median) | vs run.c |",
        "|---|---|---|---|---|",
    ]
    cpu = res["tok_per_cpu_s_median"]
    for key, value in med.items():
        threads = key.rsplit("(", 1)[1]
        base = next(k for k in med if k.startswith("run.c") and k.endswith("(" + threads))
        c = f"{cpu[key]:,.0f} | {cpu[key] / cpu[base]:.2f}x" if key in cpu else "- | -"
        lines.append(f"| {key} | {value:,.0f} | {value / med[base]:.2f}x | {c} |")
    lines += ["", "Per round:", ""]
    lines += [f"- {k}: wall {fmt(v)}" + (f"; per CPU-second {fmt(res['tok_per_cpu_s_rounds'][k])}"
                                         if k in res["tok_per_cpu_s_rounds"] else "")
              for k, v in res["tok_s_rounds"].items()]
    lines.append(f"- 1-minute load average after each round: "
                 f"{', '.join(f'{x:.2f}' for x in res['load_1min_rounds'])}")
    lines += ["", "Greedy agreement (run.c's printed continuation vs edgecraft's greedy tokens, same weights "
              "and prompt):", ""]
    for name, a in res["greedy_agreement"].items():
        lines.append(f"- {name}: the first {a['matching_tokens']} of {a['of']} tokens identical "
                     f"(run.c printed {a['runc_chars']} characters)")
    for name, same in res.get("tinygrad_greedy_equal_onnxruntime", {}).items():
        lines.append(f"- {name}: greedy tokens {'identical to' if same else 'DIFFERENT from'} onnxruntime's in every round")
    first = next(iter(res["greedy_agreement"].values()))
    lines += ["", f"edgecraft's continuation (first 120 characters): `{first['edgecraft_text'][:120]!r}`", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
