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

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from anaus_core.errors import UserInputError
from pipeline.cache import TEMP_MARK, CacheEntryError, StageCache, clean_stale_temps
from pipeline.config import PrecomputeConfig
from pipeline.executors import make_executor
from pipeline.faults import fault_point
from pipeline.fingerprint import (
    StatCache,
    change_stamp_ns,
    canonical_json,
    ingest_fingerprint,
    mask_fingerprint,
    mask_stage_digest,
    pyramid_fingerprint,
    pyramid_stage_digest,
    shard_fingerprint,
    stage_digest,
)
from pipeline.ingest import make_key
from pipeline.lock import OutputLock
from pipeline.output_guard import check_masker, check_sample_count
from pipeline.report import EXIT_OK, EXIT_SKIPPED, EXIT_STRICT_FAILURE, PrecomputeReport, StageProgress, render_report, write_errors
from pipeline.stages import (
    ErrorRecord,
    MaskerSpec,
    SampleRef,
    ShardTask,
    SourceTask,
    StageSettings,
    TaskResult,
    get_masker,
    image_meta,
    remember_masker,
    run_source_batch,
    sample_inputs,
    shard_info_from_dict,
    write_shard_task,
)
from pipeline.sample_table import RunTables

CACHE_DIR = "cache"
ERRORS_NAME = "errors.jsonl"
REPORT_NAME = "report.json"
STAT_CACHE_NAME = "stat-cache.sqlite"
MEMO_NAME = "plan-memo.sqlite"
LEGACY_NAMES = ("stat-cache.json", "plan-memo.json")


# ---------------------------------------------------------------------------------------------
# Shard assignment
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass
class SourcePlan:
    """What planning found for one source (its ready samples go straight into the SampleTable)."""

    status: str  # "ready": every entry cached; "failed": cached failure; "run": needs the executor
    ready: int = 0  # samples appended to the table
    frames_known: int = 0
    masks_missing: int = 0
    pyramids_missing: int = 0
    error: ErrorRecord | None = None


def _masker_options(config: PrecomputeConfig) -> dict[str, Any]:
    options = dict(config.masker_options)
    if config.labels is not None:
        options["labels_dir"] = str(Path(config.labels).resolve())
    if config.checkpoint is not None:
        options["checkpoint"] = str(Path(config.checkpoint).resolve())
    if config.sam_checkpoint is not None:
        sam_checkpoint = str(Path(config.sam_checkpoint).resolve())
        masker = str(config.masker).strip().lower()
        if masker == "lpsam":
            options["sam_checkpoint"] = sam_checkpoint
        elif masker == "sam":
            # For vanilla SAM the base SAM is the masker's own checkpoint: accept either option.
            if options.get("checkpoint", sam_checkpoint) != sam_checkpoint:
                raise UserInputError(f"--masker sam: --checkpoint {config.checkpoint} and --sam-checkpoint {config.sam_checkpoint} name different files (give one)")
            options["checkpoint"] = sam_checkpoint
        else:
            raise UserInputError(f"--sam-checkpoint is only used by --masker lpsam (and sam), not --masker {config.masker}")
    options.setdefault("device", config.device)
    options.setdefault("batch_size", config.batch_size)
    return options


def build_job_masker(config: PrecomputeConfig):
    """(masker, its build options) for ``config``. Building is cheap for every masker: model
    maskers (sam, lpsam) hash their checkpoint files and read shapes/metadata but load their
    weights only on the first call, so the driver can fingerprint without loading a model."""
    from anaus_core.maskers import build_masker

    options = _masker_options(config)
    return build_masker(config.masker, **options), options


def masker_fingerprint_of(config: PrecomputeConfig) -> dict:
    """The masker fingerprint that ``config`` feeds into every mask fingerprint (for sam and
    lpsam it holds the sha256 of ``checkpoint`` and, for lpsam, of ``sam_checkpoint``)."""
    return build_job_masker(config)[0].fingerprint()


MAX_STORED_SIZE = 4096  # --stored-size bound: a stored image's short side (memory per sample grows with its square)


