"""Writing shards: one tar per call, finalised atomically, with a per-sample byte map.

A shard is written under a hidden temporary name (``.<name>.tmp-<pid>-<random>``, which no
``*.tar`` glob matches), flushed, fsynced, renamed to its final ``*.tar`` name and the
directory is fsynced. So a killed writer never leaves a ``.tar`` that is partial, and the
index (written afterwards by :func:`shards.index.write_index`) can only name final shards.

Tars are deterministic: fixed member order (png, masks.bin, pyramid.bin, [region.png,] json), mtime 0,
uid/gid 0, empty user/group names, mode 0644 - the same samples give the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from shards.sample import (
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_PNG_COMPRESS_LEVEL,
    DEFAULT_PNG_FILTER,
    DEFAULT_SCALES,
    FIELDS,
    OPTIONAL_FIELDS,
    STORAGE_KEY,
    ShardSample,
    check_key,
    encode_sample,
)


@dataclass(frozen=True)
class SampleEntry:
    """Where one sample lives inside its shard and what the index stores about it.

    ``offset`` is the byte position of the sample's first tar header; ``size`` the bytes of
    all its members (headers and padding included), so ``f.seek(offset); f.read(size)`` is a
    small self-contained tar stream holding exactly that sample.
    """

    key: str
    offset: int
    size: int
    mask_count: int
    mask_areas: tuple[int, ...]
    source_hash: str
    group: str = ""  # the record's group id ("" when the record has none)


@dataclass
class ShardInfo:
    """A final shard: file name (relative to the output directory), sha256, size, samples."""

    name: str
    sha256: str
    size: int
    samples: list[SampleEntry] = field(default_factory=list)

    @property
    def sample_count(self) -> int:
        return len(self.samples)


class SampleEntryTable(Sequence[SampleEntry]):
    """The sample entries of one shard as numpy columns (~130 bytes per sample instead of a
    ~0.5 KiB ``SampleEntry`` object with its strings and tuple); a read-only sequence of
    ``SampleEntry`` (materialised on access), so it can stand in for ``ShardInfo.samples``.

    Columns: ``keys`` and ``source_hashes`` UTF-8 ``S`` arrays; ``offsets``, ``sizes``
    int64; ``mask_counts`` int32; ``mask_areas`` flat int64 with ``area_starts`` (n + 1).
    :func:`shards.index.write_index` reads the columns directly.
    """

    def __init__(self, *, keys, offsets, sizes, mask_counts, mask_areas, area_starts, source_hashes, groups=None) -> None:
        import numpy as np

        self.keys = np.asarray(keys)
        self.offsets = np.asarray(offsets, np.int64)
        self.sizes = np.asarray(sizes, np.int64)
        self.mask_counts = np.asarray(mask_counts, np.int32)
        self.mask_areas = np.asarray(mask_areas, np.int64)
        self.area_starts = np.asarray(area_starts, np.int64)
        self.source_hashes = np.asarray(source_hashes)
        self.groups = np.asarray(groups) if groups is not None else np.full(len(self.offsets), b"", dtype="S1")

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> "SampleEntryTable":
        """From ``(key, offset, size, mask_count, mask_areas, source_hash[, group])`` rows
        (SampleEntry objects or the lists of a pack-cache sidecar)."""
        import numpy as np

        keys, offsets, sizes, counts, areas, starts, hashes, groups = [], [], [], [], [], [0], [], []
        for row in rows:
            if isinstance(row, SampleEntry):
                row = (row.key, row.offset, row.size, row.mask_count, row.mask_areas, row.source_hash, row.group)
            key, offset, size, count, row_areas, source_hash, *rest = row
            groups.append(str(rest[0] if rest else "").encode("utf-8"))
            keys.append(str(key).encode("utf-8"))
            offsets.append(int(offset))
            sizes.append(int(size))
            counts.append(int(count))
            areas.extend(int(a) for a in row_areas)
            starts.append(len(areas))
            hashes.append(str(source_hash).encode("utf-8"))
        return cls(
            keys=np.array(keys, dtype="S") if keys else np.zeros(0, "S1"),
            offsets=offsets, sizes=sizes, mask_counts=counts,
            mask_areas=np.array(areas, np.int64), area_starts=starts,
            source_hashes=np.array(hashes, dtype="S") if hashes else np.zeros(0, "S1"),
            groups=np.array(groups, dtype="S") if groups else np.zeros(0, "S1"),
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def _entry(self, row: int) -> SampleEntry:
        return SampleEntry(
            key=self.keys[row].decode("utf-8"),
            offset=int(self.offsets[row]),
            size=int(self.sizes[row]),
            mask_count=int(self.mask_counts[row]),
            mask_areas=tuple(int(a) for a in self.mask_areas[self.area_starts[row] : self.area_starts[row + 1]]),
            source_hash=self.source_hashes[row].decode("utf-8"),
            group=self.groups[row].decode("utf-8"),
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._entry(row) for row in range(len(self))[index]]
        row = range(len(self))[index]  # negative indexes and IndexError as for a list
        return self._entry(row)

    def __iter__(self):
        for row in range(len(self)):
            yield self._entry(row)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (SampleEntryTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SampleEntryTable({len(self)} samples)"


def compact_shard_info(info: ShardInfo) -> ShardInfo:
    """``info`` with its samples held as a :class:`SampleEntryTable` (same content)."""
    if isinstance(info.samples, SampleEntryTable):
        return info
    return ShardInfo(name=info.name, sha256=info.sha256, size=info.size, samples=SampleEntryTable.from_rows(info.samples))


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temporary_name(final: Path) -> Path:
    """Hidden temporary sibling of ``final``; never matches ``*.tar`` or ``*.json``."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it onto ``final`` and fsync the directory."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_directory(final.parent)


