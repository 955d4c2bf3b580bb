"""Safetensors + JSON persistence for models and training state: no pickle, atomic writes.

The model config rides in the safetensors metadata, so a weights file alone is enough to rebuild
the model, and loading one never runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_file
from safetensors.torch import save_model as _st_save_model

from edgecraft.errors import UserError
from edgecraft.files import as_umask_allows
from edgecraft.model import GPT, GPTConfig

WEIGHTS_FORMAT = "edgecraft-weights/1"


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so a crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_model(model: GPT, path: str | Path) -> None:
    """Write weights + config to `path` (atomically); tied tensors are stored once."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(model.cfg.to_dict())}
    _st_save_model(model, str(tmp), metadata=metadata)
    as_umask_allows(tmp)
    os.replace(tmp, path)


def read_config(path: str | Path) -> GPTConfig:
    """The model config stored in a weights file's metadata; a damaged file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != WEIGHTS_FORMAT:
            raise UserError(f"{path}: not an edgecraft weights file (format {meta.get('format')!r})")
        return GPTConfig.from_dict(json.loads(meta["config"]))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"{path}: damaged weights file ({err})") from None


def load_model(path: str | Path, device: str = "cpu") -> GPT:
    """Rebuild the model from a weights file; missing or mis-shaped tensors are a UserError."""
    cfg = read_config(path)
    model = GPT(cfg)
    try:
        _st_load_model(model, str(path), strict=True, device=device)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"{path}: damaged weights file ({str(err).splitlines()[0]})") from None
    return model.to(device).eval()



# ---------------------------------------------------------------------------- training checkpoints
# checkpoints/step-NNNNNN/ holds model.safetensors (save_model), optimizer.safetensors (AdamW
# moments per parameter, the param groups as JSON metadata), state.safetensors (RNG states and
# other tensors such as QAT state) and state.json (step, losses, data position). A directory is
# built under a temporary name and renamed into place, so a killed process leaves either a whole
# checkpoint or a `.tmp-*` directory that `latest_checkpoint` ignores and `clean_partial` removes.

CHECKPOINT_FORMAT = "edgecraft-checkpoint/1"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], path: Path) -> None:
    """AdamW state as tensors named `KEY/PARAM` (exp_avg/blocks.0.attn.qkv.weight, step/...).

    `param_names[i]` names the optimizer's i-th parameter (param groups concatenated), so the file
    reads without knowing torch's integer indices; the param groups (lr, betas, ...) ride as JSON.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, state in sd["state"].items():
        name = param_names[index]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [param_names[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    metadata = {"format": CHECKPOINT_FORMAT, "param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=metadata)
    as_umask_allows(path)


def load_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], path: Path) -> None:
    """Restore what `save_optimizer` wrote into an optimizer built over the same parameters."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise UserError(f"{path}: damaged optimizer state ({err})") from None
    index = {name: i for i, name in enumerate(param_names)}
    saved_names = [n for g in groups for n in g["params"]]
    if saved_names != param_names:
        raise UserError(f"{path}: optimizer state is for different parameters than this model")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        state.setdefault(index[name], {})[kind] = value
    for name, values in scalars.items():
        state.setdefault(index[name], {}).update(values)
    for g in groups:
        g["params"] = [index[n] for n in g["params"]]
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    root: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    state: dict,
    tensors: dict[str, torch.Tensor],
    keep: int,
) -> Path:
    """Write root/step-NNNNNN atomically, then drop all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors")
    save_optimizer(optimizer, param_names, tmp / "optimizer.safetensors")
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(tmp / "state.safetensors"),
        metadata={"format": CHECKPOINT_FORMAT},
    )
    as_umask_allows(tmp / "state.safetensors")
    (tmp / "state.json").write_text(
        json.dumps({"format": CHECKPOINT_FORMAT, **state}, indent=1), encoding="utf-8"
    )
    if final.exists():  # re-saving a step (Ctrl-C right after a scheduled checkpoint)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first (temporary ones are skipped)."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and all((p / f).is_file() for f in CHECKPOINT_FILES)
    ]
    return [p for _, p in sorted(found)]


def clean_partial(root: Path) -> None:
    """Remove checkpoint directories a killed process left half-written."""
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """state.json and state.safetensors of one checkpoint directory."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        with safe_open(str(path / "state.safetensors"), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: damaged checkpoint ({err})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}/state.json: not an edgecraft checkpoint (format {state.get('format')!r})")
    return state, tensors
