"""Safetensors + JSON persistence for models and training state: no pickle, atomic writes.

The model config rides in the safetensors metadata, so a weights file alone is enough to rebuild
the model, and loading one never runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from edgecraft.errors import UserError
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