class _HashingFile:
    """Write-only file wrapper that hashes and counts what tarfile writes (no read-back)."""

    def __init__(self, handle):
        self._handle = handle
        self._hash = hashlib.sha256()
        self._position = 0

    def write(self, data) -> int:
        self._handle.write(data)
        self._hash.update(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _entry_from_encoded(encoded: Mapping[str, Any], offset: int, size: int) -> SampleEntry:
    record = json.loads(encoded["json"])
    masks = record.get("masks", [])
    return SampleEntry(
        key=encoded["__key__"],
        offset=offset,
        size=size,
        mask_count=len(masks),
        mask_areas=tuple(int(m["area"]) for m in masks),
        source_hash=str(record.get("source_sha256", "")),
        group=str((record.get("group") or {}).get("id", "")) if isinstance(record.get("group"), dict) else "",
    )


class ShardFileWriter:
    """Append samples to one shard under a temporary name; :meth:`finish` makes it final.

    Lower level than :class:`ShardWriter`; the precompute pipeline uses it (through
    :func:`write_shard`) to rewrite single shards. Use as a context manager: leaving the block
    with an exception removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        codec: str = "zstd",
        level: int = DEFAULT_COMPRESSION_LEVEL,
        png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
        png_filter: str = DEFAULT_PNG_FILTER,
        check_pyramid: bool | None = None,
    ):
        self.path = Path(path)
        self.png_compress_level = png_compress_level
        self.png_filter = png_filter
        self.check_pyramid = check_pyramid
        if self.path.suffix != ".tar":
            raise ValueError(f"{self.path}: shard names must end in .tar")
        self.codec = codec
        self.level = level
        self.tmp_path = temporary_name(self.path)
        self._handle = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._handle)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self._entries: list[SampleEntry] = []
        self._keys: set[str] = set()
        self._closed = False

    @property
    def bytes_written(self) -> int:
        return self._hashing.tell()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, sample: ShardSample | Mapping[str, Any]) -> SampleEntry:
        """Add a ShardSample, or a dict already produced by :func:`encode_sample`."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        if isinstance(sample, ShardSample):
            encoded = encode_sample(
                sample, codec=self.codec, level=self.level, png_compress_level=self.png_compress_level, png_filter=self.png_filter, check_pyramid=self.check_pyramid
            )
        else:
            encoded = sample
        key = check_key(encoded["__key__"])
        if key in self._keys:
            raise ValueError(f"{self.path.name}: duplicate key {key!r}")
        missing = [name for name in FIELDS if name not in encoded]
        if missing:
            raise ValueError(f"{key}: encoded sample lacks {missing}")
        start = self._tar.offset
        # the record last: a reader that meets it has every other member of the sample
        names = [name for name in FIELDS if name != "json"] + [name for name in OPTIONAL_FIELDS if name in encoded] + ["json"]
        for name in names:
            data = encoded[name]
            self._tar.addfile(_tar_info(f"{key}.{name}", len(data)), io.BytesIO(data))
        entry = _entry_from_encoded(encoded, start, self._tar.offset - start)
        self._keys.add(key)
        self._entries.append(entry)
        return entry

    def finish(self) -> ShardInfo:
        """Close the tar, fsync, rename to the final name, fsync the directory."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        self._tar.close()
        self._hashing.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._closed = True
        size = self._hashing.tell()
        os.replace(self.tmp_path, self.path)
        _fsync_directory(self.path.parent)
        return ShardInfo(name=self.path.name, sha256=self._hashing.hexdigest(), size=size, samples=list(self._entries))

    def abort(self) -> None:
        """Drop the temporary file; the final name is never touched."""
        if not self._closed:
            self._closed = True
            try:
                self._handle.close()
            finally:
                self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(
    path: str | os.PathLike,
    samples: Iterable[ShardSample | Mapping[str, Any]],
    *,
    codec: str = "zstd",
    level: int = DEFAULT_COMPRESSION_LEVEL,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
    png_filter: str = DEFAULT_PNG_FILTER,
    check_pyramid: bool | None = None,
) -> ShardInfo:
    """Write ``samples`` to the shard ``path`` (``*.tar``) atomically and return its ShardInfo.

    An existing shard of that name is replaced only once the new one is complete.
    ``check_pyramid`` is passed to :func:`shards.sample.encode_sample` (None: recompute the
    pyramid to check it unless the sample was made by ``ShardSample.build``).
    """
    writer = ShardFileWriter(path, codec=codec, level=level, png_compress_level=png_compress_level, png_filter=png_filter, check_pyramid=check_pyramid)
    try:
        for sample in samples:
            writer.add(sample)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


class ShardWriter:
    """Write samples into numbered shards and the index + manifest on close.

    >>> with ShardWriter(out_dir, samples_per_shard=1000, fingerprints={"mask": "ab12"}) as w:
    ...     for sample in samples:
    ...         w.write(sample)

    Shards roll at ``samples_per_shard`` samples or once ``max_shard_bytes`` is reached.
    If the ``with`` block raises, the shard in progress is discarded and no index is written
    (shards finished before stay final and can be re-indexed).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int = 1000,
        max_shard_bytes: int | None = 512 * 1024 * 1024,
        scales: Sequence[int] = DEFAULT_SCALES,
        fingerprints: Mapping[str, str] | None = None,
        name_pattern: str = "shard-{:06d}.tar",
        start_index: int = 0,
        codec: str = "zstd",
        level: int = DEFAULT_COMPRESSION_LEVEL,
        png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
        png_filter: str = DEFAULT_PNG_FILTER,
        check_pyramid: bool | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.scales = tuple(int(s) for s in scales)
        self.fingerprints = dict(fingerprints or {})
        self.name_pattern = name_pattern
        self.next_index = start_index
        self.codec = codec
        self.level = level
        self.png_compress_level = png_compress_level
        self.png_filter = png_filter
        self.check_pyramid = check_pyramid
        self.shard_infos: list[ShardInfo] = []
        self._current: ShardFileWriter | None = None
        self._keys: set[str] = set()
        self._closed = False

    def write(self, sample: ShardSample) -> SampleEntry:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if tuple(sample.mask_pyramid) != self.scales:
            raise ValueError(f"{sample.key}: pyramid scales {tuple(sample.mask_pyramid)} != writer scales {self.scales}")
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r}")
        if self._current is None:
            self._current = ShardFileWriter(
                self.out_dir / self.name_pattern.format(self.next_index), codec=self.codec,
                level=self.level,
                png_compress_level=self.png_compress_level,
                png_filter=self.png_filter,
                check_pyramid=self.check_pyramid,
            )
            self.next_index += 1
        entry = self._current.add(sample)
        self._keys.add(sample.key)
        if len(self._current) >= self.samples_per_shard or (
            self.max_shard_bytes is not None and self._current.bytes_written >= self.max_shard_bytes
        ):
            self._finish_current()
        return entry

    def _finish_current(self) -> None:
        if self._current is not None:
            self.shard_infos.append(self._current.finish())
            self._current = None

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and write index.zarr + manifest.json."""
        from shards.index import write_index

        if not self._closed:
            self._finish_current()
            write_index(self.out_dir, self.shard_infos, scales=self.scales, fingerprints=self.fingerprints)
            self._closed = True
        return self.shard_infos

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


__all__ = ["SampleEntry", "SampleEntryTable", "ShardInfo", "compact_shard_info", "ShardFileWriter", "ShardWriter", "write_shard", "atomic_replace", "temporary_name", "STORAGE_KEY"]
