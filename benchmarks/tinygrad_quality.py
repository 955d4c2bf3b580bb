"""What the tinygrad backend's int8 and int4 lose, beside onnxruntime's, on a trained bundle: the
validation loss of each precision on each backend, and how far their logits are apart.

    python benchmarks/tinygrad_quality.py --bundle export/shakes-llama=runs/shakes-llama \
        [--bundle export/quickstart=runs/quickstart] [--tokens 20000]

The int8 and int4 graphs quantize activations per call; tinygrad reproduces onnxruntime's rounding
exactly given the same activations, but its float arithmetic before them (attention's exp, norms)
differs in the last bits, so now and then a value lands on the other side of a rounding step and
the two backends' logits part (README, "On tinygrad"). This measures what that costs: mean
negative log-likelihood per token (runtime.Model.score: windows of the context advancing by half
of it) of the first --tokens tokens of each bundle's run's validation split, or of a text file
given instead of the run, per backend and precision, each in a fresh process.
Writes benchmarks/results/tinygrad_quality.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import harness

PRECISIONS = ("fp32", "int8", "int4")


def score_row(payload: dict) -> dict:
    """Child: one backend and precision's loss on the text, and its logits for the text's first window."""
    from edgecraft.runtime import load

    model = load(payload["bundle"], quant=payload["quant"], backend=payload["backend"],
                 **({"threads": 1} if payload["backend"] == "onnxruntime" else {}))
    text = payload["text"]
    score = model.score(text)
    ids = np.array(model.tokenizer.encode(text, add_special_tokens=False).ids[: model.block_size], dtype=np.int64)[None]
    model.engine.reset(1)
    logits = model.engine.prefill(ids)[0]
    return {"nll": score.nll, "tokens": score.n_tokens, "logits": logits.tolist()}


def _text(source: Path, tokens: int) -> tuple[str, str]:
    """(text, where from): a run's validation split (its first `tokens` tokens) or a file's end."""
    from edgecraft.bench.run import validation_text

    if source.is_dir():
        text, where = validation_text(source, tokens)
        if text is None:
            raise SystemExit(where)
        return text, f"the validation split of run {source.name}"
    return source.read_text(encoding="utf-8")[-tokens:], f"the last {tokens:,} characters of {source.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, metavar="BUNDLE=RUN_OR_TEXT",
                        help="a trained bundle exported with --int8 --int4, and its run (scored on its validation split) or a text file")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens of the validation split to score (characters of a text file)")
    args = parser.parse_args()
    info = harness.RunInfo("tinygrad backend: validation loss of fp32, int8 and int4 beside onnxruntime")
    lines = []
    for spec in args.bundle:
        bundle, _, source = spec.partition("=")
        if not source:
            raise SystemExit(f"--bundle {spec}: expected BUNDLE=RUN_OR_TEXT")
        text, where = _text(Path(source), args.tokens)
        rows = {(backend, quant): harness.child(__file__, "score", {"bundle": bundle, "quant": quant, "backend": backend, "text": text})
                for quant in PRECISIONS for backend in ("onnxruntime", "tinygrad")}
        lines += [f"`{Path(bundle).name}`: {rows[('onnxruntime', 'fp32')]['tokens']:,} tokens of {where}.", "",
                  "| precision | onnxruntime loss | tinygrad loss | vs fp32 (onnxruntime / tinygrad) | logits apart, first window (max) |",
                  "|---|---|---|---|---|"]
        base = rows[("onnxruntime", "fp32")]["nll"]
        for quant in PRECISIONS:
            ort, tg = rows[("onnxruntime", quant)], rows[("tinygrad", quant)]
            apart = np.abs(np.array(ort["logits"]) - np.array(tg["logits"])).max()
            lines.append(f"| {quant} | {ort['nll']:.4f} | {tg['nll']:.4f} | {100 * (ort['nll'] / base - 1):+.2f}% / "
                         f"{100 * (tg['nll'] / base - 1):+.2f}% | {apart:.1e} |")
        lines.append("")
    body = "\n".join(lines)
    info.write(harness.RESULTS / "tinygrad_quality", body)
    print(body)


if __name__ == "__main__":
    if not harness.serve_child({"score": score_row}):
        sys.exit(main())
