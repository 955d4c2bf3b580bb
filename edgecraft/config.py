"""The model's shape: one frozen dataclass, torch-free, saved inside every artifact.

The recipe's `[model]` section, the PyTorch model, the ONNX graph builder, the bundle manifest and
every engine read this one field list. It imports only the standard library, so the runtime (which
must never import torch) can type the manifest with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ROPE_THETA = 10000.0  # rotary base frequency (RoFormer's), shared by the model and the graph


@dataclass(frozen=True)
class GPTConfig:
    """The architecture; the single source of truth saved inside every artifact."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int = 512
    block_size: int = 256
    dropout: float = 0.0
    norm: str = "layernorm"  # | "rmsnorm"
    pos: str = "learned"  # | "rope"
    mlp: str = "gelu"  # | "swiglu"
    bias: bool = True
    tie_embeddings: bool = True

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
