"""When training goes wrong: which checkpoint a resume can trust, what an extended run changes,
and the one line for a run that diverged or ran out of memory.

A resume falls back from a damaged newest checkpoint to the newest one that reads whole, naming
what it skipped and why. `--resume RUN --set train.max_steps=N` extends a run (finished or not);
the cosine keeps the length it had (train.decay_steps), so the extension trains at min_lr, as
nanoGPT does once max_iters passes lr_decay_iters. A fresh run that fails before its first
checkpoint leaves no directory behind, so trying again needs no --force.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edgecraft.checkpoint import list_checkpoints, load_checkpoint_state, load_model
from edgecraft.errors import UserError
from edgecraft.recipe import Recipe, apply_overrides, validate

# what --set may change on --resume: more steps, and where the cosine ends; anything else would
# not continue the same run
RESUME_KEYS = ("train.max_steps", "train.decay_steps")


def _check_whole(checkpoint: Path) -> None:
    """Read every file of a checkpoint; a UserError naming the first damaged one."""
    from safetensors import SafetensorError, safe_open

    load_checkpoint_state(checkpoint)
    load_model(checkpoint / "model.safetensors")
    path = checkpoint / "optimizer.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: damaged optimizer state ({err})") from None


def usable_checkpoint(root: Path, quiet: bool = False) -> Path:
    """The newest complete checkpoint under `root` whose files read whole; each newer one that
    does not is skipped with a line saying why."""
    found = list_checkpoints(root)
    if not found:
        raise UserError(f"{root.parent}: no complete checkpoint in {root} to resume from")
    skipped = []
    for checkpoint in reversed(found):
        try:
            _check_whole(checkpoint)
        except UserError as err:
            skipped.append(f"{checkpoint.name} ({err})")
            continue
        if skipped and not quiet:
            print(f"{root.parent}: skipped {'; '.join(skipped)}; resuming from {checkpoint.name}", file=sys.stderr)
        return checkpoint
    raise UserError(f"{root.parent}: no checkpoint in {root} reads whole: {skipped[0]}; train the run again with --force")


def extended(recipe: Recipe, overrides: list[str], origin: str) -> Recipe:
    """The run's recipe with --resume's overrides applied: train.max_steps (and train.decay_steps)
    only. The cosine keeps its length unless decay_steps is given."""
    if not overrides:
        return recipe
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUME_KEYS:
            raise UserError(
                f"--set {item!r}: with --resume only {' and '.join(RESUME_KEYS)} may change; other keys "
                f"would not continue the same run (train a new one instead)"
            )
    data = recipe.model_dump()
    if data["train"].get("decay_steps") is None:
        data["train"]["decay_steps"] = recipe.train.max_steps  # the schedule the run trained with
    return validate(apply_overrides(data, overrides), origin)


def diverged(step: int, loss: float, saved: int | None, lr: float, main: bool) -> UserError:
    """The line for a training loss that is NaN or infinite."""
    kept = f"the last good checkpoint is step {saved}" if saved else "no checkpoint had been written"
    return UserError(
        f"step {step}: the training loss is {loss} (not finite): training diverged; {kept}, nothing "
        f"after it is saved. Lower train.lr (now {lr:g}) and train again" if main else ""
    )


def out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def memory_error(err: BaseException, recipe: Recipe, device, main: bool) -> UserError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    m, t = recipe.model, recipe.train
    return UserError(
        f"not enough memory on {device} for this model (d_model {m.d_model}, n_layers {m.n_layers}, "
        f"d_ff {m.d_ff}) at train.batch_size {t.batch_size} ({reason}); make model.d_model, "
        f"model.n_layers or train.batch_size smaller" if main else ""
    )


def discard_unstarted(run_dir: Path) -> None:
    """Remove a fresh run's directory when it holds no checkpoint (nothing worth keeping)."""
    if run_dir.is_dir() and not list_checkpoints(run_dir / "checkpoints"):
        shutil.rmtree(run_dir, ignore_errors=True)
