"""The decoder's matrix products for the tinygrad engine: fp32, int8 and int4 (the graph's MatMul,
DynamicQuantizeMatMul / MatMulIntegerToFloat and MatMulNBits), with the norms before them. On the
CPU each is a custom kernel with a hand-chosen loop shape over weights stored in tiles; int8 and
int4 emulate onnxruntime's kernels exactly in float32 (engine.py's docstring). Other devices keep
tinygrad's own kernels."""

from __future__ import annotations

import numpy as np

NORM_EPS = 1e-5  # the graph's (edgecraft/export/graph.py)


class Linear:
    """One of the graph's matrix products: x @ w (+ bias), w (K, N) float32; or int8 with one scale
    per column and the activations quantized to uint8 per call (`act` None: dynamic, as
    DynamicQuantizeMatMul; else MatMulIntegerToFloat's static (scale, zero point)); or, with
    `block`, MatMulNBits' 4-bit weights (w the integers q - 8, `scale` one per block of `block`
    rows and column, (K / block, N)) and its int8 activations per block (accuracy level 4).
    Quantized weights are held as their integers (quantized_dtype)."""

    def __init__(self, w, scale=None, bias=None, act: tuple[float, float] | None = None, block: int | None = None) -> None:
        self.w, self.scale, self.bias, self.act, self.block = w, scale, bias, act, block

    def __call__(self, x, valid, norm=None, residual=None, quantized=None):
        """x (R, S, K), valid (R, S, 1) bool: the rows that count for a dynamic range. `norm`: an
        RMSNorm's gain (K,) applied to x first (quantized products: or a LayerNorm's (gain, bias));
        `residual` (R, S, N): added to the result. On the CPU at fp32 both go inside the product's
        kernel (two kernels fewer a norm, one a residual); in int8 and 4 bits the norm goes inside
        the activations' quantization and the residual and bias inside the product. `quantized`:
        x already quantized (Linear.quantize), for products that share an input."""
        cpu = str(valid.device).startswith("CPU")
        if self.scale is None and cpu:
            return _matmul(x, self.w, self.bias, norm, residual)
        if self.scale is None:
            return _plus(_matmul(_normalize(x, norm), self.w, self.bias), None, residual)
        q, step = quantized or self.quantize(x, valid, norm)
        if cpu:  # int8: one block of K, the sums scaled by the step and each column's scale
            return _matmul(q, self.w, self.bias, residual=residual, blocks=(step, self.scale, self.block or q.shape[-1]))
        if self.block is not None:
            y = _block_product(q, step, self.w, self.scale, self.block)
        else:  # integer sums: exact in float32 below 2^24; a static step is in the columns' scales
            y = _matmul(q, self.w) * (self.scale if step is None else self.scale * step)
        return _plus(y, self.bias, residual)

    def quantize(self, x, valid, norm=None):
        """This product's quantized input (quantize_blocks or quantize_range), to share with another
        product of the same input and the same quantization."""
        return quantize_blocks(x, self.block, norm) if self.block is not None else quantize_range(x, valid, norm, self.act)


def _plus(y, bias, residual):
    """y + bias + residual, either of them None (the products off the CPU, which add them outside)."""
    y = y if bias is None else y + bias
    return y if residual is None else residual + y


def _normalize(x, norm):
    """x after `norm`: None, an RMSNorm's gain, or a LayerNorm's (gain, bias or None), in
    tinygrad's own kernels (apply_norm)."""
    if norm is None:
        return x
    gain, bias = norm if isinstance(norm, tuple) else (norm, None)
    return apply_norm(x, gain, bias, rms=not isinstance(norm, tuple))


def _norm_buffers(norm) -> list:
    """A norm's parameters as a custom kernel's inputs (what _normed_value reads)."""
    return [t for t in (norm if isinstance(norm, tuple) else (norm,)) if t is not None]


