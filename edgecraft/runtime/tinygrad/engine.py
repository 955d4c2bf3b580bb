"""The tinygrad engine: a bundle's weights run on tinygrad's code generators (CPU through clang,
CUDA, Metal, OpenCL, WebGPU where present), behind the same engine interface as onnxruntime.

tinygrad's ONNX frontend has no GroupQueryAttention nor GatherBlockQuantized, so the decoder is
written with tinygrad Tensors (model.py) over the graph's own initializers, read from its
protobuf bytes (graph.py, no onnx package): the graph fuses some weights (layer 0's norm
folded into an embedding table for rotary models, heads zero-padded to cache_head_size, rotary
tables), and running exactly what the graph holds is what makes the logits match onnxruntime's.

Every call is one TinyJit replay over fixed shapes, so nothing compiles after warm-up. On the CPU a
step's jit captures at its first call and is replaced by its plan (plan.py, replay.py): plain
kernel calls, stored in the cache folder, so a later process runs that step without scheduling.
- The KV cache is one buffer per layer and kind, (B, n_kv_heads, C, head_size), C = 4 block_size
  columns (and WINDOW_STEP more, which decode windows may read past the last), keys transposed
  (B, n_kv_heads, head_size, C) (model.forward says why). Sequences are
  right-aligned: every active slot's newest token sits in column t - 1, so a decode step writes
  one column, t, for all slots (a symbolic slice, no scatter), and attention reads the window of
  the longest slot, each slot masking the columns before its own start.
  When t reaches C, every slot is moved back to end at 2 block_size (one copy every 2 block_size steps).
- Prefill pads its chunk on the left to a power of two (S) and writes columns t - S .. t - 1, masked
  per row, so a chunk of any length reuses a few compiled shapes.
- decode of n slots runs the step compiled for the next power of two; the extra rows write column t
  of slots past n, which is past everything those slots hold.

int8 bundles run as int8 arithmetic emulated exactly in float32: activations are quantized per call
as onnxruntime's DynamicQuantizeMatMul does (or with the static ranges of MatMulIntegerToFloat), in
one kernel with the norm before them (products.quantize_range),
products of integers summed in float32 (exact below 2^24), then scaled; quantized tables are
dequantized once at load, as GatherBlockQuantized does per row. int4 graphs likewise: MatMulNBits'
activations quantized to int8 per block (accuracy level 4), each block's integer sum scaled by
both steps (products.py). The weights' integers are held as 16-bit floats on the CPU
(model.quantized_dtype). Exact up to the float32 arithmetic around the products: an activation within 1e-7 of a rounding boundary can round the other way than
in onnxruntime, and the KV cache keeps that difference (logits then differ by ~1e-3). A dynamic
range covers the call's real tokens; onnxruntime's also covers the padding of a ragged prefill
(rows of different lengths in one call).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgecraft.config import GPTConfig
from edgecraft.runtime.engine import prefill_lengths
from edgecraft.runtime.tinygrad import plan
from edgecraft.runtime.tinygrad.cache import chosen_folder, import_tinygrad
from edgecraft.runtime.tinygrad.graph import check_config, read_graph
from edgecraft.runtime.tinygrad.model import WINDOW_ALIGN, WINDOW_STEP, Weights, forward
from edgecraft.runtime.tinygrad.replay import CpuReplay, capture, span, weight_roles

BEAM_ENV = "EDGECRAFT_TINYGRAD_BEAM"  # n > 0: tinygrad's BEAM search of width n for decode-step kernels (cached)
DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA", "metal": "METAL", "gpu": "CL", "opencl": "CL", "cl": "CL", "webgpu": "WEBGPU",
                "amd": "AMD", "nv": "NV"}


def device_name(device: str) -> str:
    """tinygrad's name for `device` ('cpu' -> 'CPU', 'gpu'/'opencl' -> 'CL'); unknown names pass upper-cased."""
    return DEVICE_NAMES.get(device.lower(), device.upper())


