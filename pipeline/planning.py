"""Planning: check the job's options, build its masker, and decide per source what is cached
(with the plan memo that makes a no-op run cheap).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anaus_core.errors import UserInputError
from pipeline.cache import CacheEntryError, StageCache
from pipeline.config import PrecomputeConfig
from pipeline.fingerprint import canonical_json, change_stamp_ns, mask_fingerprint, pyramid_fingerprint
from pipeline.ingest import make_key
from pipeline.sample_table import RunTables
from pipeline.stages import ErrorRecord, SampleRef, SourceTask, StageSettings, image_meta, sample_inputs



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


def region_options_of(config: PrecomputeConfig) -> dict[str, Any]:
    """The scan-region settings of ``config`` (``ScanRegionConfig`` fields + its code version),
    what the region fingerprint hashes. Unknown keys raise ``UserInputError``."""
    from dataclasses import fields

    from anaus_core.scan_region import ScanRegionConfig

    known = {f.name for f in fields(ScanRegionConfig)}
    options = dict(config.region_options or {})
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserInputError(f"--region-option: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not config.scan_region:
        options["enabled"] = False
    try:
        return ScanRegionConfig(**options).to_dict()
    except TypeError as exc:
        raise UserInputError(f"--region-option: {exc}") from None


def groups_of(config: PrecomputeConfig) -> tuple[dict[str, str], str | None]:
    """({relpath: group} from groups.csv, sha256 of the file or None). The file is
    ``config.groups`` or, when not given, ``groups.csv`` in the corpus folder if it exists."""
    from pipeline.fingerprint import file_sha256
    from pipeline.ingest import GROUPS_FILE, read_groups_csv

    path = Path(config.groups) if config.groups else None
    if path is None:
        corpus = Path(config.corpus)
        candidate = (corpus if corpus.is_dir() else corpus.parent) / GROUPS_FILE
        path = candidate if candidate.is_file() else None
    elif not path.is_file():
        raise UserInputError(f"{path}: --groups file not found")
    if path is None:
        return {}, None
    return read_groups_csv(path), file_sha256(path)


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
    if not float(config.scheduler_timeout) > 0:
        raise UserInputError(f"--scheduler-timeout: must be > 0 seconds, got {config.scheduler_timeout}")
    if config.stored_size is not None and not 1 <= config.stored_size <= MAX_STORED_SIZE:
        raise UserInputError(f"--stored-size: must be in 1..{MAX_STORED_SIZE} pixels, got {config.stored_size}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: --out exists and is not a directory")



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
    region_fp = settings.region_fp(task.ingest_fp)
    if not cache.has("region", region_fp):
        failure = cache.get_failure("region", region_fp)
        if failure is not None:
            return SourcePlan("failed", error=ErrorRecord(task.relpath, "region", failure["reason"]))
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
        mask_fp = mask_fingerprint(ingest_fp=task.ingest_fp, frame=frame, mask_digest=settings.mask_digest, sample_inputs=inputs, region_fp=region_fp)
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
