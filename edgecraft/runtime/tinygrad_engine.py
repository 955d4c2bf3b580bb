"""The tinygrad engine: a bundle's weights run on tinygrad's code generators (CPU through clang,
CUDA, Metal, OpenCL, WebGPU where present), behind the same engine interface as onnxruntime.

tinygrad's ONNX frontend has no GroupQueryAttention nor GatherBlockQuantized, so the decoder is
written here with tinygrad Tensors over the graph's own initializers (read by tinygrad's protobuf
reader, no onnx package): the graph fuses some weights (layer 0's norm folded into an embedding
table for rotary models, heads zero-padded to cache_head_size, rotary tables), and running exactly
what the graph holds is what makes the logits match onnxruntime's.

Every call is one TinyJit replay over fixed shapes, so nothing compiles after warm-up:
- The KV cache is one buffer per layer and kind, (B, n_kv_heads, C, head_size), C = 4 block_size
  columns (values transposed, (B, n_kv_heads, head_size, C), so both attention products read
  contiguous memory). Sequences are right-aligned: every active slot's newest token sits in column t - 1, so a
  decode step writes one column, t, for all slots (a symbolic slice, no scatter), and attention
  reads the window of the longest slot, each slot masking the columns before its own start.
  When t reaches C, every slot is moved back to end at 2 block_size (one copy every 2 block_size steps).
- Prefill pads its chunk on the left to a power of two (S) and writes columns t - S .. t - 1, masked
  per row, so a chunk of any length reuses a few compiled shapes.
- decode of n slots runs the step compiled for the next power of two; the extra rows write column t
  of slots past n, which is past everything those slots hold.

int8 bundles run as int8 arithmetic emulated exactly in float32: activations are quantized per call
as onnxruntime's DynamicQuantizeMatMul does (or with the static ranges of MatMulIntegerToFloat),
products of integers summed in float32 (exact below 2^24), then scaled; quantized tables are
dequantized once at load, as GatherBlockQuantized does per row. Exact up to the float32 arithmetic
around the products: an activation within 1e-7 of a rounding boundary can round the other way than
in onnxruntime, and the KV cache keeps that difference (logits then differ by ~1e-3). A dynamic
range covers the call's real tokens; onnxruntime's also covers the padding of a ragged prefill
(rows of different lengths in one call).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from edgecraft.config import GPTConfig
from edgecraft.runtime.bundle import BundleError
from edgecraft.runtime.engine import prefill_lengths
from edgecraft.runtime.tinygrad_replay import CpuReplay

INSTALL_HINT = "pip install 'edgecraft[tinygrad]'"
CACHE_ENV = "EDGECRAFT_TINYGRAD_CACHE"  # a folder for tinygrad's compiled-kernel cache (cache.db)
DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA", "metal": "METAL", "gpu": "CL", "opencl": "CL", "cl": "CL", "webgpu": "WEBGPU",
                "amd": "AMD", "nv": "NV"}
NORM_EPS = 1e-5  # the graph's (edgecraft/export/graph.py)


def _tinygrad(cache_dir: str | Path | None = None):
    """Import tinygrad with its kernel cache under `cache_dir` (else $EDGECRAFT_TINYGRAD_CACHE,
    else tinygrad's own CACHEDB or ~/.cache/tinygrad), set before its database first opens."""
    try:
        import tinygrad
        from tinygrad import helpers
    except ImportError:
        raise RuntimeError(f"the tinygrad backend needs the tinygrad package: {INSTALL_HINT}") from None
    folder = cache_dir or os.environ.get(CACHE_ENV)
    if folder and helpers._db_connection is None:
        helpers.CACHEDB = str(Path(folder).expanduser().absolute() / "cache.db")
    return tinygrad


def device_name(device: str) -> str:
    """tinygrad's name for `device` ('cpu' -> 'CPU', 'gpu'/'opencl' -> 'CL'); unknown names pass upper-cased."""
    return DEVICE_NAMES.get(device.lower(), device.upper())


def check_available(device: str = "CPU", cache_dir: str | Path | None = None) -> str:
    """tinygrad's name for `device` once it is usable here; RuntimeError with one line saying what
    to install, or which devices tinygrad found, otherwise."""
    tinygrad = _tinygrad(cache_dir)
    name = device_name(device)
    if name == "CPU" and shutil.which(os.environ.get("CC", "clang")) is None:
        raise RuntimeError("tinygrad's CPU device compiles with clang, which is not installed: "
                           "apt-get install clang (Debian/Ubuntu), xcode-select --install (macOS)")
    try:
        tinygrad.Device[name]
    except Exception:
        found = ", ".join(tinygrad.Device.get_available_devices()) or "none"
        raise RuntimeError(f"tinygrad device {device!r} is not available here; devices found: {found}") from None
    return name


# ------------------------------------------------------------------------ reading the graph
# A few protobuf fields of ONNX's ModelProto, read directly: the initializers' raw bytes become
# numpy arrays without copying through a device (tinygrad's reader realizes each one, seconds here).

_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 11: np.float64}


