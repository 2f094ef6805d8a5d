"""The precompute driver's per-source and per-sample tables, in a scratch SQLite file.

The driver of a run over N samples must remember, per source, its path and fingerprints, and
per sample its key, where it came from and its three stage fingerprints, until the shards are
cut; then it walks the samples in key order. Held in Python (even as compact columns, ~0.35
KiB/sample) that grows with the corpus; here it is a SQLite file under ``DIR/cache`` with a
fixed page cache (``pipeline/sqlite_store.py``), the key order comes from SQLite's external
sorter, and ``SampleRef``/``SourceTask`` objects are only made for the batch or shard at hand.
The file is scratch: made at the start of a run, deleted at its end; its name carries
``.tmp-`` so a killed run's file is removed by ``clean_stale_temps`` at the next start.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from pipeline.sqlite_store import open_scratch_database, remove_database
from pipeline.stages import ErrorRecord, SampleRef, SourceTask

_SCHEMA = """
    CREATE TABLE sources (
        row INTEGER PRIMARY KEY, path TEXT, relpath TEXT, source_sha256 BLOB, ingest_fp BLOB,
        to_run INTEGER DEFAULT 0
    );
    CREATE TABLE samples (
        row INTEGER PRIMARY KEY, key TEXT, relpath TEXT, source_path TEXT, frame INTEGER,
        index_in_source INTEGER, height INTEGER, width INTEGER,
        source_sha256 BLOB, ingest_fp BLOB, mask_fp BLOB, pyramid_fp BLOB
    );
    -- the samples to pack, one per key, in key order (filled by pack_order)
    CREATE TABLE packed (position INTEGER PRIMARY KEY, row INTEGER);
    -- dry runs: keys of sources whose samples are not all cached
    CREATE TABLE unknown (key TEXT);
    -- relpaths met so far (a list file may name a file twice)
    CREATE TABLE seen (relpath TEXT PRIMARY KEY) WITHOUT ROWID;