def _check_config(config: PrecomputeConfig) -> None:
    if not config.corpus:
        raise UserInputError("precompute-masks: no corpus given")
    if not config.out:
        raise UserInputError("precompute-masks: no output directory given (--out DIR)")
    if not config.scales or any(int(s) < 1 for s in config.scales):
        raise UserInputError(f"--scales: must be positive integers, got {config.scales}")
    if len(set(config.scales)) != len(config.scales):
        raise UserInputError(f"--scales: repeated scale in {config.scales}")
    for name in ("samples_per_shard", "batch_size", "every_nth_frame", "max_masks"):
        if int(getattr(config, name)) < 1:
            raise UserInputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(config, name)}")
    if not 0.0 <= float(config.max_shrink) <= 1.0:
        raise UserInputError(f"--max-shrink: must be a fraction in [0, 1], got {config.max_shrink}")
    if config.workers < 0:
        raise UserInputError(f"--workers: must be >= 0, got {config.workers}")
    if config.stored_size is not None and not 1 <= config.stored_size <= MAX_STORED_SIZE:
        raise UserInputError(f"--stored-size: must be in 1..{MAX_STORED_SIZE} pixels, got {config.stored_size}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: --out exists and is not a directory")


def _index_fingerprints(settings: StageSettings, masker_fp: dict, config: PrecomputeConfig) -> dict[str, str]:
    return {
        "ingest": settings.ingest_digest,
        "mask": settings.mask_digest,
        "pyramid": settings.pyramid_digest,
        "pack": stage_digest("pack", {"samples_per_shard": config.samples_per_shard}),
        "masker": str(masker_fp.get("name", config.masker)),
    }


