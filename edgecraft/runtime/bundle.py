"""The bundle (export/NAME/): its typed manifest, every file's hash, the model file to run.

A bundle is trusted only after its manifest's format version is one we read, its fields have the
types below, and every file it lists has the recorded size and sha256, so a truncated download or
a hand-edited model fails here, naming the file or field, instead of producing wrong text later.
The exporter writes a `Manifest`; load, the engines, `edgecraft info`, bench and the genai
config read its fields. Stdlib only: the runtime must not import the training side.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecraft.config import GPTConfig

try:  # CPython's built-in SHA-256: hashlib would map libcrypto into every `edgecraft generate`
    # process (its memory budget, tests/test_runtime.py) for hashing a few MB
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
INT4_MODEL = "model.int4.onnx"
INT8_SINGLE_ROW_MODEL = "model.int8.1row.onnx"  # the int8 weights as run for one-row decode steps
QUANT_MODELS = {"fp32": FP32_MODEL, "int8": INT8_MODEL, "int4": INT4_MODEL}  # load(quant=...) -> file
CONFIG_METADATA = "edgecraft.config"  # the graph's metadata entry holding its config (JSON)


class BundleError(ValueError):
    """A bundle that cannot be used: missing, damaged or of an unknown format. The message names
    the file and the fix."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    kind: str  # "char" | "bpe"
    tokens: int


@dataclass(frozen=True)
class GraphInfo:
    """How a program that knows only onnxruntime drives the graph (export/README.md)."""

    files: list[str]  # the model files; all share these inputs and outputs
    opset: dict[str, int]
    nodes: int  # of the float32 graph
    op_types: dict[str, int]
    inputs: list[dict[str, Any]]  # {name, dtype, shape}
    outputs: list[dict[str, Any]]
    kv_cache: dict[str, Any]
    drive: dict[str, Any]


@dataclass(frozen=True)
class RuntimeSettings:
    """The settings the exporter recommends for running the graph."""

    threads: int
    session_config: dict[str, str]  # SessionOptions.add_session_config_entry entries
    execution_provider: str = "CPUExecutionProvider"
    graph_optimization_level: str = "ORT_ENABLE_BASIC"
    onnxruntime: str = ""
    why: str = ""


@dataclass(frozen=True)
class Manifest:
    """edgecraft.json: what the bundle's files are, how to drive them, and the export's checks."""

    format: str
    name: str
    created: str
    edgecraft_version: str
    parameters: int
    config: GPTConfig
    vocab_size: int
    tokenizer: TokenizerInfo
    quantization: dict[str, Any]  # per model file: "none (float32)" or the quantization report
    files: dict[str, FileEntry]
    onnx: GraphInfo
    runtime: RuntimeSettings
    checks: dict[str, Any]
    web: dict[str, Any] | None = None  # present when exported with --web
    extra: dict[str, Any] = field(default_factory=dict)  # sections a newer exporter added

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> "Manifest":
        """Validate and type a parsed edgecraft.json; BundleError names the first bad field."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return _typed(cls, {**{k: v for k, v in data.items() if k in known}, "extra": extra}, where, "")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("extra"))
        if out["web"] is None:
            del out["web"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _typed(hint, value, where: str, path: str):
    """`value` checked against the type `hint` (dataclasses, dict/list of them, scalars, Any,
    optional), built into the dataclasses; BundleError naming the field otherwise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise BundleError(f"{where}: damaged manifest ({path!r} is {value!r}, expected one of {typing.get_args(hint)})")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [h for h in options if h is not type(None)]
        return _typed(hint, value, where, path)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BundleError(f"{where}: damaged manifest ({path or 'top level'} is not an object)")
        hints = typing.get_type_hints(hint)
        kwargs = {}
        for f in dataclasses.fields(hint):
            name = f"{path}.{f.name}" if path else f.name
            if f.name in value:
                kwargs[f.name] = _typed(hints[f.name], value[f.name], where, name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"{where}: damaged manifest (no {name!r})")
        unknown = set(value) - set(hints)
        if unknown and hint is GPTConfig:
            raise BundleError(f"{where}: unknown config keys {sorted(unknown)}; upgrade edgecraft")
        return hint(**kwargs)
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where}: damaged manifest ({path!r} is not an object)")
        _, item = typing.get_args(hint)
        return {k: _typed(item, v, where, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"{where}: damaged manifest ({path!r} is not a list)")
        (item,) = typing.get_args(hint)
        return [_typed(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise BundleError(f"{where}: damaged manifest ({path!r} should be {hint.__name__}, got {value!r})")
    return value


def json_object(path: Path) -> dict:
    """The JSON object in file `path`; ValueError saying why it is not one (unreadable, not UTF-8,
    not JSON, another JSON type)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_manifest(path: str | Path) -> Manifest:
    """The typed edgecraft.json of bundle `path`, after checking its format version."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle ({MANIFEST} not found)")
    try:
        data = json_object(manifest_path)
    except ValueError as err:
        raise BundleError(f"{manifest_path}: damaged manifest ({err})") from None
    fmt = data.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise BundleError(
            f"{manifest_path}: bundle format {fmt!r} is not supported by this runtime "
            f"(reads {', '.join(SUPPORTED_FORMATS)}); re-export the run with this version of edgecraft"
        )
    return Manifest.from_dict(data, str(manifest_path))


def sha256_file(path: Path) -> str:
    digest = sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists: present, recorded size, recorded sha256. The tokenizer
    must be listed: the runtime reads it (model files are picked from the listed ones)."""
    path = Path(path)
    if TOKENIZER not in manifest.files:
        raise BundleError(f"{path / MANIFEST}: damaged manifest ({TOKENIZER} is not listed, so not verified); re-export the run")
    for name, entry in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry.bytes:
            raise BundleError(
                f"{file}: damaged ({size} bytes, the manifest says {entry.bytes}); re-export or re-copy it"
            )
        if sha256_file(file) != entry.sha256:
            raise BundleError(f"{file}: damaged (sha256 does not match the manifest); re-export or re-copy it")


def model_file(path: str | Path, manifest: Manifest, int8: bool = False, quant: str | None = None) -> Path:
    """The ONNX file to run: `quant` ("fp32", "int8", "int4"; int8=True means "int8") when asked;
    otherwise fp32, or the quantized file if that is all there is."""
    files = manifest.files
    quant = "int8" if int8 and quant is None else quant
    if quant is not None:
        if quant not in QUANT_MODELS:
            raise BundleError(f"quant {quant!r}: expected one of {', '.join(QUANT_MODELS)}")
        name = QUANT_MODELS[quant]
        if name not in files:
            raise BundleError(f"{path}: no {name} in this bundle (export it with --{quant})")
        return Path(path) / name
    for name in QUANT_MODELS.values():
        if name in files:
            return Path(path) / name
    raise BundleError(f"{path}: the manifest lists no model file ({', '.join(QUANT_MODELS.values())})")
