"""Content-addressed stage cache under ``DIR/cache``: atomic entries, cheap metadata reads.

Layout: ``DIR/cache/<stage>/<fp[:2]>/<fp>.bin``; failures of a sample at a stage are cached
as ``DIR/cache/failed/<stage>/<fp[:2]>/<fp>.json`` so a re-run with nothing changed does not
decode a known-bad file again (it still reports it).

Each entry is one file written to a temporary name in the same directory, fsynced and renamed,
so a run killed at any moment leaves either a complete entry or none (plus a temp file that
:func:`clean_stale_temps` removes at the next start). A re-run that finds an entry does not
recompute it: that is how a killed job resumes without redoing completed work.

Entry format (hand-written because the planner must read a few hundred bytes of metadata from
thousands of entries per second without decoding payloads, which ``npz``/zip or pickle cannot
do cheaply): ``MAGIC (8 bytes) | u32 header length | header JSON | payload sections``. The
header holds ``meta`` (any JSON) and the name, offset and size of each binary section.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Container, Iterable, Iterator, Mapping

MAGIC = b"ANAUSC01"
TEMP_MARK = ".tmp-"
STAGES = ("ingest", "region", "mask", "pyramid", "pack")


class CacheEntryError(Exception):
    """A cache entry exists but cannot be read (damaged); the caller recomputes it."""


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes], *, fsync: bool = True) -> None:
    """Write ``chunks`` to ``path`` via a temporary file in the same directory and ``os.replace``,
    so a reader (or a killed run) sees the old file or the whole new one, never a part.

    Temporary names contain ``.tmp-`` and never end in ``.tar``, so they are never taken for
    shards or entries. The data may be produced piece by piece (never held whole).
    """
    # Strings, not Path: called per cache entry, and pathlib interns every name it parses.
    path = os.fspath(path)
    folder, name = os.path.split(path)
    folder = folder or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + TEMP_MARK, suffix=".part")
    except FileNotFoundError:  # first entry in this folder (cheaper than mkdir on every write)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + TEMP_MARK, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """:func:`atomic_write_chunks` for data already in memory."""
    atomic_write_chunks(path, (data,), fsync=fsync)


def encode_entry(meta: Mapping[str, Any], sections: Mapping[str, bytes]) -> bytes:
    offset = 0
    table = []
    payload_crc = 0
    for name, blob in sections.items():
        table.append({"name": name, "offset": offset, "size": len(blob)})
        offset += len(blob)
        payload_crc = zlib.crc32(blob, payload_crc)
    header = json.dumps({"meta": dict(meta), "sections": table, "payload_size": offset, "payload_crc32": payload_crc}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *sections.values()])


def _parse_header(data: bytes, path: str | Path) -> tuple[dict, int]:
    if len(data) < 12 or data[:8] != MAGIC:
        raise CacheEntryError(f"{path}: not a cache entry")
    (length,) = struct.unpack("<I", data[8:12])
    if len(data) < 12 + length:
        raise CacheEntryError(f"{path}: truncated header")
    try:
        header = json.loads(data[12 : 12 + length])
    except ValueError:
        raise CacheEntryError(f"{path}: damaged header") from None
    return header, 12 + length


def decode_entry(data: bytes, path: Path | str = "<bytes>") -> tuple[dict, dict[str, bytes]]:
    header, start = _parse_header(data, path)
    payload = memoryview(data)[start:]
    if len(payload) != header.get("payload_size", len(payload)) or zlib.crc32(payload) != header.get("payload_crc32", zlib.crc32(payload)):
        raise CacheEntryError(f"{path}: damaged entry (payload size or crc32 mismatch)")
    sections = {}
    for item in header["sections"]:
        begin = start + item["offset"]
        blob = data[begin : begin + item["size"]]
        if len(blob) != item["size"]:
            raise CacheEntryError(f"{path}: truncated section {item['name']}")
        sections[item["name"]] = blob
    return header["meta"], sections


class StageCache:
    """The content-addressed store of one output directory (``root`` = ``DIR/cache``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._root = os.fspath(root)

    # -- paths ------------------------------------------------------------------------------
    # Plain string joins: a no-op run checks tens of thousands of entries and pathlib's
    # parsing would be most of its time.
    def path(self, stage: str, fp: str) -> str:
        return f"{self._root}/{stage}/{fp[:2]}/{fp}.bin"

    def failure_path(self, stage: str, fp: str) -> str:
        return f"{self._root}/failed/{stage}/{fp[:2]}/{fp}.json"

    # -- entries ----------------------------------------------------------------------------
    def has(self, stage: str, fp: str) -> bool:
        return os.path.isfile(self.path(stage, fp))

    def put(self, stage: str, fp: str, meta: Mapping[str, Any], sections: Mapping[str, bytes]) -> int:
        """Store an entry atomically (temp + rename); returns its size in bytes.

        Not fsynced: a killed process cannot tear a renamed file (the page cache outlives it),
        and after a power loss a torn entry fails its crc32 on read, is deleted and recomputed
        by the next run. Shards and the index, the published data, are fsynced."""
        data = encode_entry(meta, sections)
        atomic_write_bytes(self.path(stage, fp), data, fsync=False)
        return len(data)

    def get(self, stage: str, fp: str) -> tuple[dict, dict[str, bytes]]:
        """(meta, sections); a damaged entry is deleted (so the next run recomputes it) and
        raises ``CacheEntryError``."""
        path = self.path(stage, fp)
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            return decode_entry(data, path)
        except CacheEntryError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise

    def get_meta(self, stage: str, fp: str, *, probe_bytes: int = 4096) -> dict:
        """Only the JSON metadata of an entry (reads the header, not the payload)."""
        path = self.path(stage, fp)
        with open(path, "rb") as handle:
            data = handle.read(probe_bytes)
            if len(data) >= 12 and data[:8] == MAGIC:
                (length,) = struct.unpack("<I", data[8:12])
                if 12 + length > len(data):
                    data += handle.read(12 + length - len(data))
        header, _ = _parse_header(data, path)
        return header["meta"]

    # -- cached failures --------------------------------------------------------------------
    def put_failure(self, stage: str, fp: str, record: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.failure_path(stage, fp), json.dumps(dict(record)).encode(), fsync=False)

    def get_failure(self, stage: str, fp: str) -> dict | None:
        try:
            with open(self.failure_path(stage, fp)) as handle:
                return json.loads(handle.read())
        except (FileNotFoundError, ValueError):
            return None

    # -- maintenance ------------------------------------------------------------------------
    def garbage_collect(self, referenced: Mapping[str, Iterable[str] | Container[str]]) -> tuple[int, int]:
        """Delete entries (and cached failures) of ``stage`` whose fingerprint is not in
        ``referenced[stage]``; stages missing from ``referenced`` are left alone. A value may be
        any container (``fp in value``, e.g. a database lookup) or an iterable of fingerprints.
        Returns (files removed, bytes freed)."""
        removed = freed = 0
        for stage, fps in referenced.items():
            keep = fps if isinstance(fps, Container) and not isinstance(fps, Iterator) else set(fps)
            for base in (self.root / stage, self.root / "failed" / stage):
                if not base.is_dir():
                    continue
                for path in base.glob("*/*"):
                    fp = path.name.split(".", 1)[0]
                    if fp not in keep:
                        freed += path.stat().st_size
                        path.unlink()
                        removed += 1
        return removed, freed


from anaus_core.outputs import clean_stale_temps  # noqa: E402  (one implementation for every writing command)
