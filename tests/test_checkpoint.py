"""Safetensors persistence: weights, optimizer state and atomic checkpoint directories."""

from __future__ import annotations

import pytest
import torch

from edgecraft.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint_state,
    load_model,
    load_optimizer,
    save_checkpoint,
    save_model,
    save_optimizer,
)
from edgecraft.errors import UserError
from edgecraft.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, block_size=8)


def _trained(steps: int = 3) -> tuple[GPT, torch.optim.AdamW, list[str]]:
    torch.manual_seed(0)
    model = GPT(CFG)
    groups = model.optimizer_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True)
    for _ in range(steps):
        x = torch.randint(0, CFG.vocab_size, (2, 8))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, [names[id(p)] for g in groups for p in g["params"]]


def test_optimizer_state_round_trips_exactly(tmp_path):
    model, optimizer, names = _trained()
    save_optimizer(optimizer, names, tmp_path / "opt.safetensors")
    fresh = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1.0, fused=True)
    load_optimizer(fresh, names, tmp_path / "opt.safetensors")
    a, b = optimizer.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in state:
            assert torch.equal(state[key], b["state"][i][key]), (i, key)


def test_optimizer_state_for_other_parameters_is_refused(tmp_path):
    model, optimizer, names = _trained(1)
    save_optimizer(optimizer, names, tmp_path / "opt.safetensors")
    with pytest.raises(UserError, match="different parameters"):
        load_optimizer(optimizer, list(reversed(names)), tmp_path / "opt.safetensors")


def test_checkpoints_are_whole_newest_kept_partial_ignored(tmp_path):
    model, optimizer, names = _trained(1)
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        state = {"step": step, "best_val_loss": 1.5}
        save_checkpoint(root, step, model, optimizer, names, state, {"rng": torch.get_rng_state()}, keep=2)
    (root / ".tmp-step-000020").mkdir()  # what a kill during a save leaves
    assert [p.name for p in list_checkpoints(root)] == ["step-000010", "step-000015"]
    state, tensors = load_checkpoint_state(root / "step-000015")
    assert state["step"] == 15 and state["best_val_loss"] == 1.5
    assert tensors["rng"].dtype == torch.uint8
    reloaded = load_model(root / "step-000015" / "model.safetensors")
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name
    clean_partial(root)
    assert not (root / ".tmp-step-000020").exists()


def test_damaged_or_foreign_files_are_user_errors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(bad)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    torch.manual_seed(0)
    save_model(GPT(CFG), tmp_path / "ok.safetensors")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged checkpoint"):
        load_checkpoint_state(tmp_path / "ck")
