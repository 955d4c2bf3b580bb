"""The training loop: a validated recipe in, a run directory out (`train_recipe(recipe) -> run_dir`).

runs/NAME/ gets the resolved recipe.toml, tokenizer.json, checkpoints/step-NNNNNN/ every
`checkpoint_every` steps, TensorBoard events in tb/, metrics.jsonl, samples.txt and, at the end,
model.safetensors. Everything the next step depends on — weights, AdamW moments, the dropout RNG,
the step — is in a checkpoint, and batches are a pure function of (seed, step, micro-batch), so a
run that is interrupted and resumed ends with the same weights, bit for bit, as one that is not.

The schedule counts optimizer steps: `grad_accum` micro-batches make one step, and warmup and
cosine decay are measured in steps, so changing `grad_accum` never stretches the schedule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from edgecraft import data, quant
from edgecraft.checkpoint import (
    atomic_write_text,
    clean_partial,
    list_checkpoints,
    load_checkpoint_state,
    load_model,
    load_optimizer,
    save_checkpoint,
    save_model,
)
from edgecraft.errors import UserError
from edgecraft.model import GPT, GPTConfig, sample
from edgecraft.recipe import Recipe, TrainConfig, load_recipe, to_toml

INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay to min_lr.

    Warmup climbs as lr * (step + 1) / (warmup + 1) (nanoGPT's form), the peak is at step
    `warmup_steps`, and the cosine reaches min_lr exactly at the last step, max_steps - 1.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def resolve_device(name: str) -> torch.device:
    """train.device -> a torch device; asking for CUDA without one is the user's to fix."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError('train.device: "cuda" asked for, but PyTorch sees no CUDA device (use "auto" or "cpu")')
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_recipe(recipe: Recipe, origin: str) -> None:
    """Everything that can be checked before any work starts (the schema was checked on load)."""
    resolve_device(recipe.train.device)
    if recipe.quant.qat and recipe.quant.start_step >= recipe.train.max_steps:
        raise UserError(
            f"{origin}: quant.start_step: {recipe.quant.start_step} is not before train.max_steps "
            f"({recipe.train.max_steps}), so QAT would never run"
        )
    data.check_source(recipe.data, recipe.model.block_size, origin)


def train_recipe(
    recipe: Recipe, runs_dir: str | Path = "runs", force: bool = False, origin: str = "recipe"
) -> Path:
    """Validate, prepare the data, create runs_dir/NAME and train; returns the run directory.

    An existing run directory is an error unless `force`, and nothing is written (or removed)
    until the recipe and its data have been checked. `origin` names the recipe in error messages.
    """
    check_recipe(recipe, origin)
    run_dir = Path(runs_dir) / recipe.name
    if run_dir.exists() and not force:
        raise UserError(
            f"{run_dir} already exists: pass --force to replace it, "
            f"or continue it with edgecraft train --resume {run_dir}"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; remove it first")
    with _interruptible():
        prepared = data.prepare(recipe.data, recipe.model.block_size)
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
    prepared.tokenizer.save(str(run_dir / "tokenizer.json"))
    return _fit(run_dir, recipe, prepared, checkpoint=None)


def resume_run(run_dir: str | Path) -> Path:
    """Continue a run from its newest complete checkpoint with the recipe stored in it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    recipe_path = run_dir / "recipe.toml"
    recipe = load_recipe(recipe_path)
    check_recipe(recipe, str(recipe_path))
    root = run_dir / "checkpoints"
    clean_partial(root)
    found = list_checkpoints(root)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint in {root} to resume from")
    if (run_dir / "model.safetensors").is_file() and int(found[-1].name[5:]) >= recipe.train.max_steps:
        print(f"{run_dir}: already finished ({recipe.train.max_steps} steps); nothing to do", file=sys.stderr)
        return run_dir
    with _interruptible():
        prepared = data.prepare(recipe.data, recipe.model.block_size)
    state, _ = load_checkpoint_state(found[-1])
    if state.get("data") != _fingerprint(prepared):
        raise UserError(
            f"{run_dir}: the corpus {recipe.data.source} is not the one this run was trained on "
            "(its tokens changed), so the run cannot be resumed exactly"
        )
    return _fit(run_dir, recipe, prepared, checkpoint=found[-1])


def _fingerprint(prepared) -> dict:
    """What identifies the token arrays: their lengths and a hash of their bytes."""
    digest = hashlib.sha256()
    for tokens in (prepared.train, prepared.val):
        for start in range(0, len(tokens), 1 << 24):
            digest.update(np.ascontiguousarray(tokens[start : start + (1 << 24)]).tobytes())
    return {"train_tokens": len(prepared.train), "val_tokens": len(prepared.val), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------- Ctrl-C


class _StopFlag:
    """Set by the first Ctrl-C; the loop checkpoints at the next step boundary and stops.

    Stopping between steps (not wherever KeyboardInterrupt lands) means the checkpoint never holds
    half of an optimizer update. A second Ctrl-C interrupts at once, without a checkpoint.
    """

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to quit now)", file=sys.stderr)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn a KeyboardInterrupt into one clean line and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        raise UserError("interrupted", exit_code=INTERRUPTED) from None


@contextlib.contextmanager
def _sigint_to(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGINT, flag)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------- logging


def _event_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Log:
    """The run's three records: metrics.jsonl, TensorBoard events and samples.txt.

    On resume, events after the checkpoint's step (logged before a kill) are dropped from
    metrics.jsonl and hidden in TensorBoard (purge_step), so both read as one continuous run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.metrics = run_dir / "metrics.jsonl"
        self.samples = run_dir / "samples.txt"
        if resume_step is not None and self.metrics.is_file():
            kept = [
                line
                for line in self.metrics.read_text(encoding="utf-8").splitlines()
                if _event_step(line) <= resume_step
            ]
            atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def event(self, kind: str, step: int, **values: float) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "step": step, **values}) + "\n")
        prefix = {"train": "train/", "eval": "val/"}[kind]
        for key, value in values.items():
            tag = key if key in ("lr", "tokens_per_s", "grad_norm") else prefix + key
            self.tb.add_scalar(tag, value, step)

    def sample(self, step: int, text: str) -> None:
        with self.samples.open("a", encoding="utf-8") as f:
            f.write(f"===== step {step} =====\n{text}\n")
        self.tb.add_text("samples", text, step)

    def close(self) -> None:
        self.tb.close()


