"""Reading a run directory (runs/NAME/): load its model, describe it.

`load_run` is the one way export, bench and `generate` (edgecraft/torch_engine.py) get a trained
model out of a run, so a
missing or damaged piece is reported the same way everywhere: one UserError naming the file.
A run still in training (or stopped by Ctrl-C) has no model.safetensors yet; its newest
checkpoint's weights stand in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgecraft.errors import UserError
from edgecraft.recipe import Recipe, load_recipe


def _weights_path(run_dir: Path) -> Path:
    from edgecraft.checkpoint import list_checkpoints

    final = run_dir / "model.safetensors"
    if final.is_file():
        return final
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        return found[-1] / "model.safetensors"
    raise UserError(f"{final}: weights file not found (and no checkpoint to fall back on)")


def load_run(run_dir: str | Path, device: str = "cpu"):
    """(GPT in eval mode, Tokenizer, Recipe) of a run; UserError naming any missing/damaged file."""
    from edgecraft.checkpoint import load_model
    from edgecraft.data import load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{run_dir}/recipe.toml: not found; is {run_dir} a run directory?")
    recipe = load_recipe(run_dir / "recipe.toml")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    weights = _weights_path(run_dir)
    model = load_model(weights, device=device)
    if model.cfg.vocab_size != tokenizer.get_vocab_size():
        raise UserError(
            f"{weights}: vocabulary of {model.cfg.vocab_size} does not match "
            f"{run_dir / 'tokenizer.json'} ({tokenizer.get_vocab_size()})"
        )
    return model, tokenizer, recipe


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def _last_metrics(path: Path) -> dict[str, dict]:
    """The last event of each kind in metrics.jsonl (a torn last line from a kill is skipped)."""
    last: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            last[event.get("event", "?")] = event
    return last


def run_info(run_dir: str | Path) -> dict:
    """What a run holds, as data (`edgecraft info --json`): recipe, config, parameters, status,
    files and sizes, last metrics, checkpoints."""
    from edgecraft.checkpoint import list_checkpoints, read_config

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{run_dir}: not a run directory or bundle (no recipe.toml or edgecraft.json)")
    recipe: Recipe = load_recipe(run_dir / "recipe.toml")
    weights = _weights_path(run_dir)
    finished = (run_dir / "model.safetensors").is_file()
    return {
        "kind": "run",
        "path": str(run_dir),
        "recipe": recipe.model_dump(),
        "config": read_config(weights).to_dict(),
        "parameters": _count_params(weights),
        "status": "finished" if finished else f"not finished (weights from {weights.parent.name})",
        "last": _last_metrics(run_dir / "metrics.jsonl"),
        "files": {
            name: (run_dir / name).stat().st_size if (run_dir / name).is_file()
            else sum(p.stat().st_size for p in (run_dir / name).rglob("*") if p.is_file())
            for name in ("recipe.toml", "tokenizer.json", "model.safetensors", "metrics.jsonl", "samples.txt", "tb")
            if (run_dir / name).exists()
        },
        "checkpoints": [p.name for p in list_checkpoints(run_dir / "checkpoints")],
    }


def describe_run(run_dir: str | Path) -> str:
    """`edgecraft info` for a run: recipe, parameters, files and sizes, last metrics, checkpoints."""
    info = run_info(run_dir)
    recipe, cfg, t = info["recipe"], info["config"], info["recipe"]["train"]
    lines = [f"run {info['path']}  (recipe name {recipe['name']!r}, seed {recipe['seed']})"]
    lines.append(f"  data: {recipe['data']['source']}, {recipe['data']['tokenizer']} tokenizer, vocab {cfg['vocab_size']}")
    lines.append("  model: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "vocab_size"))
    lines.append(f"  parameters: {info['parameters']:,}")
    lines.append(
        f"  train: {t['max_steps']} steps of {t['batch_size']}x{t['grad_accum']} x {cfg['block_size']} tokens, "
        f"lr {t['lr']:g} -> {t['min_lr']:g}, warmup {t['warmup_steps']}"
        + (f", QAT from step {recipe['quant']['start_step']}" if recipe["quant"]["qat"] else "")
    )
    last = info["last"]
    if "train" in last:
        ev = last["train"]
        lines.append(f"  last train: step {ev['step']}, loss {ev['loss']:.4f}, {ev['tokens_per_s']:,.0f} tokens/s")
    if "eval" in last:
        lines.append(f"  last val: step {last['eval']['step']}, loss {last['eval']['loss']:.4f}")
    lines.append(f"  status: {info['status']}")
    lines.append("  files:")
    for name, n in info["files"].items():
        lines.append(f"    {name:<18} {_size(n):>10}")
    lines.append(f"  checkpoints: {', '.join(info['checkpoints']) or 'none'}")
    return "\n".join(lines)


def _count_params(weights: Path) -> int:
    """Parameters stored in a weights file (a tied head is stored, and counted, once)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
