"""A bundle graph read for the tinygrad engine: its initializers, inputs and metadata, straight
from the protobuf bytes (no onnx package; tinygrad's own reader realizes every tensor through a
device, seconds for a small model), and the check that the manifest describes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgecraft.config import GPTConfig
from edgecraft.runtime.bundle import CONFIG_METADATA, BundleError

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


def check_config(path: Path, cfg: GPTConfig, inputs: dict[str, tuple], meta: dict[str, str]) -> None:
    """The manifest's config must be the graph's (the onnxruntime engine's check)."""
    stamped = meta.get(CONFIG_METADATA)
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