class PlanMemo:
    """Derived, rebuildable facts that make a no-op run cheap, in ``DIR/cache/plan-memo.sqlite``:

    * ingest fingerprint -> its frames as ``[frame, height, width]`` (original size; immutable:
      the entry is content-addressed), so the planner does not open every ingest entry;
    * (source path, frame) -> the canonical JSON of the masker's per-sample inputs (e.g. the
      label file's name and sha256) with the stat of the file they came from; trusted only
      while that file's (size, mtime_ns, inode) are unchanged and its mtime is older than the
      memo entry (as in ``StatCache``), otherwise ``masker.sample_fingerprint`` is asked again.

    A SQLite file (``pipeline/sqlite_store.py``) looked up one entry at a time, so the memo
    costs no memory per sample. Every entry this run uses or makes is stamped with the run's
    id; :meth:`save` drops the others (sources gone from the corpus) and commits. Losing or
    damaging the file only costs time. ``record=False`` (dry runs) reads and never writes.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS frames (ingest_fp BLOB PRIMARY KEY, frames TEXT, run INTEGER) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS inputs (
            memo_key TEXT PRIMARY KEY, path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER,
            made_ns INTEGER, inputs TEXT, run INTEGER
        ) WITHOUT ROWID;
    """
    COMMIT_EVERY = 2000

    def __init__(self, path: Path | None, *, racy_window_ns: int = 2_000_000_000, record: bool = True) -> None:
        from pipeline.sqlite_store import open_cache_database

        self.path = path
        self.racy_window_ns = racy_window_ns
        self.record = record and path is not None
        self.run_id = time.time_ns()
        self._writes = 0
        self._last_frames_fp: str | None = None
        self._db = None
        if path is not None:
            self._db = open_cache_database(path, self.SCHEMA, readonly=not self.record)

    def _write(self, sql: str, values: tuple) -> None:
        if not self.record:
            return
        self._db.execute(sql, values)
        self._writes += 1
        if self._writes % self.COMMIT_EVERY == 0:  # a killed run keeps most of what it learnt
            self._db.commit()

    def ingest_frames(self, cache: StageCache, ingest_fp: str) -> list | None:
        """``[[frame, height, width], ...]`` of an ingest entry, or None when it is unreadable."""
        row = None
        if self._db is not None:
            row = self._db.execute("SELECT frames FROM frames WHERE ingest_fp = ?", (bytes.fromhex(ingest_fp),)).fetchone()
        if row is not None:
            frames = json.loads(row[0])
            if ingest_fp != self._last_frames_fp:  # the frames of one source are asked for in a row
                self._write("UPDATE frames SET run = ? WHERE ingest_fp = ?", (self.run_id, bytes.fromhex(ingest_fp)))
        else:
            try:
                frames = [[f["frame"], *f["original_size"]] for f in cache.get_meta("ingest", ingest_fp)["frames"]]
            except (CacheEntryError, OSError, ValueError, KeyError, TypeError):
                return None
            self._write("INSERT OR REPLACE INTO frames VALUES (?, ?, ?)", (bytes.fromhex(ingest_fp), json.dumps(frames, separators=(",", ":")), self.run_id))
        self._last_frames_fp = ingest_fp
        return frames

    def sample_inputs(self, masker, meta) -> str:
        """Canonical JSON of the masker's per-sample inputs (``"{}"`` for most maskers)."""
        locate = getattr(masker, "label_path", None)
        if locate is None:
            inputs = sample_inputs(masker, meta)
            return canonical_json(inputs) if inputs else "{}"
        memo_key = f"{meta.extra['source_path']}\0{meta.frame}"
        entry = None
        if self._db is not None:
            entry = self._db.execute("SELECT path, size, mtime_ns, inode, made_ns, inputs FROM inputs WHERE memo_key = ?", (memo_key,)).fetchone()
        if entry is not None:
            path, size, mtime_ns, inode, made_ns, inputs = entry
            try:
                stat = os.stat(path)
            except OSError:
                stat = None
            if stat is not None and (stat.st_size, change_stamp_ns(stat), stat.st_ino) == (size, mtime_ns, inode) and mtime_ns < made_ns - self.racy_window_ns:
                self._write("UPDATE inputs SET run = ? WHERE memo_key = ?", (self.run_id, memo_key))
                return inputs
        made_ns = time.time_ns()
        raw = sample_inputs(masker, meta)  # raises SampleError (no label), not memoised
        inputs = canonical_json(raw) if raw else "{}"
        path = os.fspath(locate(meta))
        stat = os.stat(path)
        self._write("INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (memo_key, path, stat.st_size, change_stamp_ns(stat), stat.st_ino, made_ns, inputs, self.run_id))
        return inputs

    def save(self) -> None:
        """Drop the entries this run did not use, commit and close (called once, after the
        stage chain ran)."""
        if self._db is None:
            return
        if self.record:
            self._db.execute("DELETE FROM frames WHERE run IS NOT ?", (self.run_id,))
            self._db.execute("DELETE FROM inputs WHERE run IS NOT ?", (self.run_id,))
            self._db.commit()
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def remember_computed(self, cache: StageCache, masker, samples: Sequence[SampleRef]) -> None:
        """Fill the memo for samples the workers just produced, so the next run is cheap."""
        for ref in samples:
            if ref.ingest_fp != self._last_frames_fp:
                self.ingest_frames(cache, ref.ingest_fp)
            meta = image_meta(ref.key, ref.relpath, ref.frame, ref.original_size, ref.source_path or ref.relpath)
            try:
                self.sample_inputs(masker, meta)
            except Exception:
                pass


def _plan_source(task: SourceTask, cache: StageCache, masker, settings: StageSettings, memo: PlanMemo, tables: RunTables) -> SourcePlan:
    """Plan one source; when all its entries exist, its samples are added to ``tables``."""
    if not cache.has("ingest", task.ingest_fp):
        failure = cache.get_failure("ingest", task.ingest_fp)
        if failure is not None:
            return SourcePlan("failed", error=ErrorRecord(task.relpath, "ingest", failure["reason"]))
        return SourcePlan("run")
    frames = memo.ingest_frames(cache, task.ingest_fp)
    if frames is None:
        return SourcePlan("run")
    plan = SourcePlan("ready", frames_known=len(frames))
    ready: list[SampleRef] = []
    for index, (frame, height, width) in enumerate(frames):
        key = make_key(task.relpath, frame)
        imeta = image_meta(key, task.relpath, frame, (height, width), task.path)
        try:
            inputs = memo.sample_inputs(masker, imeta)
        except Exception:  # the worker records the reason
            plan.status = "run"
            plan.masks_missing += 1
            plan.pyramids_missing += 1
            continue
        mask_fp = mask_fingerprint(ingest_fp=task.ingest_fp, frame=frame, mask_digest=settings.mask_digest, sample_inputs=inputs)
        pyramid_fp = pyramid_fingerprint(mask_fp=mask_fp, pyramid_digest=settings.pyramid_digest)
        has_mask = cache.has("mask", mask_fp)
        has_pyramid = cache.has("pyramid", pyramid_fp)
        if not has_mask:
            plan.masks_missing += 1
        if not has_pyramid:
            plan.pyramids_missing += 1
        if not (has_mask and has_pyramid):
            plan.status = "run"
            continue
        if plan.status == "ready":
            ready.append(
                SampleRef(
                    key=key, relpath=task.relpath, frame=frame, index_in_source=index, source_sha256=task.source_sha256,
                    ingest_fp=task.ingest_fp, mask_fp=mask_fp, pyramid_fp=pyramid_fp, original_size=(height, width), source_path=task.path,
                )
            )
    if plan.status == "ready":
        tables.add_samples(ready)
        plan.ready = len(ready)
    return plan


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
        return _run_with_tables(config, out_dir, report, cache, sources, masker, masker_fp, spec, settings, tables, stat_cache, memo, client=client, started=started)
    finally:
        for closable in (memo, stat_cache, tables):
            if closable is not None:
                closable.close()


def _run_with_tables(config, out_dir: Path, report: PrecomputeReport, cache: StageCache, sources, masker, masker_fp, spec, settings: StageSettings,
                     tables: RunTables, stat_cache: StatCache, memo: PlanMemo, *, client, started: float) -> PrecomputeReport:
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
            report.stages["ingest"].failed += 1
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
        _dry_run_plan(report, counts, tables, errors, config, cache, out_dir)
        report.errors = [e.to_dict() for e in errors]
        report.wall_seconds = time.perf_counter() - started
        return report

    # -- 2. run the stage chain where something is missing ----------------------------------
    known = len(tables)
    to_run = tables.count_to_run()
    for stage in ("ingest", "mask", "pyramid"):
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
            executor = make_executor(workers=config.workers, scheduler=config.scheduler, client=client)
            report.workers = executor.workers
            report.executor = type(executor).__name__.replace("Executor", "").lower()
            if report.executor == "serial":
                remember_masker(spec, masker)
            expected_samples = known + to_run
            processes: set[str] = set()
            batches = ((batch, settings) for batch in tables.tasks_to_run(config.batch_size))
            for result in executor.imap_unordered(run_source_batch, batches):
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
                               allow_shrink=config.allow_shrink, max_shrink=config.max_shrink)
            try:
                shard_fps = _pack_and_index(report, tables, settings, config, cache, out_dir, masker_fp, executor, client, progress)
            finally:
                if executor is not None:
                    executor.close()
                    executor = None
    if executor is not None:
        executor.close()

    stat_cache.save(keep=tables.source_paths())
    if config.gc:
        referenced = {stage: tables.referenced(stage) for stage in ("ingest", "mask", "pyramid")}
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


