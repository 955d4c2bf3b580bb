"""One process trains a run at a time: a lock file beside the run directory, holding the pid.

`runs/.NAME.lock` sits beside `runs/NAME/` rather than inside it, so that it also guards the moment
before the run directory exists (two `train` of one name started together) and survives `--force`
replacing the directory. The file is held with flock, which the kernel releases when the process
dies however it dies, so a lock left by a killed process is recognised as stale (its flock is
free) and taken over, naming the dead pid. Released, the file is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from edgecraft.errors import UserError


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


def acquire(run_dir: Path) -> int:
    """Lock `run_dir` for this process and return the lock's file descriptor; a UserError if
    another live process holds it."""
    path = lock_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{path.parent}: cannot create the runs folder ({err.strerror or err})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{path}: cannot create the run's lock file ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{run_dir} is being trained by process {_holder(path)} (lock {path}); wait for it to "
                f"finish or stop it (Ctrl-C checkpoints it), then try again"
            ) from None
        try:  # the holder may have removed the file between our open and our flock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.read(fd, 64).decode("utf-8", "replace").strip()
    if stale:
        print(f"{run_dir}: taking over the lock of process {stale}, which is gone", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(run_dir: Path, fd: int) -> None:
    """Remove the lock file, then let go of it (in that order, so a waiting process re-checks)."""
    with contextlib.suppress(OSError):
        os.unlink(lock_path(run_dir))
    os.close(fd)


@contextlib.contextmanager
def locked(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run's lock inside the block (only where `enabled`: DDP rank 0 locks for all)."""
    if not enabled:
        yield
        return
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir, fd)
