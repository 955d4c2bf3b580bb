"""Quantization-aware training: fake quant that computes what the int8 and int4 ONNX graphs compute.

The hooks are edgecraft's own (torch.ao.quantization is deprecated, and fake-quant export through
the dynamo exporter has been unreliable); the exporter (edgecraft/export/int8_graph.py) writes the int8
graph from the same functions, so training and inference round the same numbers the same way.

The arithmetic, matching onnxruntime's DynamicQuantizeMatMul / MatMulIntegerToFloat on CPU:
- weights: int8, symmetric, one scale per output channel: s = max|w_row| / 127,
  q = clamp(round(w / s), -127, 127)  (round = half to even, as in onnxruntime)
- activations: uint8, asymmetric, from a range [lo, hi] widened to include 0:
  scale = (hi - lo) / 255 (1 if hi == lo), zp = round(clamp(-lo / scale, 0, 255)),
  q = clamp(round(x / scale) + zp, 0, 255)
  - scheme "dynamic": the range of each call's input. In training the range is taken per token
    row, which is exactly what a batch-1 decode step computes; a prefill or batched call in
    onnxruntime takes one range over all its rows (a coarser grid for some rows).
  - scheme "static": a range observed during training (EMA of batch min/max) or calibration,
    frozen at export; the same numbers in every call.
- the product: int32 accumulation, times scale_a * scale_w, plus the float bias. The float
  matmul of the dequantized values below equals it up to float32 rounding.

At 4 bits (quant.bits = 4), the arithmetic of onnxruntime's MatMulNBits at accuracy level 4 (its
int8-compute kernel), checked against the kernel in tests/test_int4.py:
- weights: blocks of `block_size` along the input dimension, one scale per block, symmetric with
  the default zero point: m = the block's value of largest magnitude (signed), s = m / -8,
  q = clamp(round(w / s), -8, 7), so the largest magnitude lands exactly on -8
- activations: int8, symmetric, per block of the same size along K: s = max|x_block| / 127,
  q = round(x * (1 / s)) (the kernel multiplies by the reciprocal)
- embedding tables stay 8-bit per row (as in the int8 graph); the head reads the tied table's
  8-bit round trip in float

Gradients are straight-through: identity inside the representable range, zero where clipped.
Hooks are forward pre-hooks that shadow `module.weight` for one call and fake-quantize the
input; parameter names, the state dict and the optimizer's view of the model never change,
and a model with hooks detached is the plain float model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from edgecraft.errors import UserError
from edgecraft.files import as_umask_allows
from edgecraft.recipe import QuantConfig

QMAX_W = 127  # weights use [-127, 127]: symmetric, no -128
QMAX_A = 255  # activations use [0, 255]
RANGE_MOMENTUM = 0.01  # EMA weight of each training batch's min/max in a static range
STATE_FORMAT = "edgecraft-quant/1"


# --- the arithmetic (shared with the exporter) ------------------------------------------------


def _weight_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> integer grid values (N, K) as float and scale (N, 1); an all-zero row gets scale 1."""
    w = w.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / QMAX_W  # (N, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / scale), -QMAX_W, QMAX_W), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scale (N,) float32; one symmetric scale per output row."""
    q, scale = _weight_grid(w.float())
    return q.to(torch.int8), scale[:, 0]


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point (as float) for a range, as onnxruntime's GetQuantizationParameter."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = (hi - lo) / QMAX_A
    scale = torch.where(hi == lo, torch.ones_like(scale), scale)
    zp = torch.round(torch.clamp(-lo / scale, 0, QMAX_A))
    return scale, zp


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-row symmetric int8 round trip of w (N, K), straight-through gradient."""
    q, scale = _weight_grid(w)
    return w + (q * scale - w).detach()


class _FakeQuantActivation(torch.autograd.Function):
    """uint8 round trip in place on one buffer (a chain of fresh tensors made QAT steps several
    times slower than float), with a straight-through gradient: masked where clipped when `clips` (a static
    range), identity otherwise (a dynamic range holds the whole row; only its two ends can land
    half a step outside the grid)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, clips: bool) -> torch.Tensor:
        t = x.detach().div(scale).round_().add_(zp)  # unclamped grid index
        ctx.clips = clips
        if clips:
            ctx.save_for_backward((t >= 0) & (t <= QMAX_A))  # not clipped: the gradient passes
        return t.clamp_(0, QMAX_A).sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.clips:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None


