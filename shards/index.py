"""The per-sample index (``index.zarr``, zarr v3) and the manifest (``manifest.json``).

``index.zarr`` is a plain zarr v3 group (``zarr.open_group(out_dir / "index.zarr")``) with
one row per sample, in shard order then tar order:

========================  =========  ===========================================================
array                     dtype      meaning
========================  =========  ===========================================================
``key``                   string     sample key
``shard``                 int32      position of the shard in ``attrs["shards"]``
``offset``                int64      byte offset of the sample's first tar header in the shard
``size``                  int64      bytes of all the sample's members (headers + padding)
``mask_count``            int32      masks stored for the sample
``mask_areas``            int64      all mask areas (pixels), row after row (ragged, flat)
``mask_areas_start``      int64      (N + 1) row starts into ``mask_areas``
``source_hash``           string     sha256 of the source file (from the record)
========================  =========  ===========================================================

Attributes: ``format_version``, ``scales``, ``shards`` (file names), ``shard_sha256``,
``fingerprints`` (stage -> hex), ``sample_count``, ``index_id``.

``manifest.json``: ``format_version``, ``index_id``, ``created``, ``scales``,
``fingerprints``, ``sample_count`` and ``shards`` [{name, sha256, size, samples}].

Both are written under temporary names and renamed into place, and only after every shard
they name is final (checked: it exists under its ``*.tar`` name with the recorded size). The
manifest is renamed last and is the commit point: ``index_id`` (a hash of the content) ties
the two together, so a reader that catches them mid-update reports it instead of mixing them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from anaus_core.errors import UserInputError
from shards.sample import DEFAULT_SCALES, FORMAT_VERSION
from shards.writer import SampleEntry, SampleEntryTable, ShardInfo, _fsync_directory, atomic_replace, temporary_name

INDEX_NAME = "index.zarr"
MANIFEST_NAME = "manifest.json"
_CHUNK_ROWS = 1 << 16


def _entry_table(info: ShardInfo) -> SampleEntryTable:
    samples = info.samples
    return samples if isinstance(samples, SampleEntryTable) else SampleEntryTable.from_rows(samples)


def _index_id(shards: Sequence[ShardInfo], scales: Sequence[int], fingerprints: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"scales": list(scales), "fingerprints": dict(sorted(fingerprints.items()))}, sort_keys=True).encode())
    for info in shards:
        digest.update(f"{info.name}\0{info.sha256}\0{info.size}\0".encode())
        table = _entry_table(info)
        for key, offset, size in zip(table.keys.tolist(), table.offsets.tolist(), table.sizes.tolist()):
            digest.update(key + f"\0{offset}\0{size}\0".encode())
    return digest.hexdigest()


def _check_unique_keys(shard_infos: Sequence[ShardInfo]) -> None:
    """Keys must be unique across shards: one sort over the compact key columns (no per-key
    Python objects)."""
    tables = [_entry_table(info).keys for info in shard_infos]
    if not tables or not sum(len(t) for t in tables):
        return
    keys = np.concatenate(tables)
    order = np.argsort(keys, kind="stable")
    same = np.flatnonzero(keys[order[1:]] == keys[order[:-1]])
    if not len(same):
        return
    bounds = np.cumsum([len(t) for t in tables])
    first, second = (int(np.searchsorted(bounds, order[same[0] + d], side="right")) for d in (0, 1))
    key = keys[order[same[0]]].decode("utf-8")
    raise ValueError(f"duplicate key {key!r} in {shard_infos[first].name} and {shard_infos[second].name}")


def _check_final(out_dir: Path, info: ShardInfo) -> None:
    name = info.name
    if "/" in name or name.startswith(".") or not name.endswith(".tar"):
        raise ValueError(f"index may only name final shards (*.tar in {out_dir}), got {name!r}")
    path = out_dir / name
    if not path.is_file():
        raise ValueError(f"{path}: shard is not final (missing); refusing to index it")
    if path.stat().st_size != info.size:
        raise ValueError(f"{path}: {path.stat().st_size} bytes on disk, ShardInfo says {info.size}; refusing to index it")


def _column_pieces(shard_infos: Sequence[ShardInfo], name: str):
    """The per-shard pieces of one index column (compact numpy arrays)."""
    area_base = 0
    for number, info in enumerate(shard_infos):
        table = _entry_table(info)
        if name == "key":
            yield table.keys
        elif name == "source_hash":
            yield table.source_hashes
        elif name == "shard":
            yield np.full(len(table), number, np.int32)
        elif name == "offset":
            yield table.offsets
        elif name == "size":
            yield table.sizes
        elif name == "mask_count":
            yield table.mask_counts
        elif name == "mask_areas":
            yield table.mask_areas
        elif name == "mask_areas_start":
            yield table.area_starts[:-1] + area_base
            area_base += int(table.area_starts[-1])
        else:  # pragma: no cover - internal
            raise KeyError(name)
    if name == "mask_areas_start":
        yield np.array([area_base], np.int64)


_COLUMN_DTYPES = {"shard": np.int32, "offset": np.int64, "size": np.int64, "mask_count": np.int32, "mask_areas": np.int64, "mask_areas_start": np.int64}


def _write_column(group, name: str, shard_infos: Sequence[ShardInfo], length: int, text: bool) -> None:
    """Create column ``name`` and fill it chunk by chunk: only this column is ever held whole
    (compact bytes), and text is widened to numpy ``U`` one chunk at a time."""
    pieces = [np.asarray(p) if text else np.asarray(p, _COLUMN_DTYPES[name]) for p in _column_pieces(shard_infos, name)]
    values = np.concatenate(pieces) if pieces else np.zeros(0, "S1" if text else _COLUMN_DTYPES[name])
    del pieces
    assert len(values) == length, (name, len(values), length)
    chunk = max(1, min(_CHUNK_ROWS, length))
    dtype = str if text else values.dtype
    array = group.create_array(name, shape=(length,), dtype=dtype, chunks=(chunk,))
    for start in range(0, length, chunk):
        block = values[start : start + chunk]
        array[start : start + len(block)] = np.char.decode(block, "utf-8") if text else block


def write_index(
    out_dir: str | os.PathLike,
    shard_infos: Sequence[ShardInfo],
    *,
    scales: Sequence[int] = DEFAULT_SCALES,
    fingerprints: Mapping[str, str] | None = None,
) -> str:
    """Write ``index.zarr`` and ``manifest.json`` for ``shard_infos`` (in that order); return the index id.

    Every shard must already be final in ``out_dir``. Keys must be unique across shards.
    ``ShardInfo.samples`` may be a list of ``SampleEntry`` or a compact
    :class:`~shards.writer.SampleEntryTable` (what the precompute driver keeps); the columns
    are built from compact per-shard arrays and written one column and one chunk at a time,
    so no Python object per sample is created.
    """
    import zarr

    out_dir = Path(out_dir)
    fingerprints = {str(k): str(v) for k, v in (fingerprints or {}).items()}
    scales = [int(s) for s in scales]
    for info in shard_infos:
        _check_final(out_dir, info)
    _check_unique_keys(shard_infos)
    names = [info.name for info in shard_infos]
    if len(set(names)) != len(names):
        raise ValueError("a shard is named twice")

    count = sum(len(info.samples) for info in shard_infos)
    area_count = sum(int(_entry_table(info).area_starts[-1]) for info in shard_infos)
    index_id = _index_id(shard_infos, scales, fingerprints)

    final_index = out_dir / INDEX_NAME
    tmp_index = temporary_name(final_index)
    group = zarr.open_group(tmp_index, mode="w", zarr_format=3)
    lengths = {"mask_areas": area_count, "mask_areas_start": count + 1}
    for name in ("key", "shard", "offset", "size", "mask_count", "mask_areas", "mask_areas_start", "source_hash"):
        _write_column(group, name, shard_infos, lengths.get(name, count), name in ("key", "source_hash"))
    group.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "scales": scales,
            "shards": names,
            "shard_sha256": [info.sha256 for info in shard_infos],
            "fingerprints": fingerprints,
            "sample_count": count,
            "index_id": index_id,
        }
    )
    for path in sorted(tmp_index.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())

    # Swap the directory in: a directory cannot be replaced atomically, so the old one is moved
    # aside first. The manifest (replaced atomically, last) is the commit point; readers check
    # that the index they open carries the manifest's index_id.
    old_index = None
    if final_index.exists():
        old_index = temporary_name(final_index.with_name(INDEX_NAME + ".old"))
        os.replace(final_index, old_index)
    os.replace(tmp_index, final_index)
    _fsync_directory(out_dir)

    manifest = {
        "format_version": FORMAT_VERSION,
        "index_id": index_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "scales": scales,
        "fingerprints": fingerprints,
        "sample_count": count,
        "shards": [{"name": i.name, "sha256": i.sha256, "size": i.size, "samples": i.sample_count} for i in shard_infos],
    }
    final_manifest = out_dir / MANIFEST_NAME
    tmp_manifest = temporary_name(final_manifest)
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    atomic_replace(tmp_manifest, final_manifest)
    if old_index is not None:
        shutil.rmtree(old_index, ignore_errors=True)
    return index_id


@dataclass(frozen=True)
class ShardManifestEntry:
    name: str
    sha256: str
    size: int
    samples: int


class ShardIndex:
    """The index of a shard directory, loaded into memory (columnar numpy arrays + a key dict).

    Attributes:
        out_dir: the shard directory.
        shards: manifest entries, in shard-number order.
        keys: list of N keys; ``shard``, ``offset``, ``size``, ``mask_count`` (N,) arrays;
            ``mask_areas`` flat with ``mask_areas_start`` (N + 1); ``source_hash`` list.
        scales, fingerprints, format_version, index_id, created.
    """

    def __init__(self, out_dir: Path, manifest: Mapping[str, Any], columns: Mapping[str, Any], attrs: Mapping[str, Any]):
        self.out_dir = Path(out_dir)
        self.manifest = dict(manifest)
        self.shards = [ShardManifestEntry(str(s["name"]), str(s["sha256"]), int(s["size"]), int(s["samples"])) for s in manifest["shards"]]
        self.scales = tuple(int(s) for s in attrs.get("scales", manifest.get("scales", [])))
        self.fingerprints = dict(attrs.get("fingerprints", manifest.get("fingerprints", {})))
        self.format_version = int(attrs.get("format_version", manifest.get("format_version", 0)))
        self.index_id = str(attrs.get("index_id", ""))
        self.created = str(manifest.get("created", ""))
        self.keys: list[str] = list(columns["key"])
        self.shard = np.asarray(columns["shard"], np.int64)
        self.offset = np.asarray(columns["offset"], np.int64)
        self.size = np.asarray(columns["size"], np.int64)
        self.mask_count = np.asarray(columns["mask_count"], np.int64)
        self.mask_areas = np.asarray(columns["mask_areas"], np.int64)
        self.mask_areas_start = np.asarray(columns["mask_areas_start"], np.int64)
        self.source_hash: list[str] = list(columns["source_hash"])
        self._position = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def position(self, key: str) -> int:
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the index of {self.out_dir}") from None

    def shard_path(self, shard_number: int) -> Path:
        return self.out_dir / self.shards[shard_number].name

    def locate(self, key: str) -> tuple[Path, int, int]:
        """key -> (shard path, byte offset, byte size)."""
        row = self.position(key)
        return self.shard_path(int(self.shard[row])), int(self.offset[row]), int(self.size[row])

    def areas_of(self, row: int) -> np.ndarray:
        return self.mask_areas[self.mask_areas_start[row] : self.mask_areas_start[row + 1]]

    def rows_of_shard(self, shard_number: int) -> np.ndarray:
        return np.flatnonzero(self.shard == shard_number)

    def shard_infos(self) -> list[ShardInfo]:
        """The ShardInfo of every indexed shard (to re-index after rewriting some shards)."""
        infos = []
        for number, shard in enumerate(self.shards):
            samples = [
                SampleEntry(
                    key=self.keys[row],
                    offset=int(self.offset[row]),
                    size=int(self.size[row]),
                    mask_count=int(self.mask_count[row]),
                    mask_areas=tuple(int(a) for a in self.areas_of(row)),
                    source_hash=self.source_hash[row],
                )
                for row in self.rows_of_shard(number)
            ]
            infos.append(ShardInfo(name=shard.name, sha256=shard.sha256, size=shard.size, samples=samples))
        return infos


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserInputError(f"{path}: no manifest (not a shard directory, or its writer did not finish)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("no 'shards' list")
        for shard in manifest["shards"]:
            for field_name in ("name", "sha256", "size", "samples"):
                if field_name not in shard:
                    raise ValueError(f"a shard entry lacks {field_name!r}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserInputError(f"{path}: unreadable manifest ({exc})") from None
    return manifest


def read_index(out_dir: str | os.PathLike) -> ShardIndex:
    """Load ``index.zarr`` + ``manifest.json``; UserInputError (one line) if missing or inconsistent."""
    import zarr

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: not a directory")
    manifest = read_manifest(out_dir)
    index_path = out_dir / INDEX_NAME
    if not index_path.is_dir():
        raise UserInputError(f"{index_path}: missing index")
    try:
        group = zarr.open_group(index_path, mode="r")
        attrs = dict(group.attrs)
        columns = {name: group[name][:] for name in ("key", "shard", "offset", "size", "mask_count", "mask_areas", "mask_areas_start", "source_hash")}
        columns["key"] = columns["key"].tolist()
        columns["source_hash"] = columns["source_hash"].tolist()
    except Exception as exc:  # zarr raises many types for damaged stores
        raise UserInputError(f"{index_path}: unreadable index ({type(exc).__name__}: {exc})") from None
    if attrs.get("index_id") != manifest.get("index_id"):
        raise UserInputError(f"{index_path}: index does not match {MANIFEST_NAME} (index_id differs; an update was interrupted or is in progress)")
    if [s["name"] for s in manifest["shards"]] != list(attrs.get("shards", [])):
        raise UserInputError(f"{index_path}: shard list differs from {MANIFEST_NAME}")
    count = len(columns["key"])
    if not all(len(columns[name]) == count for name in ("shard", "offset", "size", "mask_count", "source_hash")) or len(columns["mask_areas_start"]) != count + 1:
        raise UserInputError(f"{index_path}: index arrays have different lengths")
    return ShardIndex(out_dir, manifest, columns, attrs)


__all__ = ["INDEX_NAME", "MANIFEST_NAME", "ShardIndex", "ShardManifestEntry", "read_index", "read_manifest", "write_index"]