"""

_SAMPLE_COLUMNS = "key, relpath, source_path, frame, index_in_source, height, width, source_sha256, ingest_fp, mask_fp, pyramid_fp"
_PAGE = 1024  # rows fetched per query when walking a table while writing others


class PackedMember(NamedTuple):
    position: int
    key: str
    pyramid_fp: str
    ingest_fp: str


def _ref(values) -> SampleRef:
    key, relpath, source_path, frame, index_in_source, height, width, source_sha256, ingest_fp, mask_fp, pyramid_fp = values
    return SampleRef(
        key=key, relpath=relpath, frame=frame, index_in_source=int(index_in_source), source_sha256=bytes(source_sha256).hex(),
        ingest_fp=bytes(ingest_fp).hex(), mask_fp=bytes(mask_fp).hex(), pyramid_fp=bytes(pyramid_fp).hex(),
        original_size=(int(height), int(width)), source_path=source_path,
    )


class _Referenced:
    """``fp in referenced``: is the hex fingerprint ``fp`` used by this run (for cache gc)."""

    def __init__(self, db: sqlite3.Connection, sql: str) -> None:
        self._db, self._sql = db, sql

    def __contains__(self, fp: object) -> bool:
        try:
            blob = bytes.fromhex(str(fp))
        except ValueError:
            return False
        return self._db.execute(self._sql, (blob,)).fetchone() is not None


class RunTables:
    """Sources and samples of one run (see the module docstring). ``path``: the scratch file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._db = open_scratch_database(self.path, _SCHEMA)
        self.source_count = 0
        self.sample_count = 0
        self.packed_count = 0

    def __len__(self) -> int:
        return self.sample_count

    # -- sources ------------------------------------------------------------------------------
    def add_source(self, task: SourceTask) -> int:
        """Row of the new source."""
        cursor = self._db.execute(
            "INSERT INTO sources (path, relpath, source_sha256, ingest_fp) VALUES (?, ?, ?, ?)",
            (task.path, task.relpath, bytes.fromhex(task.source_sha256), bytes.fromhex(task.ingest_fp)),
        )
        self.source_count += 1
        return int(cursor.lastrowid)

    def first_sighting(self, relpath: str) -> bool:
        """True the first time ``relpath`` is seen in this run, False after."""
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (relpath,)).rowcount == 1

    def mark_to_run(self, row: int) -> None:
        self._db.execute("UPDATE sources SET to_run = 1 WHERE row = ?", (row,))

    def count_to_run(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM sources WHERE to_run = 1").fetchone()[0])

    def tasks_to_run(self, batch_size: int) -> Iterator[list[SourceTask]]:
        """The sources marked to run, ``batch_size`` at a time, in row order. Read a page at a
        time, so the caller may add samples while iterating."""
        last = 0
        batch: list[SourceTask] = []
        while True:
            rows = self._db.execute(
                "SELECT row, path, relpath, source_sha256, ingest_fp FROM sources WHERE to_run = 1 AND row > ? ORDER BY row LIMIT ?", (last, _PAGE)
            ).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            for _, path, relpath, sha, fp in rows:
                batch.append(SourceTask(path=path, relpath=relpath, source_sha256=bytes(sha).hex(), ingest_fp=bytes(fp).hex()))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def source_ingest_fps(self) -> Iterator[str]:
        """The ingest fingerprint (hex) of every source, in row order."""
        last = 0
        while True:
            rows = self._db.execute("SELECT row, ingest_fp FROM sources WHERE row > ? ORDER BY row LIMIT ?", (last, _PAGE)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for _, fp in rows:
                yield bytes(fp).hex()

    def source_paths(self) -> Iterator[str]:
        last = 0
        while True:
            rows = self._db.execute("SELECT row, path FROM sources WHERE row > ? ORDER BY row LIMIT ?", (last, _PAGE)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for _, path in rows:
                yield path

    # -- samples ------------------------------------------------------------------------------
    def add_samples(self, refs: Iterable[SampleRef]) -> None:
        values = [
            (
                ref.key, ref.relpath, ref.source_path or ref.relpath, None if ref.frame is None else int(ref.frame), int(ref.index_in_source),
                int(ref.original_size[0]), int(ref.original_size[1]), bytes.fromhex(ref.source_sha256), bytes.fromhex(ref.ingest_fp),
                bytes.fromhex(ref.mask_fp), bytes.fromhex(ref.pyramid_fp),
            )
            for ref in refs
        ]
        self._db.executemany(f"INSERT INTO samples ({_SAMPLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        self.sample_count += len(values)

    def pack_order(self, errors: list[ErrorRecord]) -> int:
        """Fill the packing order: the samples sorted by key, one per key. Two sources mapping
        to one key (should not happen with ``make_key``): the first by relpath is kept, the
        others are appended to ``errors`` with a reason. Returns the number of samples to pack."""
        self._db.execute("DELETE FROM packed")
        cursor = self._db.execute("SELECT row, key, relpath FROM samples ORDER BY key, relpath, row")
        position = 0
        previous_key = first_relpath = None
        pending: list[tuple[int, int]] = []
        while chunk := cursor.fetchmany(_PAGE):
            for row, key, relpath in chunk:
                if key == previous_key:
                    errors.append(ErrorRecord(relpath, "pack", f"sample key {key!r} already used by {first_relpath}", key))
                    continue
                previous_key, first_relpath = key, relpath
                pending.append((position, row))
                position += 1
            # Written after the page was read: the sorter's cursor stays valid (another table).
            self._db.executemany("INSERT INTO packed VALUES (?, ?)", pending)
            pending.clear()
        self.packed_count = position
        return position

    def packed_members(self) -> Iterator[PackedMember]:
        """(position, key, pyramid_fp, ingest_fp) of every sample to pack, in key order."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT p.position, s.key, s.pyramid_fp, s.ingest_fp FROM packed p JOIN samples s ON s.row = p.row "
                "WHERE p.position > ? ORDER BY p.position LIMIT ?",
                (last, _PAGE),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for position, key, pyramid_fp, ingest_fp in rows:
                yield PackedMember(position, key, bytes(pyramid_fp).hex(), bytes(ingest_fp).hex())

    def packed_refs(self, start: int, stop: int) -> tuple[SampleRef, ...]:
        """The ``SampleRef``s of packing positions ``start .. stop - 1``, in key order."""
        rows = self._db.execute(
            f"SELECT {', '.join('s.' + c.strip() for c in _SAMPLE_COLUMNS.split(','))} FROM packed p JOIN samples s ON s.row = p.row "
            "WHERE p.position >= ? AND p.position < ? ORDER BY p.position",
            (start, stop),
        ).fetchall()
        return tuple(_ref(values) for values in rows)

    def referenced(self, stage: str) -> _Referenced:
        """The fingerprints of ``stage`` this run uses, as a container (for cache gc): ingest
        of every source, mask and pyramid of every packed sample."""
        if stage == "ingest":
            self._db.execute("CREATE INDEX IF NOT EXISTS sources_ingest ON sources (ingest_fp)")
            return _Referenced(self._db, "SELECT 1 FROM sources WHERE ingest_fp = ? LIMIT 1")
        if stage not in ("mask", "pyramid"):
            raise ValueError(f"no referenced fingerprints for stage {stage!r}")
        column = f"{stage}_fp"
        self._db.execute(f"CREATE INDEX IF NOT EXISTS samples_{column} ON samples ({column})")
        self._db.execute("CREATE INDEX IF NOT EXISTS packed_row ON packed (row)")
        return _Referenced(self._db, f"SELECT 1 FROM samples s JOIN packed p ON p.row = s.row WHERE s.{column} = ? LIMIT 1")

    # -- dry runs -----------------------------------------------------------------------------
    def add_unknown_key(self, key: str) -> None:
        self._db.execute("INSERT INTO unknown VALUES (?)", (key,))

    def dry_run_keys(self) -> Iterator[tuple[str, int | None]]:
        """Every key a run would pack, in order: (key, sample row), row None when not all of
        the key's source is cached yet."""
        cursor = self._db.execute(
            "SELECT key, MAX(row), MAX(unknown) FROM ("
            " SELECT key, row, 0 AS unknown FROM samples UNION ALL SELECT key, NULL, 1 FROM unknown"
            ") GROUP BY key ORDER BY key"
        )
        while chunk := cursor.fetchmany(_PAGE):
            for key, row, unknown in chunk:
                yield key, None if unknown else row

    def member_of_row(self, row: int) -> tuple[str, str, str]:
        key, pyramid_fp, ingest_fp = self._db.execute("SELECT key, pyramid_fp, ingest_fp FROM samples WHERE row = ?", (row,)).fetchone()
        return key, bytes(pyramid_fp).hex(), bytes(ingest_fp).hex()

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close and delete the scratch file."""
        if self._db is not None:
            self._db.close()
            self._db = None
            remove_database(self.path)

    def __enter__(self) -> "RunTables":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