# ---------------------------------------------------------------------------- the loop


def _fit(run_dir: Path, recipe: Recipe, prepared, checkpoint: Path | None) -> Path:
    cfg = recipe.train
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), _interruptible():
            return _loop(run_dir, recipe, prepared, checkpoint, device)
    finally:
        torch.set_num_threads(threads)


def _restore(recipe: Recipe, prepared, checkpoint: Path | None, device: torch.device):
    """A fresh model and optimizer (seeded), or both exactly as `checkpoint` left them, RNG too."""
    if checkpoint is None:
        torch.manual_seed(recipe.seed)
        model = GPT(GPTConfig(vocab_size=prepared.vocab_size, **recipe.model.model_dump()))
        state: dict = {
            "step": 0, "best_val_loss": None, "last_val_loss": None, "last_train_loss": None,
            "data": _fingerprint(prepared),
        }
        tensors: dict[str, torch.Tensor] = {}
    else:
        model = load_model(checkpoint / "model.safetensors")
        state, tensors = load_checkpoint_state(checkpoint)
    model.to(device).train()
    optimizer, param_names = _optimizer(model, recipe.train)
    qat = None
    if checkpoint is not None:
        load_optimizer(optimizer, param_names, checkpoint / "optimizer.safetensors")
        torch.set_rng_state(tensors["rng/torch_cpu"])
        if device.type == "cuda" and "rng/torch_cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/torch_cuda"], device)
        if state.get("qat_attached"):
            qat = quant.attach(model, recipe.quant)
            qat.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("qat/")})
    ema = None
    if recipe.train.ema:
        params = dict(model.named_parameters())
        start = {n: tensors.get(f"ema/{n}", params[n].detach()) for n in param_names}
        ema = [start[n].to(device).clone() for n in param_names]  # the optimizer's order
    return model, optimizer, param_names, state, qat, ema


