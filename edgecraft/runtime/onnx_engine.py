"""The onnxruntime engine: one session over a bundle's graph, driven through IO binding.

A token of a 1M-parameter model costs a few hundred microseconds, so per-step Python counts. All
state is allocated once per `reset()`: one KV buffer per layer and kind, (B, n_kv_heads, block_size,
head_size), bound as BOTH the graph's `past_key_values.i.*` input and its `present.i.*` output, so
GroupQueryAttention appends the new positions in place. The decode step's small inputs are numpy
arrays that onnxruntime reads directly (an OrtValue made from a CPU numpy array wraps its memory),
so a step is: write the token ids, update three tiny int arrays, `run_with_iobinding`.

Slots may sit at different positions (`seqlens_k` is per row). A prefill of fresh sequences is
one call however ragged the rows; a chunk appended to a slot that holds tokens (a sequence joining
a running batch, a window re-fill) runs one call per row over that row's slice of the buffers.
A decode over the first n slots binds the first n rows of every buffer (leading rows of a
C-contiguous array are contiguous), one binding per n, made once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecraft.config import GPTConfig
from edgecraft.runtime.bundle import CONFIG_METADATA, BundleError
from edgecraft.runtime.engine import prefill_lengths

# One intra-op thread: robust wherever an app runs; an idle multi-core machine gains from more, a
# busy one loses much more (benchmarks/results/decode_speed.md). Callers that own the machine pass threads=N.
DEFAULT_THREADS = 1

# onnxruntime session config entries for a bundle's graph (see session_options); the exporter
# writes them into the manifest for apps that run model.onnx with plain onnxruntime
SESSION_CONFIG = {"session.set_denormal_as_zero": "1"}


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a bundle's graph. It is written already fused (onnxruntime's optimiser finds
    nothing more at its highest level), so only the cheap basic level runs and sessions load faster.

    Denormals are flushed to zero: a softmax over a causal prompt feeds exp() scores whose denormal
    intermediates are very slow on x86 (benchmarks/results/decode_speed.md). onnxruntime applies
    this to the thread that creates the process's FIRST session (and its own pool threads), so an
    app that made an onnxruntime session before loading a bundle keeps its setting.
    """
    so = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    return so


