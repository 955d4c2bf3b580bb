"""The model's shape: one frozen dataclass, torch-free, saved inside every artifact.

The recipe's `[model]` section, the PyTorch model, the ONNX graph builder, the bundle manifest and
every engine read this one field list. It imports only the standard library, so the runtime (which
must never import torch) can type the manifest with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

ROPE_THETA = 10000.0  # rotary base frequency (RoFormer's), shared by the model and the graph


@dataclass(frozen=True)
class GPTConfig:
    """The architecture; the single source of truth saved inside every artifact."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 8
    # key/value heads: None = n_heads (multi-head); fewer share each K/V head among n_heads /
    # n_kv_heads query heads (grouped-query; 1 = multi-query), shrinking the KV cache and qkv matrix
    n_kv_heads: int | None = None
    d_ff: int = 512
    block_size: int = 256
    dropout: float = 0.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    pos: Literal["learned", "rope"] = "learned"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        # configs saved before the key existed, and recipes that leave it out, mean multi-head
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    @property
    def cache_head_size(self) -> int:
        """The head size of the exported graph's attention and KV cache: head_size rounded up to a
        multiple of 8, which onnxruntime's CPU GroupQueryAttention needs (edgecraft/export/graph.py
        zero-pads other heads)."""
        return -(-self.head_size // 8) * 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