def fake_quant_activation(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, clips: bool = True
) -> torch.Tensor:
    """uint8 round trip of x with broadcastable scale/zp. The gradient passes straight through,
    except (when `clips`) where x lies beyond the grid's ends by more than half a step."""
    return _FakeQuantActivation.apply(x, scale, zp, clips)


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) range of x (..., K) -> scale, zp (..., 1): one decode step's arithmetic."""
    lo, hi = torch.aminmax(x.detach(), dim=-1, keepdim=True)
    return activation_qparams(lo, hi)


# --- block-wise weights and activations (MatMulNBits, accuracy level 4) ---------------------------


def block_grid(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> integer grid values (N, K / block, block) as float in [-2^(bits-1), 2^(bits-1) - 1]
    and scales (N, K / block, 1). A block of zeros gets scale 0, not 1: the kernel's zero-point
    term (8 * scale * the activations' sum) would otherwise cost float32 cancellation error."""
    N, K = w.shape
    wb = w.detach().float().reshape(N, K // block, block)  # (N, nb, block)
    peak = wb.gather(-1, wb.abs().argmax(-1, keepdim=True))  # (N, nb, 1) signed largest magnitude
    qmax = 2 ** (bits - 1)
    scale = peak / -qmax
    q = torch.clamp(torch.round(wb / torch.where(scale != 0, scale, torch.ones_like(scale))), -qmax, qmax - 1)
    return q, scale


def fake_quant_weight_blocks(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Block-wise symmetric round trip of w (N, K), straight-through gradient."""
    q, scale = block_grid(w, bits, block)
    return w + ((q * scale).reshape(w.shape).to(w.dtype) - w).detach()


def fake_quant_activation_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """int8 symmetric round trip of x (..., K) per block of `block` along K, as MatMulNBits'
    accuracy level 4 quantizes its input; straight-through gradient (a block's range holds it)."""
    xb = x.detach().reshape(*x.shape[:-1], -1, block)  # (..., K / block, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(xb * inv) * scale
    return x + (q.reshape(x.shape) - x).detach()


# --- which layers -------------------------------------------------------------------------------


TABLE_BLOCK = 16  # the int8 graph's GatherBlockQuantized holds a table only when d_model % 16 == 0
KEEP_FLOAT = ("embeddings", "head", "first", "last")  # the groups --keep-float may name


def quantized_layers(model: nn.Module, embeddings: bool, keep_float: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The one answer to which layers are quantized, for QAT and the int8 export alike: every block
    linear; with `embeddings`, the head and (when the int8 graph can hold them) the token/position
    tables; minus the KEEP_FLOAT groups named in `keep_float`."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.")
    }
    if embeddings:
        tables = ("tok_emb", "pos_emb") if model.cfg.d_model % TABLE_BLOCK == 0 else ()
        for name in (*tables, "head"):
            module = getattr(model, name, None)
            if module is not None:
                layers[name] = module
    last = f"blocks.{model.cfg.n_layers - 1}."
    group = {
        "embeddings": lambda n: n in ("tok_emb", "pos_emb"),
        "head": lambda n: n == "head",
        "first": lambda n: n.startswith("blocks.0."),
        "last": lambda n: n.startswith(last),
    }
    return {name: m for name, m in layers.items() if not any(group[key](name) for key in keep_float)}


# --- the hooks ----------------------------------------------------------------------------------


class QATHandle:
    """Fake-quant hooks on a model's layers; `detach()` restores the float model exactly.

    state_dict() holds what the export needs besides the weights: for the static scheme, each
    linear layer's observed input range `<layer>.act_range` = [lo, hi].
    """

    def __init__(self, model: nn.Module, cfg: QuantConfig, only: set[str] | None = None) -> None:
        self.scheme = cfg.scheme
        self.bits, self.block = cfg.bits, cfg.block_size
        self.calibrating = False  # static ranges: True = running min/max (PTQ), else training EMA
        self.layers = {
            name: module
            for name, module in quantized_layers(model, cfg.embeddings).items()
            if only is None or name in only
        }
        self.ranges: dict[str, torch.Tensor] = {}  # layer -> (2,) [lo, hi]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in self.layers.items():
            is_linear = isinstance(module, nn.Linear)
            if is_linear and self.scheme == "static":
                self.ranges[name] = torch.tensor([float("inf"), float("-inf")])
            pre = self._linear_pre_hook(name) if is_linear else self._embedding_pre_hook
            if name == "head" and self.bits == 4:  # the int4 graph's head: float over the 8-bit table
                pre = self._embedding_pre_hook
            self._hooks.append(module.register_forward_pre_hook(pre))
            self._hooks.append(module.register_forward_hook(_unshadow, always_call=True))
        torch.compiler.reset()  # code compiled before the hooks existed would silently skip them

    def _embedding_pre_hook(self, module: nn.Module, args: tuple) -> None:
        module.__dict__["weight"] = fake_quant_weight(module._parameters["weight"])

    def _linear_pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # (..., K)
            if self.bits == 4:
                module.__dict__["weight"] = fake_quant_weight_blocks(module._parameters["weight"], 4, self.block)
                return (fake_quant_activation_blocks(x, self.block), *args[1:])
            module.__dict__["weight"] = fake_quant_weight(module._parameters["weight"])
            if self.scheme == "dynamic":
                scale, zp = dynamic_qparams(x)  # (..., 1)
            else:
                scale, zp = self._static_qparams(name, x, observe=module.training or self.calibrating)
            return (fake_quant_activation(x, scale, zp, clips=self.scheme == "static"), *args[1:])

        return hook

    def _static_qparams(self, name: str, x: torch.Tensor, observe: bool):
        r = self.ranges[name]
        if observe:
            batch = torch.stack(torch.aminmax(x.detach())).float().cpu()
            if self.calibrating or not torch.isfinite(r).all():
                r = torch.stack((torch.minimum(r[0], batch[0]), torch.maximum(r[1], batch[1])))
            else:
                r = torch.lerp(r, batch, RANGE_MOMENTUM)
            self.ranges[name] = r
        elif not torch.isfinite(r).all():
            raise RuntimeError(f"{name}: static activation range never observed")
        scale, zp = activation_qparams(r[0], r[1])
        return scale.to(x.device), zp.to(x.device)

    def detach(self) -> None:
        """Remove every hook; the model computes in float again, parameters untouched."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        torch.compiler.reset()  # and code compiled with them would keep fake-quantizing

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.act_range": r.clone() for name, r in self.ranges.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(
                f"quantization state does not match the model (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); was it written with another [quant] scheme?"
            )
        for key, value in state.items():
            self.ranges[key.removesuffix(".act_range")] = value.detach().float().cpu().clone()


def _unshadow(module: nn.Module, args: tuple, output) -> None:
    module.__dict__.pop("weight", None)


def attach(model: nn.Module, cfg: QuantConfig, only: set[str] | None = None) -> QATHandle:
    """Start fake-quantizing `model` as `cfg` says (limited to the layers in `only`, when given);
    returns the handle that detaches and holds state."""
    return QATHandle(model, cfg, only)


# --- persistence ----------------------------------------------------------------------------------


def save_state(handle: QATHandle, path: str | Path) -> None:
    """Write the handle's state (safetensors, atomically), with the scheme in the metadata."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = handle.state_dict() or {"_empty": torch.zeros(0)}  # safetensors wants a tensor
    save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "scheme": handle.scheme})
    as_umask_allows(tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(scheme, state) from a file written by save_state; a damaged file is a UserError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise UserError(f"{path}: not an edgecraft quantization state file")
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: damaged quantization state ({err})") from None
    state.pop("_empty", None)
    return meta.get("scheme", "dynamic"), state
