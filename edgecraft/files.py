"""Permissions of what edgecraft publishes.

safetensors (0.8) writes its files owner-only (0600), and runs' checkpoints and bundles are
assembled in folders that tempfile.mkdtemp makes owner-only (0700) before they are renamed into
place. Runs and bundles are meant to be copied, served and read by other users and services, so
edgecraft gives them the permissions the user's umask gives any new file (0644 and 0755 under
the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_umask_allows(path: Path) -> None:
    """Set the permissions of `path` (a file, or a folder without its contents) to what the
    umask gives a new file or folder."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
