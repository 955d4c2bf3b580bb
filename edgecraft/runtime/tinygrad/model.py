"""The decoder in tinygrad Tensors over a bundle graph's weights (edgecraft/export/graph.py's,
int8_graph.py's and int4_graph.py's initializer names): the tinygrad engine's arithmetic, one
function for prefill and decode, and the attention kernels of a decode step; the matrix products
are products.py's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edgecraft.config import GPTConfig
from edgecraft.runtime.bundle import BundleError
from edgecraft.runtime.tinygrad.products import Linear, apply_norm, tiled

WINDOW_ALIGN = 16  # a decode window's first column is a multiple of this: the kernels load aligned vectors
# a decode window spans a multiple of this many columns (a few compiled widths); the engine's cache
# buffers hold this many columns past their last, for windows that reach past column t
WINDOW_STEP = 32


def quantized_dtype(device: str):
    """The dtype holding quantized weights' integers (|q| <= 128, exact either way) on `device`: on
    the CPU 16-bit floats, which clang widens in one instruction where int8 takes two and 4-bit
    nibbles three; a 128 x 384 one-row product took 2.48 us from float16 weights, 3.61 from int8,
    4.91 from nibbles and 2.32 from float32 (benchmarks/results/tinygrad_weight_forms.md). int8
    elsewhere."""
    return np.float16 if device.startswith("CPU") else np.int8


def _attend(e, values, r0: int, base):
    """A decode step's attention output on the CPU: e (R, nkv, g, W) @ the values cache's window of
    W columns from base * WINDOW_ALIGN (`base` a bound variable) / e's sum over W ->
    (R, nkv, g, hp). One custom kernel over the whole cache buffer (B, nkv, C, hp): a window of a
    cache is a view, which custom_kernel would first copy; each head's hp outputs accumulate in
    vector registers over the window's columns, one contiguous row of hp values each."""
    from tinygrad import Tensor, UOp
    from tinygrad.codegen.opt import Opt, OptOps
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    R, nkv, g, W = e.shape
    hp = values.shape[-1]
    heads = R * nkv * g

    def kernel(out, E, V, base):
        i, d, w = UOp.range(heads, 0), UOp.range(hp, 1), UOp.range(W, 2, axis_type=AxisType.REDUCE)
        acc = (E[i, w] * V[r0 + i // (nkv * g), i // g % nkv, base * WINDOW_ALIGN + w, d]).reduce(w, arg=Ops.ADD)
        total = E[i, w].reduce(w, arg=Ops.ADD)  # the softmax's denominator, in the same loop
        # tinygrad upcasts at most 16 at once: heads wider than that loop over groups of 16 outputs
        up = next((n for n in (16, 8, 4) if hp % n == 0), 0)
        opts = (Opt(OptOps.UPCAST, 1, up), Opt(OptOps.UNROLL, 0, 4)) if up and W % 4 == 0 else ()
        return out[i, d].store(acc / total).end(i, d).sink(arg=KernelInfo(name=f"attend_{heads}_{W}_{hp}", opts_to_apply=opts))

    return _windowed(kernel, Tensor.empty(heads, hp, device=e.device), (e.reshape(heads, W), values),
                     base).reshape(R, nkv, g, hp)


def _scores(q, keys, meta, r0: int, base, W: int, scale: float):
    """A decode step's attention scores on the CPU: q (R, nkv, g, hp) . the keys cache's window of W
    columns from base * WINDOW_ALIGN, times `scale`, -inf outside each row's columns (meta's first
    and last, as in forward) -> (R, nkv, g, W). One custom kernel over the whole cache buffer
    (B, nkv, hp, C) (see _attend): 16 columns' scores accumulate in vector registers over hp."""
    from tinygrad import Tensor, UOp, dtypes
    from tinygrad.codegen.opt import Opt, OptOps
    from tinygrad.uop.ops import AxisType, KernelInfo, Ops

    R, nkv, g, hp = q.shape
    heads = R * nkv * g

    def kernel(out, Q, K, M, base):
        i, w, d = UOp.range(heads, 0), UOp.range(W, 1), UOp.range(hp, 2, axis_type=AxisType.REDUCE)
        r = i // (nkv * g)
        dot = (Q[i, d] * K[r0 + r, i // g % nkv, d, base * WINDOW_ALIGN + w]).reduce(d, arg=Ops.ADD)
        col = w.cast(dtypes.int32)
        inside = (col >= M[r, 2]) & (col <= M[r, 3])
        score = inside.where(dot * scale, float("-inf"))
        opts = (Opt(OptOps.UPCAST, 1, 16),) if W % 16 == 0 else ()
        return out[i, w].store(score).end(i, w).sink(arg=KernelInfo(name=f"scores_{heads}_{W}_{hp}", opts_to_apply=opts))

    return _windowed(kernel, Tensor.empty(heads, W, device=q.device), (q.reshape(heads, hp), keys, meta), base).reshape(R, nkv, g, W)


def _pointwise(fn, *xs):
    """fn(*xs) elementwise (xs of one shape, contiguous) on the CPU as one custom kernel over a plain
    loop, no upcast: clang's loop vectorizer then runs its exp polynomial 16 lanes wide, where
    tinygrad's own kernel (4 outputs written out per iteration) stays scalar, several times slower
    (benchmarks/results/int4-peers/peers_llama2c_tinygrad_profile.md). Other devices keep tinygrad's kernel."""
    from tinygrad import Tensor, UOp
    from tinygrad.uop.ops import KernelInfo

    if not str(xs[0].device).startswith("CPU"):
        return fn(*xs).contiguous()
    shape, n = xs[0].shape, xs[0].numel()

    def kernel(out, *ins):
        i = UOp.range(n, 0)
        return out[i].store(fn(*(x[i] for x in ins))).end(i).sink(arg=KernelInfo(name=f"pointwise_{n}", opts_to_apply=()))

    return Tensor.empty(n, device=xs[0].device).custom_kernel(*(x.reshape(n) for x in xs), fxn=kernel)[0].reshape(shape)


def _softmax_numerators(scores):
    """exp(scores - their row max), scores (..., W): tinygrad's max, then the exp as one custom kernel
    with no upcast on the CPU (see _pointwise)."""
    from tinygrad import Tensor, UOp
    from tinygrad.uop.ops import KernelInfo

    if not str(scores.device).startswith("CPU"):
        return (scores - scores.max(-1, keepdim=True)).exp().contiguous()
    shape, W = scores.shape, scores.shape[-1]
    rows = scores.numel() // W

    def kernel(out, S, M):
        i, w = UOp.range(rows, 0), UOp.range(W, 1)
        return out[i, w].store((S[i, w] - M[i]).exp()).end(i, w).sink(arg=KernelInfo(name=f"softmax_exp_{rows}_{W}", opts_to_apply=()))

    flat = scores.reshape(rows, W)
    return Tensor.empty(rows, W, device=scores.device).custom_kernel(flat, flat.max(-1), fxn=kernel)[0].reshape(shape)


def _windowed(kernel, out, inputs: tuple, base):
    """out after `kernel`(out, *inputs, base): a custom kernel whose last parameter is the bound
    variable `base` itself (tinygrad's custom_kernel takes buffers only); the kernel's parameter
    keeps the variable's name, which a step's calls bind."""
    from tinygrad import Tensor, UOp
    from tinygrad.uop.ops import Ops

    srcs = (out.uop, *(t.uop for t in inputs), base)
    var = base.src[0]
    slots = [UOp.placeholder_like(s, slot=j) for j, s in enumerate(srcs[:-1])]
    slots.append(UOp(Ops.PARAM, src=var.src, arg=replace(var.arg, slot=len(slots))))
    return Tensor(srcs[0].after(kernel(*slots).call(*srcs)))


def _rotate(x, cos, sin):
    """Rotary positions on (R, S, heads, hp) by cos/sin (R, S, 1, hp/2): non-interleaved halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def _upload(a: np.ndarray, device: str):
    """A tensor holding `a`. On the CPU it is written straight into the tensor's memory: no copy
    kernel to schedule, which a fresh process's first token would otherwise wait for."""
    from tinygrad import Tensor

    if device != "CPU" or a.size == 0:
        return Tensor(a, device=device)
    t = Tensor.empty(*a.shape, dtype=a.dtype.name, device=device)
    buffer = t.uop.base.buffer.ensure_allocated()
    np.frombuffer(buffer.as_memoryview(force_zero_copy=True), dtype=a.dtype)[: a.size] = a.reshape(-1)
    return t


class Weights:
    """The graph's initializers mapped back to the decoder's parts, as tinygrad Tensors on `device`.
    Names are edgecraft/export/graph.py's and int8_graph.py's."""

    def __init__(self, inits: dict[str, np.ndarray], cfg: GPTConfig, device: str, path: Path) -> None:
        from tinygrad import Tensor

        self.cfg, self.path, self._device = cfg, path, device
        self._inits = inits
        made: list = []  # realized together at the end: one schedule rather than one per tensor
        self._T = lambda a, dtype=np.float32: made.append(_upload(np.ascontiguousarray(a, dtype=dtype), device)) or made[-1]
        # 0, 1, 2...: enough for a decode window (engine.py: up to WINDOW_ALIGN - 1 columns before the
        # longest slot's first and WINDOW_STEP - 1 past its last)
        self.count = self._T(np.arange(cfg.block_size + WINDOW_ALIGN + WINDOW_STEP), np.int32)
        self.tok = self._T(self._table("tok_emb"))  # (V, D)
        self.pos = self._T(self._table("pos_emb")) if cfg.pos == "learned" else None  # (block, D)
        self.table0 = self._T(self._get("blocks.0.norm1.table")) if cfg.pos == "rope" else None  # (V, D)
        self.rope = (self._T(self._get("rope.cos")), self._T(self._get("rope.sin"))) if cfg.pos == "rope" else None
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blocks.{i}"
            layer = {
                "norm1": self._norm(f"{p}.norm1") if (i > 0 or cfg.pos == "learned") else None,
                "qkv": self._linear(f"{p}.attn.qkv", bias=True),
                "proj": self._linear(f"{p}.attn.proj"),
                "proj_bias": self._opt(f"{p}.attn.proj.bias"),
                "norm2": self._norm(f"{p}.norm2"),
                "mlp_proj": self._linear(f"{p}.mlp.proj"),
                "mlp_proj_bias": self._opt(f"{p}.mlp.proj.bias"),
            }
            if cfg.mlp == "swiglu":
                layer["gate"], layer["up"] = self._linear(f"{p}.mlp.gate", True), self._linear(f"{p}.mlp.up", True)
            else:
                layer["fc"] = self._linear(f"{p}.mlp.fc", bias=True)
            self.layers.append(layer)
        self.norm_f = self._norm("norm_f")
        self.head = self._linear("head")
        Tensor.realize(*made)
        del self._inits

    def _get(self, name: str) -> np.ndarray:
        if name not in self._inits:
            raise BundleError(f"{self.path}: no initializer {name!r}; not a graph edgecraft wrote: re-export the run")
        return self._inits[name]

    def _opt(self, name: str):
        return self._T(self._inits[name]) if name in self._inits else None

    def _norm(self, prefix: str):
        return self._T(self._get(f"{prefix}.weight")), self._opt(f"{prefix}.bias")

    def _table(self, name: str) -> np.ndarray:
        """An embedding table, dequantized as GatherBlockQuantized does ((q - 128) * row scale)."""
        if f"{name}.weight.uint8" in self._inits:
            q = self._get(f"{name}.weight.uint8").astype(np.float32) - 128.0  # (rows, D)
            scale = self._get(f"{name}.weight.scale")  # (rows, D / block)
            return q * np.repeat(scale, q.shape[1] // scale.shape[1], axis=1)
        return self._get(f"{name}.weight")

    def _linear(self, name: str, bias: bool = False) -> Linear:
        b = self._opt(f"{name}.bias") if bias else None
        if f"{name}.weight.uint4" in self._inits:
            return self._linear4(name, b)
        if f"{name}.weight.int8" in self._inits:
            act = None
            if f"{name}.weight.act_scale" in self._inits:
                act = (float(self._get(f"{name}.weight.act_scale")), float(self._get(f"{name}.weight.act_zero_point")))
            w = self._get(f"{name}.weight.int8")
        else:
            w, act = self._get(f"{name}.weight.T"), None
        cpu, N = self._device.startswith("CPU"), w.shape[1]
        if cpu:  # (K, N) as the graph holds them -> tiles for _matmul
            w = tiled(w, N)
        scale = None
        if f"{name}.weight.int8" in self._inits:
            scale = self._get(f"{name}.weight.scale")  # (N,)
            if act is not None:  # a static step folded into the columns' scales (quantize_range returns none)
                scale = scale * np.float32(act[0])
            if cpu:  # _matmul's one block of K: (N / T, 1, T)
                scale = tiled(scale.reshape(1, N), N)
            scale = self._T(scale)
        # int8 weights stay integers in memory (half the bytes of float32 on the CPU), widened in the kernel
        return Linear(self._T(w, quantized_dtype(self._device) if scale is not None else np.float32), scale, b, act)

    def _linear4(self, name: str, bias) -> Linear:
        """MatMulNBits' weights (export/int4_graph.py's layout: B (N, K / block, block / 2) uint8,
        the lower nibble first, each q + 8; scales (N K / block,)) as the integers q (K, N) int8
        and the scales (K / block, N); on the CPU both tiled as _matmul reads them. The integers are
        held as quantized_dtype, not packed: nibbles cost the CPU's product more than their bytes save."""
        packed = self._get(f"{name}.weight.uint4")
        N, nb, half = packed.shape
        q = np.empty((N, nb, 2 * half), dtype=np.int8)
        q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
        w = (q - 8).reshape(N, nb * 2 * half).T  # (K, N)
        scale = self._get(f"{name}.weight.scales").reshape(N, nb).T  # (nb, N)
        if self._device.startswith("CPU"):
            w, scale = tiled(w, N), tiled(scale, N)
        return Linear(self._T(w, quantized_dtype(self._device)), self._T(scale), bias, block=2 * half)


def forward(w: Weights, kv: list, meta, r0, c0, window, R: int, S: int, masked: bool, base=None):
    """One call's logits (R, S, V): rows r0..r0+R-1 of the cache take S new columns c0..c0+S-1
    (written only where a row's chunk is, when `masked`), then attend over the `window` columns
    from column base * WINDOW_ALIGN (base a bound variable, decode), else ending at c0 + S.
    meta (R, 2S + 3) int32: ids (R, S) left-padded, positions (R, S), then per row the window's
    first column that row attends to, the causal limit (the window column of the chunk's first
    token) and the count of its new tokens (host arithmetic: the window may be a symbolic size)."""
    cfg = w.cfg
    nh, nkv, hp = cfg.n_heads, cfg.n_kv_heads, cfg.cache_head_size
    g = nh // nkv
    ids, pos = meta[:, :S], meta[:, S : 2 * S]  # (R, S) each
    first, limit = meta[:, 2 * S].reshape(R, 1, 1), meta[:, 2 * S + 1].reshape(R, 1, 1)
    new = meta[:, 2 * S + 2].reshape(R, 1)
    count = w.count  # 0, 1, 2...: aranges on the weights' device
    col = count.shrink(((0, S),)).reshape(1, S)
    valid = (col >= S - new).reshape(R, S, 1)  # (R, S, 1) the real tokens of each row
    # attention mask (R, 1, 1, S, W): a row's own columns, causal within the chunk
    key = count.shrink(((0, window),)).reshape(1, 1, window)
    query = col.reshape(1, S, 1)
    mask = ((key >= first) & (key - query <= limit)).reshape(R, 1, 1, S, window)
    rows, cols = (r0, r0 + R), (c0, c0 + S)
    rms = cfg.norm == "rmsnorm"
    x = w.tok[ids]  # (R, S, D) the residual stream
    if w.pos is not None:
        x = x + w.pos[pos]
        h, gain = _normed(x, w.layers[0]["norm1"], rms, w.layers[0]["qkv"])
    else:  # layer 0's norm folded into a table (the graph's)
        h, gain = w.table0[ids], None
        cos, sin = (t[pos].reshape(R, S, 1, hp // 2) for t in w.rope)
    for i, layer in enumerate(w.layers):
        qkv = layer["qkv"](h, valid, norm=gain)  # (R, S, (nh + 2 nkv) hp)
        q = qkv[:, :, : nh * hp].reshape(R, S, nh, hp)
        k = qkv[:, :, nh * hp : (nh + nkv) * hp].reshape(R, S, nkv, hp)
        v = qkv[:, :, (nh + nkv) * hp :].reshape(R, S, nkv, hp)
        if w.rope is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # keys (B, nkv, hp, C) and values (B, nkv, C, hp): the columns of a window are the vector
        # axis of the scores' product, and one column is one vector of the values' product
        writes = ((kv[2 * i].shrink((rows, None, None, cols)), k.permute(0, 2, 3, 1), (R, 1, 1, S)),
                  (kv[2 * i + 1].shrink((rows, None, cols, None)), v.permute(0, 2, 1, 3), (R, 1, S, 1)))
        for target, value, shape in writes:
            target.assign(valid.reshape(shape).where(value, target) if masked else value)
        start = c0 + S - window if base is None else base * WINDOW_ALIGN
        span = (start, start + window)
        q = q.reshape(R, S, nkv, g, hp).permute(0, 2, 3, 1, 4).reshape(R, nkv, g * S, hp)
        # decode on the CPU: custom kernels over the whole cache buffers, the window aligned
        windowed = base is not None and S == 1 and isinstance(r0, int) and str(q.device).startswith("CPU")
        if windowed:
            scores = _scores(q, kv[2 * i], meta, r0, base, window, cfg.head_size**-0.5).reshape(R, nkv, g, S, window)
        else:
            keys = kv[2 * i].shrink((rows, None, None, span))  # (R, nkv, hp, W)
            scores = (q.matmul(keys) * cfg.head_size**-0.5).reshape(R, nkv, g, S, window)
            scores = mask.where(scores, float("-inf")).contiguous()  # (R, nkv, g, S, W)
        # softmax with each exp computed once (materialized, or every consumer recomputes it) and
        # the division after the product, on hp values rather than W
        e = _softmax_numerators(scores).reshape(R, nkv, g * S, window)
        if windowed:
            attn = _attend(e, kv[2 * i + 1], r0, base)  # (R, nkv, g, hp)
        else:
            values = kv[2 * i + 1].shrink((rows, None, span, None))  # (R, nkv, W, hp)
            attn = e.matmul(values) / e.sum(-1, keepdim=True)  # (R, nkv, g S, hp)
        if S > 1:  # (one column: the same order already, and a permute would be copied)
            attn = attn.reshape(R, nkv, g, S, hp).permute(0, 3, 1, 2, 4)
        attn = attn.reshape(R, S, nh * hp)
        x = layer["proj"](attn, valid, residual=x)
        if layer["proj_bias"] is not None:
            x = x + layer["proj_bias"]
        h, gain = _normed(x, layer["norm2"], rms, layer.get("fc") or layer["gate"])
        if cfg.mlp == "swiglu":
            gate, up = layer["gate"], layer["up"]
            alike = gate.scale is not None and (gate.block, gate.act) == (up.block, up.act)
            shared = gate.quantize(h, valid, gain) if alike else None  # quantized alike: the input once for both
            f = _pointwise(lambda a, b: a.silu() * b, gate(h, valid, norm=gain, quantized=shared),
                           up(h, valid, norm=gain, quantized=shared))  # (R, S, F)
        else:  # exact (erf)
            f = _pointwise(lambda a: a.gelu(approximate="none"), layer["fc"](h, valid, norm=gain))  # (R, S, F)
        x = layer["mlp_proj"](f, valid, residual=x)
        if layer["mlp_proj_bias"] is not None:
            x = x + layer["mlp_proj_bias"]
        if i + 1 < len(w.layers):
            h, gain = _normed(x, w.layers[i + 1]["norm1"], rms, w.layers[i + 1]["qkv"])
    h, gain = _normed(x, w.norm_f, rms, w.head)
    return w.head(h, valid, norm=gain)  # (R, S, V)


def _normed(x, params: tuple, rms: bool, into: Linear):
    """(the next products' input, the norm they apply themselves or None): an RMSNorm without bias
    is left to the products (Linear, `into` the first), a LayerNorm to quantized ones (its (gain,
    bias)), which take it inside their activations' quantization; any other norm is applied here."""
    gain, bias = params
    if rms and bias is None:
        return x, gain
    if not rms and into.scale is not None:
        return x, params
    return apply_norm(x, gain, bias, rms=rms), None
