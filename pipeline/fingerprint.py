"""Stage fingerprints of the precompute job and a stat cache for source hashes.

Every stage output is keyed by a sha256 over canonical JSON of everything that determines it:

    ingest_fp  = H("ingest",  source sha256, D(ingest options,            INGEST_CODE_VERSION))
    region_fp  = H("region",  ingest_fp, D(scan-region settings,          REGION_CODE_VERSION))
    mask_fp    = H("mask",    ingest_fp, frame, region_fp,
                              D(masker fingerprint (incl. checkpoint sha256), finalize options,
                                                                          MASK_CODE_VERSION),
                              per-sample masker inputs (e.g. label sha256))
    pyramid_fp = H("pyramid", mask_fp, D(scales,                          PYRAMID_CODE_VERSION))

``D(...)`` (:func:`stage_digest`) is computed once per run, so per-sample fingerprints hash a
few short strings (a no-op run over 10,000 samples computes 30,000 of them).
    shard_fp   = H("pack",    ordered (key, pyramid_fp, ingest_fp) of members,
                              pack options,                               PACK_CODE_VERSION)

The chain is Merkle-style: a change upstream changes every fingerprint downstream, and a change
of a stage's own options changes that stage and what follows, never what precedes it. Anything
that cannot be turned into canonical JSON raises ``TypeError`` instead of falling back to a
random or ``repr``-based key (the HF datasets #4521 pitfall: silent recompute-everything).

Bump a ``*_CODE_VERSION`` by hand whenever the output of that stage changes for the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping


INGEST_CODE_VERSION = 2  # 2: colour maps and source info in the entry
REGION_CODE_VERSION = 2  # 2: the border is peeled off blurred edge ramps (half maximum)
MASK_CODE_VERSION = 2  # 2: masks clipped to the scan region, residual inside it
PYRAMID_CODE_VERSION = 1
PACK_CODE_VERSION = 2  # 2: scan-region member, origin and group in the record

HASH_CHUNK_BYTES = 1 << 20


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"cannot fingerprint non-finite float {value!r}")
        # Integral floats and ints hash alike (an option given as 1 or 1.0 means the same).
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"cannot fingerprint a mapping with non-string keys: {keys!r}")
        return {k: _canonical(value[k]) for k in sorted(keys)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return _canonical(value.item())  # numpy scalar
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}")


def canonical_json(value: Any) -> str:
    """Sorted-key, whitespace-free JSON of ``value``; raises ``TypeError`` for anything else."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


def ingest_fingerprint(*, source_sha256: str, options: Mapping[str, Any] | str) -> str:
    """``options``: the ingest options, or their :func:`stage_digest` (computed once per run)."""
    digest = options if isinstance(options, str) else stage_digest("ingest", options)
    return _sha(f"ingest\0{source_sha256}\0{digest}")


def stage_digest(stage: str, settings: Mapping[str, Any]) -> str:
    """Fingerprint of a stage's run-wide settings plus its code version; computed once per run
    so that the per-sample fingerprints below only hash a few short strings."""
    code = {"ingest": INGEST_CODE_VERSION, "region": REGION_CODE_VERSION, "mask": MASK_CODE_VERSION,
            "pyramid": PYRAMID_CODE_VERSION, "pack": PACK_CODE_VERSION}[stage]
    return fingerprint({"stage": stage, "settings": dict(settings), "code": code})


def mask_stage_digest(*, masker_fingerprint: Mapping[str, Any], finalize_options: Mapping[str, Any]) -> str:
    return stage_digest("mask", {"masker": dict(masker_fingerprint), "finalize": dict(finalize_options)})


def pyramid_stage_digest(scales: Iterable[int]) -> str:
    return stage_digest("pyramid", {"scales": [int(s) for s in scales]})


def region_fingerprint(*, ingest_fp: str, region_digest: str) -> str:
    """The scan region of one source (all its frames): ``region_digest`` is the
    :func:`stage_digest` of the scan-region settings."""
    return _sha(f"region\0{ingest_fp}\0{region_digest}")


def mask_fingerprint(*, ingest_fp: str, frame: int | None, mask_digest: str, sample_inputs: Mapping[str, Any] | str, region_fp: str = "") -> str:
    """``mask_digest``: :func:`mask_stage_digest` (masker fingerprint incl. checkpoint sha256,
    finalize options, MASK_CODE_VERSION); ``sample_inputs``: per-sample files the masker reads
    (e.g. the label's sha256), or their :func:`canonical_json` (what the plan memo keeps)."""
    if isinstance(sample_inputs, str):
        inputs = sample_inputs
    else:
        inputs = canonical_json(dict(sample_inputs)) if sample_inputs else "{}"
    region = f"\0{region_fp}" if region_fp else ""  # masks are clipped to the source's scan region
    return _sha(f"mask\0{ingest_fp}\0{'' if frame is None else int(frame)}\0{mask_digest}\0{inputs}{region}")