def check_available(device: str = "CPU", cache_dir: str | Path | None = None) -> str:
    """tinygrad's name for `device` once it is usable here; RuntimeError with one line saying what
    to install, or which devices tinygrad found, otherwise."""
    tinygrad = import_tinygrad(cache_dir)
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
        check_config(path, config, inputs, meta)
        self.cfg = config
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.weights = Weights(inits, config, self.device, path)
        self._columns = 4 * config.block_size  # C: cache columns (module docstring)
        self._jits: dict[tuple, list] = {}
        self.steps_planned = self.steps_loaded = 0  # steps captured into a stored plan / run from one
        self._queued = True  # work may be on the device's queue (a jit's call), which a replay waits for
        self._store = None  # stored plans: the CPU device only (replay.py)
        if self.device == "CPU":
            folder = plan.folder(chosen_folder(cache_dir))
            self._store = plan.Store(folder, {**plan.machine_key(self.device), "config": asdict(config),
                                              "graph": plan.graph_key(inits)})
            self._weights = weight_roles(self.weights)
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
        nkv, C, hp = self.cfg.n_kv_heads, self._columns + WINDOW_STEP, self.cfg.cache_head_size
        # per layer: keys (B, n_kv_heads, head_size, C), values (B, n_kv_heads, C, head_size)
        shapes = [(B, nkv, hp, C), (B, nkv, C, hp)] * self.cfg.n_layers
        if self._store is not None:  # zeroed through the host's view: no kernel to schedule
            self._kv = [Tensor.empty(*shape, device=self.device) for shape in shapes]
            for t in self._kv:
                t.uop.base.buffer.ensure_allocated()
                _host_view(t)[...] = 0
            self._owned = {**self._weights, **{f"kv.{j}": span(t) for j, t in enumerate(self._kv)}}
        else:
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
            def window(j, row, col):  # keys (1, nkv, hp, block), values (1, nkv, block, hp)
                span = [(row, row + 1), None, None, None]
                span[3 - j % 2] = (col, col + block)
                return self._kv[j].shrink(tuple(span))

            def copy(s, d, sc, dc):
                parts = [window(j, s, sc).contiguous() for j in range(len(self._kv))]
                parts[0].realize(*parts[1:])
                for j, part in enumerate(parts):
                    window(j, d, dc).assign(part)
                self._kv[0].realize(*self._kv[1:])
                return parts[0]
            self._jits[key] = self._entry(key, copy)
        entry = self._jits[key]
        values = {"src": int(src), "dst": int(dst), "src_col": int(self._end[src]) - block, "dst_col": int(end) - block}
        if entry[5] is not None:
            self._drain()
            entry[5](values)
            return
        B, C = len(self.lengths), self._columns
        top = {"src": B - 1, "dst": B - 1, "src_col": C - block, "dst_col": C - block}
        args = tuple(self._var(name, 0, top[name]).bind(value) for name, value in values.items())
        entry[0](*args)
        self._queued = True
        self._plan_captured(key, entry, args, None)

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

    def _call(self, kind: str, R: int, S: int, window: int, meta: np.ndarray, r0: int, c0: int,
              first: int | None = None) -> np.ndarray:
        """One jitted call of `forward` -> logits (R, S, V), a view the next call of the same shape
        overwrites. The jit, its input buffer and the view of its output are made once per shape.
        `first`: the window's first column, a multiple of WINDOW_ALIGN (decode), else the window ends at c0 + S."""
        from tinygrad import Tensor

        B, C = len(self.lengths), self._columns
        key = (kind, R, S, window)
        if key not in self._jits:
            def step(meta, r, c, first=None):
                return forward(self.weights, self._kv, meta, r, c, window, R, S, masked=kind == "prefill",
                               base=first).realize(*self._kv)
            self._jits[key] = self._entry(key, step, meta.shape, (R, S, self.vocab_size))
        entry = self._jits[key]
        jit, inputs, host_in, last, host_out, replay = entry
        if host_in is None:  # a device without host-visible memory: a fresh input each call
            inputs = Tensor(meta, device=self.device)
        else:
            host_in[...] = meta
        if replay is not None:  # its kernels run in this thread: the logits are there when it returns
            self._drain()
            replay({"row": r0, "col": c0, "first": 0 if first is None else first // WINDOW_ALIGN})
            return host_out.reshape(R, S, self.vocab_size)
        v = self._var
        r = 0 if R == B or kind == "decode" else v("row", 0, B - 1).bind(r0)  # decode: rows from 0
        args = (inputs, r, v("col", 0, C - S).bind(c0))
        if first is not None:  # in units of WINDOW_ALIGN columns, so the kernels know it aligned
            args += (v("first", 0, (C + WINDOW_STEP - window) // WINDOW_ALIGN).bind(first // WINDOW_ALIGN),)
        with _beam(kind):
            out = jit(*args)
        self._queued = True
        if out is not last:  # the first calls' results are fresh tensors; replays return the same one
            entry[3], entry[4] = out, _host_view(out)
            host_out = entry[4]
        if self._plan_captured(key, entry, args, out):  # the jit and its buffers go: keep this call's logits
            return np.array(host_out).reshape(R, S, self.vocab_size)
        if host_out is None:
            return entry[3].numpy().reshape(R, S, self.vocab_size)
        self._drain()
        return host_out.reshape(R, S, self.vocab_size)

    def _drain(self) -> None:
        """Wait for the device's queue only where a jit's call may have left work on it (a synchronize
        costs more than a few numpy calls)."""
        from tinygrad import Device

        if self._queued:
            Device[self.device].synchronize()
            self._queued = False

    def _entry(self, key: tuple, fn, in_shape: tuple | None = None, out_shape: tuple | None = None) -> list:
        """[jit, input tensor, its host view, last output, its host view, replay] of one jitted
        function: a stored plan bound to this engine's buffers when there is one (no jit), else a
        TinyJit, which on the CPU captures at its first call so that its plan is stored then."""
        from tinygrad import Tensor

        if self._store is not None:
            replay = self._bind(self._store.load(self._step_key(key)), in_shape, out_shape)
            if replay is not None:
                self.steps_loaded += 1
                return replay
        jit = self._jit(fn)
        if self._store is not None:
            jit.cnt = 1  # everything it reads is realized already: no warm-up call needed
        inputs = None
        if in_shape is not None:
            inputs = Tensor.zeros(*in_shape, dtype="int32", device=self.device).contiguous().realize()
        return [jit, inputs, None if inputs is None else _host_view(inputs), None, None, None]

    def _step_key(self, key: tuple) -> dict:
        return {"call": list(key), "batch": len(self.lengths), "beam": _beam_width(key[0])}

    def _bind(self, stored, in_shape: tuple | None, out_shape: tuple | None) -> list | None:
        """A plan's entry (see _entry) bound to this engine's weights and cache; None if it does not fit."""
        if stored is None:
            return None
        try:
            replay = CpuReplay(stored, self.device, self._owned)
            host_in = None if in_shape is None else replay.view("input", np.int32, in_shape)
            host_out = None if out_shape is None else replay.view("output", np.float32, out_shape)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return None
        return [None, None, host_in, None, host_out, replay]

    def _plan_captured(self, key: tuple, entry: list, args: tuple, out) -> bool:
        """After a CPU TinyJit's capturing call: its plan stored and bound in place of the jit. False
        (the jit stays, replaying itself) where the step cannot be planned."""
        jit = entry[0]
        if self._store is None or jit.cnt != 2 or jit.captured is None:
            return False
        owned = dict(self._owned)
        if entry[1] is not None:
            owned["input"] = span(entry[1])
        if out is not None:
            owned["output"] = span(out)
        captured = capture(jit, args, owned)
        shapes = (None if entry[1] is None else entry[1].shape, None if out is None else out.shape)
        bound = self._bind(captured, *shapes)
        if bound is None:
            return False
        self._store.save(self._step_key(key), captured)
        self.steps_planned += 1
        self._jits[key] = bound
        return True

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
        counts = lengths[:n].tolist()  # Python ints: numpy's calls cost a microsecond or more each on a few values
        longest = max(counts)
        if longest >= self.block_size:
            raise ValueError(f"a slot already holds block_size {self.block_size} positions")
        if self._t >= self._columns:
            self._make_room()
        if any(end != self._t for end in self._end[:n].tolist()):
            self._align(range(n), self._t)
        R = min(len(lengths), 1 << (n - 1).bit_length())
        # attention reads the columns of the longest slot, from the WINDOW_ALIGN-aligned column at or
        # before its first (vector loads of the cache), rounded up to WINDOW_STEP: at most
        # WINDOW_ALIGN - 1 before it and WINDOW_STEP - 1 past column t (masked; the buffer has room)
        t = self._t
        first = (t - longest) // WINDOW_ALIGN * WINDOW_ALIGN
        window = -(-(t + 1 - first) // WINDOW_STEP) * WINDOW_STEP
        rows = [(i, a, t - a - first, t - first, 1) for i, a in zip(np.asarray(ids).tolist(), counts)]
        rows += [(0, 0, 0, t - first, 0)] * (R - n)  # rows past n: not new, out of int8's ranges
        meta = np.array(rows, dtype=np.int32)  # (R, 5): forward's layout for S = 1
        out = self._call("decode", R, 1, window, meta, 0, t, first)
        self._t += 1
        self._end[:n] = self._t
        lengths[:n] = [a + 1 for a in counts]
        return out.reshape(R, self.vocab_size)[:n]


def _beam_width(kind: str) -> int:
    """$EDGECRAFT_TINYGRAD_BEAM for decode steps, else 0: the search times candidate kernels
    (minutes the first time, then kept in tinygrad's cache), worth it only where a step repeats."""
    if kind != "decode":
        return 0
    try:
        return max(0, int(os.environ.get(BEAM_ENV, "0")))
    except ValueError:
        raise ValueError(f"{BEAM_ENV} must be a whole number, got {os.environ[BEAM_ENV]!r}") from None


def _beam(kind: str):
    """tinygrad's BEAM setting for the kernels compiled while capturing a step of this kind."""
    from tinygrad.helpers import Context

    return Context(BEAM=_beam_width(kind))


def _host_view(tensor) -> np.ndarray | None:
    """A numpy array over a realized tensor's own memory where the device shares the host's (CPU),
    else None. Reading it needs the device synchronized first."""
    buffer = tensor.uop.base.buffer
    if not hasattr(buffer.allocator, "_as_buffer"):
        return None
    memory = buffer.as_memoryview(force_zero_copy=True)
    return np.frombuffer(memory, dtype=np.dtype(buffer.dtype.fmt))[: tensor.numel()].reshape(tensor.shape)
