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
``group``                 string     the record's group id (patient, study, clip, groups.csv
                                     entry; ``docs/shard-format.md``); absent in older stores
``anatomy``               int16      optional (``precompute-masks --anatomy``): category code
========================  =========  ===========================================================

Attributes: ``format_version``, ``scales``, ``shards`` (file names), ``shard_sha256``,
``fingerprints`` (stage -> hex), ``sample_count``, ``index_id`` (+ ``anatomy_categories``).

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anaus_core.errors import UserInputError
from shards.sample import DEFAULT_SCALES, FORMAT_VERSION
from shards.writer import SampleEntry, SampleEntryTable, ShardInfo, _fsync_directory, atomic_replace, temporary_name

INDEX_NAME = "index.zarr"
MANIFEST_NAME = "manifest.json"
# Rows per chunk of every index column. Small enough that writing (one chunk per column in
# memory) costs the same at 10k or 10M samples; large enough for a few hundred chunk files per
# column at a million samples.
_CHUNK_ROWS = 1 << 13


def _entry_table(info) -> SampleEntryTable:
    """The sample entries of ``info``: a ``ShardInfo`` (entries held) or a :class:`ShardSummary`
    (entries loaded on each call and not kept)."""
    load = getattr(info, "load_entries", None)
    samples = load() if load is not None else info.samples
    return samples if isinstance(samples, SampleEntryTable) else SampleEntryTable.from_rows(samples)


@dataclass(frozen=True)
class ShardSummary:
    """A final shard for :func:`write_index` without its per-sample entries in memory:
    ``load_entries()`` returns them (a ``SampleEntryTable`` or ``SampleEntry`` rows) when the
    index is written, one shard at a time, so writing the index of N samples holds only a
    shard's entries and one chunk per column. ``load_entries`` must be picklable only if the
    summary is sent to another process."""

    name: str
    sha256: str
    size: int
    sample_count: int
    load_entries: Callable[[], Any]


def _index_id(shards: Sequence[ShardInfo], scales: Sequence[int], fingerprints: Mapping[str, str]) -> str:
    return _first_pass(shards, scales, fingerprints)[0]


def _first_pass(shards, scales: Sequence[int], fingerprints: Mapping[str, str]) -> tuple[str, int, bool]:
    """(index id, total mask areas, keys strictly increasing over all shards) in one pass."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"scales": list(scales), "fingerprints": dict(sorted(fingerprints.items()))}, sort_keys=True).encode())
    area_count = 0
    increasing = True
    last_key: bytes | None = None
    for info in shards:
        digest.update(f"{info.name}\0{info.sha256}\0{info.size}\0".encode())
        table = _entry_table(info)
        for key, offset, size in zip(table.keys.tolist(), table.offsets.tolist(), table.sizes.tolist()):
            digest.update(key + f"\0{offset}\0{size}\0".encode())
        area_count += int(table.area_starts[-1])
        keys = table.keys
        if increasing and len(keys):
            # Sorted, distinct keys (what the precompute job writes) are unique without a global
            # sort; anything else falls back to _check_unique_keys.
            increasing = bool((keys[1:] > keys[:-1]).all()) and (last_key is None or keys[0] > last_key)
            last_key = keys[-1]
    return digest.hexdigest(), area_count, increasing


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


_COLUMNS = ("key", "shard", "offset", "size", "mask_count", "mask_areas", "mask_areas_start", "source_hash", "group")
_TEXT_COLUMNS = ("key", "source_hash", "group")
_COLUMN_DTYPES = {"shard": np.int32, "offset": np.int64, "size": np.int64, "mask_count": np.int32, "mask_areas": np.int64, "mask_areas_start": np.int64,
                 "anatomy": np.int16}  # anatomy: optional (precompute-masks --anatomy)


def _shard_pieces(number: int, table: SampleEntryTable, area_base: int) -> dict[str, np.ndarray]:
    """One shard's piece of every index column."""
    return {
        "key": table.keys,
        "shard": np.full(len(table), number, np.int32),
        "offset": table.offsets,
        "size": table.sizes,
        "mask_count": table.mask_counts,
        "mask_areas": table.mask_areas,
        "mask_areas_start": table.area_starts[:-1] + area_base,
        "source_hash": table.source_hashes,
        "group": table.groups,
    }


