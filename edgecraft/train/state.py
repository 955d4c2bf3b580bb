"""Everything the next step depends on, to and from a checkpoint: weights, AdamW moments, every
rank's RNG, QAT ranges, the weight average, and the batch layout (world size, global batch)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from edgecraft import quant
from edgecraft.checkpoint import load_checkpoint_state, load_model, load_optimizer, save_checkpoint
from edgecraft.errors import UserError
from edgecraft.model import GPT, GPTConfig
from edgecraft.recipe import Recipe, TrainConfig
from edgecraft.train.distributed import Group, average_ranges, gather


def fingerprint(prepared) -> dict:
    """What identifies the token arrays: their lengths and a hash of their bytes."""
    digest = hashlib.sha256()
    for tokens in (prepared.train, prepared.val):
        for start in range(0, len(tokens), 1 << 24):
            digest.update(np.ascontiguousarray(tokens[start : start + (1 << 24)]).tobytes())
    return {"train_tokens": len(prepared.train), "val_tokens": len(prepared.val), "sha256": digest.hexdigest()}


def make_optimizer(model: GPT, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the model's decay/no-decay groups; fused (one kernel for all tensors) is the
    fastest on CPU and GPU alike. Returns the parameter names in the optimizer's order."""
    groups = model.optimizer_groups(cfg.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [names[id(p)] for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return optimizer, param_names


def resume_batch_size(state: dict, recipe: Recipe, world: int, where: str) -> int:
    """The per-process batch that keeps a checkpoint's global batch on `world` processes.

    The global batch (batch_size x grad_accum x processes) is what a step reads; keeping it is
    what makes a run resumed on another number of processes continue the same run.
    """
    accum = recipe.train.grad_accum
    saved = state.get("global_batch", recipe.train.batch_size * accum)  # older checkpoints: 1 process
    if saved % (accum * world):
        raise UserError(
            f"{where}: this run's global batch is {saved} sequences per step (batch_size "
            f"{state.get('batch_size', saved // accum)} x grad_accum {accum} x {state.get('world_size', 1)} "
            f"processes); {world} processes cannot share it evenly, and another global batch would not "
            f"continue the run: resume on a number of processes that divides {saved // accum}"
        )
    return saved // (accum * world)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """A dropout RNG seed of its own for each rank other than 0 (rank 0 keeps the run's stream)."""
    return int(np.random.SeedSequence([seed % (1 << 64), rank, step]).generate_state(1, np.uint64)[0])


def _rng_key(kind: str, rank: int) -> str:
    return f"rng/{kind}" if rank == 0 else f"rng/{kind}/rank{rank}"  # rank 0's: the 1-process name


def restore(recipe: Recipe, prepared, identity: dict, checkpoint, group: Group):
    """A fresh model and optimizer (seeded), or both exactly as `checkpoint` left them, RNG too.
    `identity` is the tokens' fingerprint, recorded in a fresh run's state.

    Returns (model, optimizer, param_names, state, qat, ema).
    """
    device = group.device
    if checkpoint is None:
        torch.manual_seed(recipe.seed)
        model = GPT(GPTConfig(vocab_size=prepared.vocab_size, **recipe.model.model_dump()))
        state: dict = {
            "step": 0, "best_val_loss": None, "last_val_loss": None, "last_train_loss": None,
            "data": identity,
        }
        tensors: dict[str, torch.Tensor] = {}
        if not group.main:
            torch.manual_seed(_rank_seed(recipe.seed, group.rank, 0))
    else:
        model = load_model(checkpoint / "model.safetensors")
        state, tensors = load_checkpoint_state(checkpoint)
    model.to(device).train()
    optimizer, param_names = make_optimizer(model, recipe.train)
    qat = None
    if checkpoint is not None:
        load_optimizer(optimizer, param_names, checkpoint / "optimizer.safetensors")
        cpu_key, cuda_key = _rng_key("torch_cpu", group.rank), _rng_key("torch_cuda", group.rank)
        if cpu_key in tensors:
            torch.set_rng_state(tensors[cpu_key])
        else:  # saved by fewer processes than resume it: this rank's dropout starts afresh
            torch.manual_seed(_rank_seed(recipe.seed, group.rank, state["step"]))
        if device.type == "cuda" and cuda_key in tensors:
            torch.cuda.set_rng_state(tensors[cuda_key], device)
        if state.get("qat_attached"):
            qat = quant.attach(model, recipe.quant)
            qat.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("qat/")})
    ema = None
    if recipe.train.ema:
        params = dict(model.named_parameters())
        start = {n: tensors.get(f"ema/{n}", params[n].detach()) for n in param_names}
        ema = [start[n].to(device).clone() for n in param_names]  # the optimizer's order
    return model, optimizer, param_names, state, qat, ema


def save(run_dir, step, model, optimizer, param_names, state, qat, ema, recipe: Recipe, group: Group, batch_size: int):
    """Write checkpoints/step-NNNNNN (rank 0). Every rank calls it: their RNG states are gathered
    and QAT ranges averaged first."""
    cfg = recipe.train
    global_batch = batch_size * cfg.grad_accum * group.world
    state = {
        **state,
        "step": step,
        "tokens_seen": step * global_batch * recipe.model.block_size,
        "world_size": group.world,
        "batch_size": batch_size,
        "grad_accum": cfg.grad_accum,
        "global_batch": global_batch,
        "data_position": {"seed": recipe.seed, "next_step": step, "micro": 0},
        "qat_attached": qat is not None,
    }
    tensors = {_rng_key("torch_cpu", r): s for r, s in enumerate(gather(group, torch.get_rng_state()))}
    if group.device.type == "cuda":
        cuda = gather(group, torch.cuda.get_rng_state(group.device))
        tensors.update({_rng_key("torch_cuda", r): s for r, s in enumerate(cuda)})
    average_ranges(group, qat)
    if not group.main:
        return
    if qat is not None:
        tensors.update({f"qat/{k}": v for k, v in qat.state_dict().items()})
    if ema is not None:  # the checkpoint's model.safetensors keeps the training weights
        tensors.update({f"ema/{name}": e for name, e in zip(param_names, ema)})
    save_checkpoint(run_dir / "checkpoints", step, model, optimizer, param_names, state, tensors, cfg.keep_checkpoints)
