"""What a run records as it trains: metrics.jsonl, TensorBoard events, samples.txt, the progress bar.

Only rank 0 of a DDP run logs; the other ranks get `NullLog` and a disabled progress bar.
"""

from __future__ import annotations

import json
import math
import sys
import time
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


LINE_SECONDS = 10.0  # progress lines to a log or CI output: one per this many seconds, and a last one


class ProgressLines:
    """The progress bar's calls, as plain lines at a steady interval: what stderr gets when it is
    not a terminal (a log file, CI), where a bar would print nothing, or a line per redraw."""

    def __init__(self, total: int, initial: int, file=None, interval: float = LINE_SECONDS) -> None:
        self.total, self.n, self.file, self.interval = total, initial, file or sys.stderr, interval
        self.start_n, self.start = initial, time.monotonic()
        self.last, self.printed, self.postfix = self.start, initial, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, text: str, file=None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        if self.n != self.printed:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%){extra}, "
              f"{_duration(now - self.start)} elapsed{eta}", file=self.file, flush=True)
        self.last, self.printed = now, self.n


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress(total: int, initial: int, enabled: bool = True):
    """A tqdm bar on stderr when it is a terminal, else ProgressLines; nothing when not `enabled`."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, initial)
    return tqdm(
        total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled else True,
        file=sys.stderr,
    )
