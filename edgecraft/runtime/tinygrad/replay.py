"""Captured CPU steps as plain calls of their compiled kernels.

A decode step of the 1M-parameter model is about a hundred small kernels; TinyJit's replay spends
tens of microseconds of Python on each (resolving buffers and variables per kernel), more than the
kernels themselves (benchmarks/results/tinygrad_decode.md). `capture` reads a TinyJit's captured
step into a `Plan` (plan.py): each kernel's compiled object and its buffer arguments by role.
`CpuReplay` binds a plan, captured here or loaded from disk, to this process's buffers: the
programs go through tinygrad's own CPU loader, addresses are resolved once into a table of calls,
and a step is one ctypes call of a small C function (`_DRIVER`, compiled by tinygrad's CPU compiler
and cached like its kernels) that calls every kernel of the table in turn: Python's ~2 us a kernel
call (a step is ~130 of them) was a tenth of a batch-16 step. The step's variables (the cache row
and columns) are written into the table before the call.

This reads TinyJit's captured program (tinygrad 0.14's internals, hence the pinned version); any
call it does not know (a copy, a graph, a multi-device buffer), or a buffer the step reads before
writing that is not one of the engine's, makes `capture` return None and the engine keeps
TinyJit's own replay.
"""

from __future__ import annotations

import ctypes
import hashlib

import numpy as np

from edgecraft.runtime.tinygrad.model import Weights
from edgecraft.runtime.tinygrad.products import Linear
from edgecraft.runtime.tinygrad.plan import Kernel, Plan

SCRATCH = "scratch."  # roles of the step's own intermediate buffers
MAX_ARGS = 16  # arguments of one kernel call that _DRIVER passes
# the table: per call, its argument count n, the function's address, then its n arguments; n = ~0 ends it
_DRIVER = "typedef unsigned long long u64;\nvoid edgecraft_run_table(const u64 *p) {\n  for (;;) {\n" \
    "    u64 n = p[0]; void *f = (void *)p[1]; const u64 *a = p + 2;\n    switch (n) {\n" + "".join(
        f"    case {n}: ((void (*)({', '.join(['u64'] * n) or 'void'}))f)({', '.join(f'a[{j}]' for j in range(n))}); break;\n"
        for n in range(MAX_ARGS + 1)) + "    default: return;\n    }\n    p = a + n;\n  }\n}\n"


def capture(jit, args: tuple, roles: dict[str, tuple[int, int]]) -> Plan | None:
    """The plan of a TinyJit that has captured, from the arguments of a call. `roles` names the
    buffers the engine owns: role -> (address, bytes); any other buffer becomes scratch."""
    from tinygrad.engine.jit import _prepare_jit_inputs
    from tinygrad.engine.realize import resolve_params
    from tinygrad.uop.ops import Ops

    captured = getattr(jit, "captured", None)
    if captured is None:
        return None
    input_uops, _, _, _ = _prepare_jit_inputs(args, {})
    if any(u in captured._written_uops for u in input_uops):
        return None
    spans = sorted((addr, addr + size, role) for role, (addr, size) in roles.items())
    sizes, scratch, written, kernels, target = {}, {}, set(), [], None
    for call in captured.linear.src:
        ast = call.src[0]
        if call.op is not Ops.CALL or ast.op is not Ops.PROGRAM or not isinstance(call.src[1].device, str):
            return None
        if not call.src[1].device.startswith("CPU") or ast.arg.target.renderer == "LVP":
            return None
        global_size, _ = ast.arg.launch_dims({})
        if not all(isinstance(g, int) for g in global_size) or global_size[1:] != (1, 1):
            return None
        target = target or repr(ast.arg.target)
        resolved = resolve_params(call, tuple(input_uops))
        kernel_args = []
        for slot in ast.arg.globals:
            buffer = resolved[slot].buffer.ensure_allocated()
            addr = int(buffer.get_buf(call.src[1].device).va_addr)
            role = next(((r, addr - lo) for lo, hi, r in spans if lo <= addr < hi), None)
            if role is None:  # the step's own memory: a base buffer (the JIT's arena) and an offset in it
                base = buffer.base
                name = scratch.setdefault(id(base), f"{SCRATCH}{len(scratch)}")
                role = (name, addr - int(base.ensure_allocated().get_buf(base.device).va_addr))
                sizes[name] = base.nbytes
                if slot in ast.arg.ins and role not in written:  # it would read what this process left there
                    return None
            else:
                sizes[role[0]] = roles[role[0]][1]
            if slot in ast.arg.outs:
                written.add(role)
            kernel_args.append(role)
        elf = ast.to_elf()
        names = [_dtype_name(dtype) for _, _, dtype, _ in elf.signature]
        if None in names:
            return None
        signature = tuple((name, slot, dtype, tuple(int(d) for d in shape))
                          for (name, slot, _, shape), dtype in zip(elf.signature, names))
        kernels.append(Kernel(elf.name, bytes(elf.lib), signature, tuple(kernel_args),
                              tuple(v.expr for v in ast.arg.vars), global_size[0]))
    return Plan(target, tuple(kernels), sizes) if kernels else None


