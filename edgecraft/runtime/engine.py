"""The decode engine: one onnxruntime session over a bundle's graph, driven through IO binding.

A token of a 1M-parameter model costs a few hundred µs, so every per-step microsecond counts.
All state is allocated once per `reset()`: one KV buffer per layer and kind, (B, n_heads,
block_size, head_size), bound as BOTH the graph's `past_key_values.i.*` input and its
`present.i.*` output, so GroupQueryAttention appends the new positions in place (it shares the
buffer when both point at the same memory). The decode step's small inputs (token ids, positions,
`seqlens_k`, ...) are numpy arrays that onnxruntime reads directly (an OrtValue made from a CPU
numpy array wraps its memory), so a step is: write B token ids, update three tiny int arrays,
`run_with_iobinding`.

Sequences in one batch may sit at different positions (`seqlens_k` is per row), which is what
continuous batching needs. A prefill of fresh sequences is one call however ragged the rows
(GroupQueryAttention's prompt path takes each row's length from `seqlens_k`); a chunk appended to
caches that already hold tokens runs one call per row, over that row's slice of the buffers. So
to start a new sequence in slot b of a running batch (or to re-fill a row whose window slides),
set `lengths[b] = 0` and prefill with length 0 for the other rows, which sit that call out with
their caches untouched.
Imports only numpy, onnxruntime and the standard library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

# One intra-op thread: robust wherever an app runs. benchmarks/results/decode_speed.md: on an idle
# Xeon 2 threads give +10% batch-1 decode and -30% time to first token (4 threads: prompts and
# batches gain more), but on a busy 2-core machine every extra thread costs 2-3x. Callers that
# own an idle machine pass threads=N.
DEFAULT_THREADS = 1

# onnxruntime session config entries for a bundle's graph (see session_options); the exporter
# writes them into the manifest for apps that run model.onnx with plain onnxruntime
SESSION_CONFIG = {"session.set_denormal_as_zero": "1"}


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a bundle's graph. It is written already fused (onnxruntime's optimiser at its
    highest level finds nothing to change), so only the cheap basic level runs: the char-1m graph
    loads in ~17 ms instead of ~31 ms at ORT_ENABLE_ALL.

    Denormals are flushed to zero: a softmax over a causal prompt, or over a peaked attention
    row, feeds exp() scores below -88 whose denormal intermediates cost ~100 cycles each, which
    made a 64-token prefill of the char-1m model 25% slower (2.6 -> 2.07 ms). onnxruntime applies
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


class Engine:
    """Prefill and one-token decode steps over a preallocated, shared KV cache."""

    def __init__(self, model_path: str | Path, manifest: dict, threads: int = 0, device: str = "cpu") -> None:
        # a bundle's edgecraft.json keeps the model config under "config"; callers that build a
        # manifest in memory for a bare graph (the int8 export's checks) use "model"
        cfg = manifest["config"] if "config" in manifest else manifest["model"]
        self.block_size: int = cfg["block_size"]
        self.vocab_size: int = cfg["vocab_size"]
        self._cache_shape = (cfg["n_heads"], self.block_size, cfg["d_model"] // cfg["n_heads"])
        self._n_layers: int = cfg["n_layers"]
        specs = {spec["name"]: spec for spec in manifest["onnx"]["inputs"]}
        self._has_positions = "position_ids" in specs
        # (B, 1) and (1,) since genai_config.json (edgecraft 0.1 bundles exported before it: (B,), ())
        self._counter_dims = (1,) if len(specs["seqlens_k"]["shape"]) == 2 else ()
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
        self.session = ort.InferenceSession(
            str(model_path), session_options(self.threads), providers=providers
        )
        self.lengths = np.zeros(0, dtype=np.int64)  # (B,) tokens cached per sequence
        self.reset(1)

    # ------------------------------------------------------------------------------------ state

    def reset(self, batch_size: int) -> None:
        """Start `batch_size` empty sequences; buffers are reallocated only when the size changes
        (positions past a sequence's length are never read, so old contents need no clearing)."""
        B = batch_size
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {B}")
        if B == len(self.lengths):
            self.lengths[:] = 0
            return
        self.lengths = np.zeros(B, dtype=np.int64)
        # (B, n_heads, block_size, head_size) per layer and kind; the OrtValues wrap this memory
        self._kv = [np.zeros((B, *self._cache_shape), dtype=np.float32) for _ in range(2 * self._n_layers)]
        # the decode step's buffers, written in place and read by onnxruntime through the binding
        self._step_ids = np.zeros((B, 1), dtype=np.int64)  # (B, 1)
        self._step_pos = np.zeros((B, 1), dtype=np.int64)  # (B, 1)
        self._seqlens = np.zeros(B, dtype=np.int32)  # (B,) tokens cached after the step, minus 1
        self._total = np.zeros(self._counter_dims, dtype=np.int32)  # (1,) the longest sequence
        self._step_logits = np.zeros((B, 1, self.vocab_size), dtype=np.float32)  # (B, 1, V)
        self._step_out = self._step_logits[:, 0]  # (B, V) the view decode() returns
        self._step_binding = self._bind_call(
            self._cache_binding(self._kv), self._step_ids, self._step_pos,
            self._seqlens.reshape(B, *self._counter_dims), self._total, self._step_logits,
        )
        # prefills of fresh sequences rebind only their small inputs (48 -> 11 µs a call)
        self._prefill_binding = self._cache_binding(self._kv)

    def _cache_binding(self, kv: list[np.ndarray]) -> ort.IOBinding:
        """A binding with the KV buffers bound, wrapping (not copying) the numpy arrays: each is
        both the past input and the present output. The KV buffers stay in host memory also with
        device="cuda": onnxruntime's CUDA GroupQueryAttention runs only float16/bfloat16, so a
        float32 graph's attention (which owns the cache) stays on the CPU provider."""
        binding = self.session.io_binding()
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
        if B != len(self.lengths):
            raise ValueError(f"prefill got {B} rows for a batch of {len(self.lengths)}; call reset({B})")
        n = np.full(B, S, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        if n.shape != (B,) or (n < 0).any() or (n > S).any():
            raise ValueError(f"lengths must be (B,) = ({B},) values in 0..{S}, got {n.tolist()}")
        past = self.lengths
        total = past + n  # (B,) cached after this call
        if (total > self.block_size).any():
            b = int(np.argmax(total))
            raise ValueError(
                f"row {b}: {int(past[b])} cached + {int(n[b])} new positions exceed block_size {self.block_size}"
            )
        logits = np.empty((B, S, self.vocab_size), dtype=np.float32)  # (B, S, V)
        if not past.any():  # fresh sequences: one call, each row's length from seqlens_k
            pos = np.broadcast_to(np.minimum(np.arange(S), self.block_size - 1), (B, S))  # (B, S)
            # a row with nothing new still computes one (unused) position: seqlens_k must be >= 0
            seqlens = np.maximum(total - 1, 0).astype(np.int32)  # (B,)
            self._run(ids, np.ascontiguousarray(pos), seqlens, S, logits, self._kv)
        else:  # chunks after cached tokens: one call per row, over that row's slice of the buffers
            for b in np.flatnonzero(n):
                k, p = int(n[b]), int(past[b])
                self._run(
                    ids[b : b + 1, :k], p + np.arange(k)[None, :], np.array([p + k - 1], dtype=np.int32),
                    p + k, logits[b : b + 1, :k], [buffer[b : b + 1] for buffer in self._kv],
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
        """One new token per sequence, ids (B,) -> logits (B, V).

        The returned array is a view of a buffer that the next `decode` call overwrites.

        A run streams megabytes of weights through the caches, so the numpy code around it runs
        cold: the vectorised bookkeeping below cost ~14 µs per step at batch 1 (2 µs warm). Batch 1
        therefore takes scalar reads and writes, which touch far less of numpy (~2 µs), and
        nothing but the return follows the run.
        """
        lengths = self.lengths
        if len(ids) != len(lengths):
            raise ValueError(f"decode got {len(ids)} token ids for a batch of {len(lengths)}")
        single = len(lengths) == 1
        longest = lengths.item() if single else lengths.max()
        if longest >= self.block_size:
            raise ValueError(f"a sequence already holds block_size {self.block_size} positions")
        if single:
            self._step_ids[0, 0] = ids[0]
            if self._has_positions:
                self._step_pos[0, 0] = longest
            self._seqlens[0] = longest
            lengths[0] = longest + 1
        else:
            self._step_ids[:, 0] = ids
            if self._has_positions:
                self._step_pos[:, 0] = lengths
            self._seqlens[:] = lengths
            lengths += 1
        self._total[...] = longest + 1
        try:
            self.session.run_with_iobinding(self._step_binding)
        except Exception:
            lengths -= 1
            raise
        return self._step_out
