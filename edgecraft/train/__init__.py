"""Training: a validated recipe in, a run directory out (`train_recipe(recipe) -> run_dir`)."""

from edgecraft.train.loop import _optimizer, _to_device, _update_ema, lr_at, resume_run, train_recipe

__all__ = ["_optimizer", "_to_device", "_update_ema", "lr_at", "resume_run", "train_recipe"]
