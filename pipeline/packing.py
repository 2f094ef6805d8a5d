"""Pack: cut key-sorted samples into content-defined shards, write the missing ones, commit the
index + manifest and remove shards the index no longer names.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from anaus_core.errors import UserInputError
from pipeline.cache import CacheEntryError, StageCache
from pipeline.config import PrecomputeConfig
from pipeline.executors import make_executor
from pipeline.faults import fault_point
from pipeline.fingerprint import shard_fingerprint, stage_digest
from pipeline.sample_table import RunTables
from pipeline.stages import ShardTask, StageSettings, shard_info_from_dict, write_shard_task



def _key_hash(key: str | bytes) -> int:
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def shard_ranges(sorted_keys: Iterable[str | bytes], samples_per_shard: int) -> Iterator[tuple[int, int]]:
    """(start, stop) positions of each shard over key-sorted samples; see :func:`assign_shards`.
    Keys may be ``str`` or their ASCII ``bytes`` (the driver's key column)."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    min_size = max(1, samples_per_shard // 2)
    modulus = max(1, samples_per_shard - min_size)
    max_size = 2 * samples_per_shard
    start = 0
    position = -1
    for position, key in enumerate(sorted_keys):
        size = position + 1 - start
        if samples_per_shard == 1 or size >= max_size or (size >= min_size and _key_hash(key) % modulus == 0):
            yield start, position + 1
            start = position + 1
    if start <= position:
        yield start, position + 1


def assign_shards(sorted_keys: Sequence[str], samples_per_shard: int) -> list[list[int]]:
    """Cut key-sorted samples into shards at content-defined boundaries.

    A shard ends after key k when it holds at least ``samples_per_shard // 2`` samples and
    ``hash(k) % ceil(samples_per_shard / 2) == 0``, or when it reaches ``2 * samples_per_shard``.
    The mean size is about ``samples_per_shard``. Because cut points depend on the keys
    themselves (not on positions), adding, removing or editing a few samples changes only the
    shards that hold them (plus, rarely, a neighbour until the cuts re-align at the next
    hash-chosen boundary); every other shard keeps its exact membership and so its name.
    """
    return [list(range(start, stop)) for start, stop in shard_ranges(sorted_keys, samples_per_shard)]


def shard_name(shard_fp: str) -> str:
    return f"shard-{shard_fp[:16]}.tar"


def shard_groups(items: Iterable[Any], samples_per_shard: int, key_of: Callable[[Any], str | bytes]) -> Iterator[list[Any]]:
    """The key-sorted ``items`` (any iterable, e.g. a database cursor) cut into the shards of
    :func:`shard_ranges`, streamed: one shard's items (at most ``2 * samples_per_shard``) are
    held at a time."""
    buffer: list[Any] = []

    def keys():
        for item in items:
            buffer.append(item)
            yield key_of(item)

    # shard_ranges yields a range as soon as it has read the range's last key, so the buffer
    # then holds exactly that range's items (and nothing after them).
    for start, stop in shard_ranges(keys(), samples_per_shard):
        group = buffer[: stop - start]
        del buffer[: stop - start]
        yield group


def _shard_plan(tables: RunTables, settings: StageSettings, config: PrecomputeConfig, anatomy=None) -> list[tuple[str, str, int, int]]:
    """(shard fingerprint, shard file name, first position, stop position) in key order; one
    tuple per shard (so it grows with the number of shards, not of samples)."""
    pack_options = settings.pack_options
    if anatomy is not None:  # --anatomy: the categories are part of what a shard holds
        pack_options = {**pack_options, **anatomy.pack_option()}
    planned = []
    for group in shard_groups(tables.packed_members(), config.samples_per_shard, lambda member: member.key):
        shard_fp = shard_fingerprint(((m.key, m.pyramid_fp, m.ingest_fp) for m in group), pack_options)
        planned.append((shard_fp, shard_name(shard_fp), group[0].position, group[-1].position + 1))
    return planned


def _shard_task(out_dir: Path, name: str, shard_fp: str, refs, settings: StageSettings, groups: dict[str, str] | None,
                anatomy=None) -> ShardTask:
    members_groups = tuple((ref.relpath, groups[ref.relpath]) for ref in refs if groups and ref.relpath in groups)
    return ShardTask(str(out_dir), name, shard_fp, refs, settings.cache_root, settings.scales,
                     region_digest=settings.region_digest, groups=members_groups, anatomy=anatomy)


def _load_pack_entries(cache_root: str, shard_fp: str):
    """The sample entries of a written shard, from its pack-cache sidecar (``ShardSummary``)."""
    return shard_info_from_dict(StageCache(cache_root).get_meta("pack", shard_fp, probe_bytes=1 << 16)).samples


def _summary(info, cache: StageCache, shard_fp: str, sample_count: int):
    from functools import partial

    from shards.index import ShardSummary

    return ShardSummary(name=info.name, sha256=info.sha256, size=int(info.size), sample_count=int(sample_count),
                        load_entries=partial(_load_pack_entries, str(cache.root), shard_fp))


def _existing_shard_info(cache: StageCache, out_dir: Path, shard_fp: str, name: str):
    """A ``ShardSummary`` of shard ``name`` when it is final and its pack entry matches."""
    path = out_dir / name
    if not path.is_file() or not cache.has("pack", shard_fp):
        return None
    try:
        info = shard_info_from_dict(cache.get_meta("pack", shard_fp, probe_bytes=1 << 16))
    except (CacheEntryError, OSError, ValueError, KeyError, TypeError):
        return None
    if info.name != name or path.stat().st_size != info.size:
        return None
    return _summary(info, cache, shard_fp, len(info.samples))


def _pack_and_index(report, tables: RunTables, settings, config, cache, out_dir: Path, masker_fp, executor, client, progress,
                    groups: dict[str, str] | None = None) -> set[str]:
    from pipeline.anatomy import index_anatomy, parse_anatomy_source
    from shards.index import INDEX_NAME, read_manifest, write_index

    pack_start = time.perf_counter()
    anatomy = parse_anatomy_source(config.anatomy, corpus=config.corpus)
    planned = _shard_plan(tables, settings, config, anatomy)
    infos: dict[str, Any] = {}
    to_write: list[tuple[str, str, int, int]] = []
    for shard_fp, name, start, stop in planned:
        info = _existing_shard_info(cache, out_dir, shard_fp, name)
        if info is not None:
            infos[name] = info
            report.shards_reused += 1
        else:
            to_write.append((shard_fp, name, start, stop))
    progress.add("pack", len(planned), "shards")
    progress.advance("pack", report.shards_reused, reused=True)
    if to_write:
        # Members become SampleRef objects one shard at a time, as the executor asks for work.
        fps = {name: shard_fp for shard_fp, name, _, _ in to_write}
        tasks = (
            (_shard_task(out_dir, name, shard_fp, tables.packed_refs(start, stop), settings, groups, anatomy),)
            for shard_fp, name, start, stop in to_write
        )
        own_executor = executor is None
        if own_executor:
            executor = make_executor(workers=config.workers, scheduler=config.scheduler, client=client,
                                     scheduler_timeout=config.scheduler_timeout)
        try:
            for result in executor.imap_unordered(write_shard_task, tasks):
                infos[result.info.name] = _summary(result.info, cache, fps[result.info.name], result.samples)
                report.shards_written += 1
                report.bytes_written += result.info.size
                progress.advance("pack", 1)
        finally:
            if own_executor:
                executor.close()
    ordered = [infos[name] for _, name, _, _ in planned]
    del infos
    report.shard_bytes_total = sum(info.size for info in ordered)
    names = [info.name for info in ordered]
    index_fps = _index_fingerprints(settings, masker_fp, config)

    # -- commit: the index names exactly the current shards --------------------------------
    unchanged = False
    if (out_dir / "manifest.json").is_file() and (out_dir / INDEX_NAME).is_dir():
        try:
            manifest = read_manifest(out_dir)
            unchanged = (
                [s["name"] for s in manifest["shards"]] == names
                and [s["sha256"] for s in manifest["shards"]] == [i.sha256 for i in ordered]
                and manifest.get("fingerprints") == index_fps
                and list(manifest.get("scales", [])) == list(settings.scales)
                and _index_matches_manifest(out_dir, manifest)
            )
        except UserInputError:
            unchanged = False
    if not unchanged:
        fault_point("index")
        write_index(out_dir, ordered, scales=settings.scales, fingerprints=index_fps,
                    anatomy=index_anatomy(cache, [fp for fp, _, _, _ in planned]) if anatomy is not None else None)
        report.index_written = True
    fault_point("cleanup")
    current = set(names)
    for path in sorted(out_dir.glob("*.tar")):
        if path.name not in current:
            path.unlink()
            report.shards_removed += 1
    report.pack_seconds = time.perf_counter() - pack_start
    return {shard_fp for shard_fp, _, _, _ in planned}


def _index_matches_manifest(out_dir: Path, manifest: dict) -> bool:
    import json

    from shards.index import INDEX_NAME

    try:
        attrs = json.loads((out_dir / INDEX_NAME / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("index_id") == manifest.get("index_id")




def _index_fingerprints(settings: StageSettings, masker_fp: dict, config: PrecomputeConfig) -> dict[str, str]:
    return {
        "ingest": settings.ingest_digest,
        "region": settings.region_digest,
        "mask": settings.mask_digest,
        "pyramid": settings.pyramid_digest,
        "pack": stage_digest("pack", {"samples_per_shard": config.samples_per_shard}),
        "masker": str(masker_fp.get("name", config.masker)),
    }
