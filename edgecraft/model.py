"""A small decoder-only GPT in PyTorch, with an explicit KV cache.

Pre-norm blocks, causal self-attention through scaled_dot_product_attention, tied embeddings, and
recipe switches for the modern variants (RMSNorm, rotary positions, SwiGLU). `forward` takes the
cache of earlier positions and returns the new one, so decoding token by token with the cache gives
the same logits as one full forward pass — the contract the ONNX export is checked against.

Parameter names are part of the file format (the exporter reads them):
  tok_emb.weight (V, D)            pos_emb.weight (block, D)   [pos = "learned"]
  blocks.i.norm1 / norm2           blocks.i.attn.qkv (D + 2 kv, D) [q; k; v rows]   blocks.i.attn.proj (D, D)
                                   (kv = n_kv_heads * head_size: grouped-query attention)
  blocks.i.mlp.fc, mlp.proj        [gelu]     blocks.i.mlp.gate, mlp.up, mlp.proj   [swiglu]
  norm_f                           head.weight (V, D), tied to tok_emb.weight when tie_embeddings
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgecraft.config import ROPE_THETA, GPTConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v each (B, n_kv_heads, T_past, hs)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias, eps=1e-5)


def rope_tables(head_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_size / 2) for rotary positions (non-interleaved halves)."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by the tables' rows for its positions (cos/sin: (T, hs/2))."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kv_width = cfg.n_kv_heads * cfg.head_size
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.kv_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, D = x.shape
        nh, nkv, hs = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_size
        q, k, v = self.qkv(x).split((D, self.kv_width, self.kv_width), dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n_past = 0
        if past is not None:
            n_past = past[0].shape[2]
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, T_past + T, hs)
            v = torch.cat((past[1], v), dim=2)
        # query head h reads key/value head h // (nh / nkv), as GroupQueryAttention does
        sdpa = {"dropout_p": self.cfg.dropout if self.training else 0.0, "enable_gqa": nkv != nh}
        if n_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, **sdpa)
        else:
            # query i sits at position n_past + i and sees keys 0 .. n_past + i
            mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(diagonal=n_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
            self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, d_ff)
        else:
            h = F.gelu(self.fc(x))  # (B, T, d_ff), exact (erf) GELU
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, past, rope):
        a, present = self.attn(self.norm1(x), past, rope)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        else:
            cos, sin = rope_tables(cfg.head_size, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-NeoX's width-aware init: every matrix and embedding N(0, sqrt(2 / (5 d))) ("small_init",
        Nguyen & Salazar 2019), the residual output projections N(0, 2 / (n_layers sqrt(d))) ("wang_init").

        GPT-2's fixed 0.02 is about that std at GPT-2's width 768 but too small at narrow widths,
        where it costs final validation loss (benchmarks/results/train_shakespeare.md compares the
        inits). Norm gains stay 1; biases start at 0.
        """
        d = self.cfg.d_model
        for name, p in self.named_parameters():  # a tied head is its embedding, initialized once
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=2 / (self.cfg.n_layers * math.sqrt(d)))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=math.sqrt(2 / (5 * d)))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KVCache]:
        """idx (B, T) token ids after `cache`'s positions -> (logits (B, T, V), loss, new cache)."""
        B, T = idx.shape
        n_past = cache[0][0].shape[2] if cache else 0
        if n_past + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {n_past + T} positions exceeds block_size {self.cfg.block_size}"
            )
        x = self.tok_emb(idx)  # (B, T, D)
        rope = None
        if self.cfg.pos == "learned":
            pos = torch.arange(n_past, n_past + T, device=idx.device)
            x = x + self.pos_emb(pos)
        else:
            rope = (self.rope_cos[n_past : n_past + T], self.rope_sin[n_past : n_past + T])
        x = self.drop(x)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, cache[i] if cache else None, rope)
            new_cache.append(present)
        logits = self.head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss, new_cache

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices (dim >= 2) only, never on biases or norm gains."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
