"""Compact, columnar per-source and per-sample tables for the precompute driver.

The driver of a run over N samples must remember, per sample, its key, where it came from and
its three stage fingerprints until the shards are cut. Held as Python objects (a dataclass with
hex strings per sample) that is ~1 KiB/sample; here it is ~350 bytes (with typical paths): fingerprints as raw
32-byte digests in ``bytearray`` columns (read back as ``np.dtype("S32")``), numbers in
``array.array`` columns and strings (keys, paths) as one UTF-8 byte buffer plus offsets.
``SampleRef``/``SourceTask`` objects are only materialised for the batch or shard at hand.
"""

from __future__ import annotations

from array import array
from typing import Iterable, Iterator

import numpy as np

from pipeline.stages import SampleRef, SourceTask

NO_FRAME = -1


class StringColumn:
    """Append-only list of strings stored as one UTF-8 buffer + int64 end offsets."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, text: str) -> None:
        self._data += text.encode("utf-8")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, index: int) -> bytes:
        start = self._ends[index - 1] if index else 0
        return bytes(self._data[start : self._ends[index]])

    def __getitem__(self, index: int) -> str:
        return self.raw(index).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for index in range(len(self)):
            yield self[index]

    def as_bytes_array(self) -> np.ndarray:
        """The strings as a fixed-width ``S`` array (sorts like the strings for ASCII keys)."""
        if not len(self):
            return np.zeros(0, "S1")
        return np.array([self.raw(i) for i in range(len(self))], dtype="S")

    @property
    def nbytes(self) -> int:
        return len(self._data) + self._ends.itemsize * len(self._ends)


class DigestColumn:
    """Append-only column of sha256 digests, given and returned as hex, stored as 32 bytes."""

    def __init__(self) -> None:
        self._data = bytearray()

    def append(self, hex_digest: str) -> None:
        self._data += bytes.fromhex(hex_digest)

    def __len__(self) -> int:
        return len(self._data) // 32

    def __getitem__(self, index: int) -> str:
        return self._data[32 * index : 32 * index + 32].hex()

    def array(self) -> np.ndarray:
        return np.frombuffer(bytes(self._data), dtype="S32") if self._data else np.zeros(0, "S32")

    def hex_set(self, rows: Iterable[int] | None = None) -> set[str]:
        rows = range(len(self)) if rows is None else rows
        return {self[i] for i in rows}

    @property
    def nbytes(self) -> int:
        return len(self._data)


class SourceTable:
    """One row per hashed source file: absolute path, relative path, sha256, ingest fingerprint."""

    def __init__(self) -> None:
        self.path = StringColumn()
        self.relpath = StringColumn()
        self.source_sha256 = DigestColumn()
        self.ingest_fp = DigestColumn()

    def append(self, task: SourceTask) -> int:
        self.path.append(task.path)
        self.relpath.append(task.relpath)
        self.source_sha256.append(task.source_sha256)
        self.ingest_fp.append(task.ingest_fp)
        return len(self.path) - 1

    def __len__(self) -> int:
        return len(self.path)

    def task(self, row: int) -> SourceTask:
        return SourceTask(path=self.path[row], relpath=self.relpath[row], source_sha256=self.source_sha256[row], ingest_fp=self.ingest_fp[row])

    @property
    def nbytes(self) -> int:
        return self.path.nbytes + self.relpath.nbytes + self.source_sha256.nbytes + self.ingest_fp.nbytes


class SampleTable:
    """One row per sample ready to pack (all three cache entries exist)."""

    def __init__(self) -> None:
        self.key = StringColumn()
        self.relpath = StringColumn()
        self.source_path = StringColumn()
        self.frame = array("q")
        self.index_in_source = array("i")
        self.original_size = array("i")  # h, w interleaved
        self.source_sha256 = DigestColumn()
        self.ingest_fp = DigestColumn()
        self.mask_fp = DigestColumn()
        self.pyramid_fp = DigestColumn()

    def __len__(self) -> int:
        return len(self.frame)

    def append(self, ref: SampleRef) -> None:
        self.key.append(ref.key)
        self.relpath.append(ref.relpath)
        self.source_path.append(ref.source_path or ref.relpath)
        self.frame.append(NO_FRAME if ref.frame is None else int(ref.frame))
        self.index_in_source.append(int(ref.index_in_source))
        self.original_size.extend((int(ref.original_size[0]), int(ref.original_size[1])))
        self.source_sha256.append(ref.source_sha256)
        self.ingest_fp.append(ref.ingest_fp)
        self.mask_fp.append(ref.mask_fp)
        self.pyramid_fp.append(ref.pyramid_fp)

    def extend(self, refs: Iterable[SampleRef]) -> None:
        for ref in refs:
            self.append(ref)

    def ref(self, row: int) -> SampleRef:
        frame = self.frame[row]
        return SampleRef(
            key=self.key[row], relpath=self.relpath[row], frame=None if frame == NO_FRAME else int(frame),
            index_in_source=int(self.index_in_source[row]), source_sha256=self.source_sha256[row], ingest_fp=self.ingest_fp[row],
            mask_fp=self.mask_fp[row], pyramid_fp=self.pyramid_fp[row],
            original_size=(int(self.original_size[2 * row]), int(self.original_size[2 * row + 1])), source_path=self.source_path[row],
        )

    def key_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows sorted by key, the sorted keys as an ``S`` array); stable, so equal keys keep
        their insertion order."""
        keys = self.key.as_bytes_array()
        order = np.argsort(keys, kind="stable")
        return order, keys[order]

    @property
    def nbytes(self) -> int:
        columns = (self.key, self.relpath, self.source_path, self.source_sha256, self.ingest_fp, self.mask_fp, self.pyramid_fp)
        arrays = (self.frame, self.index_in_source, self.original_size)
        return sum(c.nbytes for c in columns) + sum(a.itemsize * len(a) for a in arrays)