def _loop(run_dir: Path, recipe: Recipe, prepared, checkpoint: Path | None, device: torch.device) -> Path:
    cfg, B, T = recipe.train, recipe.train.batch_size, recipe.model.block_size
    model, optimizer, param_names, state, qat, ema = _restore(recipe, prepared, checkpoint, device)
    forward = _compiled(model) if cfg.compile else model
    autocast = _autocast(cfg, device)

    step = state["step"]
    log = _Log(run_dir, resume_step=None if checkpoint is None else step)
    stop = _StopFlag()
    tokens_per_step = B * T * cfg.grad_accum
    loss_sum = torch.zeros((), device=device)  # summed micro-batch losses since the last log
    steps_since_log, train_seconds = 0, 0.0
    saved = step if checkpoint is not None else None
    bar = _progress(cfg.max_steps, step)
    print(
        f"{run_dir}: {model.num_params():,} parameters, {len(prepared.train):,} training tokens, "
        f"{'resuming at step ' + str(step) if step else 'starting'} on {device}",
        file=sys.stderr,
    )
    try:
        with _sigint_to(stop):
            while step < cfg.max_steps and not stop.set:
                if recipe.quant.qat and qat is None and step >= recipe.quant.start_step:
                    qat = quant.attach(model, recipe.quant)
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(cfg.grad_accum):
                    x, y = _to_device(data.get_batch(prepared.train, B, T, recipe.seed, step, micro), device)
                    try:
                        with autocast:
                            _, loss, _ = forward(x, y)
                    except Exception as err:  # torch.compile fails lazily, on the first call
                        if forward is model:
                            raise
                        warnings.warn(f"train.compile: torch.compile failed ({err}); training uncompiled")
                        forward = model
                        with autocast:
                            _, loss, _ = forward(x, y)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    _update_ema(ema, optimizer, cfg.ema, step)
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
                    with _averaged(optimizer, ema):
                        val_loss = _evaluate(model, prepared.val, recipe, device)
                    log.event("eval", step, loss=val_loss)
                    state["last_val_loss"] = val_loss
                    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                        state["best_val_loss"] = val_loss
                    bar.write(f"step {step}: val loss {val_loss:.4f}", file=sys.stderr)
                if step % cfg.sample_every == 0:
                    with _averaged(optimizer, ema):
                        log.sample(step, _sample_text(model, prepared, recipe, step, device))
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop.set:
                    _checkpoint(run_dir, step, model, optimizer, param_names, state, qat, ema, recipe, device)
                    saved = step
    finally:
        bar.close()
        log.close()
    if stop.set and step < cfg.max_steps:
        if saved != step:
            _checkpoint(run_dir, step, model, optimizer, param_names, state, qat, ema, recipe, device)
        raise UserError(
            f"interrupted at step {step}; checkpoint saved. Continue with: edgecraft train --resume {run_dir}",
            exit_code=INTERRUPTED,
        )
    if qat is not None:  # the exporter reads the observed ranges from here
        quant.save_state(qat, run_dir / "quant.safetensors")
        qat.detach()
    with _averaged(optimizer, ema):
        save_model(model, run_dir / "model.safetensors")
    return run_dir


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def _update_ema(ema: list[torch.Tensor], optimizer: torch.optim.Optimizer, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * weights after optimizer step `step` (1-based), d = min(decay,
    1 - 1/step): the plain mean of all steps so far until the average's window is full, so the
    initial weights never linger in it."""
    torch._foreach_lerp_(ema, _params(optimizer), 1.0 - min(decay, 1.0 - 1.0 / step))


@contextlib.contextmanager
def _averaged(optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None) -> Iterator[None]:
    """The model holds the averaged weights inside the block and its training weights again after."""
    if ema is None:
        yield
        return
    params = _params(optimizer)
    with torch.no_grad():
        trained = [p.clone() for p in params]
        torch._foreach_copy_(params, ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, trained)


def _optimizer(model: GPT, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the model's decay/no-decay groups; fused (one kernel for all tensors) is the
    fastest on CPU and GPU alike. Returns the parameter names in the optimizer's order."""
    groups = model.optimizer_groups(cfg.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [names[id(p)] for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return optimizer, param_names


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """Matmuls in bfloat16 when asked (AMX / tensor cores); a no-op context for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def _compiled(model: GPT):
    try:
        return torch.compile(model)
    except Exception as err:
        warnings.warn(f"train.compile: torch.compile is unavailable ({err}); training uncompiled")
        return model


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)


def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)  # (B, T) int64 each
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


@torch.no_grad()
def _evaluate(model: GPT, tokens, recipe: Recipe, device: torch.device) -> float:
    """Mean loss per validation token over the split's non-overlapping blocks: the whole split
    when `eval_batches` batches cover it (an exact figure), else the same fixed subset every time."""
    model.eval()
    cfg = recipe.train
    batches = data.val_blocks(tokens, cfg.batch_size, recipe.model.block_size, cfg.eval_batches, recipe.seed)
    total, rows = torch.zeros((), dtype=torch.float64, device=device), 0
    with _autocast(cfg, device):
        for batch in batches:
            x, y = _to_device(batch, device)
            total += model(x, y)[1].double() * len(x)  # the last batch may be short: weigh by rows
            rows += len(x)
    model.train()
    return total.item() / rows


def _sample_text(model: GPT, prepared, recipe: Recipe, step: int, device: torch.device) -> str:
    """A sample from the first validation token; its own generator leaves the dropout RNG alone."""
    generator = torch.Generator(device).manual_seed(recipe.seed + step)
    start = torch.tensor(prepared.val[:1].astype(np.int64), device=device)[None]  # (1, 1)
    out = sample(model, start, recipe.train.sample_tokens, temperature=0.8, top_k=40, generator=generator)
    model.train()
    return prepared.tokenizer.decode(out[0].tolist())


def _checkpoint(run_dir, step, model, optimizer, param_names, state, qat, ema, recipe, device) -> Path:
    cfg = recipe.train
    state = {
        **state,
        "step": step,
        "tokens_seen": step * cfg.batch_size * recipe.model.block_size * cfg.grad_accum,
        "data_position": {"seed": recipe.seed, "next_step": step, "micro": 0},
        "qat_attached": qat is not None,
    }
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng/torch_cuda"] = torch.cuda.get_rng_state(device)
    if qat is not None:
        tensors.update({f"qat/{k}": v for k, v in qat.state_dict().items()})
    if ema is not None:  # the checkpoint's model.safetensors keeps the training weights
        tensors.update({f"ema/{name}": e for name, e in zip(param_names, ema)})
    return save_checkpoint(
        run_dir / "checkpoints", step, model, optimizer, param_names, state, tensors, cfg.keep_checkpoints
    )
