"""``--dry-run``: what a run would compute per stage and how many shards it would write.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import StageCache
from pipeline.fingerprint import shard_fingerprint
from pipeline.packing import shard_groups, shard_name
from pipeline.report import PrecomputeReport
from pipeline.sample_table import RunTables
from pipeline.stages import ErrorRecord



def _dry_run_plan(report: PrecomputeReport, counts: dict[str, int], tables: RunTables, errors: list[ErrorRecord], config, cache: StageCache, out_dir: Path,
                  settings=None) -> None:
    frames_known, not_ingested = counts["frames_known"], counts["not_ingested"]
    stages = {
        "ingest": {"compute": not_ingested, "reuse": frames_known, "failed": sum(1 for e in errors if e.stage == "ingest")},
        # Sources not ingested yet: one sample each for single images (their frames are unknown
        # until decoded; videos and multi-frame files may hold more).
        "mask": {"compute": counts["masks_missing"] + not_ingested, "reuse": frames_known - counts["masks_missing"], "failed": 0},
        "pyramid": {"compute": counts["pyramids_missing"] + not_ingested, "reuse": frames_known - counts["pyramids_missing"], "failed": 0},
    }
    existing = {p.name for p in out_dir.glob("*.tar")} if out_dir.is_dir() else set()
    to_write = 0
    groups = 0
    keys = 0
    current = set()
    pack_options = settings.pack_options if settings is not None else {"scales": [int(s) for s in config.scales], "groups": None}
    from pipeline.anatomy import parse_anatomy_source

    anatomy = parse_anatomy_source(config.anatomy, corpus=config.corpus)
    if anatomy is not None:  # as packing._shard_plan: the categories are part of a shard
        pack_options = {**pack_options, **anatomy.pack_option()}
    for group in shard_groups(tables.dry_run_keys(), config.samples_per_shard, lambda item: item[0]):
        groups += 1
        keys += len(group)
        if any(row is None for _, row in group):
            to_write += 1
            continue
        shard_fp = shard_fingerprint((tables.member_of_row(row) for _, row in group), pack_options)
        name = shard_name(shard_fp)
        current.add(name)
        if name in existing and cache.has("pack", shard_fp):
            continue
        to_write += 1
    stages_out = dict(stages)
    stages_out["pack (shards)"] = {"compute": to_write, "reuse": groups - to_write, "failed": 0}
    remove = len(existing - current) if to_write == 0 else "some"
    summary = (
        f"would compute ingest {stages['ingest']['compute']} file(s), mask {stages['mask']['compute']}, "
        f"pyramid {stages['pyramid']['compute']} sample(s), write {to_write} of {groups} shard(s)"
        + (f" (+ frames of {not_ingested} file(s) not ingested yet)" if not_ingested else "")
    )
    if to_write == 0 and stages["mask"]["compute"] == 0 and stages["pyramid"]["compute"] == 0 and stages["ingest"]["compute"] == 0:
        summary = "nothing to recompute" + (f"; {remove} stale shard(s) would be removed" if remove else "")
    report.samples = keys
    report.dry_run_plan = {"stages": stages_out, "summary": summary, "not_ingested": not_ingested, "shards_to_write": to_write, "shards": groups}
