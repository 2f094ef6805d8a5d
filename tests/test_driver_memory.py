"""The precompute driver's state off the Python heap (SQLite tables, stat cache, lazily loaded
shard entries, streamed discovery) gives the same results, and its memory does not grow with
the corpus."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tracemalloc

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
    # racy_window_ns=0: the change stamp includes ctime, which utime cannot move back (just now)
    cache = StatCache(tmp_path / "stat.sqlite", racy_window_ns=0)
    assert [cache.sha256(f) for f in files] == [file_sha256(f) for f in files]
    cache.save(keep=iter([str(f) for f in files[:4]]))
    cache.close()
    with sqlite3.connect(tmp_path / "stat.sqlite") as db:
        entries = [bytes(row[0]).decode() for row in db.execute("SELECT path FROM stat")]
    assert sorted(entries) == sorted(str(f) for f in files[:4])
    again = StatCache(tmp_path / "stat.sqlite", racy_window_ns=0)
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


def test_damaged_stat_cache_is_rebuilt(tmp_path):
    (tmp_path / "stat.sqlite").write_bytes(b"not a database at all" * 100)
    source = tmp_path / "a.bin"
    source.write_bytes(b"abc")
    cache = StatCache(tmp_path / "stat.sqlite")
    assert cache.sha256(source) == file_sha256(source) and cache.hashed == 1
    cache.save()
    assert len(cache) == 1


def test_readonly_stat_cache_writes_nothing(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"abc")
    assert StatCache(tmp_path / "none.sqlite", readonly=True).sha256(source) == file_sha256(source)
    assert not (tmp_path / "none.sqlite").exists()
    cache = StatCache(tmp_path / "stat.sqlite")
    cache.sha256(source)
    cache.save()
    cache.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    readonly = StatCache(tmp_path / "stat.sqlite", readonly=True)
    readonly.sha256(tmp_path / "a.bin")
    readonly.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _ref(number: int, key: str | None = None, relpath: str | None = None):
    from pipeline.stages import SampleRef

    digest = lambda tag: hashlib.sha256(f"{tag}{number}".encode()).hexdigest()  # noqa: E731
    return SampleRef(
        key=key or f"k{number:06d}", relpath=relpath or f"d/{number}.png", frame=None if number % 3 else number % 7,
        index_in_source=number % 2, source_sha256=digest("s"), ingest_fp=digest("i"), mask_fp=digest("m"),
        pyramid_fp=digest("p"), original_size=(100 + number % 5, 200 + number % 11), source_path=f"/abs/d/{number}.png",
    )


def test_run_tables_order_dedup_and_round_trip(tmp_path):
    from pipeline.sample_table import RunTables
    from pipeline.stages import SourceTask

    refs = [_ref(n) for n in (5, 3, 9, 1)] + [_ref(7, key="k000003", relpath="a/first.png"), _ref(8, key="k000003", relpath="z/last.png")]
    with RunTables(tmp_path / "t.sqlite") as tables:
        tables.add_samples(refs)
        errors = []
        assert tables.pack_order(errors) == 4
        # the duplicate key keeps the first source by relpath, the others become errors
        assert sorted((e.path, e.key) for e in errors) == [("d/3.png", "k000003"), ("z/last.png", "k000003")]
        members = list(tables.packed_members())
        assert [m.key for m in members] == ["k000001", "k000003", "k000005", "k000009"]
        assert tables.packed_refs(0, 4) == (refs[3], refs[4], refs[0], refs[2])
        assert members[1].pyramid_fp == refs[4].pyramid_fp and members[1].ingest_fp == refs[4].ingest_fp
        # gc containers: fingerprints of packed samples only
        mask = tables.referenced("mask")
        assert refs[4].mask_fp in mask and refs[1].mask_fp not in mask and "zz" not in mask
        # sources: paged iteration while samples are added
        for n in range(2500):
            row = tables.add_source(SourceTask(path=f"/p/{n}", relpath=f"{n}", source_sha256=_ref(n).source_sha256, ingest_fp=_ref(n).ingest_fp))
            if n % 2:
                tables.mark_to_run(row)
        assert tables.first_sighting("x") and not tables.first_sighting("x")
        seen = []
        for batch in tables.tasks_to_run(7):
            tables.add_samples([_ref(10_000 + len(seen))])
            seen += [task.path for task in batch]
        assert seen == [f"/p/{n}" for n in range(1, 2500, 2)]
        assert list(tables.source_paths()) == [f"/p/{n}" for n in range(2500)]
        assert _ref(11).ingest_fp in tables.referenced("ingest")
    assert not (tmp_path / "t.sqlite").exists()


def _driver_peak(tmp_path, count: int) -> int:
    """Python-heap peak (bytes) of the driver's per-sample bookkeeping over ``count`` samples:
    add, order, cut into shards and hand out every shard's refs."""
    from pipeline.job import shard_groups
    from pipeline.sample_table import RunTables

    tables = RunTables(tmp_path / f"peak{count}.sqlite")
    tracemalloc.start()
    try:
        for start in range(0, count, 64):
            tables.add_samples(_ref(n) for n in range(start, min(start + 64, count)))
        tables.pack_order([])
        for group in shard_groups(tables.packed_members(), 100, lambda member: member.key):
            tables.packed_refs(group[0].position, group[-1].position + 1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        tables.close()


def test_driver_bookkeeping_memory_does_not_grow_with_the_corpus(tmp_path):
    small, large = _driver_peak(tmp_path, 2_000), _driver_peak(tmp_path, 20_000)
    # 18,000 more samples: an in-memory table would add megabytes (>= 100 bytes per sample);
    # what is held here is one page of rows and one shard's refs.
    assert large - small < 150_000, (small, large)
    assert large < 2_000_000, large


def test_shard_groups_match_shard_ranges():
    from pipeline.job import shard_groups, shard_ranges

    keys = [f"key{n:05d}" for n in range(1234)]
    groups = list(shard_groups(iter(keys), 40, lambda key: key))
    assert [(keys.index(g[0]), keys.index(g[-1]) + 1) for g in groups] == list(shard_ranges(keys, 40))
    assert sum(groups, []) == keys


def test_index_from_lazy_shard_summaries(tmp_path):
    from shards.index import ShardSummary

    infos = _infos(tmp_path, [4, 0, 3, 6])
    expected_id = write_index(tmp_path, infos, scales=(7,), fingerprints={"a": "b"})
    expected = _tree(tmp_path / "index.zarr")
    loads = []

    def loader(info):
        def load():
            loads.append(info.name)
            return SampleEntryTable.from_rows([[e.key, e.offset, e.size, e.mask_count, list(e.mask_areas), e.source_hash] for e in info.samples])
        return load

    summaries = [ShardSummary(name=i.name, sha256=i.sha256, size=i.size, sample_count=len(i.samples), load_entries=loader(i)) for i in infos]
    assert write_index(tmp_path, summaries, scales=(7,), fingerprints={"a": "b"}) == expected_id
    assert _tree(tmp_path / "index.zarr") == expected
    assert all(loads.count(i.name) == 2 for i in infos)  # two passes, nothing kept between


def test_streamed_discovery_finds_the_same_files(tmp_path):
    from pipeline.ingest import iter_source_files

    for name in ("b/x.png", "a.png", "b/c/y.tif", "b/.hidden.png", "notes.txt", "z.PNG"):
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    listed = discover_sources(tmp_path / "corpus")
    streamed = list(iter_source_files(tmp_path / "corpus"))
    assert sorted(rel for _, rel in streamed) == [s.relpath for s in listed]
    assert sorted(streamed) == sorted((str(s.path), s.relpath) for s in listed)
    (tmp_path / "list.txt").write_text("corpus/a.png\n# comment\ncorpus/b/x.png\ncorpus/a.png\n")
    assert [rel for _, rel in iter_source_files(tmp_path / "list.txt")] == ["corpus/a.png", "corpus/b/x.png", "corpus/a.png"]
    (tmp_path / "bad.lst").write_bytes(b"\xff\xfe\x00bad")
    try:
        iter_source_files(tmp_path / "bad.lst")
    except Exception as exc:
        assert "bad.lst" in str(exc) and "not a folder" in str(exc)
    else:
        raise AssertionError("a binary list file was accepted")
