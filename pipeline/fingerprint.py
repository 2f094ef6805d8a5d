"""Stage fingerprints of the precompute job and a stat cache for source hashes.

Every stage output is keyed by a sha256 over canonical JSON of everything that determines it:

    ingest_fp  = H("ingest",  source sha256, D(ingest options,            INGEST_CODE_VERSION))
    mask_fp    = H("mask",    ingest_fp, frame,
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
from array import array
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

INGEST_CODE_VERSION = 1
MASK_CODE_VERSION = 1
PYRAMID_CODE_VERSION = 1
PACK_CODE_VERSION = 1

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
    code = {"ingest": INGEST_CODE_VERSION, "mask": MASK_CODE_VERSION, "pyramid": PYRAMID_CODE_VERSION, "pack": PACK_CODE_VERSION}[stage]
    return fingerprint({"stage": stage, "settings": dict(settings), "code": code})


def mask_stage_digest(*, masker_fingerprint: Mapping[str, Any], finalize_options: Mapping[str, Any]) -> str:
    return stage_digest("mask", {"masker": dict(masker_fingerprint), "finalize": dict(finalize_options)})


def pyramid_stage_digest(scales: Iterable[int]) -> str:
    return stage_digest("pyramid", {"scales": [int(s) for s in scales]})


def mask_fingerprint(*, ingest_fp: str, frame: int | None, mask_digest: str, sample_inputs: Mapping[str, Any] | str) -> str:
    """``mask_digest``: :func:`mask_stage_digest` (masker fingerprint incl. checkpoint sha256,
    finalize options, MASK_CODE_VERSION); ``sample_inputs``: per-sample files the masker reads
    (e.g. the label's sha256), or their :func:`canonical_json` (what the plan memo keeps)."""
    if isinstance(sample_inputs, str):
        inputs = sample_inputs
    else:
        inputs = canonical_json(dict(sample_inputs)) if sample_inputs else "{}"
    return _sha(f"mask\0{ingest_fp}\0{'' if frame is None else int(frame)}\0{mask_digest}\0{inputs}")


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


class StatCache:
    """path -> sha256, trusted only while (size, mtime_ns, inode) are unchanged.

    Re-hashing every source on every run would make a no-op run over a large corpus I/O bound;
    this is the same trade-off git's index makes. Like git's "racy" check, an entry whose mtime
    is within ``racy_window_ns`` of the moment it was hashed is not trusted (the file may have
    been rewritten within the filesystem's timestamp granularity), so it is re-hashed next time.

    The cache is a JSON file (``{"version": 1, "entries": {path: [size, mtime_ns, inode,
    sha256, hashed_at_ns]}}``) written atomically by :meth:`save`; losing it (crash before save)
    only costs re-hashing. In memory it is columnar, not one dict entry per file (~0.4 KiB
    each): the loaded entries as a sorted ``S`` array of paths (looked up by binary search),
    an int64 (n, 4) stat table and raw 32-byte digests; files hashed in this session are
    appended to similar columns (~100 bytes + path each) and merged in on :meth:`save`.
    A path hashed twice in one session is hashed twice (the driver asks once per file).
    """

    def __init__(self, path: str | Path | None, *, racy_window_ns: int = 2_000_000_000) -> None:
        self.path = Path(path) if path is not None else None
        self.racy_window_ns = racy_window_ns
        self.hashed = 0
        self.reused = 0
        self._dirty = False
        self._paths = np.zeros(0, "S1")  # loaded entries, sorted by path (UTF-8 bytes)
        self._stats = np.zeros((0, 4), np.int64)  # size, mtime_ns, inode, hashed_at_ns
        self._digests = np.zeros(0, "S32")
        self._new_paths: list[bytes] = []
        self._new_stats = array("q")
        self._new_digests = bytearray()
        if self.path is not None and self.path.exists():
            try:
                self._load(json.loads(self.path.read_text()).get("entries", {}))
            except (ValueError, TypeError, OSError, AttributeError):
                self._paths, self._stats, self._digests = np.zeros(0, "S1"), np.zeros((0, 4), np.int64), np.zeros(0, "S32")  # a damaged stat cache is only a lost optimisation

    def _load(self, entries: dict) -> None:
        count = len(entries)
        paths = np.array([_path_bytes(k) for k in entries], dtype="S") if count else np.zeros(0, "S1")
        stats = np.empty((count, 4), np.int64)
        digests = bytearray()
        for row, (size, mtime_ns, inode, sha256, hashed_at_ns) in enumerate(entries.values()):
            stats[row] = (size, mtime_ns, inode, hashed_at_ns)
            digest = bytes.fromhex(sha256)
            if len(digest) != 32:
                raise ValueError("not a sha256")
            digests += digest
        order = np.argsort(paths, kind="stable")
        self._paths, self._stats = paths[order], stats[order]
        self._digests = np.frombuffer(bytes(digests), "S32")[order] if count else np.zeros(0, "S32")

    def __len__(self) -> int:
        return len(self._paths) + len(self._new_paths)

    def _loaded_row(self, key: bytes) -> int | None:
        row = int(np.searchsorted(self._paths, key))
        if row < len(self._paths) and self._paths[row] == key:
            return row
        return None

    def sha256(self, path: str | Path) -> str:
        """sha256 of the file's bytes, from the cache when its stat is unchanged."""
        path = os.fspath(path)
        stat = os.stat(path)
        key = _path_bytes(path)
        row = self._loaded_row(key)
        if row is not None:
            size, mtime_ns, inode, hashed_at_ns = self._stats[row].tolist()
            if size == stat.st_size and mtime_ns == stat.st_mtime_ns and inode == stat.st_ino and stat.st_mtime_ns < hashed_at_ns - self.racy_window_ns:
                self.reused += 1
                return _digest_hex(self._digests[row])
        hashed_at = time.time_ns()
        digest = file_sha256(path)
        self._new_paths.append(key)
        self._new_stats.extend((stat.st_size, stat.st_mtime_ns, stat.st_ino, hashed_at))
        self._new_digests += bytes.fromhex(digest)
        self.hashed += 1
        self._dirty = True
        return digest

    def save(self, keep: Iterable[str] | None = None) -> None:
        """Write the cache atomically; ``keep`` (paths) drops entries of files no longer used."""
        if self.path is None:
            return
        new_paths = np.array(self._new_paths, dtype="S") if self._new_paths else np.zeros(0, "S1")
        new_stats = np.frombuffer(self._new_stats, np.int64).reshape(-1, 4) if len(self._new_stats) else np.zeros((0, 4), np.int64)
        new_digests = np.frombuffer(bytes(self._new_digests), "S32") if self._new_digests else np.zeros(0, "S32")
        # The last hash of a path wins; a loaded entry that was re-hashed is replaced.
        last = np.ones(len(new_paths), bool)
        if len(new_paths) > 1:
            reversed_unique = np.unique(new_paths[::-1], return_index=True)[1]
            last[:] = False
            last[len(new_paths) - 1 - reversed_unique] = True
        keep_loaded = ~np.isin(self._paths, new_paths) if len(new_paths) else np.ones(len(self._paths), bool)
        if keep is not None:
            keep_paths = [_path_bytes(os.fspath(p)) for p in keep]
            keep_array = np.array(keep_paths, dtype="S") if keep_paths else np.zeros(0, "S1")
            del keep_paths
            in_keep_loaded = np.isin(self._paths, keep_array)
            self._dirty |= bool((~in_keep_loaded & keep_loaded).any())
            keep_loaded &= in_keep_loaded
            last &= np.isin(new_paths, keep_array)
        if not self._dirty:
            return
        from pipeline.cache import atomic_write_chunks

        def rows(paths, stats, digests, mask):
            for row in np.flatnonzero(mask).tolist():
                size, mtime_ns, inode, hashed_at_ns = stats[row].tolist()
                name = paths[row].decode("utf-8", "surrogateescape")
                yield f"{json.dumps(name)}:[{size},{mtime_ns},{inode},\"{_digest_hex(digests[row])}\",{hashed_at_ns}]"

        def chunks():
            yield b'{"version":1,"entries":{'
            first = True
            for text in _chain(rows(self._paths, self._stats, self._digests, keep_loaded), rows(new_paths, new_stats, new_digests, last)):
                yield (text if first else "," + text).encode("utf-8", "surrogateescape")
                first = False
            yield b"}}"

        atomic_write_chunks(self.path, chunks())
        self._dirty = False


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _digest_hex(digest: bytes) -> str:
    # numpy ``S`` items drop trailing NUL bytes; a digest may end in zeros.
    return bytes(digest).ljust(32, b"\0").hex()


def _path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")
