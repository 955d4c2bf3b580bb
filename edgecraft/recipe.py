"""The recipe: one TOML file that says what to train, validated before any work starts.

Every section is a pydantic model that forbids unknown keys, so a typo is an error naming the key
path, not a silently ignored setting. `--set section.key=value` overrides go through the same
validation as the file itself.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from dataclasses import fields
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from edgecraft.config import GPTConfig
from edgecraft.errors import UserError


class _Section(BaseModel):
    # NaN and infinity train nothing (and are not TOML, so a run's recipe.toml could not hold them)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: str = Field("builtin:python-docs", description="A file, a folder, a glob, or builtin:NAME.")
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = Field(512, ge=16, le=65536, description="BPE only: the vocabulary to train.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    cache_dir: str | None = Field(
        None, description="Where token arrays are cached; default ~/.cache/edgecraft/data."
    )


class _ModelSection(_Section):
    @model_validator(mode="after")
    def _heads_divide_width(self) -> "_ModelSection":
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("rotary positions need an even head size (d_model / n_heads)")
        kv = self.n_kv_heads
        if kv is not None and (kv > self.n_heads or self.n_heads % kv):
            raise ValueError(
                f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads}): each key/value head "
                f"serves n_heads / n_kv_heads query heads"
            )
        return self


# Limits and descriptions of the [model] keys; their names, types and defaults are GPTConfig's.
# vocab_size is not a key: the tokenizer decides it.
_MODEL_LIMITS: dict[str, dict[str, Any]] = {
    "d_model": {"ge": 8},
    "n_layers": {"ge": 1},
    "n_heads": {"ge": 1},
    "n_kv_heads": {"ge": 1, "description": "Key/value heads (grouped-query attention); must divide "
                   "n_heads; default n_heads."},
    "d_ff": {"ge": 8},
    "block_size": {"ge": 2},
    "dropout": {"ge": 0.0, "lt": 1.0},
    "bias": {"description": "Biases in linear layers and LayerNorm (GPT-2 style)."},
}
_MODEL_TYPES = get_type_hints(GPTConfig)
ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelSection,
    **{
        f.name: (_MODEL_TYPES[f.name], Field(f.default, **_MODEL_LIMITS.get(f.name, {})))
        for f in fields(GPTConfig)
        if f.name != "vocab_size"
    },
)


class TrainConfig(_Section):
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(5000, ge=1, description="Optimizer steps (accumulation included).")
    decay_steps: int | None = Field(
        None, ge=1,
        description="Steps the cosine decays over (None = max_steps); min_lr after them. A run extended "
        "with --resume --set train.max_steps=N keeps its old length here, so the extension trains at min_lr.",
    )
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Peak learning rate; above 1, AdamW diverges.")
    min_lr: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    eval_every: int = Field(250, ge=1)
    eval_batches: int = Field(
        20,
        ge=1,
        description="Evaluation reads at most this many batches of the validation split's "
        "non-overlapping blocks: the whole split (an exact loss) when they cover it, else a fixed subset.",
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Decay of an exponential moving average of the weights, updated every optimizer "
        "step (the plain mean of the steps so far until 1 / (1 - ema) of them); evaluation, samples "
        "and model.safetensors use the average. 0 = off.",
    )
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    sample_every: int = Field(500, ge=1)
    sample_tokens: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Compute dtype (autocast); weights and optimizer stay float32. bfloat16 pays off "
        "for wider models on CPUs with AMX and on recent GPUs; on narrow models casts cost more than "
        "they save (benchmarks/results/train_shakespeare.md).",
    )
    threads: int = Field(0, ge=0, description="0 = library default.")
    compile: bool = False

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class QuantConfig(_Section):
    qat: bool = False
    start_step: int = Field(0, ge=0, description="QAT fine-tunes from this step on.")
    embeddings: bool = Field(False, description="Also fake-quantize the embedding/head matrix.")
    scheme: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="Activation quantization the int8 graph runs: dynamic = per-call uint8 range "
        "(DynamicQuantizeMatMul), static = ranges observed in training (MatMulIntegerToFloat).",
    )
    bits: Literal[8, 4] = Field(
        8,
        description="Weight bits QAT trains for: 8 = the int8 graph (per-channel weights), 4 = the "
        "int4 graph (block-wise weights and int8 activations per block: MatMulNBits, accuracy "
        "level 4; `edgecraft export --int4`). scheme applies to 8 bits only.",
    )
    block_size: Literal[16, 32, 64, 128] = Field(
        32, description="4 bits: weights per scale along the input dimension (export --block-size)."
    )

    @model_validator(mode="after")
    def _scheme_is_8_bit(self) -> "QuantConfig":
        if self.bits == 4 and self.scheme != "dynamic":
            raise ValueError("scheme 'static' is an 8-bit scheme; 4-bit activations are quantized per call")
        return self


class Recipe(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 1337
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    quant: QuantConfig = QuantConfig()

    @model_validator(mode="after")
    def _blocks_fit(self) -> "Recipe":
        """4-bit QAT quantizes blocks of quant.block_size along every matrix's input width."""
        q, m = self.quant, self.model
        if q.qat and q.bits == 4 and (m.d_model % q.block_size or m.d_ff % q.block_size):
            raise ValueError(
                f"quant.block_size {q.block_size} must divide model.d_model ({m.d_model}) and "
                f"model.d_ff ({m.d_ff}); choose a smaller block"
            )
        return self


def _format_error(origin: str, err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{origin}: {path}: {msg}{more}"


def _parse_value(raw: str) -> Any:
    """Read an override value as TOML (numbers, booleans, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to raw recipe data (validation happens afterwards)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.lr=3e-4")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def validate(data: dict[str, Any], origin: str) -> Recipe:
    """Validate raw recipe data; any problem is one UserError naming `origin` and the key path."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_error(origin, err)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe TOML file, apply overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    data = apply_overrides(data, overrides or [])
    return validate(data, str(path))


def to_toml(recipe: Recipe) -> str:
    """Serialize a resolved recipe back to TOML (the run directory's recipe.toml)."""
    lines: list[str] = []
    dump = recipe.model_dump()
    for key, value in dump.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in dump.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            for k, v in value.items():
                if v is not None:
                    lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def json_schema() -> str:
    """The recipe's JSON Schema, for editors and `edgecraft recipe schema`."""
    return json.dumps(Recipe.model_json_schema(), indent=2)
