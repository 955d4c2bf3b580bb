"""Replaying a captured TinyJit on tinygrad's CPU device as plain calls of its compiled kernels.

A decode step of the 1M-parameter model is about a hundred small kernels; TinyJit's replay spends
tens of microseconds of Python on each (resolving buffers and variables per kernel), more than the
kernels themselves (benchmarks/results/tinygrad_decode.md). The buffers and the kernels of a captured
step never change, so their addresses are resolved once here and a step is one ctypes call per
kernel, with the step's variables (the cache row and column) filled in.

This reads TinyJit's captured program (tinygrad 0.14's internals, hence the pinned version); any
call it does not know (a copy, a graph, a multi-device buffer) makes `CpuReplay.build` return None
and the engine keeps TinyJit's own replay.
"""

from __future__ import annotations

import ctypes


class CpuReplay:
    """The kernels of one captured step: (function, arguments, variable slots, cores)."""

    def __init__(self, kernels: list, captured) -> None:
        self.kernels = kernels
        self.captured = captured  # holds the buffers the addresses point into

    @classmethod
    def build(cls, jit, args: tuple) -> "CpuReplay | None":
        """From a TinyJit that has captured (called at least twice) and the arguments of a call."""
        from tinygrad.engine.jit import _prepare_jit_inputs
        from tinygrad.engine.realize import get_runtime, resolve_params
        from tinygrad.uop.ops import Ops

        captured = getattr(jit, "captured", None)
        if captured is None:
            return None
        input_uops, var_vals, _, _ = _prepare_jit_inputs(args, {})
        if any(u in captured._written_uops for u in input_uops):
            return None
        kernels = []
        for call in captured.linear.src:
            ast = call.src[0]
            if call.op is not Ops.CALL or ast.op is not Ops.PROGRAM or not isinstance(call.src[1].device, str):
                return None
            device = call.src[1].device
            if not device.startswith("CPU"):
                return None
            resolved = resolve_params(call, tuple(input_uops))
            buffers = [resolved[i].buffer.ensure_allocated().get_buf(device) for i in ast.arg.globals]
            runtime = get_runtime(device, ast)
            if getattr(runtime, "lvp", True):
                return None
            global_size, _ = ast.arg.launch_dims(var_vals)
            if not all(isinstance(g, int) for g in global_size):
                return None
            names = [v.expr for v in ast.arg.vars]
            values = [int(b.va_addr) for b in buffers] + [0] * len(names)
            slots = [(len(buffers) + j, name) for j, name in enumerate(names)]
            function = ctypes.CFUNCTYPE(None, *[ctypes.c_uint64] * len(values))(runtime.addr)
            kernels.append((function, values, slots, global_size[0], runtime))  # runtime: keeps its code mapped
        return cls(kernels, captured)

    def __call__(self, var_vals: dict[str, int]) -> None:
        """Run the step with these variable values ('core_id' is each core's index)."""
        for function, values, slots, cores, _ in self.kernels:
            for core in range(cores):
                for j, name in slots:
                    values[j] = core if name == "core_id" else var_vals[name]
                function(*values)
