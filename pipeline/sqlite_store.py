"""SQLite files for the precompute driver's per-file and per-sample state.

The driver of a run over N samples has to remember, per source and per sample, paths, keys
and stage fingerprints until the shards are cut, and it keeps two rebuildable caches (the stat
cache and the plan memo) from one run to the next. Held in Python memory, all of these grow
with the corpus (a few hundred bytes per sample even in compact columns, plus the allocator's
fragmentation around them). In SQLite they live on disk behind a page cache of fixed size
(``CACHE_KIB``), sorting by key happens in SQLite's external sorter, and the driver's memory
stays flat whatever the corpus size (docs/benchmarks.md (precompute)).

``sqlite3`` is in the standard library; a database that cannot be opened or read is deleted
and recreated, because everything stored in these files can be rebuilt (it only costs time).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# Page cache per connection. Large enough that lookups of a no-op run stay in memory for the
# B-tree's inner pages, small enough to be noise next to the interpreter (~40 MiB).
CACHE_KIB = 256


def _configure(connection: sqlite3.Connection, *, durable: bool) -> None:
    connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    # Sorts and temporary B-trees (ORDER BY over every key) spill to files, not to RAM.
    connection.execute("PRAGMA temp_store=FILE")
    if durable:
        # WAL: a killed run leaves the last committed state; synchronous=NORMAL is enough for
        # data that is only an optimisation (a torn last transaction is rolled back).
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    else:
        # Scratch state of one run: never needs to survive a crash (the file itself is removed).
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")


def remove_database(path: str | os.PathLike) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(os.fspath(path) + suffix)
        except FileNotFoundError:
            pass


def open_cache_database(path: str | os.PathLike, schema: str, *, readonly: bool = False) -> sqlite3.Connection | None:
    """A connection to the rebuildable cache database ``path`` with ``schema`` applied
    (``CREATE ... IF NOT EXISTS`` statements). A damaged file is deleted and started afresh.
    ``readonly``: open an existing file without ever writing it; None when there is none."""
    path = Path(path)
    if readonly:
        if not path.is_file():
            return None
        try:
            # immutable: no lock or -shm/-wal file is created (a dry run writes nothing); what a
            # crashed run left uncheckpointed in a -wal file is ignored, costing only time.
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
            connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return connection
        except sqlite3.DatabaseError:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            connection = sqlite3.connect(path)
            _configure(connection, durable=True)
            connection.executescript(schema)
            connection.commit()
            return connection
        except sqlite3.DatabaseError:
            if attempt:
                raise
            try:
                connection.close()
            except Exception:  # pragma: no cover - close of a broken handle
                pass
            remove_database(path)  # damaged: only an optimisation was lost
    raise AssertionError("unreachable")  # pragma: no cover


def open_scratch_database(path: str | os.PathLike, schema: str) -> sqlite3.Connection:
    """A new scratch database at ``path`` (replacing any file there) for one run's tables."""
    remove_database(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    _configure(connection, durable=False)
    connection.executescript(schema)
    return connection
