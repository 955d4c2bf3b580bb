"""Starting and resuming a run: the checks before any work, the run directory, the data, resume rules.

Under torchrun every rank runs these. Rank 0 alone creates and writes the run directory, and
holds its lock (lock.py) from the first check to the end; a check that fails on any rank stops them
all, reported once (distributed.together).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

from edgecraft import data
from edgecraft.checkpoint import atomic_write_text, clean_partial, load_checkpoint_state
from edgecraft.errors import UserError
from edgecraft.recipe import Recipe, load_recipe, to_toml
from edgecraft.train.distributed import Group, check_same, peers_kept, process_group, resolve_device, together
from edgecraft.train.interrupt import interruptible
from edgecraft.train.lock import locked
from edgecraft.train.loop import fit
from edgecraft.train.recover import discard_unstarted, extended, usable_checkpoint
from edgecraft.train.state import fingerprint, resume_batch_size


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
    run_dir = Path(runs_dir) / recipe.name
    with process_group(recipe.train.device) as group, peers_kept(group, _resume_hint(run_dir)), \
            contextlib.ExitStack() as held:
        with together(group):
            check_recipe(recipe, origin)
            if group.main:  # the lock first: the existence check then holds until the run is made
                held.enter_context(locked(run_dir))
                _check_new_run_dir(run_dir, force)
        prepared, identity = _prepare(recipe, group)
        try:
            with together(group):
                if group.main:
                    _create_run_dir(run_dir)
                    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
                    prepared.tokenizer.save(str(run_dir / "tokenizer.json"))
            return fit(run_dir, recipe, prepared, identity, None, group, recipe.train.batch_size)
        except BaseException:  # out of memory, diverged, a second Ctrl-C: before any checkpoint,
            if group.main:  # the directory holds nothing to keep, and a retry needs no --force
                discard_unstarted(run_dir)
            raise


def resume_run(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Continue a run from its newest complete checkpoint with the recipe stored in it, on any
    number of processes that keeps the run's global batch. `overrides` (train.max_steps) extend
    it; the extended recipe replaces the run's recipe.toml."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    recipe_path = run_dir / "recipe.toml"
    recipe = extended(load_recipe(recipe_path), overrides or [], f"{recipe_path} with --set")
    root = run_dir / "checkpoints"
    with process_group(recipe.train.device) as group, peers_kept(group, _resume_hint(run_dir)), \
            contextlib.ExitStack() as held:
        with together(group):
            check_recipe(recipe, str(recipe_path))
            if group.main:
                held.enter_context(locked(run_dir))
                clean_partial(root)
            newest = usable_checkpoint(root, quiet=not group.main)  # a damaged newest one is skipped
        check_same(group, int(newest.name[5:]), f"the newest checkpoint in {root} (is it on a shared file system?)")
        if (run_dir / "model.safetensors").is_file() and int(newest.name[5:]) >= recipe.train.max_steps:
            if group.main:
                print(f"{run_dir}: already finished ({recipe.train.max_steps} steps); nothing to do", file=sys.stderr)
            return run_dir
        if overrides and group.main:
            atomic_write_text(recipe_path, to_toml(recipe))
        prepared, identity = _prepare(recipe, group)
        with together(group):
            state, _ = load_checkpoint_state(newest)
            if state.get("data") != identity:
                raise UserError(
                    f"{run_dir}: the corpus {recipe.data.source} is not the one this run was trained on "
                    "(its tokens changed), so the run cannot be resumed exactly"
                )
            batch_size = resume_batch_size(state, recipe, group.world, str(run_dir))
        if group.main and batch_size != recipe.train.batch_size:
            print(
                f"{run_dir}: {group.world} process(es) x batch_size {batch_size} keep the run's global batch "
                f"of {state['global_batch']}",
                file=sys.stderr,
            )
        return fit(run_dir, recipe, prepared, identity, newest, group, batch_size)


def _quiet(quiet: bool):
    """Ranks other than 0 keep their progress lines to themselves (errors still raise)."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


def _resume_hint(run_dir: Path) -> str:
    return f"The newest checkpoint continues the run: edgecraft train --resume {run_dir}"


def _check_new_run_dir(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not force:
        raise UserError(
            f"{run_dir} already exists: pass --force to replace it, "
            f"or continue it with edgecraft train --resume {run_dir}"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; remove it first")


def _create_run_dir(run_dir: Path) -> None:
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None


def _prepare(recipe: Recipe, group: Group):
    """The token arrays and their fingerprint, tokenized once per machine: local rank 0 fills the
    cache, then the other ranks read it. Every rank must hold the same tokens."""
    prepared = None
    for turn in (True, False):
        with together(group), interruptible(), _quiet(not group.main):
            if (group.local_rank == 0) == turn:
                prepared = data.prepare(recipe.data, recipe.model.block_size)
    identity = fingerprint(prepared)
    check_same(group, int(identity["sha256"][:15], 16), f"the corpus {recipe.data.source}")
    return prepared, identity