def _shard_plan(tables: RunTables, settings: StageSettings, config: PrecomputeConfig) -> list[tuple[str, str, int, int]]:
    """(shard fingerprint, shard file name, first position, stop position) in key order; one
    tuple per shard (so it grows with the number of shards, not of samples)."""
    pack_options = {"scales": list(settings.scales)}
    planned = []
    for group in shard_groups(tables.packed_members(), config.samples_per_shard, lambda member: member.key):
        shard_fp = shard_fingerprint(((m.key, m.pyramid_fp, m.ingest_fp) for m in group), pack_options)
        planned.append((shard_fp, shard_name(shard_fp), group[0].position, group[-1].position + 1))
    return planned


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


def _pack_and_index(report, tables: RunTables, settings, config, cache, out_dir: Path, masker_fp, executor, client, progress) -> set[str]:
    from shards.index import INDEX_NAME, read_manifest, write_index

    pack_start = time.perf_counter()
    planned = _shard_plan(tables, settings, config)
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
            (ShardTask(str(out_dir), name, shard_fp, tables.packed_refs(start, stop), settings.cache_root, settings.scales),)
            for shard_fp, name, start, stop in to_write
        )
        own_executor = executor is None
        if own_executor:
            executor = make_executor(workers=config.workers, scheduler=config.scheduler, client=client)
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
        write_index(out_dir, ordered, scales=settings.scales, fingerprints=index_fps)
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


def _dry_run_plan(report: PrecomputeReport, counts: dict[str, int], tables: RunTables, errors: list[ErrorRecord], config, cache: StageCache, out_dir: Path) -> None:
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
    pack_options = {"scales": [int(s) for s in config.scales]}
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
