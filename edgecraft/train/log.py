"""What a run records as it trains: metrics.jsonl, TensorBoard events, samples.txt, the progress bar.

Only rank 0 of a DDP run logs; the other ranks get `NullLog` and a disabled progress bar.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from edgecraft.checkpoint import atomic_write_text


def _event_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Log:
    """The run's three records: metrics.jsonl, TensorBoard events and samples.txt.

    On resume, events after the checkpoint's step (logged before a kill) are dropped from
    metrics.jsonl and hidden in TensorBoard (purge_step), so both read as one continuous run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.metrics = run_dir / "metrics.jsonl"
        self.samples = run_dir / "samples.txt"
        if resume_step is not None and self.metrics.is_file():
            kept = [
                line
                for line in self.metrics.read_text(encoding="utf-8").splitlines()
                if _event_step(line) <= resume_step
            ]
            atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def event(self, kind: str, step: int, **values: float) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "step": step, **values}) + "\n")
        prefix = {"train": "train/", "eval": "val/"}[kind]
        for key, value in values.items():
            tag = key if key in ("lr", "tokens_per_s", "grad_norm") else prefix + key
            self.tb.add_scalar(tag, value, step)

    def sample(self, step: int, text: str) -> None:
        with self.samples.open("a", encoding="utf-8") as f:
            f.write(f"===== step {step} =====\n{text}\n")
        self.tb.add_text("samples", text, step)

    def close(self) -> None:
        self.tb.close()


class NullLog:
    """A DDP rank other than 0: same calls, nothing written."""

    def event(self, kind: str, step: int, **values: float) -> None:
        pass

    def sample(self, step: int, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int, enabled: bool = True):
    """A tqdm bar on stderr (off when stderr is not a terminal, and off when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled else True,
        file=sys.stderr,
    )