def _fields(buf: memoryview, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of one protobuf message: ints for varints, memoryviews
    for length-delimited fields and fixed-size ones."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field's values, packed or not."""
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v - (1 << 64) if v >= 1 << 63 else v)
    return out


def _tensor(msg: memoryview) -> tuple[str, np.ndarray]:
    dims, dtype, name, data = [], 1, "", None
    for field, wire, value in _fields(msg):
        if field == 1:
            dims += _ints(wire, value)
        elif field == 2:
            dtype = value
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            data = np.frombuffer(value, dtype=_DTYPES[dtype]).copy()
        elif field == 4 and wire == 2:
            data = np.frombuffer(value, dtype=np.float32).copy()
        elif field == 7:
            data = np.array(_ints(wire, value), dtype=np.int64)
    if data is None:
        data = np.zeros(0, dtype=_DTYPES.get(dtype, np.float32))
    return name, data.reshape(dims)


def _input_shape(msg: memoryview) -> tuple[str, tuple]:
    name, dims = "", []
    for field, _, value in _fields(msg):
        if field == 1:
            name = bytes(value).decode()
        elif field == 2:  # TypeProto -> tensor_type -> shape -> dim
            for f1, _, tensor in _fields(value):
                for f2, _, shape in _fields(tensor) if f1 == 1 else ():
                    for f3, _, dim in _fields(shape) if f2 == 2 else ():
                        for f4, _, d in _fields(dim) if f3 == 1 else ():
                            dims.append(d if f4 == 1 else bytes(d).decode())
    return name, tuple(dims)


def read_graph(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple], dict[str, str]]:
    """A bundle graph's initializers (numpy arrays), inputs' shapes and metadata."""
    inits, inputs, meta = {}, {}, {}
    try:
        buf = memoryview(path.read_bytes())
        for field, _, value in _fields(buf):
            if field == 7:  # graph
                for f, _, item in _fields(value):
                    if f == 5:
                        name, array = _tensor(item)
                        inits[name] = array
                    elif f == 11:
                        name, shape = _input_shape(item)
                        inputs[name] = shape
            elif field == 14:  # metadata_props
                entry = {f: bytes(v).decode() for f, _, v in _fields(value)}
                meta[entry.get(1, "")] = entry.get(2, "")
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not a readable ONNX graph ({type(err).__name__}: {err}); re-export the run") from None
    return inits, inputs, meta


# ------------------------------------------------------------------------------ the weights

class Linear:
    """One of the graph's matrix products: x @ w.T (+ bias), w (N, K) float32, or int8 with one scale
    per column and the activations quantized to uint8 per call (`act` None: dynamic, as
    DynamicQuantizeMatMul; else MatMulIntegerToFloat's static (scale, zero point))."""

    def __init__(self, w, scale=None, bias=None, act: tuple[float, float] | None = None) -> None:
        self.w, self.scale, self.bias, self.act = w, scale, bias, act

    def __call__(self, x, valid):
        """x (R, S, K), valid (R, S, 1) bool: the rows that count for a dynamic range."""
        if self.scale is None:
            y = _product(x, self.w, _lanes(x))
        else:
            if self.act is None:  # onnxruntime's GetQuantizationParameter over the call's real rows
                masked = valid.where(x, 0.0)
                lo, hi = masked.min().minimum(0.0), masked.max().maximum(0.0)
                step = (hi - lo) / 255.0
                step = (hi == lo).where(1.0, step)
                zp = (-lo / step).clip(0.0, 255.0).round()
            else:
                step, zp = self.act
            q = ((x / step).round() + zp).clip(0.0, 255.0) - zp  # (R, S, K) integers in float32
            y = _product(q, self.w, _lanes(x)) * (self.scale * step)  # integer sums: exact in float32 below 2^24
        return y if self.bias is None else y + self.bias


