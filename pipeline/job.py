"""The ``precompute-masks`` job: plan, run the stage chain where needed, pack, index, report.

Order of one run (all under ``DIR/.lock``):

1. discover sources; hash them (stat cache); compute every fingerprint the cache lets us
   compute without running a stage;
2. ``--dry-run``: print per stage what would be computed and stop;
3. send every source with missing entries through ingest -> mask -> pyramid on the executor
   (in-process, local processes or dask), in batches;
4. sort the samples by key, cut them into shards at content-defined boundaries, name every
   shard by the fingerprint of its members and write the shards that do not exist yet (one
   task per shard: each shard is written once, atomically);
5. write the index + manifest if the shard list changed (commit point), then delete shards
   the new index no longer names; write ``errors.jsonl`` and ``report.json``.

A kill at any point leaves the cache with complete entries only, shards that are complete
under their final names, and the previous (or the new) index intact; the next run reuses all
of it. See docs/precompute.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.cache import TEMP_MARK, StageCache, clean_stale_temps
from pipeline.config import PrecomputeConfig
from pipeline.dry_run import _dry_run_plan
from pipeline.executors import make_executor
from pipeline.fingerprint import (
    StatCache,
    canonical_json,
    ingest_fingerprint,
    mask_stage_digest,
    pyramid_stage_digest,
    stage_digest,
)
from pipeline.ingest import make_key
from pipeline.lock import OutputLock
from pipeline.output_guard import check_masker, check_sample_count
# Planning and packing live in modules of their own; their public names stay importable from here.
from pipeline.packing import (  # noqa: F401
    _index_fingerprints,
    _pack_and_index,
    assign_shards,
    shard_groups,
    shard_name,
    shard_ranges,
)
from pipeline.planning import (  # noqa: F401
    PlanMemo,
    SourcePlan,
    _check_config,
    _plan_source,
    build_job_masker,
    masker_fingerprint_of,
    groups_of,
    region_options_of,
)
from pipeline.report import EXIT_OK, EXIT_SKIPPED, EXIT_STRICT_FAILURE, PrecomputeReport, StageProgress, render_report, write_errors
from pipeline.sample_table import RunTables
from pipeline.prefetch import pipelined_source_batches, resolve_prefetch
from pipeline.stages import ErrorRecord, MaskerSpec, SourceTask, StageSettings, TaskResult, remember_masker, run_source_batch

CACHE_DIR = "cache"
ERRORS_NAME = "errors.jsonl"
REPORT_NAME = "report.json"
STAT_CACHE_NAME = "stat-cache.sqlite"
MEMO_NAME = "plan-memo.sqlite"
LEGACY_NAMES = ("stat-cache.json", "plan-memo.json")



# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run_precompute(config: PrecomputeConfig, *, client=None, console=None, show_report: bool | None = None) -> PrecomputeReport:
    """Run (or, with ``config.dry_run``, plan) the precompute job; returns its report.

    ``client``: an existing ``distributed.Client`` to run on (tests pass a LocalCluster's);
    otherwise ``config.scheduler`` / ``config.workers`` choose the executor.
    Raises ``UserInputError`` for bad options, a missing corpus or a locked output directory.
    A skipped input is not an exception: see ``report.errors`` and ``report.exit_code``.
    """
    _check_config(config)
    started = time.perf_counter()
    out_dir = Path(config.out)
    show = config.progress if show_report is None else show_report
    lock = OutputLock(out_dir)
    if config.dry_run and (not out_dir.exists() or not os.access(out_dir, os.W_OK)):
        lock = None  # nothing to protect, nothing to create (a read-only output can be planned)
    if lock is not None:
        lock.acquire()
    try:
        report = _run_locked(config, out_dir, client=client, started=started)
    finally:
        if lock is not None:
            lock.release()
    if show:
        render_report(report, console)
    return report


def _run_locked(config: PrecomputeConfig, out_dir: Path, *, client, started: float) -> PrecomputeReport:
    from pipeline.ingest import ingest_fingerprint as ingest_options_of
    from pipeline.ingest import iter_source_files

    report = PrecomputeReport(out_dir=str(out_dir), dry_run=config.dry_run)
    cache_root = out_dir / CACHE_DIR
    cache = StageCache(cache_root)
    if not config.dry_run:
        clean_stale_temps(out_dir)
        for legacy in LEGACY_NAMES:  # JSON caches of earlier versions, replaced by SQLite files
            try:
                os.unlink(cache_root / legacy)
            except FileNotFoundError:
                pass

    sources = iter_source_files(config.corpus)  # streamed: (path, relpath) strings

    masker, masker_options = build_job_masker(config)
    masker_fp = masker.fingerprint()
    check_masker(out_dir, str(masker_fp.get("name", config.masker)), allow_change=config.allow_masker_change)
    spec = MaskerSpec(name=config.masker, options_json=canonical_json(masker_options), fingerprint_json=canonical_json(masker_fp))
    ingest_options = ingest_options_of(stored_size=config.stored_size, every_nth_frame=config.every_nth_frame)
    finalize_options = {"min_area": config.min_area, "max_masks": config.max_masks, "add_residual": config.add_residual}
    region_options = region_options_of(config)
    groups, groups_sha = groups_of(config)
    settings = StageSettings(
        cache_root=str(cache_root.resolve()),
        stored_size=config.stored_size,
        every_nth_frame=config.every_nth_frame,
        ingest_options=ingest_options,
        finalize_options=finalize_options,
        scales=tuple(int(s) for s in config.scales),
        batch_size=config.batch_size,
        masker=spec,
        ingest_digest=stage_digest("ingest", ingest_options),
        mask_digest=mask_stage_digest(masker_fingerprint=masker_fp, finalize_options=finalize_options),
        pyramid_digest=pyramid_stage_digest(config.scales),
        region_options=region_options,
        region_digest=stage_digest("region", region_options),
        groups_sha256=groups_sha,
    )

    # Per-source and per-sample facts go into a scratch SQLite file (pipeline/sample_table.py),
    # the stat cache and the plan memo are SQLite files too: nothing the driver holds in memory
    # grows with the corpus (docs/benchmarks.md (precompute)).
    import tempfile

    scratch_dir = cache_root if not config.dry_run else Path(tempfile.gettempdir())
    scratch_dir.mkdir(parents=True, exist_ok=True)
    tables = RunTables(scratch_dir / f".run-tables{TEMP_MARK}{os.getpid()}-{time.time_ns()}.sqlite")
    stat_cache = memo = None
    try:
        stat_cache = StatCache(cache_root / STAT_CACHE_NAME, readonly=config.dry_run)
        memo = PlanMemo(cache_root / MEMO_NAME, record=not config.dry_run)
        return _run_with_tables(config, out_dir, report, cache, sources, masker, masker_fp, spec, settings, tables, stat_cache, memo, client=client, started=started, groups=groups)
    finally:
        for closable in (memo, stat_cache, tables):
            if closable is not None:
                closable.close()


def _run_with_tables(config, out_dir: Path, report: PrecomputeReport, cache: StageCache, sources, masker, masker_fp, spec, settings: StageSettings,
                     tables: RunTables, stat_cache: StatCache, memo: PlanMemo, *, client, started: float,
                     groups: dict[str, str] | None = None) -> PrecomputeReport:
    # -- 1. plan ------------------------------------------------------------------------------
    plan_start = time.perf_counter()
    errors: list[ErrorRecord] = []  # skipped inputs only: grows with errors, not with the corpus
    counts = {"frames_known": 0, "masks_missing": 0, "pyramids_missing": 0, "not_ingested": 0}
    hash_start = time.perf_counter()
    for source_path, relpath in sources:
        if not tables.first_sighting(relpath):
            continue  # a list file naming a file twice
        counts["sources"] = counts.get("sources", 0) + 1
        report.sources += 1
        path = os.path.abspath(source_path)
        try:
            digest = stat_cache.sha256(path)
        except FileNotFoundError:
            errors.append(ErrorRecord(relpath, "ingest", "file not found"))
            report.stages["ingest"].failed += 1
            continue
        except OSError as exc:
            errors.append(ErrorRecord(relpath, "ingest", f"cannot read file ({exc.strerror or exc})"))
            report.stages["ingest"].failed += 1
            continue
        task = SourceTask(path=path, relpath=relpath, source_sha256=digest, ingest_fp=ingest_fingerprint(source_sha256=digest, options=settings.ingest_digest))
        row = tables.add_source(task)
        plan = _plan_source(task, cache, masker, settings, memo, tables)
        if plan.status == "failed":
            errors.append(plan.error)
            report.stages[plan.error.stage].failed += 1
        elif plan.status == "run":
            tables.mark_to_run(row)
            if config.dry_run:
                tables.add_unknown_key(make_key(task.relpath))
                if plan.frames_known == 0:
                    counts["not_ingested"] += 1
        if plan.status != "failed":
            counts["frames_known"] += plan.frames_known
            counts["masks_missing"] += plan.masks_missing
            counts["pyramids_missing"] += plan.pyramids_missing
    report.source_hash_seconds = time.perf_counter() - hash_start
    report.sources_hashed = stat_cache.hashed
    report.plan_seconds = time.perf_counter() - plan_start
    if not counts.get("sources"):
        check_sample_count(out_dir, 0, skipped=0, corpus=config.corpus, allow_shrink=True, max_shrink=config.max_shrink)

    if config.dry_run:
        _dry_run_plan(report, counts, tables, errors, config, cache, out_dir, settings)
        report.errors = [e.to_dict() for e in errors]
        report.wall_seconds = time.perf_counter() - started
        return report

    # -- 2. run the stage chain where something is missing ----------------------------------
    known = len(tables)
    to_run = tables.count_to_run()
    for stage in ("ingest", "region", "mask", "pyramid"):
        report.stages[stage].reused += known

    executor = None
    shard_fps = None
    with StageProgress(config.progress) as progress:
        progress.add("ingest", report.sources, "files")
        progress.add("mask", known + to_run)
        progress.add("pyramid", known + to_run)
        progress.advance("ingest", report.sources - to_run, reused=True)
        progress.advance("mask", known, reused=True)
        progress.advance("pyramid", known, reused=True)
        if to_run:
            executor = make_executor(workers=config.workers, scheduler=config.scheduler, client=client,
                                     scheduler_timeout=config.scheduler_timeout)
            report.workers = executor.workers
            report.executor = type(executor).__name__.replace("Executor", "").lower()
            if report.executor == "serial":
                remember_masker(spec, masker)
            expected_samples = known + to_run
            processes: set[str] = set()
            batches = ((batch, settings) for batch in tables.tasks_to_run(config.batch_size))
            prefetch = resolve_prefetch(config.prefetch, config.masker, report.executor)
            if prefetch:  # ingest of the next batches in threads while this one is masked
                results = pipelined_source_batches(batches, workers=prefetch, depth=prefetch)
            else:
                results = executor.imap_unordered(run_source_batch, batches)
            for result in results:
                _merge(report, result)
                processes.add(result.process)
                report.task_processes = len(processes)
                tables.add_samples(result.samples)
                memo.remember_computed(cache, masker, result.samples)
                errors.extend(result.errors)
                produced = len(result.samples) + sum(1 for e in result.errors if e.stage != "ingest")
                expected_samples += produced - result.sources_done
                progress.set_total("mask", max(expected_samples, known))
                progress.set_total("pyramid", max(expected_samples, known))
                mask_reused, pyramid_reused = result.tallies["mask"].reused, result.tallies["pyramid"].reused
                progress.advance("ingest", result.sources_done - result.sources_reused)
                progress.advance("ingest", result.sources_reused, reused=True)
                progress.advance("mask", produced - mask_reused)
                progress.advance("mask", mask_reused, reused=True)
                progress.advance("pyramid", len(result.samples) - pyramid_reused)
                progress.advance("pyramid", pyramid_reused, reused=True)
        memo.save()  # and close it: nothing below needs it
        # -- 3. pack ------------------------------------------------------------------------
        report.samples = tables.pack_order(errors)
        report.errors = [e.to_dict() for e in sorted(errors, key=lambda e: (e.path, e.stage, e.key or ""))]
        del errors
        if config.strict and report.errors:
            report.exit_code = EXIT_STRICT_FAILURE
        else:
            # before the commit point: an empty or much smaller corpus (wrong or unmounted folder)
            # must not replace the published shards (pipeline/output_guard.py)
            check_sample_count(out_dir, report.samples, skipped=len(report.errors), corpus=config.corpus,
                               allow_shrink=config.allow_shrink, max_shrink=config.max_shrink,
                               first_error=report.errors[0] if report.errors else None)
            try:
                shard_fps = _pack_and_index(report, tables, settings, config, cache, out_dir, masker_fp, executor, client, progress, groups=groups)
            finally:
                if executor is not None:
                    executor.close()
                    executor = None
    if executor is not None:
        executor.close()

    stat_cache.save(keep=tables.source_paths())
    if config.gc:
        referenced = {stage: tables.referenced(stage) for stage in ("ingest", "mask", "pyramid")}
        # one region per source, named by its ingest fingerprint and this run's settings
        referenced["region"] = {settings.region_fp(fp) for fp in tables.source_ingest_fps()}
        if shard_fps is not None:
            referenced["pack"] = shard_fps
        removed, _freed = cache.garbage_collect(referenced)
        report.cache_removed = removed
    write_errors(out_dir / ERRORS_NAME, report.errors)
    if report.exit_code == EXIT_OK and report.errors:
        report.exit_code = EXIT_SKIPPED
    report.wall_seconds = time.perf_counter() - started
    report.save(out_dir / REPORT_NAME)
    return report


def _merge(report: PrecomputeReport, result: TaskResult) -> None:
    for stage, tally in result.tallies.items():
        summary = report.stages[stage]
        summary.computed += tally.computed
        summary.reused += tally.reused
        summary.failed += tally.failed
        summary.seconds += tally.seconds
    report.masker_seconds += result.masker_seconds
    report.bytes_written += result.cache_bytes_written
