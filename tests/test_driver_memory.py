"""Compact driver structures (shard entries, stat cache, source list) give the same results."""

from __future__ import annotations

import json
import os

import numpy as np

from pipeline.fingerprint import StatCache, file_sha256
from pipeline.ingest import discover_source_list, discover_sources
from shards.index import read_index, write_index
from shards.writer import SampleEntry, SampleEntryTable, ShardInfo, compact_shard_info


def _infos(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    infos, number = [], 0
    for shard, size in enumerate(sizes):
        name = f"s{shard}.tar"
        (tmp_path / name).write_bytes(b"x" * (10 + shard))
        entries = []
        for _ in range(size):
            count = int(rng.integers(0, 4))
            digest = bytes(rng.integers(0, 256, 31, dtype=np.uint8).tolist()) + b"\0"  # trailing NUL
            entries.append(SampleEntry(f"k/{number:05d}", int(rng.integers(0, 10**9)), int(rng.integers(1, 10**6)), count, tuple(int(a) for a in rng.integers(0, 10**5, count)), digest.hex()))
            number += 1
        infos.append(ShardInfo(name, "ab" * 32, 10 + shard, entries))
    return infos


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_compact_entries_write_the_same_index(tmp_path):
    infos = _infos(tmp_path, [3, 0, 5])
    first = write_index(tmp_path, infos, scales=(7,), fingerprints={"a": "b"})
    listed = _tree(tmp_path / "index.zarr")
    compact = [compact_shard_info(info) for info in infos]
    assert all(isinstance(info.samples, SampleEntryTable) for info in compact)
    assert [list(c.samples) for c in compact] == [i.samples for i in infos]
    assert write_index(tmp_path, compact, scales=(7,), fingerprints={"a": "b"}) == first
    assert _tree(tmp_path / "index.zarr") == listed
    assert read_index(tmp_path).shard_infos() == infos


def test_compact_entries_reject_duplicate_keys(tmp_path):
    infos = _infos(tmp_path, [2, 2])
    infos[1].samples[1] = infos[0].samples[0]
    try:
        write_index(tmp_path, [compact_shard_info(i) for i in infos])
    except ValueError as exc:
        assert "k/00000" in str(exc) and "s0.tar" in str(exc) and "s1.tar" in str(exc)
    else:
        raise AssertionError("duplicate key accepted")


def test_stat_cache_round_trip_and_keep(tmp_path):
    old = 1_600_000_000_000_000_000
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes([i]) * (i + 1))
        os.utime(path, ns=(old, old))
        files.append(path)
    cache = StatCache(tmp_path / "stat.json")
    assert [cache.sha256(f) for f in files] == [file_sha256(f) for f in files]
    cache.save(keep=[str(f) for f in files[:4]])
    entries = json.loads((tmp_path / "stat.json").read_text())["entries"]
    assert sorted(entries) == sorted(str(f) for f in files[:4])
    again = StatCache(tmp_path / "stat.json")
    assert [again.sha256(f) for f in files[:4]] == [file_sha256(f) for f in files[:4]]
    assert again.hashed == 0 and again.reused == 4


def test_source_list_matches_discover_sources(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.png", "b.png", "a/y.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "list.txt").write_text(f"b.png\n{outside}\na/x.png\nb.png\n")
    for corpus in (tmp_path, tmp_path / "list.txt"):
        listed = discover_sources(corpus)
        compact = discover_source_list(corpus)
        assert list(compact) == listed
        assert list(discover_source_list(corpus).drain()) == listed
    outside.unlink()
