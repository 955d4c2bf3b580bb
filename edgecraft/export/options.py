"""The export's options and their validation, done before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgecraft.errors import UserError

MIN_OPSET = 17  # LayerNormalization
MAX_CALIBRATE = 10_000  # calibration batches: each is a forward pass, and ranges settle within dozens


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    force: bool = False
    int8: bool = False
    int8_only: bool = False
    calibrate: int = 0
    keep_float: tuple[str, ...] = ()
    max_loss_increase: float | None = None
    int4: bool = False  # also write model.int4.onnx (export/int4.py)
    block_size: int | None = None  # int4 weights per scale; None = the QAT run's, or 32
    text: Path | None = None  # the checks' text instead of the run's validation split


def check_keep_float(keep_float: tuple[str, ...]) -> None:
    from edgecraft.quant import KEEP_FLOAT  # torch: only once there is an int8 export to check

    bad = [k for k in keep_float if k not in KEEP_FLOAT]
    if bad:
        raise UserError(f"--keep-float {bad[0]!r}: expected one of {', '.join(KEEP_FLOAT)}")


def check_options(options: ExportOptions) -> None:
    """Refuse an opset out of range and int8 flags that would be ignored or are unknown."""
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= options.opset <= top:
        raise UserError(f"--opset {options.opset}: expected {MIN_OPSET} to {top}")
    if not options.int8:
        given = [flag for flag, on in (("--keep-float", options.keep_float), ("--calibrate", options.calibrate),
                                       ("--max-loss-increase", options.max_loss_increase is not None)) if on]
        if options.int4:  # int4 takes the same quality flags, except calibration (no static ranges)
            given = [flag for flag in given if flag == "--calibrate"]
        if given:
            raise UserError(f"{given[0]} applies to the int8 export; add --int8")
    if options.block_size is not None and not options.int4:
        raise UserError("--block-size applies to the int4 export; add --int4")
    if options.calibrate > MAX_CALIBRATE:
        raise UserError(f"--calibrate {options.calibrate}: at most {MAX_CALIBRATE} batches (a few dozen calibrate well)")
    increase = options.max_loss_increase
    if increase is not None and not math.isfinite(increase):
        raise UserError(f"--max-loss-increase {increase}: expected a finite percentage, e.g. 2")
    check_keep_float(options.keep_float)