class CpuReplay:
    """A plan bound to buffers: the engine's (weights, KV cache) by address, the rest (the step's
    input, output and scratch) allocated here."""

    _programs: dict[tuple, object] = {}  # (device, object digest) -> loaded program, shared by every step

    def __init__(self, plan: Plan, device: str, owned: dict[str, tuple[int, int]]) -> None:
        """ValueError when the plan does not fit these buffers (sizes differ, a role is missing)."""
        from tinygrad import Device, dtypes
        from tinygrad.device import Buffer, TinyELF
        from tinygrad.helpers import Target

        if Target.parse(plan.target) != Device[device].renderer.target:
            raise ValueError(f"the plan is for {plan.target}")
        self.buffers: dict[str, Buffer] = {}  # the memory allocated here (held: the kernels point into it)
        addresses = {}
        for role, size in plan.sizes.items():
            if role in owned:
                if owned[role][1] != size:
                    raise ValueError(f"{role} is {owned[role][1]} bytes, the plan's {size}")
                addresses[role] = owned[role][0]
            elif role.startswith(SCRATCH) or role in ("input", "output"):
                self.buffers[role] = Buffer(device, size, dtypes.uint8).allocate()
                addresses[role] = int(self.buffers[role]._buf.va_addr)
            else:
                raise ValueError(f"the plan reads {role}, which this engine does not hold")
        self.kernels = plan.kernels
        table, slots = [], {}  # the calls (_DRIVER's layout); variable name -> its places in the table
        for k in plan.kernels:
            digest = (device, hashlib.sha256(k.lib).digest())
            if (program := self._programs.get(digest)) is None:
                signature = tuple((name, slot, _dtype(dtype), shape) for name, slot, dtype, shape in k.signature)
                elf = TinyELF(k.lib, k.name, Target.parse(plan.target), signature)
                program = self._programs[digest] = Device[device].runtime(elf)
            n = len(k.args) + len(k.vars)
            if n > MAX_ARGS:
                raise ValueError(f"a kernel of {n} arguments")
            for core in range(k.cores):
                table += [n, program.addr] + [addresses[role] + offset for role, offset in k.args]
                for name in k.vars:
                    table.append(core if name == "core_id" else 0)
                    if name != "core_id":
                        slots.setdefault(name, []).append(len(table) - 1)
        self._table = np.array(table + [~0 & (2**64 - 1)], dtype=np.uint64)
        self._slots = [(name, np.array(places)) for name, places in slots.items()]
        self._run = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_driver(device).addr)
        self._address = self._table.ctypes.data

    def view(self, role: str, dtype, shape: tuple) -> np.ndarray:
        """A numpy array over one of the buffers allocated here (the step's input or output)."""
        memory = self.buffers[role].as_memoryview(force_zero_copy=True)
        count = int(np.prod(shape))
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)

    def __call__(self, var_vals: dict[str, int]) -> None:
        """Run the step with these variable values ('core_id' is each core's index)."""
        for name, places in self._slots:
            self._table[places] = var_vals[name]
        self._run(self._address)


def _driver(device: str):
    """_DRIVER loaded on `device` (compiled once; tinygrad's compile cache keeps the object)."""
    from tinygrad import Device
    from tinygrad.device import TinyELF

    if (program := CpuReplay._programs.get((device, "driver"))) is None:
        renderer = Device[device].renderer
        lib = renderer.compiler.compile_cached(_DRIVER)
        program = CpuReplay._programs[(device, "driver")] = Device[device].runtime(
            TinyELF(lib, "edgecraft_run_table", renderer.target, ()))
    return program


def _dtype_name(dtype) -> str | None:
    """A dtype's name in tinygrad's table ('int8'; its own name is C's, 'signed char')."""
    from tinygrad.dtype import DTYPES_DICT

    return next((name for name, d in DTYPES_DICT.items() if d == dtype), None)


def _dtype(name: str):
    """tinygrad's dtype of a stored signature's name."""
    from tinygrad.dtype import DTYPES_DICT

    if name not in DTYPES_DICT:
        raise ValueError(f"no tinygrad dtype {name!r}")
    return DTYPES_DICT[name]


def span(tensor) -> tuple[int, int]:
    """(address, bytes) of a realized CPU tensor's buffer: a role a plan binds."""
    buffer = tensor.uop.base.buffer.ensure_allocated()
    return int(buffer._buf.va_addr), buffer.nbytes


def weight_roles(weights: Weights) -> dict[str, tuple[int, int]]:
    """The weights' buffers by where they sit ('weights.layers.0.qkv.w'): the names plans use."""
    return {f"weights{name}": span(t) for name, t in _tensors(weights, "")}


def _tensors(obj, name: str):
    from tinygrad import Tensor

    if isinstance(obj, Tensor):
        yield name, obj
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensors(x, f"{name}.{i}")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, f"{name}.{k}")
    elif isinstance(obj, (Weights, Linear)):
        for k, x in vars(obj).items():
            yield from _tensors(x, f"{name}.{k}")