class OnnxEngine:
    """The engine interface (runtime/engine.py) over onnxruntime: prefill and one-token decode
    steps over a preallocated KV cache shared between the graph's past inputs and present outputs."""

    def __init__(
        self, model_path: str | Path, config: GPTConfig, threads: int = 0, device: str = "cpu",
        single_row_path: str | Path | None = None,
    ) -> None:
        """`single_row_path`: a second graph over the same weights and inputs that one-row decode
        steps run instead (the int8 bundle's 8-bit MatMulNBits graph, faster than the main graph's
        DynamicQuantizeMatMul at one row and slower at many: benchmarks/results/int4.md); both
        sessions bind the same KV buffers."""
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self._cache_shape = (config.n_kv_heads, config.block_size, config.cache_head_size)
        self._n_layers = config.n_layers
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "device 'cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available; "
                    f"this onnxruntime has {', '.join(ort.get_available_providers())})"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda'")
        self.threads = threads or DEFAULT_THREADS

        def open_session(path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), session_options(self.threads), providers=providers)

        try:
            self.session = open_session(model_path)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BundleError(f"{model_path}: onnxruntime cannot load it ({reason}); re-export the run") from None
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self._check_shapes(model_path, config, shapes)
        self._single = None  # the session one-row decode steps run on, when there is one
        if single_row_path is not None:
            try:
                self._single = open_session(single_row_path)
            except Exception:  # a kernel form this onnxruntime lacks: every step runs on the main graph
                pass
            if self._single is not None and {i.name: i.shape for i in self._single.get_inputs()} != shapes:
                raise BundleError(f"{single_row_path}: its inputs differ from {model_path}'s; re-export the run")
        self._has_positions = "position_ids" in shapes
        # (B, 1) and (1,) since genai_config.json (bundles exported before it: (B,), ())
        self._counter_dims = (1,) if len(shapes["seqlens_k"]) == 2 else ()
        self.lengths = np.zeros(0, dtype=np.int64)  # (B,) tokens cached per slot
        self.reset(1)

    def _check_shapes(self, model_path, config: GPTConfig, shapes: dict) -> None:
        """The config must describe the graph: an edited manifest is refused naming the field
        rather than running with, say, half the context. Graphs carry their config in their
        metadata (older ones only in their shapes)."""
        stamped = self.session.get_modelmeta().custom_metadata_map.get(CONFIG_METADATA)
        if stamped is not None:
            for key, value in json.loads(stamped).items():
                if getattr(config, key, None) != value:
                    raise BundleError(
                        f"{model_path}: the manifest's config.{key} is {getattr(config, key, None)!r} but the "
                        f"graph was exported with {value!r}; the manifest was edited: re-export the run"
                    )
        for name in ("input_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key"):
            if name not in shapes:
                raise BundleError(f"{model_path}: not an edgecraft graph (no input {name!r}); re-export the run")
        past = shapes["past_key_values.0.key"]
        layers = sum(1 for n in shapes if n.startswith("past_key_values.") and n.endswith(".key"))
        logits = {o.name: o.shape for o in self.session.get_outputs()}.get("logits", [None])
        for field_name, declared, actual in (
            ("n_layers", config.n_layers, layers),
            ("n_kv_heads", config.n_kv_heads, past[1]),
            ("block_size", config.block_size, past[2]),
            ("d_model / n_heads", config.cache_head_size, past[3]),  # heads padded to it at export
            ("vocab_size", config.vocab_size, logits[-1]),
        ):
            if isinstance(actual, int) and declared != actual:
                raise BundleError(
                    f"{model_path}: the manifest's config.{field_name} is {declared} but the graph has "
                    f"{actual}; the manifest was edited or belongs to another model: re-export the run"
                )

    # ------------------------------------------------------------------------------------ state

    def reset(self, batch_size: int) -> None:
        """`batch_size` empty slots; buffers are reallocated only when the size changes
        (positions past a slot's length are never read, so old contents need no clearing)."""
        B = batch_size
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {B}")
        if B == len(self.lengths):
            self.lengths[:] = 0
            return
        self.lengths = np.zeros(B, dtype=np.int64)
        # (B, n_kv_heads, block_size, head_size) per layer and kind; the OrtValues wrap this memory
        self._kv = [np.zeros((B, *self._cache_shape), dtype=np.float32) for _ in range(2 * self._n_layers)]
        # the decode step's buffers, written in place and read by onnxruntime through the bindings
        self._step_ids = np.zeros((B, 1), dtype=np.int64)  # (B, 1)
        self._step_pos = np.zeros((B, 1), dtype=np.int64)  # (B, 1)
        self._seqlens = np.zeros(B, dtype=np.int32)  # (B,) tokens cached after the step, minus 1
        self._total = np.zeros(self._counter_dims, dtype=np.int32)  # (1,) the longest sequence
        self._step_logits = np.zeros((B, 1, self.vocab_size), dtype=np.float32)  # (B, 1, V)
        self._steps: dict[int, tuple] = {}  # n -> (session, binding, logits (n, V))
        # prefills of fresh sequences rebind only their small inputs
        self._prefill_binding = self._cache_binding(self._kv)

    def _step(self, n: int) -> tuple[ort.InferenceSession, ort.IOBinding, np.ndarray]:
        """The session and decode binding over slots 0..n-1, and the (n, V) view of its logits."""
        if n not in self._steps:
            session = self._single if n == 1 and self._single is not None else self.session
            binding = self._bind_call(
                self._cache_binding([buffer[:n] for buffer in self._kv], session), self._step_ids[:n],
                self._step_pos[:n], self._seqlens[:n].reshape(n, *self._counter_dims), self._total,
                self._step_logits[:n],
            )
            self._steps[n] = (session, binding, self._step_logits[:n, 0])
        return self._steps[n]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            n = int(self.lengths[src])
            for buffer in self._kv:
                buffer[dst, :, :n] = buffer[src, :, :n]
            self.lengths[dst] = n
            self.lengths[src] = 0

    def _cache_binding(self, kv: list[np.ndarray], session: ort.InferenceSession | None = None) -> ort.IOBinding:
        """A binding with the KV buffers bound, wrapping (not copying) the numpy arrays: each is
        both the past input and the present output. The KV buffers stay in host memory also with
        device="cuda": onnxruntime's CUDA GroupQueryAttention runs only float16/bfloat16, so a
        float32 graph's attention (which owns the cache) stays on the CPU provider."""
        binding = (session or self.session).io_binding()
        for i in range(self._n_layers):
            for j, kind in enumerate(("key", "value")):
                buffer = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        return binding

    def _bind_call(self, binding: ort.IOBinding, ids, pos, seqlens, total, logits) -> ort.IOBinding:
        """(Re)bind one call's small inputs and its logits output, wrapping the arrays."""
        inputs = {"input_ids": ids, "seqlens_k": seqlens, "total_sequence_length": total}
        if self._has_positions:
            inputs["position_ids"] = pos
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return binding

    # ------------------------------------------------------------------------------------ steps

    def prefill(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Append right-padded chunks ids (B, S) of `lengths` (B,) real tokens -> logits (B, S, V).

        Each row's chunk goes after what that row already holds. Rows past a sequence's real
        length give garbage logits and are not cached; a row of length 0 is left as it is.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        B, S = ids.shape
        n = prefill_lengths(ids, lengths, self.lengths, self.block_size)
        past = self.lengths
        total = past + n  # (B,) cached after this call
        logits = np.empty((B, S, self.vocab_size), dtype=np.float32)  # (B, S, V)
        rows = np.flatnonzero(n)
        if not len(rows):
            return logits
        a, b = int(rows[0]), int(rows[-1]) + 1
        if len(rows) == b - a and not past[a:b].any():  # fresh, adjacent rows: one call for all
            pos = np.broadcast_to(np.minimum(np.arange(S), self.block_size - 1), (b - a, S))  # (b-a, S)
            kv = self._kv if (a, b) == (0, B) else [buffer[a:b] for buffer in self._kv]
            self._run(ids[a:b], np.ascontiguousarray(pos), (total[a:b] - 1).astype(np.int32), S, logits[a:b], kv)
        else:  # one call per row, over that row's slice of the buffers
            for r in rows:
                k, p = int(n[r]), int(past[r])
                self._run(
                    ids[r : r + 1, :k], p + np.arange(k)[None, :], np.array([p + k - 1], dtype=np.int32),
                    p + k, logits[r : r + 1, :k], [buffer[r : r + 1] for buffer in self._kv],
                )
        self.lengths[:] = total
        return logits

    def _run(self, ids, pos, seqlens, total: int, logits, kv: list[np.ndarray]) -> None:
        """One prefill call, seqlens (B,) and total shaped as the graph declares them; the arrays
        are contiguous, so every binding wraps their memory."""
        binding = self._prefill_binding if kv is self._kv else self._cache_binding(kv)
        self._bind_call(
            binding, np.ascontiguousarray(ids), np.ascontiguousarray(pos, dtype=np.int64),
            seqlens.reshape(-1, *self._counter_dims), np.full(self._counter_dims, total, dtype=np.int32), logits,
        )
        self.session.run_with_iobinding(binding)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """One new token for each of the slots 0..n-1, ids (n,) -> logits (n, V).

        The returned array is a view of a buffer that the next `decode` call overwrites. A run
        streams megabytes of weights through the CPU caches, so the numpy code around it runs cold
        (benchmarks/results/decode_speed.md): batch 1 takes scalar reads and writes, which touch
        far less of numpy, and nothing but the return follows the run.
        """
        n = len(ids)
        lengths = self.lengths
        if not 1 <= n <= len(lengths):
            raise ValueError(f"decode got {n} token ids for {len(lengths)} slots")
        session, binding, out = self._steps.get(n) or self._step(n)
        if n == 1:
            longest = lengths.item(0)
            if longest >= self.block_size:
                raise ValueError(f"slot 0 already holds block_size {self.block_size} positions")
            self._step_ids[0, 0] = ids[0]
            if self._has_positions:
                self._step_pos[0, 0] = longest
            self._seqlens[0] = longest
            lengths[0] = longest + 1
        else:
            active = lengths[:n]
            longest = active.max()
            if longest >= self.block_size:
                raise ValueError(f"a slot already holds block_size {self.block_size} positions")
            self._step_ids[:n, 0] = ids
            if self._has_positions:
                self._step_pos[:n, 0] = active
            self._seqlens[:n] = active
            active += 1
        self._total[...] = longest + 1
        try:
            session.run_with_iobinding(binding)
        except Exception:
            lengths[:n] -= 1
            raise
        return out