class _ColumnWriter:
    """Fills one index column chunk by chunk as shard pieces arrive: holds at most one chunk
    (plus the piece at hand), and text is widened to numpy ``U`` one chunk at a time."""

    def __init__(self, group, name: str, length: int) -> None:
        self.text = name in _TEXT_COLUMNS
        self.name, self.length = name, length
        self.chunk = max(1, min(_CHUNK_ROWS, length))
        self.array = group.create_array(name, shape=(length,), dtype=str if self.text else _COLUMN_DTYPES[name], chunks=(self.chunk,))
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.written = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values) if self.text else np.asarray(values, _COLUMN_DTYPES[self.name])
        if not len(values):
            return
        self.pending.append(values)
        self.pending_rows += len(values)
        if self.pending_rows >= self.chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        values = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        whole = len(values) if final else len(values) - len(values) % self.chunk
        for start in range(0, whole, self.chunk):
            block = values[start : min(start + self.chunk, whole)]
            self.array[self.written : self.written + len(block)] = np.char.decode(block, "utf-8") if self.text else block
            self.written += len(block)
        rest = values[whole:]
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)

    def finish(self) -> None:
        self._flush(final=True)
        assert self.written == self.length, (self.name, self.written, self.length)


def write_index(
    out_dir: str | os.PathLike,
    shard_infos: Sequence[ShardInfo | ShardSummary],
    *,
    scales: Sequence[int] = DEFAULT_SCALES,
    fingerprints: Mapping[str, str] | None = None,
    anatomy: tuple[Sequence[str], np.ndarray] | None = None,
) -> str:
    """Write ``index.zarr`` and ``manifest.json`` for ``shard_infos`` (in that order); return the index id.

    Every shard must already be final in ``out_dir``. Keys must be unique across shards.
    Each item is a ``ShardInfo`` (``samples``: ``SampleEntry`` rows or a compact
    :class:`~shards.writer.SampleEntryTable`) or a :class:`ShardSummary` whose entries are
    loaded when needed (what the precompute driver passes). The index is written in two passes
    over the shards (id, sizes and key order; then every column, one chunk at a time), so only
    one shard's entries and one chunk per column are in memory at once. Keys that arrive in
    strictly increasing order are unique by construction; otherwise one sort checks them.

    ``anatomy``: (category vocabulary, int16 code per sample in index order), from
    ``precompute-masks --anatomy`` (``pipeline.anatomy``): written as the ``anatomy`` column,
    and the manifest gains ``anatomy`` {``categories``, ``counts``}.
    """
    import zarr

    out_dir = Path(out_dir)
    fingerprints = {str(k): str(v) for k, v in (fingerprints or {}).items()}
    scales = [int(s) for s in scales]
    for info in shard_infos:
        _check_final(out_dir, info)
    count = sum(int(info.sample_count) for info in shard_infos)
    index_id, area_count, increasing = _first_pass(shard_infos, scales, fingerprints)
    if not increasing:
        _check_unique_keys(shard_infos)
    names = [info.name for info in shard_infos]
    if len(set(names)) != len(names):
        raise ValueError("a shard is named twice")

    final_index = out_dir / INDEX_NAME
    tmp_index = temporary_name(final_index)
    group = zarr.open_group(tmp_index, mode="w", zarr_format=3)
    lengths = {"mask_areas": area_count, "mask_areas_start": count + 1}
    writers = {name: _ColumnWriter(group, name, lengths.get(name, count)) for name in _COLUMNS}
    area_base = 0
    for number, info in enumerate(shard_infos):
        table = _entry_table(info)
        if len(table) != info.sample_count:
            raise ValueError(f"{info.name}: {len(table)} entries, expected {info.sample_count}")
        for name, piece in _shard_pieces(number, table, area_base).items():
            writers[name].add(piece)
        area_base += int(table.area_starts[-1])
        del table
    writers["mask_areas_start"].add(np.array([area_base], np.int64))
    if anatomy is not None:
        anatomy_writer = _ColumnWriter(group, "anatomy", count)
        anatomy_writer.add(np.asarray(anatomy[1], np.int16))
        writers["anatomy"] = anatomy_writer
    for writer in writers.values():
        writer.finish()
    del writers
    group.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "scales": scales,
            "shards": names,
            "shard_sha256": [info.sha256 for info in shard_infos],
            "fingerprints": fingerprints,
            "sample_count": count,
            "index_id": index_id,
            **({"anatomy_categories": list(anatomy[0])} if anatomy is not None else {}),
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
    if anatomy is not None:
        counts = np.bincount(np.asarray(anatomy[1], np.int64), minlength=len(anatomy[0]))
        manifest["anatomy"] = {"categories": list(anatomy[0]), "counts": {n: int(c) for n, c in zip(anatomy[0], counts)}}
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
        # ``precompute-masks --anatomy``: int16 codes into ``anatomy_categories`` (None without)
        self.anatomy_categories: list[str] | None = list(attrs["anatomy_categories"]) if "anatomy_categories" in attrs else None
        self.anatomy = np.asarray(columns["anatomy"], np.int64) if columns.get("anatomy") is not None else None
        self.group: list[str] = list(columns.get("group") or [""] * len(self.keys))
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
                    group=self.group[row],
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
        columns["anatomy"] = group["anatomy"][:] if "anatomy_categories" in attrs else None
        if "group" in group:  # stores written before groups have no such column
            columns["group"] = group["group"][:].tolist()
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
