"""Captured CPU steps kept on disk, so a fresh process runs its first token without tinygrad's
scheduler.

tinygrad's own cache keeps compiled kernels keyed by their source, but a process still spends
seconds of Python scheduling and lowering a step to reach that source. A plan is what a captured
step comes down to on the CPU (replay.py): its kernels in order, each one's compiled object and its
buffer arguments by role (a weight by name, a KV-cache layer, the step's input and output, scratch
space at an offset), its variables and cores. It is stored as JSON plus one file of raw kernel
objects (no pickle), under a name derived from everything that changes the lowered code (`Store`'s
key); a plan that is missing, damaged or stored for another key is ignored and rebuilt. The weights'
values are never stored: the engine binds the plan to the tensors it loaded from the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMAT = "edgecraft-tinygrad-plan/1"
FOLDER = "edgecraft-plans"  # beside tinygrad's cache.db
# tinygrad settings that change what is printed or cached, not the code a step lowers to; DEV's
# effect is in the renderer's target (tinygrad also sets DEV itself once it picks a device)
_NOT_CODE = {"DEBUG", "PARALLEL", "VIZ", "PROFILE", "TRACEMETA", "NO_COLOR", "CACHELEVEL", "CCACHE", "SCACHE",
             "CAPTURE_PROCESS_REPLAY", "TRACK_MATCH_STATS", "IGNORE_BEAM_CACHE", "DEV"}


@dataclass(frozen=True)
class Kernel:
    """One compiled kernel call of a step."""

    name: str  # the function's name in the object
    lib: bytes  # the compiled object, as tinygrad's CPU program loader takes it
    signature: tuple  # ((param name or None, slot, dtype name, shape), ...): tinygrad's TinyELF signature
    args: tuple  # ((role, byte offset), ...): the buffer arguments, in order
    vars: tuple  # the variables after the buffers, by name ('core_id': the core's index)
    cores: int  # calls, one per core index


@dataclass(frozen=True)
class Plan:
    """A step's kernels on one target, and the size in bytes of every buffer role they touch."""

    target: str
    kernels: tuple
    sizes: dict

    def to_files(self) -> tuple[dict, bytes]:
        """(JSON document, raw bytes): each distinct kernel object once in the raw bytes."""
        blob, where = bytearray(), {}
        kernels = []
        for k in self.kernels:
            if k.lib not in where:
                where[k.lib] = (len(blob), len(k.lib))
                blob += k.lib
            kernels.append({"name": k.name, "lib": where[k.lib], "signature": [list(s) for s in k.signature],
                            "args": [list(a) for a in k.args], "vars": list(k.vars), "cores": k.cores})
        doc = {"target": self.target, "sizes": self.sizes, "kernels": kernels,
               "binary": {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}
        return doc, bytes(blob)

    @classmethod
    def from_files(cls, doc: dict, blob: bytes) -> "Plan":
        """The inverse of to_files; ValueError (or KeyError/TypeError) for anything out of shape."""
        binary = doc["binary"]
        if len(blob) != binary["bytes"] or hashlib.sha256(blob).hexdigest() != binary["sha256"]:
            raise ValueError("the kernel objects do not match their checksum")
        sizes = {str(role): _int(size) for role, size in doc["sizes"].items()}
        kernels = []
        for k in doc["kernels"]:
            start, length = (_int(x) for x in k["lib"])
            if start + length > len(blob):
                raise ValueError("a kernel object past the end of the file")
            args = tuple((str(role), _int(offset)) for role, offset in k["args"])
            if any(role not in sizes or offset >= sizes[role] for role, offset in args):
                raise ValueError("an argument outside the plan's buffers")
            signature = tuple((None if n is None else str(n), _int(slot), str(dtype), tuple(_int(d) for d in shape))
                              for n, slot, dtype, shape in k["signature"])
            kernels.append(Kernel(str(k["name"]), blob[start : start + length], signature, args,
                                  tuple(str(v) for v in k["vars"]), max(1, _int(k["cores"]))))
        return cls(str(doc["target"]), tuple(kernels), sizes)


def _int(x) -> int:
    if type(x) is not int or x < 0:
        raise ValueError(f"not a size: {x!r}")
    return x


def folder(cache_dir: str | Path | None) -> Path | None:
    """Where plans live: beside tinygrad's kernel cache (cache_dir, else tinygrad's CACHEDB), or
    None when tinygrad's own disk cache is off (CACHELEVEL=0)."""
    from tinygrad import helpers

    if helpers.CACHELEVEL < 1:
        return None
    base = Path(cache_dir).expanduser() if cache_dir else Path(helpers.CACHEDB).expanduser().parent
    return base.absolute() / FOLDER


def machine_key(device: str) -> dict:
    """What about tinygrad and this machine changes a step's lowered code and its binaries: the
    version, the renderer's target (native arch), the CPU model and flags, the core count, the
    tinygrad settings given in the environment, and the engine's own source."""
    from importlib.metadata import version

    from tinygrad import Device
    from tinygrad.helpers import ContextVar

    source = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):  # the decoder and the step functions
        source.update(path.read_bytes())
    settings = {k: os.environ[k] for k in sorted(ContextVar._cache) if k in os.environ and k not in _NOT_CODE}
    return {"format": FORMAT, "tinygrad": version("tinygrad"), "device": device,
            "target": repr(Device[device].renderer.target), "cpu": _cpu(), "cores": os.cpu_count(),
            "settings": settings, "source": source.hexdigest()}


def _cpu() -> str:
    """The CPU model and its flags (binaries are built for the native arch)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return hashlib.sha256("\n".join(sorted(set(wanted))).encode()).hexdigest()


def graph_key(inits: dict) -> str:
    """The graph's initializers as far as they shape the code: names, dtypes and shapes, and the
    values of scalars (static activation ranges are constants inside the kernels)."""
    digest = hashlib.sha256()
    for name in sorted(inits):
        a = inits[name]
        digest.update(f"{name} {a.dtype} {a.shape}\n".encode())
        if a.size <= 4:
            digest.update(a.tobytes())
    return digest.hexdigest()


class Store:
    """The plans of one engine's steps: `key` holds everything but the step's own shape."""

    def __init__(self, root: Path | None, key: dict) -> None:
        self.root, self.key = root, key

    def _paths(self, step: dict) -> tuple[dict, Path, Path] | None:
        if self.root is None:
            return None
        key = {**self.key, "step": step}
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return key, self.root / f"{name}.json", self.root / f"{name}.bin"

    def load(self, step: dict) -> Plan | None:
        """The stored plan of `step`, or None when there is none usable (missing, damaged, stale)."""
        paths = self._paths(step)
        if paths is None:
            return None
        key, doc_path, bin_path = paths
        try:
            doc = json.loads(doc_path.read_text())
            if doc.get("key") != key:  # another key under this name, or a stale format
                return None
            return Plan.from_files(doc["plan"], bin_path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, step: dict, plan: Plan) -> None:
        """Store `plan` atomically (raw bytes first, then the JSON that names their checksum); a
        folder that cannot be written leaves the step unplanned, not the run failed."""
        paths = self._paths(step)
        if paths is None:
            return
        key, doc_path, bin_path = paths
        doc, blob = plan.to_files()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _write(bin_path, blob)
            _write(doc_path, json.dumps({"key": key, "plan": doc}).encode())
        except OSError:
            pass


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
