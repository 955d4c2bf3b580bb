"""The GPT's contracts: causality and cached decoding equal to a full forward pass, both variants."""

from __future__ import annotations

import math

import pytest
import torch

from edgecraft.model import GPT, GPTConfig
from edgecraft.torch_engine import run_model

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False),
}


def _model(variant: str, **extra) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, d_model=32, n_layers=2, n_heads=4, d_ff=64, block_size=16, **VARIANTS[variant], **extra)
    return GPT(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_future_token_never_changes_an_earlier_logit(variant):
    model = _model(variant)
    idx = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        base = model(idx)[0]  # (B, T, V)
        for t in (0, 5, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 30
            out = model(changed)[0]
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_the_full_forward(variant):
    model = _model(variant)
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        full = model(idx)[0]  # (B, 12, V)
        logits, _, cache = model(idx[:, :5])  # prefill 5
        steps = [logits]
        logits, _, cache = model(idx[:, 5:8], cache=cache)  # a 3-token chunk after a cache
        steps.append(logits)
        for t in range(8, 12):  # then one token at a time
            logits, _, cache = model(idx[:, t : t + 1], cache=cache)
            steps.append(logits)
    assert cache[0][0].shape == (2, 4, 12, 8)  # (B, nh, T, hs)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sequences_longer_than_the_block_are_refused():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_head_counts_once_and_decay_groups_cover_every_parameter():
    model = _model("gpt2")
    assert model.head.weight is model.tok_emb.weight
    groups = model.optimizer_groups(0.1)
    in_groups = [p for g in groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in model.parameters()})
    assert sum(p.numel() for p in in_groups) == model.num_params()
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_is_width_aware(variant):
    """GPT-NeoX's small_init for matrices and embeddings, wang_init for residual output projections."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, d_model=128, n_layers=4, n_heads=4, d_ff=512, block_size=64, **VARIANTS[variant])
    params = dict(GPT(cfg).named_parameters())
    small, wang = math.sqrt(2 / (5 * 128)), 2 / (4 * math.sqrt(128))
    for name, p in params.items():
        if name.endswith("proj.weight"):
            assert p.std().item() == pytest.approx(wang, rel=0.05), name
        elif p.dim() >= 2:
            assert p.std().item() == pytest.approx(small, rel=0.05), name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:
            assert torch.equal(p, torch.ones_like(p)), name  # norm gains


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_is_seeded_and_slides_past_the_window(variant):
    """The PyTorch model under runtime.Model (the training samples' and `generate RUN`'s path)."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({chr(97 + i): i for i in range(30)}, unk_token="a"))
    runtime = run_model(_model(variant), tokenizer)

    def run(seed, temperature):
        return runtime.generate([1, 2, 3], max_new_tokens=30, temperature=temperature, top_k=5, seed=seed)

    assert run(1, 1.0) == run(1, 1.0)
    assert len(runtime.sequence([1, 2, 3]).context) == 3
    assert runtime.engine.block_size < 33  # 3 + 30 tokens: the window slides
    assert run(1, 0.0) == run(2, 0.0)  # greedy ignores the seed
