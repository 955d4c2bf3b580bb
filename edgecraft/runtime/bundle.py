"""Reading and verifying a bundle (export/NAME/): the manifest, every file's hash, the model file.

A bundle is trusted only after its manifest's format version is one we read and every file it
lists has the recorded size and sha256, so a truncated download or a hand-edited model fails here,
naming the file, instead of producing wrong text later. Self-contained (stdlib only): the runtime
must not import the training side, so `BundleError` lives here and the CLI maps it to a one-line
error.
"""

from __future__ import annotations

import json
from pathlib import Path

try:  # CPython's built-in SHA-256, which hashlib itself falls back to without OpenSSL: importing
    # hashlib maps libcrypto, 3.6 MB of the `edgecraft generate` process's 80 MB budget, for a
    # hash of a few MB that the built-in code does in ~3 ms per MB.
    from _sha2 import sha256  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.10, 3.11
    except ImportError:  # other interpreters
        from hashlib import sha256

FORMAT = "edgecraft-bundle/1"
SUPPORTED_FORMATS = (FORMAT,)
MANIFEST = "edgecraft.json"
TOKENIZER = "tokenizer.json"
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"


class BundleError(ValueError):
    """A bundle that cannot be used: missing, damaged or of an unknown format. The message names
    the file and the fix."""


def read_manifest(path: str | Path) -> dict:
    """The parsed edgecraft.json of bundle `path`, after checking its format version."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle ({MANIFEST} not found)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path}: damaged manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: damaged manifest (not a JSON object)")
    fmt = manifest.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise BundleError(
            f"{manifest_path}: bundle format {fmt!r} is not supported by this runtime "
            f"(reads {', '.join(SUPPORTED_FORMATS)}); re-export the run or upgrade edgecraft"
        )
    for key in ("config", "files"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{manifest_path}: damaged manifest (no {key!r} object)")
    return manifest


def sha256_file(path: Path) -> str:
    digest = sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(path: str | Path, manifest: dict) -> None:
    """Check every file the manifest lists: present, recorded size, recorded sha256."""
    path = Path(path)
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(
                f"{file}: damaged ({size} bytes, the manifest says {entry.get('bytes')}); re-export or re-copy it"
            )
        if sha256_file(file) != entry.get("sha256"):
            raise BundleError(f"{file}: damaged (sha256 does not match the manifest); re-export or re-copy it")


def model_file(path: str | Path, manifest: dict, int8: bool) -> Path:
    """The ONNX file to run: int8 when asked; otherwise fp32, or int8 if that is all there is."""
    files = manifest["files"]
    if int8:
        if INT8_MODEL not in files:
            raise BundleError(f"{path}: no {INT8_MODEL} in this bundle (export it with --int8)")
        return Path(path) / INT8_MODEL
    for name in (FP32_MODEL, INT8_MODEL):
        if name in files:
            return Path(path) / name
    raise BundleError(f"{path}: the manifest lists no model file ({FP32_MODEL} or {INT8_MODEL})")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(str, value[:3]))}, … ({len(value)} items)]"
    return str(value)


def _tree(section: dict, indent: str = "  ") -> list[str]:
    """A manifest section as indented `key: value` lines, in the manifest's order."""
    lines = []
    for key, value in section.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_tree(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {_value(value)}")
    return lines


def describe_bundle(path: str | Path) -> str:
    """A human summary for `edgecraft info`: format, config, sizes, quantization, export checks
    and the recommended runtime settings."""
    path = Path(path)
    manifest = read_manifest(path)
    lines = [f"bundle {path}", f"  format: {manifest['format']}"]
    for key in ("name", "created", "edgecraft_version"):
        if key in manifest:
            lines.append(f"  {key}: {manifest[key]}")
    if isinstance(manifest.get("parameters"), int):
        lines.append(f"  parameters: {manifest['parameters']:,}")
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict):
        lines.append(f"  tokenizer: {tokenizer.get('kind', '?')}, {tokenizer.get('tokens', '?')} tokens")
    graph = manifest.get("onnx")
    if isinstance(graph, dict) and "nodes" in graph:
        opsets = ", ".join(f"{domain} {version}" for domain, version in graph.get("opset", {}).items())
        lines.append(f"  onnx graph: {graph['nodes']} nodes (opsets: {opsets})")
    lines += ["config", *_tree(manifest["config"])]
    lines.append("files")
    for name, entry in manifest["files"].items():
        present = "" if (path / name).is_file() else "  (MISSING)"
        lines.append(f"  {name}: {_size(entry.get('bytes', 0))}  sha256 {str(entry.get('sha256'))[:12]}…{present}")
    for section in ("quantization", "checks", "runtime"):
        if manifest.get(section) is not None:
            section_value = manifest[section]
            lines += [section, *(_tree(section_value) if isinstance(section_value, dict) else [f"  {section_value}"])]
    return "\n".join(lines)
