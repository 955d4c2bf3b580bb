"""What machine a benchmark ran on: CPU model, cores, instruction-set flags, library versions.

Int8 speed on x86 is decided by a handful of CPU flags (AVX2, AVX-512, VNNI, AMX), so they are
recorded with every result. Library versions come from package metadata, so describing the
machine never imports torch.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# The flags that pick onnxruntime's / PyTorch's int8 and fp32 kernels (names as in /proc/cpuinfo).
X86_FLAGS = (
    "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")  # NEON, dot product, int8 matmul

LIBRARIES = (
    "edgecraft", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "onnx",
    "transformers", "optimum", "optimum-onnx", "matplotlib", "rich",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers; absent ones are left out."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def system_info() -> dict:
    """A JSON-ready description of this machine and its software."""
    cpu = _cpuinfo()
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    is_arm = platform.machine().lower() in ("aarch64", "arm64")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": {flag: flag in flags for flag in (ARM_FLAGS if is_arm else X86_FLAGS)},
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


def describe(info: dict) -> str:
    """One or two lines for a terminal or a README: CPU, cores, the int8-relevant flags, versions."""
    have = [flag for flag, on in info["isa"].items() if on]
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items())
    return (
        f"{info['cpu']} ({info['arch']}, {info['usable_cores']} usable of {info['logical_cores']} cores; "
        f"{' '.join(have) or 'no SIMD flags read'}), {info['os']}, Python {info['python']}\n{libs}"
    )