def _product(x, w, lanes: int):
    """x (..., M, K) @ w.T, w (..., N, K) (leading axes broadcast), summed over `lanes`
    interleaved partial sums (0: a plain matmul). tinygrad's CPU kernel for a few rows keeps one
    scalar accumulator per output, a chain of dependent adds; lanes make it vectors of
    independent ones, several times faster for decode steps (benchmarks/results/tinygrad_decode.md)."""
    K = x.shape[-1]
    if lanes == 0 or K % lanes:
        return x.matmul(w.transpose(-1, -2))
    xs = x.reshape(*x.shape[:-1], 1, K // lanes, lanes)  # (..., M, 1, K/l, l)
    ws = w.reshape(*w.shape[:-2], 1, w.shape[-2], K // lanes, lanes)  # (..., 1, N, K/l, l)
    return (xs * ws).sum(-2).sum(-1)  # (..., M, N)


def _lanes(x) -> int:
    """Partial sums for a product of x (R, S, K): 8 for one row, 4 for a decode batch, none for a
    prefill (its kernel has rows enough to keep independent sums)."""
    R, S = x.shape[0], x.shape[1]
    return 8 if R * S == 1 else 4 if S == 1 else 0


def _norm(x, gain, bias, rms: bool):
    """LayerNorm or RMSNorm over the last axis (eps 1e-5), as the graph's kernels."""
    if rms:
        y = x * (x.square().mean(-1, keepdim=True) + NORM_EPS).rsqrt()
    else:
        y = x.layernorm(eps=NORM_EPS)
    y = y * gain
    return y if bias is None else y + bias


def _rotate(x, cos, sin):
    """Rotary positions on (R, S, heads, hp) by cos/sin (R, S, 1, hp/2): non-interleaved halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


class Weights:
    """The graph's initializers mapped back to the decoder's parts, as tinygrad Tensors on `device`.
    Names are edgecraft/export/graph.py's and int8_graph.py's."""

    def __init__(self, inits: dict[str, np.ndarray], cfg: GPTConfig, device: str, path: Path) -> None:
        from tinygrad import Tensor

        self.cfg, self.path = cfg, path
        self._inits = inits
        made: list = []  # realized together at the end: one schedule rather than one per tensor
        self._T = lambda a: made.append(Tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)) or made[-1]
        self.count = Tensor(np.arange(cfg.block_size + 1, dtype=np.int32), device=device)  # (block + 1,)
        made.append(self.count)
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
        if f"{name}.weight.int8" in self._inits:
            act = None
            if f"{name}.weight.act_scale" in self._inits:
                act = (float(self._get(f"{name}.weight.act_scale")), float(self._get(f"{name}.weight.act_zero_point")))
            w = self._get(f"{name}.weight.int8").T
        else:
            w, act = self._get(f"{name}.weight.T").T, None
        # stored (N, K), as torch's Linear: each output reads one contiguous row (the graph's (K, N)
        # made every output a strided walk, several times slower on CPU)
        scale = self._T(self._get(f"{name}.weight.scale")) if f"{name}.weight.int8" in self._inits else None
        return Linear(self._T(w), scale, b, act)


def forward(w: Weights, kv: list, meta, r0, c0, window, R: int, S: int, masked: bool):
    """One call's logits (R, S, V): rows r0..r0+R-1 of the cache take S new columns c0..c0+S-1
    (written only where a row's chunk is, when `masked`), then attend over the `window` columns
    ending at c0 + S. meta (R, 2S + 3) int32: ids (R, S) left-padded, positions (R, S), then per
    row the window's first column that row attends to, window - S (the causal limit) and the count
    of its new tokens (host arithmetic: the window may be a symbolic size)."""
    cfg = w.cfg
    nh, nkv, hp = cfg.n_heads, cfg.n_kv_heads, cfg.cache_head_size
    g = nh // nkv
    ids, pos = meta[:, :S], meta[:, S : 2 * S]  # (R, S) each
    first, limit = meta[:, 2 * S].reshape(R, 1, 1), meta[:, 2 * S + 1].reshape(R, 1, 1)
    new = meta[:, 2 * S + 2].reshape(R, 1)
    count = w.count  # (block + 1,) 0, 1, 2...: aranges on the weights' device
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
        h = _norm(x, *w.layers[0]["norm1"], rms=rms)
    else:  # layer 0's norm folded into a table (the graph's)
        h = w.table0[ids]
        cos, sin = (t[pos].reshape(R, S, 1, hp // 2) for t in w.rope)
    for i, layer in enumerate(w.layers):
        qkv = layer["qkv"](h, valid)  # (R, S, (nh + 2 nkv) hp)
        q = qkv[:, :, : nh * hp].reshape(R, S, nh, hp)
        k = qkv[:, :, nh * hp : (nh + nkv) * hp].reshape(R, S, nkv, hp)
        v = qkv[:, :, (nh + nkv) * hp :].reshape(R, S, nkv, hp)
        if w.rope is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # keys (B, nkv, C, hp) and values transposed (B, nkv, hp, C): both products then read
        # contiguous memory
        writes = ((kv[2 * i].shrink((rows, None, cols, None)), k.permute(0, 2, 1, 3), (R, 1, S, 1)),
                  (kv[2 * i + 1].shrink((rows, None, None, cols)), v.permute(0, 2, 3, 1), (R, 1, 1, S)))
        for target, value, shape in writes:
            target.assign(valid.reshape(shape).where(value, target) if masked else value)
        span = (c0 + S - window, c0 + S)
        keys = kv[2 * i].shrink((rows, None, span, None))  # (R, nkv, W, hp)
        values = kv[2 * i + 1].shrink((rows, None, None, span))  # (R, nkv, hp, W)
        q = q.reshape(R, S, nkv, g, hp).permute(0, 2, 3, 1, 4).reshape(R, nkv, g * S, hp)
        scores = (q.matmul(keys.transpose(-1, -2)) * cfg.head_size**-0.5).reshape(R, nkv, g, S, window)
        scores = mask.where(scores, float("-inf")).contiguous()  # (R, nkv, g, S, W)
        # softmax with each exp computed once (materialized, or every consumer recomputes it) and
        # the division after the product, on hp values rather than W
        e = (scores - scores.max(-1, keepdim=True)).exp().reshape(R, nkv, g * S, window).contiguous()
        attn = _product(e, values, 8 if R * S == 1 else 0) / e.sum(-1, keepdim=True)  # (R, nkv, g S, hp)
        attn = attn.reshape(R, nkv, g, S, hp).permute(0, 3, 1, 2, 4).reshape(R, S, nh * hp)
        x = x + layer["proj"](attn, valid)
        if layer["proj_bias"] is not None:
            x = x + layer["proj_bias"]
        h = _norm(x, *layer["norm2"], rms=rms)
        if cfg.mlp == "swiglu":
            f = (layer["gate"](h, valid).silu() * layer["up"](h, valid)).contiguous()  # (R, S, F)
        else:
            f = layer["fc"](h, valid).gelu(approximate="none").contiguous()  # (R, S, F), exact (erf)
        x = x + layer["mlp_proj"](f, valid)
        if layer["mlp_proj_bias"] is not None:
            x = x + layer["mlp_proj_bias"]
        if i + 1 < len(w.layers):
            h = _norm(x, *w.layers[i + 1]["norm1"], rms=rms)
    return w.head(_norm(x, *w.norm_f, rms=rms), valid)  # (R, S, V)


# ------------------------------------------------------------------------------ the engine

def _bucket(n: int, top: int, least: int = 8) -> int:
    """The next power of two >= n (at least `least`), capped at `top`: the shapes compiled."""
    return min(top, max(least, 1 << (n - 1).bit_length()))


class TinygradEngine:
    """The engine interface (runtime/engine.py) on tinygrad, from a bundle graph's weights."""

    def __init__(self, model_path: str | Path, config: GPTConfig, device: str = "CPU",
                 cache_dir: str | Path | None = None) -> None:
        self.device = check_available(device, cache_dir)
        from tinygrad import TinyJit, Variable

        self._jit, self._var = TinyJit, Variable
        path = Path(model_path)
        inits, inputs, meta = read_graph(path)
        _check_config(path, config, inputs, meta)
        self.cfg = config
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.weights = Weights(inits, config, self.device, path)
        self._columns = 4 * config.block_size  # C: cache columns (module docstring)
        self._jits: dict[tuple, object] = {}
        self.lengths = np.zeros(0, dtype=np.int64)  # (B,) tokens cached per slot
        self.reset(1)

    # ------------------------------------------------------------------------------ state

    def reset(self, batch_size: int) -> None:
        """`batch_size` empty slots; the cache is reallocated (and steps recompiled) only when the size changes."""
        from tinygrad import Tensor

        B = batch_size
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {B}")
        # the column the next decode writes; every aligned slot ends before it. Every slot ends at
        # block_size or later, even one moved back to make room for an appended chunk, so the
        # last block_size columns before any end are in the buffer
        self._t = 2 * self.block_size
        if B == len(self.lengths):
            self.lengths[:] = 0
            self._end[:] = self._t
            return
        self.lengths = np.zeros(B, dtype=np.int64)
        self._end = np.full(B, self._t, dtype=np.int64)  # (B,) the column after each slot's newest token
        nkv, C, hp = self.cfg.n_kv_heads, self._columns, self.cfg.cache_head_size
        # per layer: keys (B, n_kv_heads, C, head_size), values (B, n_kv_heads, head_size, C)
        shapes = [(B, nkv, C, hp), (B, nkv, hp, C)] * self.cfg.n_layers
        self._kv = [Tensor.zeros(*shape, device=self.device).contiguous() for shape in shapes]
        Tensor.realize(*self._kv)
        self._jits.clear()

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self._copy(src, dst, int(self._end[src]))
            self.lengths[dst], self._end[dst] = self.lengths[src], self._end[src]
            self.lengths[src] = 0

    def _copy(self, src: int, dst: int, end: int) -> None:
        """Slot src's last block_size columns before its end into slot dst, ending at `end`."""
        block = self.block_size
        key = ("copy",)
        if key not in self._jits:
            def window(j, row, col):  # keys (1, nkv, block, hp), values (1, nkv, hp, block)
                span = [(row, row + 1), None, None, None]
                span[2 + j % 2] = (col, col + block)
                return self._kv[j].shrink(tuple(span))

            def copy(s, d, sc, dc):
                parts = [window(j, s, sc).contiguous() for j in range(len(self._kv))]
                parts[0].realize(*parts[1:])
                for j, part in enumerate(parts):
                    window(j, d, dc).assign(part)
                self._kv[0].realize(*self._kv[1:])
                return parts[0]
            self._jits[key] = self._jit(copy)
        B, C = len(self.lengths), self._columns
        v = self._var
        self._jits[key](v("src", 0, B - 1).bind(int(src)), v("dst", 0, B - 1).bind(int(dst)),
                        v("src_col", 0, C - block).bind(int(self._end[src]) - block),
                        v("dst_col", 0, C - block).bind(int(end) - block))

    def _align(self, slots, end: int) -> None:
        """Move each of `slots` that holds tokens so that its newest ends at column `end`."""
        for b in slots:
            if self.lengths[b] and self._end[b] != end:
                self._copy(b, b, end)
            self._end[b] = end

    def _make_room(self) -> None:
        """At the last column, move every slot back to end at 2 block_size (module docstring)."""
        self._t = 2 * self.block_size
        self._align(range(len(self.lengths)), self._t)

    # ------------------------------------------------------------------------------ steps

    def _call(self, kind: str, R: int, S: int, window: int, meta: np.ndarray, r0: int, c0: int) -> np.ndarray:
        """One jitted call of `forward` -> logits (R, S, V), a view the next call of the same shape
        overwrites. The jit, its input buffer and the view of its output are made once per shape."""
        from tinygrad import Device, Tensor

        B, C = len(self.lengths), self._columns
        key = (kind, R, S, window)
        if key not in self._jits:
            def step(meta, r, c):
                return forward(self.weights, self._kv, meta, r, c, window, R, S, masked=kind == "prefill").realize(*self._kv)
            inputs = Tensor.zeros(*meta.shape, dtype="int32", device=self.device).contiguous().realize()
            self._jits[key] = [self._jit(step), inputs, _host_view(inputs), None, None, None]
        entry = self._jits[key]
        jit, inputs, host_in, last, host_out, replay = entry
        if host_in is None:  # a device without host-visible memory: a fresh input each call
            inputs = Tensor(meta, device=self.device)
        else:
            host_in[...] = meta
        v = self._var
        r = 0 if R == B else v("row", 0, B - 1).bind(r0)
        args = (inputs, r, v("col", 0, C - S).bind(c0))
        if replay is not None:
            replay({"row": r0, "col": c0})
        else:
            out = jit(*args)
            if out is not last:  # the first calls' results are fresh tensors; replays return the same one
                entry[3], entry[4] = out, _host_view(out)
                host_out = entry[4]
            elif host_in is not None and jit.cnt >= 3:
                entry[5] = CpuReplay.build(jit, args)
        if host_out is None:
            return entry[3].numpy().reshape(R, S, self.vocab_size)
        Device[self.device].synchronize()
        return host_out.reshape(R, S, self.vocab_size)

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Append right-padded chunks ids (B, S) of `lengths` (B,) real tokens -> logits (B, S, V)."""
        ids = np.asarray(ids, dtype=np.int64)
        B, S = ids.shape
        n = prefill_lengths(ids, lengths, self.lengths, self.block_size)
        logits = np.zeros((B, S, self.vocab_size), dtype=np.float32)  # (B, S, V)
        rows = np.flatnonzero(n)
        if not len(rows):
            return logits
        t = self._t
        for b in rows:  # a chunk appended to a slot: its tokens so far end n columns before t
            if self.lengths[b]:
                self._align([b], t)
                self._copy(b, b, t - int(n[b]))
        total = self.lengths + n
        Sp = _bucket(int(n.max()), self.block_size)  # the chunk's compiled width
        window = _bucket(int(total[rows].max()), self.block_size)
        window = max(window, Sp)
        sel = rows if len(rows) == 1 else np.arange(B)  # one slot, or all (rows without tokens masked)
        R = len(sel)
        meta = np.zeros((R, 2 * Sp + 3), dtype=np.int32)  # (R, 2 Sp + 3), forward's layout
        for j, b in enumerate(sel):
            k, p = int(n[b]), int(self.lengths[b])
            meta[j, Sp - k : Sp] = ids[b, :k]
            meta[j, 2 * Sp - k : 2 * Sp] = np.minimum(p + np.arange(k), self.block_size - 1)
            meta[j, 2 * Sp :] = window - total[b], window - Sp, k
        out = self._call("prefill", R, Sp, window, meta, int(sel[0]), t - Sp)  # (R, Sp, V)
        for j, b in enumerate(sel):
            k = int(n[b])
            logits[b, :k] = out[j, Sp - k :]
            if k:
                self._end[b] = t
        self.lengths[:] = total
        return logits

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One new token for each of the slots 0..n-1, ids (n,) -> logits (n, V)."""
        n = len(ids)
        lengths = self.lengths
        if not 1 <= n <= len(lengths):
            raise ValueError(f"decode got {n} token ids for {len(lengths)} slots")
        active = lengths[:n]
        longest = int(active.max())
        if longest >= self.block_size:
            raise ValueError(f"a slot already holds block_size {self.block_size} positions")
        if self._t >= self._columns:
            self._make_room()
        if (self._end[:n] != self._t).any():
            self._align(range(n), self._t)
        R = min(len(lengths), 1 << (n - 1).bit_length())
        # attention reads the columns of the longest slot, rounded up: a few compiled widths
        window = _bucket(longest + 1, self.block_size, least=32)
        meta = np.zeros((R, 5), dtype=np.int32)  # (R, 5): forward's layout for S = 1
        meta[:n, 0], meta[:n, 1], meta[:n, 2] = ids, active, window - 1 - active
        meta[:, 3], meta[:n, 4] = window - 1, 1  # rows past n: not new, out of int8's ranges
        out = self._call("decode", R, 1, window, meta, 0, self._t)
        self._t += 1
        self._end[:n] = self._t
        active += 1
        return out.reshape(R, self.vocab_size)[:n]


def _host_view(tensor) -> np.ndarray | None:
    """A numpy array over a realized tensor's own memory where the device shares the host's (CPU),
    else None. Reading it needs the device synchronized first."""
    buffer = tensor.uop.base.buffer
    if not hasattr(buffer.allocator, "_as_buffer"):
        return None
    memory = buffer.as_memoryview(force_zero_copy=True)
    return np.frombuffer(memory, dtype=np.dtype(buffer.dtype.fmt))[: tensor.numel()].reshape(tensor.shape)


def _check_config(path: Path, cfg: GPTConfig, inputs: dict[str, tuple], meta: dict[str, str]) -> None:
    """The manifest's config must be the graph's (the onnxruntime engine's check)."""
    import json

    stamped = meta.get("edgecraft.config")
    if stamped is not None:
        for key, value in json.loads(stamped).items():
            if getattr(cfg, key, None) != value:
                raise BundleError(f"{path}: the manifest's config.{key} is {getattr(cfg, key, None)!r} but the graph "
                                  f"was exported with {value!r}; the manifest was edited: re-export the run")
    past = inputs.get("past_key_values.0.key")
    if "input_ids" not in inputs or past is None:
        raise BundleError(f"{path}: not an edgecraft graph (no input 'input_ids' / 'past_key_values.0.key'); re-export the run")
    if past[1] != cfg.n_kv_heads or past[3] != cfg.cache_head_size:
        raise BundleError(f"{path}: its KV cache is {past} but the manifest's config says {cfg.n_kv_heads} heads of "
                          f"{cfg.cache_head_size}; re-export the run")