def quantize_range(x, valid, norm=None, act: tuple[float, float] | None = None):
    """DynamicQuantizeMatMul's uint8 activations (onnxruntime's GetQuantizationParameter): one range
    over the call's real rows (`valid` (R, S, 1)), widened to hold 0, split into 255 steps, and each
    value rounded half to even to step units plus the zero point, clipped to 0..255; or
    MatMulIntegerToFloat's static (step, zero point) `act`. `norm` as quantize_blocks'. -> (q -
    zero point in float32 (R, S, K), the step (1, 1), or None for a static one, which the weights'
    scale holds). On the CPU one custom kernel (the norm, the range and the rounding), where
    tinygrad's own took five or six a product."""
    from tinygrad import Tensor, UOp
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    R, S, K = x.shape
    M = R * S
    if not str(x.device).startswith("CPU"):
        return _quantize_range_tensor(x, valid, norm, act)

    def kernel(Q, STEP, X, V, *params):
        if act is None:  # the range: both maxima over the same loops, each row's norm taken once
            i, k = UOp.range(M, 0, axis_type=AxisType.REDUCE), UOp.range(K, 1, axis_type=AxisType.REDUCE)
            v = V[i].where(_normed_value(X, i, params, norm, K, 10)(k), 0.0)
            hi = v.reduce(i, k, arg=Ops.MAX).maximum(0.0)
            lo = -((-v).reduce(i, k, arg=Ops.MAX).maximum(0.0))
            step = hi.eq(lo).where(1.0, (hi - lo) / 255.0)
            zp = (-lo / step).maximum(0.0).minimum(255.0).round()
        else:
            step, zp = float(act[0]), float(act[1])
        i, k = UOp.range(M, 2), UOp.range(K, 3)
        value = _normed_value(X, i, params, norm, K, 20)(k)
        q = Q[i, k].store(((value / step).round() + zp).maximum(0.0).minimum(255.0) - zp).end(i, k)
        stored = UOp.group(q, STEP[0].store(step)) if act is None else q
        return stored.sink(arg=KernelInfo(name=f"quantize8_{M}_{K}", opts_to_apply=()))

    q, step = Tensor.empty(M, K, device=x.device).custom_kernel(
        Tensor.empty(1, device=x.device), x.reshape(M, K), valid.reshape(M), *_norm_buffers(norm), fxn=kernel)[:2]
    return q.reshape(R, S, K), (step.reshape(1, 1) if act is None else None)


def _quantize_range_tensor(x, valid, norm, act):
    """quantize_range in tinygrad's own kernels (other devices)."""
    x = _normalize(x, norm)
    if act is None:
        masked = valid.where(x, 0.0)
        lo, hi = masked.min().minimum(0.0), masked.max().maximum(0.0)
        step = (hi == lo).where(1.0, (hi - lo) / 255.0)
        zp = (-lo / step).clip(0.0, 255.0).round()
    else:
        step, zp = act
    return ((x / step).round() + zp).clip(0.0, 255.0) - zp, (step.reshape(1, 1) if act is None else None)


def _normed_value(X, i, params: tuple, norm, K: int, first_range: int):
    """k -> row i of X (M, K) after `norm` (None, an RMSNorm's gain, or a LayerNorm's (gain, bias or
    None), given as the kernel's `params` buffers): the row's statistics are reductions over K, which
    tinygrad computes once a row, before the loop that uses them. `first_range`: the ids of those
    reductions' ranges, distinct from the kernel's own."""
    from tinygrad import UOp
    from tinygrad.uop.ops import AxisType, Ops

    if norm is None:
        return lambda k: X[i, k]
    layer_norm = isinstance(norm, tuple)
    G, B = params[0], (params[1] if len(params) > 1 else None)
    mean = None
    if layer_norm:
        k = UOp.range(K, first_range, axis_type=AxisType.REDUCE)
        mean = X[i, k].reduce(k, arg=Ops.ADD) * (1.0 / K)
    k = UOp.range(K, first_range + 1, axis_type=AxisType.REDUCE)
    centered = X[i, k] - mean if layer_norm else X[i, k]
    scale = ((centered * centered).reduce(k, arg=Ops.ADD) * (1.0 / K) + NORM_EPS).rsqrt()

    def value(k):
        v = ((X[i, k] - mean) if layer_norm else X[i, k]) * scale * G[k]
        return v if B is None else v + B[k]
    return value


