"""Run directory -> bundle: the steps of an export, in order, written atomically.

    export_run(runs/NAME, None, ExportOptions()) -> export/NAME/ {model.onnx, tokenizer.json, edgecraft.json,
                                                                  genai_config.json}

The shipped graph is the one `edgecraft.export.graph` writes op by op with onnxruntime's fused
operators; it needs no optimisation pass at load or export (onnxruntime's optimizer at its highest
level finds nothing left to fuse; a test checks the node count is unchanged), so sessions load
with ORT_ENABLE_BASIC. Everything is written into a temporary directory beside the target and
renamed into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgecraft.errors import UserError
from edgecraft.export.genai import write_genai_files
from edgecraft.export.graph import build_graph, state_arrays
from edgecraft.export.manifest import bundle_manifest
from edgecraft.export.options import ExportOptions, check_options
from edgecraft.export.parity import PARITY_BOUND, check_engine, parity_checks
from edgecraft.files import as_umask_allows
from edgecraft.model import GPT
from edgecraft.recipe import Recipe
from edgecraft.rundir import load_run
from edgecraft.runtime.bundle import FP32_MODEL, INT8_MODEL, MANIFEST, TOKENIZER


def _validation_tokens(recipe: Recipe, model: GPT) -> tuple[np.ndarray, str]:
    """Held-out token ids for the checks (the run's own validation split) and where they came from.

    A run whose corpus has moved still exports: the checks then run on random token ids, and the
    manifest says so.
    """
    from edgecraft.data import prepare

    try:
        val = np.asarray(prepare(recipe.data, model.cfg.block_size).val, dtype=np.int64)
        return val, f"validation split of {recipe.data.source} ({len(val):,} tokens)"
    except UserError as err:
        rng = np.random.default_rng(0)
        val = rng.integers(0, model.cfg.vocab_size, size=4 * model.cfg.block_size + 1)
        return val, f"random token ids (validation text unavailable: {err})"


def write_onnx(model: GPT, path: Path, opset: int) -> onnx.ModelProto:
    """The shipped fp32 graph, built directly from the weights."""
    graph = build_graph(model.cfg, state_arrays(model), opset)
    onnx.save(graph, str(path))
    return graph


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing one (--force) is replaced."""
    if out.exists():
        old = out.with_name(f".old-{out.name}-{tmp.name}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_run(run_dir: Path, out: Path | None, options: ExportOptions) -> Path:
    """Export `run_dir` to a bundle at `out` (default export/NAME) and return its path."""
    run_dir = Path(run_dir)
    check_options(options)
    model, tokenizer, recipe = load_run(run_dir)  # UserError naming a missing/damaged file
    out = Path(out) if out is not None else Path("export") / recipe.name
    if out.exists() and not options.force:
        raise UserError(f"{out}: already exists; use --force to replace it")
    val, source = _validation_tokens(recipe, model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    as_umask_allows(tmp)
    try:
        graph = write_onnx(model, tmp / FP32_MODEL, options.opset)
        tokenizer.save(str(tmp / TOKENIZER))
        checks = {"text": source, **parity_checks(model, check_engine(tmp / FP32_MODEL, model.cfg), val)}
        int8 = None
        if options.int8:  # its quality gate raises before anything is kept
            from edgecraft.export.int8 import export_int8

            int8 = export_int8(
                run_dir, model, recipe, val, tmp / FP32_MODEL, tmp / INT8_MODEL, options.keep_float,
                options.calibrate, options.max_loss_increase, options.opset,
            )
            if options.int8_only:
                (tmp / FP32_MODEL).unlink()
        write_genai_files(model.cfg, tokenizer, recipe.data.tokenizer, tmp)
        manifest = bundle_manifest(model, tokenizer, recipe, graph, checks, tmp, int8)
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"export: {out}: parity {max(checks['max_abs_logit_diff_prefill'], checks['max_abs_logit_diff_decode']):.2g} "
        f"(bound {PARITY_BOUND}), top-1 agreement {checks['top1_agreement']:.4f}, "
        f"perplexity {checks['perplexity_pytorch']:.4f} PyTorch vs {checks['perplexity_onnx']:.4f} ONNX"
    )
    return out