def pyramid_fingerprint(*, mask_fp: str, pyramid_digest: str) -> str:
    return _sha(f"pyramid\0{mask_fp}\0{pyramid_digest}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_fingerprint(members: Iterable[tuple[str, str, str]], options: Mapping[str, Any]) -> str:
    """``members``: ordered (key, pyramid_fp, ingest_fp) of the samples the shard holds.

    The ingest fingerprint is included because the shard stores the image, which the pyramid
    fingerprint already implies through the mask fingerprint; it is kept explicit so the shard
    identity stays right even if a later code version decouples the two.
    """
    return fingerprint({"stage": "pack", "members": [list(m) for m in members], "options": dict(options), "code": PACK_CODE_VERSION})


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def change_stamp_ns(stat: os.stat_result) -> int:
    """The newer of a file's mtime and ctime (ns). An in-place edit that keeps the size and puts
    the old mtime back (``touch -d``, some copy tools) still moves ctime, which user space cannot
    set: comparing this stamp instead of the mtime alone catches it."""
    return max(int(stat.st_mtime_ns), int(stat.st_ctime_ns))


class StatCache:
    """path -> sha256, trusted only while (size, change stamp, inode) are unchanged; the change
    stamp is the newer of mtime and ctime (``change_stamp_ns``; stored in the mtime_ns column).

    Re-hashing every source on every run would make a no-op run over a large corpus I/O bound;
    this is the same trade-off git's index makes. Like git's "racy" check, an entry whose mtime
    is within ``racy_window_ns`` of the moment it was hashed is not trusted (the file may have
    been rewritten within the filesystem's timestamp granularity), so it is re-hashed next time.

    Stored in a SQLite file (``pipeline/sqlite_store.py``; table ``stat``: path, size,
    mtime_ns, inode, sha256, hashed_at_ns), looked up one path at a time, so memory does not
    grow with the number of files. Each hash is written as it is made; :meth:`save` commits
    (and drops entries not in ``keep``). Losing or damaging the file only costs re-hashing.
    ``path=None``: nothing is remembered (every call hashes). ``readonly=True`` (dry runs):
    entries are read, never written.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS stat (
            path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,
            sha256 BLOB, hashed_at_ns INTEGER
        ) WITHOUT ROWID;
    """
    COMMIT_EVERY = 1000

    def __init__(self, path: str | Path | None, *, racy_window_ns: int = 2_000_000_000, readonly: bool = False) -> None:
        from pipeline.sqlite_store import open_cache_database

        self.path = Path(path) if path is not None else None
        self.racy_window_ns = racy_window_ns
        self.readonly = readonly
        self.hashed = 0
        self.reused = 0
        self._db = open_cache_database(self.path, self.SCHEMA, readonly=readonly) if self.path is not None else None

    def __len__(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT count(*) FROM stat").fetchone()[0])

    def sha256(self, path: str | Path) -> str:
        """sha256 of the file's bytes, from the cache when its stat is unchanged."""
        path = os.fspath(path)
        stat = os.stat(path)
        key = _path_bytes(path)
        if self._db is not None:
            row = self._db.execute("SELECT size, mtime_ns, inode, sha256, hashed_at_ns FROM stat WHERE path = ?", (key,)).fetchone()
            if row is not None:
                size, mtime_ns, inode, digest, hashed_at_ns = row
                stamp = change_stamp_ns(stat)
                if size == stat.st_size and mtime_ns == stamp and inode == stat.st_ino and stamp < hashed_at_ns - self.racy_window_ns:
                    self.reused += 1
                    return bytes(digest).hex()
        hashed_at = time.time_ns()
        digest = file_sha256(path)
        self.hashed += 1
        if self._db is not None and not self.readonly:
            self._db.execute(
                "INSERT OR REPLACE INTO stat VALUES (?, ?, ?, ?, ?, ?)",
                (key, stat.st_size, change_stamp_ns(stat), stat.st_ino, bytes.fromhex(digest), hashed_at),
            )
            if self.hashed % self.COMMIT_EVERY == 0:  # a killed run keeps most of its hashing
                self._db.commit()
        return digest

    def save(self, keep: Iterable[str] | None = None) -> None:
        """Commit; ``keep`` (paths, streamed) drops the entries of files no longer used."""
        if self._db is None or self.readonly:
            return
        if keep is not None:
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS keep (path BLOB PRIMARY KEY) WITHOUT ROWID")
            self._db.execute("DELETE FROM temp.keep")
            self._db.executemany("INSERT OR IGNORE INTO temp.keep VALUES (?)", ((_path_bytes(os.fspath(p)),) for p in keep))
            self._db.execute("DELETE FROM stat WHERE path NOT IN (SELECT path FROM temp.keep)")
            self._db.execute("DELETE FROM temp.keep")
        self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")