def quantize_blocks(x, block: int, norm=None):
    """MatMulNBits' int8 activations at accuracy level 4 (MLAS's QuantizeARow_CompInt8): each row's
    blocks of `block` values scaled by 127 / their largest magnitude and rounded half to even.
    `norm`: applied to x first, an RMSNorm's gain (K,) or a LayerNorm's (gain, bias or None).
    -> (the integers in float32 (R, S, K), each block's step (R * S, K / block)). On the CPU one
    custom kernel (norm, block maxima, rounding), where tinygrad's own split it into six."""
    from tinygrad import Tensor, UOp
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    R, S, K = x.shape
    M, nb = R * S, K // block
    if not str(x.device).startswith("CPU"):
        return _quantize_blocks_tensor(_normalize(x, norm), block)

    def kernel(Q, STEP, X, *params):
        i = UOp.range(M, 0)
        value = _normed_value(X, i, params, norm, K, 1)
        b = UOp.range(nb, 3)
        j = UOp.range(block, 4, axis_type=AxisType.REDUCE)
        amax = value(b * block + j).abs().reduce(j, arg=Ops.MAX)
        inverse = amax.eq(0.0).where(0.0, 127.0 / amax)
        j = UOp.range(block, 5)
        q = Q[i, b * block + j].store((value(b * block + j) * inverse).round()).end(j)
        step = STEP[i, b].store(amax / 127.0)
        return UOp.group(q, step).end(i, b).sink(arg=KernelInfo(name=f"quantize_{M}_{K}_{block}", opts_to_apply=()))

    q, step = Tensor.empty(M, K, device=x.device).custom_kernel(
        Tensor.empty(M, nb, device=x.device), x.reshape(M, K), *_norm_buffers(norm), fxn=kernel)[:2]
    return q.reshape(R, S, K), step


