"""The training loop: schedule, gradient accumulation, clipping, evaluation, samples, checkpoints.

Everything the next step depends on is in a checkpoint (state.py), and batches are a pure
function of (seed, step, micro-step, global row), so a run that is interrupted and resumed ends
with the same weights, bit for bit, as one that is not.

The schedule counts optimizer steps: `grad_accum` micro-batches make one step, and warmup and
cosine decay are measured in steps, so changing `grad_accum` never stretches the schedule. Under
DDP each of the `world` ranks runs this loop on its own rows of every micro-step's global batch
(`batch_size` x world rows); DDP averages the gradients, so a step is the step one process would
take on the whole global batch.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgecraft import data, quant
from edgecraft.checkpoint import save_model
from edgecraft.errors import UserError
from edgecraft.model import GPT
from edgecraft.recipe import Recipe, TrainConfig
from edgecraft.torch_engine import sample_text
from edgecraft.train import distributed as dist
from edgecraft.train.distributed import Group
from edgecraft.train.ema import averaged, update_ema
from edgecraft.train.interrupt import INTERRUPTED, StopFlag, interruptible, signals_to
from edgecraft.train.log import Log, NullLog, progress
from edgecraft.train.recover import diverged, memory_error, out_of_memory
from edgecraft.train.state import restore, save


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay to min_lr.

    Warmup climbs as lr * (step + 1) / (warmup + 1) (nanoGPT's form), the peak is at step
    `warmup_steps`, and the cosine reaches min_lr exactly at the last step, max_steps - 1 (or
    decay_steps - 1, after which min_lr holds).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, (cfg.decay_steps or cfg.max_steps) - 1 - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def fit(
    run_dir: Path, recipe: Recipe, prepared, identity: dict, checkpoint: Path | None, group: Group, batch_size: int
) -> Path:
    """Train from scratch or from `checkpoint` to train.max_steps; `batch_size` rows per micro-batch
    on each rank. Returns the run directory."""
    threads = torch.get_num_threads()
    wanted = dist.threads_per_rank(group, recipe.train.threads)
    if wanted:
        torch.set_num_threads(wanted)
    device = group.device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), interruptible():
            return _loop(run_dir, recipe, prepared, identity, checkpoint, group, batch_size)
    except (MemoryError, RuntimeError) as err:  # a model or batch too large: one line, not a traceback
        if not out_of_memory(err):
            raise
        raise memory_error(err, recipe, device, group.main) from None
    finally:
        torch.set_num_threads(threads)


def _loop(run_dir, recipe: Recipe, prepared, identity: dict, checkpoint, group: Group, B: int) -> Path:
    cfg, T, device = recipe.train, recipe.model.block_size, group.device
    model, optimizer, param_names, state, qat, ema = restore(recipe, prepared, identity, checkpoint, group)
    forward = dist.wrap(group, _compiled(model) if cfg.compile else model)
    autocast = _autocast(cfg, device)

    step = state["step"]
    log = Log(run_dir, resume_step=None if checkpoint is None else step) if group.main else NullLog()
    stop = StopFlag(quiet=not group.main)
    global_batch = B * cfg.grad_accum * group.world
    tokens_per_step = global_batch * T  # over all ranks
    loss_sum = torch.zeros((), device=device)  # summed step losses since the last log
    steps_since_log, train_seconds = 0, 0.0
    saved = step if checkpoint is not None else None
    if group.main:  # before the bar, which would otherwise draw itself on the header's line
        processes = f"{group.world} processes" if group.world > 1 else "1 process"
        print(
            f"{run_dir}: {model.num_params():,} parameters, {len(prepared.train):,} training tokens, "
            f"{'resuming at step ' + str(step) if step else 'starting'} on {device}; global batch "
            f"{global_batch} = batch_size {B} x grad_accum {cfg.grad_accum} x {processes}",
            file=sys.stderr,
        )
    bar = progress(cfg.max_steps, step, enabled=group.main)
    # what a val loss is measured on: eval_batches batches of blocks, or every block of the split
    eval_tokens = min((len(prepared.val) - 1) // T, cfg.eval_batches * B * group.world) * T

    def checkpoint_now() -> None:
        save(run_dir, step, model, optimizer, param_names, state, qat, ema, recipe, group, B)

    try:
        with signals_to(stop):
            while step < cfg.max_steps:
                if recipe.quant.qat and qat is None and step >= recipe.quant.start_step:
                    qat = quant.attach(model, recipe.quant)
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = data.get_batch(prepared.train, B, T, recipe.seed, step, micro, group.rank, group.world)
                    x, y = to_device(batch, device)
                    with dist.no_sync(forward, micro == cfg.grad_accum - 1):
                        try:
                            with autocast:
                                _, loss, _ = forward(x, y)
                        except Exception as err:  # torch.compile fails lazily, on the first call
                            if not cfg.compile or forward is model:
                                raise
                            warnings.warn(f"train.compile: torch.compile failed ({err}); training uncompiled")
                            forward = dist.wrap(group, model)
                            with autocast:
                                _, loss, _ = forward(x, y)
                        (loss / cfg.grad_accum).backward()
                    step_loss += loss.detach()
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    update_ema(ema, optimizer, cfg.ema, step)
                step_loss, stopping = dist.end_step(group, step_loss, stop.set)
                if not torch.isfinite(step_loss):  # every rank sees the same all-reduced loss
                    raise diverged(step, step_loss.item() / cfg.grad_accum, saved, cfg.lr, group.main)
                loss_sum += step_loss
                steps_since_log += 1
                train_seconds += time.perf_counter() - t0
                bar.update(1)

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    train_loss = loss_sum.item() / (steps_since_log * cfg.grad_accum)
                    speed = steps_since_log * tokens_per_step / max(train_seconds, 1e-9)
                    log.event("train", step, loss=train_loss, lr=lr, grad_norm=grad_norm.item(), tokens_per_s=speed)
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed:,.0f}", refresh=False)
                    state["last_train_loss"] = train_loss
                    loss_sum.zero_()
                    steps_since_log, train_seconds = 0, 0.0
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    with averaged(optimizer, ema):
                        val_loss = evaluate(model, prepared.val, recipe, group, B)
                    log.event("eval", step, loss=val_loss)
                    state["last_val_loss"] = val_loss
                    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                        state["best_val_loss"] = val_loss
                    if group.main:
                        bar.write(f"step {step}: val loss {val_loss:.4f} on {eval_tokens:,} tokens of the "
                                  f"validation split", file=sys.stderr)
                if step % cfg.sample_every == 0 and group.main:
                    with averaged(optimizer, ema):
                        log.sample(step, _sample_text(model, prepared, recipe, step))
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
                    checkpoint_now()
                    saved = step
                if stopping:
                    break
    finally:
        bar.close()
        log.close()
    if step < cfg.max_steps:  # stopped by a signal on some rank
        if saved != step:
            checkpoint_now()
        raise UserError(
            f"interrupted at step {step}; checkpoint saved. Continue with: edgecraft train --resume {run_dir}"
            if group.main else "",
            exit_code=INTERRUPTED,
        )
    if qat is not None:  # the exporter reads the observed ranges from here
        dist.average_ranges(group, qat)
        if group.main:
            quant.save_state(qat, run_dir / "quant.safetensors")
        qat.detach()
    if group.main:
        with averaged(optimizer, ema):
            save_model(model, run_dir / "model.safetensors")
    return run_dir


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """Matmuls in bfloat16 when asked (AMX / tensor cores); a no-op context for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def _compiled(model: GPT):
    try:
        return torch.compile(model)
    except Exception as err:
        warnings.warn(f"train.compile: torch.compile is unavailable ({err}); training uncompiled")
        return model


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy (x, y) batch as int64 tensors on `device` (pinned and non-blocking for CUDA)."""
    x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)  # (B, T) int64 each
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


@torch.no_grad()
def evaluate(model: GPT, tokens, recipe: Recipe, group: Group, batch_size: int) -> float:
    """Mean loss per validation token over the split's non-overlapping blocks: the whole split
    when `eval_batches` batches cover it (an exact figure), else the same fixed subset every time.

    Batches hold batch_size x world blocks, each rank scores its own rows and the sums are
    all-reduced: the same blocks and the same figure on any number of processes.
    """
    model.eval()
    cfg, rows = recipe.train, slice(group.rank * batch_size, (group.rank + 1) * batch_size)
    batches = data.val_blocks(tokens, batch_size * group.world, recipe.model.block_size, cfg.eval_batches, recipe.seed)
    sums = torch.zeros(2, dtype=torch.float64, device=group.device)  # (loss x rows, rows)
    with _autocast(cfg, group.device):
        for x, y in batches:
            x, y = x[rows], y[rows]
            if len(x):
                x, y = to_device((x, y), group.device)
                sums[0] += model(x, y)[1].double() * len(x)  # the last batch may be short: weigh by rows
                sums[1] += len(x)
    model.train()
    dist.all_sum(group, sums)
    return (sums[0] / sums[1]).item()


def _sample_text(model: GPT, prepared, recipe: Recipe, step: int) -> str:
    """A sample from the first validation token through runtime.Model's decode loop (the one
    `edgecraft generate` runs); its own RNG leaves the training RNGs alone."""
    start = [int(prepared.val[0])]
    text = sample_text(model, prepared.tokenizer, start, recipe.train.sample_tokens, seed=recipe.seed + step)
    model.train()
    return text
