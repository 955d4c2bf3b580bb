"""Training benchmark: edgecraft vs. nanoGPT's CPU "baby" Shakespeare run, side by side.

    python benchmarks/train_shakespeare.py [--corpus PATH] [--threads 2] [--nanogpt] [--repeats 1] [--seeds 1337]
    python benchmarks/train_shakespeare.py --interleaved 400 [--threads 2]   # step timing only

--corpus is tiny-shakespeare's input.txt (default: ../shared/data/tinyshakespeare.txt where it
exists); nanoGPT's side reads it as a text file, so there is no built-in fallback.

edgecraft trains recipes/shakespeare-baby.toml through the real `edgecraft train` command; with
--nanogpt the same machine then runs nanoGPT's training loop on the same corpus with the same
hyperparameters (4 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations, lr 1e-3 ->
1e-4, warmup 100, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout, bias=False).
edgecraft differs in two things none of those settle: its weights start from GPT-NeoX's
width-aware init (nanoGPT: GPT-2's std 0.02) and it evaluates a weight average (train.ema). Each
run is a fresh process; runs alternate between the two when --repeats > 1. --seeds runs each
seed (the recipe's `seed`; nanoGPT's torch.manual_seed) and adds the mean over seeds.

Reported: the final validation loss (nanoGPT's README: about 1.88 for this run) measured two ways
for both trainers: over the whole validation split (every non-overlapping block: the exact figure,
what edgecraft logs) and as nanoGPT's estimate_loss does it (the mean of 200 batches of random
windows: a sample, off by a few thousandths either way); milliseconds
per training iteration and tokens/s (evaluation excluded; the same statistic for both: the mean
over 10-step windows, as edgecraft logs it, then the median over windows), the wall time of the
whole run, and the share of `threads` cores the run got (well below 100% = a busy machine).

The nanoGPT side (`_nanogpt`) is a faithful minimal re-implementation of Andrej Karpathy's
nanoGPT (https://github.com/karpathy/nanoGPT, MIT license): model.py's GPT, configure_optimizers
and train.py's get_batch, get_lr and loop, with only what this configuration uses (no DDP, no
checkpoints, no AMP: on CPU its autocast context is a no-op and its GradScaler is disabled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

RECIPE = harness.REPO / "recipes" / "shakespeare-baby.toml"

# the baby run, as nanoGPT's README runs it on CPU (config/train_shakespeare_char.py + flags)
BABY = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=False,
    learning_rate=1e-3, max_iters=2000, lr_decay_iters=2000, min_lr=1e-4, warmup_iters=100,
    weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_iters=200,
)


# ---------------------------------------------------------------------------- edgecraft


def run_edgecraft(corpus: Path, threads: int, steps: int, workdir: Path, seed: int = 1337) -> dict:
    exe = Path(sys.executable).with_name("edgecraft")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "edgecraft.cli"])]
    cmd += [
        "train", str(RECIPE), "--runs-dir", str(workdir / "runs"), "--force",
        "--set", f"data.source={json.dumps(str(corpus))}",
        "--set", f"data.cache_dir={json.dumps(str(workdir / 'cache'))}",
        "--set", f"train.threads={threads}",
        "--set", f"train.max_steps={steps}",
        "--set", f"seed={seed}",
    ]
    with _measured(threads) as usage:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"edgecraft train failed:\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in (workdir / "runs" / "shakespeare-baby" / "metrics.jsonl").open()]
    speeds = [e["tokens_per_s"] for e in events if e["event"] == "train"][1:]  # first window warms up
    tok_s = statistics.median(speeds)
    val = [e["loss"] for e in events if e["event"] == "eval"][-1]  # the whole split (see the recipe)
    tokens_per_iter = BABY["batch_size"] * BABY["block_size"]
    return {
        "val_loss": val, "val_loss_200": _random_batches_loss(workdir, corpus, seed),
        "tok_s": tok_s, "ms_per_iter": 1000 * tokens_per_iter / tok_s, **usage,
    }


def _random_batches_loss(workdir: Path, corpus: Path, seed: int) -> float:
    """The final model's loss as nanoGPT estimates it: the mean of 200 batches of random windows
    (edgecraft's data.eval_batches draws them), for comparison with the whole-split figure."""
    import torch

    from edgecraft import data
    from edgecraft.checkpoint import load_model
    from edgecraft.recipe import load_recipe

    recipe = load_recipe(
        RECIPE, [f"data.source={json.dumps(str(corpus))}", f"data.cache_dir={json.dumps(str(workdir / 'cache'))}"]
    )
    val = data.prepare(recipe.data, recipe.model.block_size).val
    model = load_model(workdir / "runs" / "shakespeare-baby" / "model.safetensors").eval()
    B, T = BABY["batch_size"], BABY["block_size"]
    with torch.no_grad():
        losses = [model(*map(torch.from_numpy, b))[1] for b in data.eval_batches(val, B, T, 200, seed)]
    return torch.stack(losses).mean().item()


@contextlib.contextmanager
def _measured(threads: int):
    """Wall time of a child process, and the share of `threads` cores it got (CPU s / wall s):
    well below 1 means other processes were competing for the cores."""
    usage: dict = {}
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    yield usage
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    usage.update(wall_s=wall, cpu_share=cpu / (wall * threads))


# ---------------------------------------------------------------------------- nanoGPT


def _nanogpt_parts(corpus: Path, threads: int, steps: int, seed: int = 1337):
    """nanoGPT's model, optimizer, get_batch, get_lr and estimate_loss for the baby run, and a
    whole-split validation loss (not nanoGPT's) for comparison with edgecraft's figure."""
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    torch.set_num_threads(threads)
    cfg = dict(BABY, max_iters=steps, lr_decay_iters=steps)

    # data/shakespeare_char/prepare.py: sorted characters, first 90% train, uint16
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    splits = {"train": ids[:n], "val": ids[n:]}

    class LayerNorm(nn.Module):
        def __init__(self, ndim, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["n_embd"]
            self.c_attn = nn.Linear(d, 3 * d, bias=cfg["bias"])
            self.c_proj = nn.Linear(d, d, bias=cfg["bias"])
            self.resid_dropout = nn.Dropout(cfg["dropout"])

        def forward(self, x):
            B, T, C = x.size()
            nh = cfg["n_head"]
            q, k, v = self.c_attn(x).split(C, dim=2)
            k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
            q = q.view(B, T, nh, C // nh).transpose(1, 2)
            v = v.view(B, T, nh, C // nh).transpose(1, 2)
            drop = cfg["dropout"] if self.training else 0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=drop, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["n_embd"]
            self.c_fc = nn.Linear(d, 4 * d, bias=cfg["bias"])
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * d, d, bias=cfg["bias"])
            self.dropout = nn.Dropout(cfg["dropout"])

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = LayerNorm(cfg["n_embd"], cfg["bias"])
            self.attn = CausalSelfAttention()
            self.ln_2 = LayerNorm(cfg["n_embd"], cfg["bias"])
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab_size):
            super().__init__()
            d = cfg["n_embd"]
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab_size, d),
                wpe=nn.Embedding(cfg["block_size"], d),
                drop=nn.Dropout(cfg["dropout"]),
                h=nn.ModuleList([Block() for _ in range(cfg["n_layer"])]),
                ln_f=LayerNorm(d, cfg["bias"]),
            ))
            self.lm_head = nn.Linear(d, vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            self.apply(self._init_weights)
            for pn, p in self.named_parameters():
                if pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layer"]))

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            t = idx.size(1)
            pos = torch.arange(0, t, dtype=torch.long)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            # fused AdamW only when device_type == "cuda"
            return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - cfg["block_size"], (cfg["batch_size"],))
        x = torch.stack([torch.from_numpy(data[i : i + cfg["block_size"]].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + cfg["block_size"]].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                losses[k] = model(*get_batch(split))[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    @torch.no_grad()
    def whole_val_loss():  # every non-overlapping block of the val split, mean per token
        model.eval()
        val, T = splits["val"].astype(np.int64), cfg["block_size"]
        n = (len(val) - 1) // T
        x = torch.from_numpy(val[: n * T]).view(n, T)  # (n, T)
        y = torch.from_numpy(val[1 : n * T + 1]).view(n, T)
        total = sum(model(x[i : i + 64], y[i : i + 64])[1].item() * len(x[i : i + 64]) for i in range(0, n, 64))
        model.train()
        return total / n

    def get_lr(it):
        if it < cfg["warmup_iters"]:
            return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
        if it > cfg["lr_decay_iters"]:
            return cfg["min_lr"]
        ratio = (it - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
        return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])

    torch.manual_seed(seed)  # train.py's 1337 + seed_offset
    model = GPT(len(chars))
    return model, model.configure_optimizers(), get_batch, get_lr, estimate_loss, whole_val_loss, cfg


def _nanogpt(corpus: Path, threads: int, steps: int, seed: int = 1337) -> dict:
    """nanoGPT's baby run (see the module docstring); returns the same figures as run_edgecraft."""
    import torch

    model, optimizer, get_batch, get_lr, estimate_loss, whole_val_loss, cfg = _nanogpt_parts(corpus, threads, steps, seed)
    X, Y = get_batch("train")
    t0 = time.time()
    dts, val = [], float("nan")
    for iter_num in range(cfg["max_iters"] + 1):  # nanoGPT's loop stops after iter_num > max_iters
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        evaluated = iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]
        if evaluated:
            val = estimate_loss()["val"]
        if iter_num == cfg["max_iters"]:
            break  # the last eval reports the model after max_iters updates
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        loss.item()  # log_interval = 1 in the README's CPU command
        if not evaluated and iter_num > 0:
            dts.append(dt)
    # the statistic edgecraft's metrics.jsonl gives: mean time over 10-step windows, then the median
    windows = [dts[i : i + 10] for i in range(0, len(dts) - 9, 10)]
    ms = 1000 * statistics.median(statistics.fmean(w) for w in windows)
    return {
        "val_loss": whole_val_loss(),
        "val_loss_200": val,
        "tok_s": cfg["batch_size"] * cfg["block_size"] / (ms / 1000),
        "ms_per_iter": ms,
    }


def interleaved(corpus: Path, threads: int, iters: int, block: int = 25) -> dict[str, dict]:
    """Both training steps in one process, alternating blocks of iterations: machine noise hits
    both alike. Reports the median wall and CPU milliseconds per iteration of each.

    edgecraft's side makes the calls edgecraft.train makes each step (lr_at, data.get_batch, the
    fused AdamW from train.state.make_optimizer, clip, step, the recipe's weight average); no logging, eval
    or checkpoints on either side.
    """
    import torch

    from edgecraft import data
    from edgecraft.model import GPT, GPTConfig
    from edgecraft.recipe import load_recipe
    from edgecraft.train.ema import update_ema as _update_ema
    from edgecraft.train.loop import lr_at
    from edgecraft.train.loop import to_device as _to_device
    from edgecraft.train.state import make_optimizer as _optimizer

    n_model, n_opt, get_batch, get_lr, *_ = _nanogpt_parts(corpus, threads, iters)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(RECIPE, [f"data.source={json.dumps(str(corpus))}", f"data.cache_dir={json.dumps(tmp)}"])
        prepared = data.prepare(recipe.data, recipe.model.block_size)
    cfg, B, T = recipe.train, recipe.train.batch_size, recipe.model.block_size
    torch.manual_seed(recipe.seed)
    e_model = GPT(GPTConfig(vocab_size=prepared.vocab_size, **recipe.model.model_dump())).train()
    e_opt, _ = _optimizer(e_model, cfg)
    e_ema = [p.detach().clone() for group in e_opt.param_groups for p in group["params"]] if cfg.ema else None
    cpu = torch.device("cpu")

    def edgecraft_step(step: int) -> None:
        for group in e_opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = _to_device(data.get_batch(prepared.train, B, T, recipe.seed, step), cpu)
        _, loss, _ = e_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(e_model.parameters(), cfg.grad_clip)
        e_opt.step()
        e_opt.zero_grad(set_to_none=True)
        if e_ema is not None:
            _update_ema(e_ema, e_opt, cfg.ema, step + 1)

    def nanogpt_step(it: int) -> None:
        for group in n_opt.param_groups:
            group["lr"] = get_lr(it)
        _, loss = n_model(*get_batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(n_model.parameters(), 1.0)
        n_opt.step()
        n_opt.zero_grad(set_to_none=True)
        loss.item()

    def blocks(step_fn):  # one round: the next `block` iterations, (wall, CPU) seconds each
        counter = iter(range(iters))

        def run() -> list[tuple[float, float]]:
            out = []
            for i in (next(counter) for _ in range(block)):
                w, c = time.perf_counter(), time.process_time()
                step_fn(i)
                out.append((time.perf_counter() - w, time.process_time() - c))
            return out
        return run

    # the first block of each warms up and is dropped
    rounds = harness.interleave({"edgecraft": blocks(edgecraft_step), "nanoGPT": blocks(nanogpt_step)}, iters // block - 1)
    out = {}
    for name, done in rounds.items():
        wall, cpu = statistics.median(w for r in done for w, _ in r), statistics.median(c for r in done for _, c in r)
        out[name] = {"ms_per_iter": 1000 * wall, "cpu_ms_per_iter": 1000 * cpu, "tok_s": B * T / wall}
    return out


def run_nanogpt(corpus: Path, threads: int, steps: int, seed: int = 1337) -> dict:
    """In a fresh process, as edgecraft's run is."""
    spec = {"corpus": str(corpus), "threads": threads, "steps": steps, "seed": seed}
    with _measured(threads) as usage:
        out = harness.child(__file__, "nanogpt", spec)
    return {**out, **usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=harness.default_corpus(),
                        help="tiny-shakespeare's input.txt (default: ../shared/data/tinyshakespeare.txt if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000, help="iterations (2000 = the published run)")
    parser.add_argument("--nanogpt", action="store_true", help="also run nanoGPT's loop on the same machine")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    parser.add_argument(
        "--seeds", default="1337", help="comma-separated seeds, each run --repeats times (default: the recipe's 1337)"
    )
    parser.add_argument(
        "--interleaved", type=int, metavar="N", default=0,
        help="instead: N training iterations of each in one process, alternating (noise-robust step timing)",
    )
    args = parser.parse_args()
    if args.corpus is None or not args.corpus.is_file():
        sys.exit(f"error: corpus {args.corpus} not found; pass --corpus PATH (tinyshakespeare's input.txt)")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds!r}: expected comma-separated integers, e.g. 1337,1,2")
    print(harness.RunInfo("Training: edgecraft vs nanoGPT's baby Shakespeare run").markdown(""))
    if args.interleaved:
        print(f"corpus: {args.corpus}; {args.interleaved} iterations of each step, alternating, {args.threads} threads")
        results = interleaved(args.corpus, args.threads, args.interleaved)
        print("\n| trainer | ms/iteration (wall) | CPU ms/iteration | tokens/s |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['ms_per_iter']:.1f} | {r['cpu_ms_per_iter']:.1f} | {r['tok_s']:,.0f} |")
        return
    print(
        f"corpus: {args.corpus}, {args.steps} iterations, {args.threads} threads, "
        f"seeds {', '.join(map(str, seeds))}, {args.repeats} repeat(s) each"
    )
    trainers = ["edgecraft", "nanoGPT"] if args.nanogpt else ["edgecraft"]
    results: dict[tuple[str, int], list[dict]] = {(name, seed): [] for seed in seeds for name in trainers}
    for seed in seeds:
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                results["edgecraft", seed].append(run_edgecraft(args.corpus, args.threads, args.steps, Path(tmp), seed))
            print(f"  edgecraft seed {seed} run {i + 1}: {json.dumps(results['edgecraft', seed][-1])}", flush=True)
            if args.nanogpt:
                results["nanoGPT", seed].append(run_nanogpt(args.corpus, args.threads, args.steps, seed))
                print(f"  nanoGPT   seed {seed} run {i + 1}: {json.dumps(results['nanoGPT', seed][-1])}", flush=True)

    print(
        "\n| trainer | seed | final val loss (whole split) | 200 random batches | ms/iteration | tokens/s "
        "| wall s | CPU share |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in trainers:
        medians = []
        for seed in seeds:
            runs = results[name, seed]
            medians.append({k: statistics.median(r[k] for r in runs) for k in runs[0]})
        rows = list(zip(map(str, seeds), medians))
        if len(seeds) > 1:
            rows.append(("mean", {k: statistics.fmean(m[k] for m in medians) for k in medians[0]}))
        for label, m in rows:
            print(
                f"| {name} | {label} | {m['val_loss']:.4f} | {m['val_loss_200']:.4f} | {m['ms_per_iter']:.1f} "
                f"| {m['tok_s']:,.0f} | {m['wall_s']:.0f} | {m['cpu_share']:.0%} |"
            )


if __name__ == "__main__":
    if not harness.serve_child({"nanogpt": lambda p: _nanogpt(Path(p["corpus"]), p["threads"], p["steps"], p["seed"])}):
        main()