def _quantize_blocks_tensor(x, block: int):
    """quantize_blocks in tinygrad's own kernels (other devices)."""
    R, S, K = x.shape
    blocks = x.reshape(R * S, K // block, block)
    amax = blocks.abs().max(-1, keepdim=True)
    q = (blocks * (amax == 0).where(0.0, 127.0 / amax)).round().reshape(R, S, K)
    return q, (amax / 127.0).reshape(R * S, K // block)


def _block_product(q, step, w, scale, block: int):
    """sum over blocks of (q's block . w's block) * step * scale: the 4-bit product off the CPU,
    tinygrad's batched matmul over the blocks. q (R, S, K), step (R S, K / block), w (K, N),
    scale (K / block, N) -> (R, S, N)."""
    from tinygrad import dtypes

    R, S, K = q.shape
    nb, N = K // block, w.shape[-1]
    dots = q.reshape(R * S, nb, block).permute(1, 0, 2).matmul(w.cast(dtypes.float32).reshape(nb, block, N))  # (nb, RS, N)
    return (dots * step.permute(1, 0).reshape(nb, R * S, 1) * scale.reshape(nb, 1, N)).sum(0).reshape(R, S, N)


def _matmul(x, w, bias=None, norm=None, residual=None, blocks=None):
    """x (R, S, K) @ w (+ bias (N,)) -> (R, S, N), w (K, N), on the CPU in tiles (N / T, K, T)
    (tile_width). On the CPU one kernel written out with its loop shape chosen here: 16 outputs
    (contiguous in a tile) times up to 4 rows, or up to 64 outputs of one row (_upcasts), accumulate
    in vector registers over K. tinygrad's own choice for a few rows keeps a handful of scalar
    accumulators (chains of dependent adds), several times slower
    (benchmarks/results/tinygrad_decode.md). Other devices keep tinygrad's matmul.
    CPU only: `norm` (K,) an RMSNorm's gain on x (its sum of squares taken in the same loop over K,
    the scale applied to the sums), `residual` (R, S, N) added to the result; `blocks` (step
    (M or 1, K / b) or None, scale (N / T, K / b, T), b): x and w hold integers, each block's sum
    of b products exact in float32, then scaled by the activations' step and the weights' scale, in
    block order (MatMulNBits; int8 products are one block of K)."""
    from tinygrad import Tensor, UOp, dtypes
    from tinygrad.codegen.opt import Opt, OptOps
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    R, S, K = x.shape
    if not str(x.device).startswith("CPU"):
        y = x.matmul(w.cast(dtypes.float32) if w.dtype != dtypes.float32 else w)
        return y if bias is None else y + bias
    groups, _, T = w.shape  # tiled (N / T, K, T): see tile_width
    N, M = groups * T, R * S
    cols, more = _upcasts(N)
    rows = next(m for m in (4, 2, 1) if M % m == 0)
    j = (M > 1) + (groups > 1)  # the tile's column axis (ranges of size 1 are dropped before the options apply)
    opts = [Opt(OptOps.UPCAST, j, cols)] if cols > 1 else []
    if M == 1 and more > 1:  # one row: more outputs in flight instead
        opts.append(Opt(OptOps.UPCAST, j, more))
    if rows > 1:
        opts.append(Opt(OptOps.UPCAST, 0, rows))

    def kernel(C, A, B, *extra):
        i, c, u = UOp.range(M, 0), UOp.range(groups, 1), UOp.range(T, 2)
        n = c * T + u
        extra = list(extra)
        if blocks is not None:
            step, scale = extra.pop(0) if blocks[0] is not None else None, extra.pop(0)
            # one block: no range over blocks (tinygrad drops a range of size 1, and its reduce with it)
            b = UOp.range(K // size, 3, axis_type=AxisType.REDUCE) if K > size else 0
            j = UOp.range(size, 4, axis_type=AxisType.REDUCE)
            k = b * size + j if K > size else j
            dot = (A[i, k] * B[c, k, u].cast(dtypes.float32)).reduce(j, arg=Ops.ADD)
            acc = dot * (scale[c, b, u] if step is None else step[i if step_rows > 1 else 0, b] * scale[c, b, u])
            acc = acc.reduce(b, arg=Ops.ADD) if K > size else acc
            return _finish(C, acc, i, c, u, n, extra)
        k = UOp.range(K, 3, axis_type=AxisType.REDUCE)
        weight = B[c, k, u] if B.dtype == dtypes.float32 else B[c, k, u].cast(dtypes.float32)
        a = A[i, k]
        if norm is not None:
            gain = extra.pop(0)
            acc = (a * gain[k] * weight).reduce(k, arg=Ops.ADD)
            acc = acc * ((a * a).reduce(k, arg=Ops.ADD) / K + NORM_EPS).sqrt().reciprocal()
        else:
            acc = (a * weight).reduce(k, arg=Ops.ADD)
        return _finish(C, acc, i, c, u, n, extra)

    def _finish(C, acc, i, c, u, n, extra):
        if bias is not None:
            acc = acc + extra.pop(0)[n]
        if residual is not None:
            acc = acc + extra.pop(0)[i, n]
        name = f"matmul{f'_b{size}' if blocks is not None else ''}_{M}_{N}_{K}"
        return C[i, n].store(acc).end(i, c, u).sink(arg=KernelInfo(name=name, opts_to_apply=tuple(opts)))

    size = blocks[2] if blocks is not None else 0
    step_rows = blocks[0].shape[0] if blocks is not None and blocks[0] is not None else 0
    inputs = [x.reshape(M, K), w] + [t for t in (blocks or ())[:2] if t is not None] + [t for t in (norm, bias) if t is not None]
    inputs += [residual.reshape(M, N)] if residual is not None else []
    out = Tensor.empty(M, N, device=x.device).custom_kernel(*inputs, fxn=kernel)[0]
    return out.reshape(R, S, N)


def _upcasts(N: int) -> tuple[int, int]:
    """(cols, more): a one-row product's kernel keeps cols x more outputs in vector registers, cols
    the largest divisor of N up to 16 (16, or 11 of a 66-token vocabulary), more 4 where at least 4
    such groups of 4 x cols remain, else 2 (faster for 128 outputs), else what divides
    (benchmarks/results/int4-peers/peers_llama2c_tinygrad_profile.md)."""
    cols = max(n for n in range(1, 17) if N % n == 0)
    groups = N // cols
    more = 4 if groups % 4 == 0 and groups >= 16 else 2 if groups % 2 == 0 and groups >= 8 else \
        max(m for m in (1, 2, 3, 4) if groups % m == 0)
    return cols, more


def tile_width(N: int) -> int:
    """The columns of one tile of a CPU product's weights, stored (N / T, K, T): a one-row kernel's
    outputs in flight, so that it streams one contiguous block of weights per group of outputs
    rather than T columns out of every row, the weights coming from beyond the L2
    (benchmarks/results/int4-peers/peers_llama2c_tinygrad_profile.md)."""
    cols, more = _upcasts(N)
    return cols * more


def tiled(a: np.ndarray, N: int) -> np.ndarray:
    """(rows, N) -> (N / T, rows, T), T = tile_width(N): how the CPU kernels read a product's
    weights and per-column scales."""
    T = tile_width(N)
    return a.reshape(a.shape[0], N // T, T).transpose(1, 0, 2)


def apply_norm(x, gain, bias, rms: bool):
    """LayerNorm or RMSNorm over the last axis (eps 1e-5), as the graph's kernels."""
    if rms:
        y = x * (x.square().mean(-1, keepdim=True) + NORM_EPS).rsqrt()
    else:
        y = x.layernorm(eps=NORM_EPS)
    y = y * gain
    return y if bias is None else y + bias
