"""Run directory -> bundle: the steps of an export, in order, written atomically.

    export_run(runs/NAME, None, ExportOptions()) -> export/NAME/ {model.onnx, tokenizer.json, edgecraft.json,
                                                                  genai_config.json}

The shipped graph is the one `edgecraft.export.graph` writes op by op with onnxruntime's fused
operators; it needs no optimisation pass at load or export (onnxruntime's optimizer at its highest
level finds nothing left to fuse; a test checks the node count is unchanged), so sessions load
with ORT_ENABLE_BASIC. Everything is written into a temporary directory beside the target and
renamed into place at the end, so a failure leaves nothing half-written; a temporary directory
that a killed export left behind is removed by the next export to the same place.
"""

from __future__ import annotations

import os
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
from edgecraft.runtime.bundle import FP32_MODEL, INT4_MODEL, INT8_MODEL, MANIFEST, TOKENIZER


def _text_tokens(path: Path, tokenizer) -> np.ndarray:
    """Token ids of a text file given with --text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--text {path}: cannot read it as UTF-8 text ({getattr(err, 'strerror', None) or err})") from None
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    if len(ids) < 2:
        raise UserError(f"--text {path}: {len(ids)} tokens; the checks need at least 2")
    return ids


def _validation_tokens(recipe: Recipe, model: GPT, tokenizer, text: Path | None) -> tuple[np.ndarray, str, bool]:
    """Held-out token ids for the checks, where they came from, and whether they are real text:
    --text FILE, else the run's own validation split. A run whose corpus has moved still exports,
    its graph checked on random token ids; the console and the manifest say so."""
    from edgecraft.data import prepare

    if text is not None:
        val = _text_tokens(text, tokenizer)
        return val, f"{text} ({len(val):,} tokens)", True
    try:
        val = np.asarray(prepare(recipe.data, model.cfg.block_size).val, dtype=np.int64)
        return val, f"validation split of {recipe.data.source} ({len(val):,} tokens)", True
    except UserError as err:
        rng = np.random.default_rng(0)
        val = rng.integers(0, model.cfg.vocab_size, size=4 * model.cfg.block_size + 1)
        return val, f"random token ids (validation text unavailable: {err})", False


def _check_finite(model: GPT, run_dir: Path) -> None:
    """A diverged run's weights hold NaN or inf: no graph of them is worth shipping."""
    import torch

    bad = [name for name, p in model.state_dict().items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(
            f"{run_dir}: the weights are not finite ({bad[0]} holds NaN or inf; training diverged); "
            f"nothing exported. Retrain with a lower train.lr"
        )


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary folders of exports to `out` whose process is gone (killed mid-export).
    Their names carry the writer's pid; a live process's folder is left alone."""
    for tmp in out.parent.glob(f".tmp-{out.name}-*"):
        pid = tmp.name.removeprefix(f".tmp-{out.name}-").split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"export: removed {tmp}, left behind by an interrupted export")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _make_folder(out: Path) -> tuple[Path, list[Path]]:
    """The temporary folder beside `out` and the parent folders created for it (removed again if
    the export fails), or one UserError saying where the bundle cannot be written."""
    created = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-{os.getpid()}-", dir=out.parent))
    except OSError as err:
        _remove_empty(created)
        raise UserError(
            f"--out {out}: cannot write the bundle there ({err.strerror or err}); choose another --out"
        ) from None
    as_umask_allows(tmp)
    return tmp, created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass


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
    _check_finite(model, run_dir)
    out = Path(out) if out is not None else Path("export") / recipe.name
    if out.exists() and not options.force:
        raise UserError(f"{out}: already exists; use --force to replace it")
    tmp, created = _make_folder(out)
    done = False
    try:
        val, source, real = _validation_tokens(recipe, model, tokenizer, options.text)
        if not real:
            if options.max_loss_increase is not None:
                raise UserError(
                    f"--max-loss-increase: {source.removeprefix('random token ids ')}; the int8 quality "
                    f"gate does not judge made-up text: give the text to judge on with --text FILE"
                )
            print(f"export: the checks run on {source}; their perplexities say nothing about quality "
                  f"(give --text FILE to measure on text)")
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
        int4 = None
        if options.int4:  # the same gate: raises before anything is kept
            from edgecraft.export.int4 import export_int4

            int4 = export_int4(
                model, recipe, val, tmp / FP32_MODEL, tmp / INT4_MODEL, options.block_size, options.keep_float,
                options.max_loss_increase, options.opset,
            )
        if options.int8_only:
            (tmp / FP32_MODEL).unlink()
        write_genai_files(model.cfg, tokenizer, recipe.data.tokenizer, tmp)
        manifest = bundle_manifest(model, tokenizer, recipe, graph, checks, tmp, int8, int4)
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _publish(tmp, out)
        done = True
    except OSError as err:  # a full disk, a folder made read-only meanwhile
        raise UserError(f"--out {out}: writing the bundle failed ({err.strerror or err}); nothing written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_empty(created)
    print(
        f"export: {out}: parity {max(checks['max_abs_logit_diff_prefill'], checks['max_abs_logit_diff_decode']):.2g} "
        f"(bound {PARITY_BOUND}), top-1 agreement {checks['top1_agreement']:.4f}, "
        f"perplexity {checks['perplexity_pytorch']:.4f} PyTorch vs {checks['perplexity_onnx']:.4f} ONNX "
        f"on {checks['tokens_checked']:,} tokens of the checks' text, {source.split(' (')[0]}"
    )
    return out
