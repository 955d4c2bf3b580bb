"""tinygrad's kernel cache folder: which one (cache_dir, else $EDGECRAFT_TINYGRAD_CACHE), set before
tinygrad's database first opens, and a folder that exists but cannot be written opened for reading
only (a cache filled beforehand and shipped on a read-only disk)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

INSTALL_HINT = "pip install 'edgecraft[tinygrad]'"
CACHE_ENV = "EDGECRAFT_TINYGRAD_CACHE"  # a folder for tinygrad's compiled-kernel cache (cache.db)


def chosen_folder(cache_dir: str | Path | None) -> str | Path | None:
    """The cache folder asked for: `cache_dir`, else $EDGECRAFT_TINYGRAD_CACHE, else None (tinygrad's own)."""
    return cache_dir or os.environ.get(CACHE_ENV)


def import_tinygrad(cache_dir: str | Path | None = None):
    """Import tinygrad with its kernel cache under `cache_dir` (else $EDGECRAFT_TINYGRAD_CACHE,
    else tinygrad's own CACHEDB or ~/.cache/tinygrad), set before its database first opens. A
    folder that exists but cannot be written is read, never written (a cache filled beforehand
    and shipped on a read-only disk)."""
    try:
        import tinygrad
        from tinygrad import helpers
    except ImportError:
        raise RuntimeError(f"the tinygrad backend needs the tinygrad package: {INSTALL_HINT}") from None
    folder = chosen_folder(cache_dir)
    if folder and helpers._db_connection is None:
        path = Path(folder).expanduser().absolute()
        if path.is_dir() and not os.access(path, os.W_OK):  # shipped pre-filled on a read-only disk
            helpers.CACHEDB = str(path / "cache.db")
            helpers._db_connection = _read_only_cache(path / "cache.db")
            return tinygrad
        try:  # tinygrad would fail later, on its first kernel, with a message about the device
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError("not writable")
        except OSError as err:
            given = "cache_dir" if cache_dir else f"${CACHE_ENV}"
            raise RuntimeError(f"tinygrad's kernel cache folder {str(path)!r} ({given}) cannot be used: "
                               f"{err.strerror or err}; point it at a writable folder") from None
        helpers.CACHEDB = str(path / "cache.db")
    return tinygrad


class _KeepNothing(sqlite3.Cursor):
    """A cursor on a cache that cannot be written: what tinygrad stores (a kernel compiled in this
    process) is dropped; tinygrad still keeps it in memory for the rest of the process."""

    def execute(self, sql, parameters=()):
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError:
            if sql.lstrip().upper().startswith(("CREATE", "REPLACE")):  # diskcache_put's statements
                return self
            raise


class _ReadOnlyCache(sqlite3.Connection):
    def cursor(self, factory=_KeepNothing):
        return super().cursor(factory)


def _read_only_cache(db: Path) -> sqlite3.Connection:
    """tinygrad's kernel database in a folder this process cannot write, opened for reading only:
    read-only (a writer elsewhere may still share it), else immutable (tinygrad's database is in WAL
    mode, which SQLite opens read-only only beside a shared-memory file a folder like this lacks),
    else, with no database there, an empty one in memory."""
    for mode in ("mode=ro", "immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(f"{db.as_uri()}?{mode}", uri=True, factory=_ReadOnlyCache)
            conn.execute("SELECT name FROM sqlite_master").fetchall()
            return conn
        except sqlite3.Error:
            if conn is not None:
                conn.close()
    return sqlite3.connect(":memory:")
