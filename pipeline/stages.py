"""The per-sample stage chain (ingest -> scan region -> mask -> pyramid) and the pack stage, as
picklable tasks. The scan region is found once per source (all frames of a clip together) and
every mask of the source is clipped to it (``MaskSet.finalize(region=...)``).

These functions run wherever the executor puts them: in the driver, in local worker processes
or on ``dask.distributed`` workers. Each reads and writes only content-addressed cache entries
under the shared output directory (and, for pack, exactly one shard file), so running a task
twice - a retried dask task, a resumed run - is harmless: it finds its entries and skips, or
rewrites identical bytes.

A task returns small, picklable results (fingerprints, counts, timings, error records); all
bulk data goes through the cache.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from anaus_core.maskers.base import ImageMeta, SampleError
from anaus_core.maskset import MaskSet
from pipeline.cache import CacheEntryError, StageCache
from pipeline.fingerprint import mask_fingerprint, pyramid_fingerprint, region_fingerprint
from pipeline.ingest import make_key

# Entries in the cache are read and written many times; speed matters more than ratio there
# (shards use the shard store's stronger setting).
_CACHE_ZSTD_LEVEL = 3


# ---------------------------------------------------------------------------------------------
# Settings shipped to every task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskerSpec:
    """How a worker builds its masker: ``build_masker(name, **options)``; ``fingerprint`` is what
    the driver computed, checked on the worker (a different checkpoint on another machine
    must not silently produce different masks under the same cache keys)."""

    name: str
    options_json: str  # canonical JSON of the build_masker options (hashable, picklable)
    fingerprint_json: str

    def build_options(self) -> dict[str, Any]:
        import json

        return json.loads(self.options_json)


@dataclass(frozen=True)
class StageSettings:
    cache_root: str
    stored_size: int
    every_nth_frame: int
    ingest_options: Mapping[str, Any]
    finalize_options: Mapping[str, Any]
    scales: tuple[int, ...]
    batch_size: int
    masker: MaskerSpec
    ingest_digest: str  # pipeline.fingerprint.stage_digest of the ingest options
    mask_digest: str  # ... of masker fingerprint + finalize options
    pyramid_digest: str  # ... of the scales
    region_options: Mapping[str, Any] = field(default_factory=dict)  # anaus_core.scan_region.ScanRegionConfig fields
    region_digest: str = ""  # ... of the scan-region settings
    groups_sha256: str | None = None  # of the groups.csv in use (enters the shard fingerprints)

    @property
    def pack_options(self) -> dict[str, Any]:
        """What besides the members' fingerprints makes a shard's bytes."""
        return {"scales": [int(s) for s in self.scales], "groups": self.groups_sha256}

    def region_fp(self, ingest_fp: str) -> str:
        return region_fingerprint(ingest_fp=ingest_fp, region_digest=self.region_digest)


@dataclass(frozen=True)
class SourceTask:
    """One source file to bring through ingest -> mask -> pyramid."""

    path: str
    relpath: str
    source_sha256: str
    ingest_fp: str


@dataclass
class SampleRef:
    """What the driver needs to pack one sample (everything else is in the cache)."""

    key: str
    relpath: str
    frame: int | None
    index_in_source: int
    source_sha256: str
    ingest_fp: str
    mask_fp: str
    pyramid_fp: str
    original_size: tuple[int, int]
    source_path: str = ""  # the file's path on the machine that read it (for the plan memo)


@dataclass
class ErrorRecord:
    path: str
    stage: str
    reason: str
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"path": self.path, "stage": self.stage, "reason": self.reason}
        if self.key is not None:
            data["key"] = self.key
        return data


@dataclass
class StageTally:
    computed: int = 0
    reused: int = 0
    failed: int = 0
    seconds: float = 0.0

    def add(self, other: "StageTally") -> None:
        self.computed += other.computed
        self.reused += other.reused
        self.failed += other.failed
        self.seconds += other.seconds


@dataclass
class TaskResult:
    samples: list[SampleRef] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    tallies: dict[str, StageTally] = field(default_factory=lambda: {s: StageTally() for s in ("ingest", "region", "mask", "pyramid")})
    masker_seconds: float = 0.0
    cache_bytes_written: int = 0
    sources_done: int = 0
    sources_reused: int = 0  # sources whose ingest entry was already cached
    process: str = field(default_factory=lambda: f"{__import__('socket').gethostname()}:{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# Cache entry codecs
# ---------------------------------------------------------------------------------------------


def encode_ingest_entry(relpath: str, source_sha256: str, frames: Sequence[tuple], source_info: Mapping[str, Any] | None = None):
    """``frames``: (key, frame, original size, uint8 image[, bool colour map or None]) each."""
    meta = {"relpath": relpath, "source_sha256": source_sha256, "frames": [], "source_info": dict(source_info or {"kind": "image"})}
    sections = {}
    for index, (key, frame, original_size, image, *rest) in enumerate(frames):
        image = np.ascontiguousarray(image, dtype=np.uint8)
        colour = rest[0] if rest else None
        # Keys are not stored: they derive from the path, which is not part of the (content)
        # fingerprint; two files with equal bytes share this entry under their own keys.
        entry = {"frame": frame, "original_size": list(original_size), "shape": list(image.shape)}
        sections[f"image{index}"] = zlib.compress(image.tobytes(), 1)
        if colour is not None:
            entry["colour"] = True
            sections[f"colour{index}"] = zlib.compress(np.packbits(np.asarray(colour, bool)).tobytes(), 1)
        meta["frames"].append(entry)
    return meta, sections


def decode_ingest_colour(meta: Mapping[str, Any], sections: Mapping[str, bytes], index: int) -> np.ndarray | None:
    frame = meta["frames"][index]
    if not frame.get("colour"):
        return None
    shape = tuple(frame["shape"])
    bits = np.frombuffer(zlib.decompress(sections[f"colour{index}"]), np.uint8)
    return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def encode_region_entry(region: np.ndarray, info: Mapping[str, Any]):
    region = np.asarray(region, bool)
    meta = {"shape": list(region.shape), "info": dict(info)}
    return meta, {"region": zlib.compress(np.packbits(region).tobytes(), 6)}


def decode_region_entry(meta: Mapping[str, Any], sections: Mapping[str, bytes]) -> np.ndarray:
    shape = tuple(meta["shape"])
    bits = np.frombuffer(zlib.decompress(sections["region"]), np.uint8)
    return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def decode_ingest_image(meta: Mapping[str, Any], sections: Mapping[str, bytes], index: int) -> np.ndarray:
    shape = tuple(meta["frames"][index]["shape"])
    return np.frombuffer(zlib.decompress(sections[f"image{index}"]), np.uint8).reshape(shape)


def encode_mask_entry(mask_set: MaskSet):
    from shards.sample import CODEC_ZSTD, encode_masks

    meta = {"ids": mask_set.ids.tolist(), "sources": list(mask_set.sources), "scores": [float(s) for s in mask_set.scores], "shape": list(mask_set.masks.shape)}
    return meta, {"masks": encode_masks(mask_set.masks, codec=CODEC_ZSTD, level=_CACHE_ZSTD_LEVEL)}


def decode_mask_entry(meta: Mapping[str, Any], sections: Mapping[str, bytes]) -> MaskSet:
    from shards.sample import decode_masks

    masks = decode_masks(sections["masks"])
    return MaskSet(masks=masks, ids=np.asarray(meta["ids"], np.int32), sources=list(meta["sources"]), scores=np.asarray(meta["scores"], np.float32))


def encode_pyramid_entry(pyramid: Mapping[int, np.ndarray]):
    from shards.sample import CODEC_ZSTD, encode_pyramid

    return {"scales": [int(s) for s in pyramid]}, {"pyramid": encode_pyramid(pyramid, codec=CODEC_ZSTD, level=_CACHE_ZSTD_LEVEL)}


def decode_pyramid_entry(sections: Mapping[str, bytes]) -> dict[int, np.ndarray]:
    from shards.sample import decode_pyramid

    return decode_pyramid(sections["pyramid"])


# ---------------------------------------------------------------------------------------------
# Masker per worker process
# ---------------------------------------------------------------------------------------------

# Built once per process and keyed by the full spec, so two specs never share an instance and
# the output depends only on the spec: a per-process memo, not state that changes results.
_MASKERS: dict[MaskerSpec, Any] = {}


def get_masker(spec: MaskerSpec):
    masker = _MASKERS.get(spec)
    if masker is None:
        from anaus_core.maskers import build_masker
        from pipeline.fingerprint import canonical_json

        masker = build_masker(spec.name, **spec.build_options())
        actual = canonical_json(masker.fingerprint())
        if actual != spec.fingerprint_json:
            raise RuntimeError(
                f"masker {spec.name!r} on this worker has fingerprint {actual}, the driver expected "
                f"{spec.fingerprint_json}: is the checkpoint file the same on every machine?"
            )
        _MASKERS[spec] = masker
    return masker


def remember_masker(spec: MaskerSpec, masker: Any) -> None:
    """Let the driver reuse the masker it built for the fingerprint (serial execution)."""
    _MASKERS[spec] = masker


def sample_inputs(masker: Any, meta: ImageMeta) -> dict[str, Any]:
    """Per-sample inputs a masker reads besides the image (the ``labels`` masker: the label
    file's name and sha256), from its optional ``sample_fingerprint(meta)``; they enter the
    mask fingerprint so that editing one label re-runs the mask stage of that sample only.
    Raises ``SampleError`` (e.g. no label file) like the masker itself would."""
    locate = getattr(masker, "sample_fingerprint", None)
    return dict(locate(meta)) if locate is not None else {}


def image_meta(key: str, relpath: str, frame: int | None, original_size, source_path: str) -> ImageMeta:
    return ImageMeta(key=key, relpath=relpath, frame=frame, extra={"original_size": tuple(int(v) for v in original_size), "source_path": source_path})


# ---------------------------------------------------------------------------------------------
# The chain ingest -> mask -> pyramid for a batch of sources
# ---------------------------------------------------------------------------------------------


def _fault_point(name: str) -> None:
    from pipeline.faults import fault_point

    fault_point(name)


@dataclass
class IngestedBatch:
    """``ingest_source_batch``'s output: per task the ingest entry (meta, sections) or None
    (failed; recorded in ``result``), and the batch's ``TaskResult`` so far."""

    tasks: Sequence[SourceTask]
    frames: list
    result: TaskResult


def ingest_source_batch(tasks: Sequence[SourceTask], settings: StageSettings) -> IngestedBatch:
    """The ingest stage of ``run_source_batch`` alone (``pipeline.prefetch`` runs it ahead in a
    thread; ``run_source_batch(..., ingested=...)`` continues from it)."""
    cache = StageCache(settings.cache_root)
    result = TaskResult()
    return IngestedBatch(tasks=tasks, frames=[_ingest(task, settings, cache, result) for task in tasks], result=result)


def run_source_batch(tasks: Sequence[SourceTask], settings: StageSettings, ingested: IngestedBatch | None = None) -> TaskResult:
    """Bring every source of ``tasks`` through ingest, mask and pyramid, reusing cache entries.

    Never raises for a bad sample: failures become ``ErrorRecord``s (and cached failures when
    they are a property of the input, i.e. ``SampleError``), so one bad file never stops the
    others. ``ingested``: the ingest stage already done by ``ingest_source_batch``.
    """
    cache = StageCache(settings.cache_root)
    result = TaskResult() if ingested is None else ingested.result
    masker = None
    pending: list[dict[str, Any]] = []  # samples whose mask must be computed

    for position, task in enumerate(tasks):
        frames = _ingest(task, settings, cache, result) if ingested is None else ingested.frames[position]
        result.sources_done += 1
        if frames is None:
            continue
        meta, sections = frames
        region = _scan_region(task, meta, sections, settings, cache, result)
        if region is None:
            continue
        region_fp = settings.region_fp(task.ingest_fp)
        for index, frame_meta in enumerate(meta["frames"]):
            if masker is None:
                masker = get_masker(settings.masker)
            frame = frame_meta["frame"]
            key = make_key(task.relpath, frame)
            imeta = image_meta(key, task.relpath, frame, frame_meta["original_size"], task.path)
            try:
                inputs = sample_inputs(masker, imeta)
            except SampleError as exc:
                result.errors.append(ErrorRecord(task.relpath, "mask", _one_line(exc), key))
                result.tallies["mask"].failed += 1
                continue
            mask_fp = mask_fingerprint(ingest_fp=task.ingest_fp, frame=frame, mask_digest=settings.mask_digest, sample_inputs=inputs, region_fp=region_fp)
            item = {
                "task": task, "index": index, "frame_meta": frame_meta, "meta": imeta, "mask_fp": mask_fp, "region": region,
                "pyramid_fp": pyramid_fingerprint(mask_fp=mask_fp, pyramid_digest=settings.pyramid_digest), "sections": sections, "ingest_meta": meta,
            }
            if cache.has("mask", mask_fp):
                result.tallies["mask"].reused += 1
                _pyramid(item, None, settings, cache, result)
                continue
            failure = cache.get_failure("mask", mask_fp)
            if failure is not None:
                result.errors.append(ErrorRecord(task.relpath, "mask", failure["reason"], key))
                result.tallies["mask"].failed += 1
                continue
            pending.append(item)
            if len(pending) >= settings.batch_size:
                _mask_batch(pending, masker, settings, cache, result)
                pending = []
    if pending:
        _mask_batch(pending, masker, settings, cache, result)
    return result


def _ingest(task: SourceTask, settings: StageSettings, cache: StageCache, result: TaskResult):
    from pipeline.ingest import IngestError, SourceFile, iter_ingest_source

    tally = result.tallies["ingest"]
    if cache.has("ingest", task.ingest_fp):
        try:
            meta, sections = cache.get("ingest", task.ingest_fp)
            tally.reused += len(meta["frames"])
            result.sources_reused += 1
            return meta, sections
        except CacheEntryError:
            pass  # damaged entry: recompute below and overwrite it
    failure = cache.get_failure("ingest", task.ingest_fp)
    if failure is not None:
        result.errors.append(ErrorRecord(task.relpath, "ingest", failure["reason"]))
        tally.failed += 1
        return None
    start = time.perf_counter()
    try:
        source = SourceFile(path=Path(task.path), relpath=task.relpath)
        items = list(iter_ingest_source(source, stored_size=settings.stored_size, every_nth_frame=settings.every_nth_frame, source_sha256=task.source_sha256))
        frames = [(item.key, item.frame, item.original_size, item.image, item.colour) for item in items]
        source_info = items[0].source_info if items else None
    except IngestError as exc:
        tally.seconds += time.perf_counter() - start
        reason = _one_line(exc)
        # A file that vanished may come back; everything else is a property of these bytes.
        if "not found" not in reason:
            cache.put_failure("ingest", task.ingest_fp, {"path": task.relpath, "stage": "ingest", "reason": reason})
        result.errors.append(ErrorRecord(task.relpath, "ingest", reason))
        tally.failed += 1
        return None
    except Exception as exc:  # a decoder bug must not stop the other files; not cached
        tally.seconds += time.perf_counter() - start
        result.errors.append(ErrorRecord(task.relpath, "ingest", f"unexpected {type(exc).__name__}: {_one_line(exc)}"))
        tally.failed += 1
        return None
    meta, sections = encode_ingest_entry(task.relpath, task.source_sha256, frames, source_info)
    result.cache_bytes_written += cache.put("ingest", task.ingest_fp, meta, sections)
    tally.seconds += time.perf_counter() - start
    tally.computed += len(frames)
    return meta, sections


def _scan_region(task: SourceTask, meta: Mapping[str, Any], sections: Mapping[str, bytes], settings: StageSettings, cache: StageCache,
                 result: TaskResult) -> np.ndarray | None:
    """The scan region of a source (all its frames), from the cache or computed; None (error
    recorded, failure cached) when it has none."""
    from anaus_core.scan_region import ScanRegionConfig, ScanRegionError, detect_scan_region

    tally = result.tallies["region"]
    region_fp = settings.region_fp(task.ingest_fp)
    if cache.has("region", region_fp):
        try:
            region = decode_region_entry(*cache.get("region", region_fp))
            tally.reused += len(meta["frames"])  # counted per sample, as ingest is
            return region
        except CacheEntryError:
            pass  # damaged entry: recompute
    failure = cache.get_failure("region", region_fp)
    if failure is not None:
        result.errors.append(ErrorRecord(task.relpath, "region", failure["reason"]))
        tally.failed += 1
        return None
    start = time.perf_counter()
    count = len(meta["frames"])
    try:
        config = ScanRegionConfig(**{k: v for k, v in settings.region_options.items() if k != "code_version"})
        # evenly spaced frames (as many as the detector uses): a long clip is not decoded whole
        chosen = sorted({int(round(i)) for i in np.linspace(0, count - 1, min(count, config.max_frames))})
        frames = [decode_ingest_image(meta, sections, i) for i in chosen]
        colours = [decode_ingest_colour(meta, sections, i) for i in chosen]
        found = detect_scan_region(np.stack(frames), colour=colours if any(c is not None for c in colours) else None, config=config)
    except (ScanRegionError, ValueError) as exc:
        reason = _one_line(exc)
        cache.put_failure("region", region_fp, {"path": task.relpath, "stage": "region", "reason": reason})
        result.errors.append(ErrorRecord(task.relpath, "region", reason))
        tally.failed += 1
        tally.seconds += time.perf_counter() - start
        return None
    except Exception as exc:  # a bug must not stop the other files; not cached
        result.errors.append(ErrorRecord(task.relpath, "region", f"unexpected {type(exc).__name__}: {_one_line(exc)}"))
        tally.failed += 1
        tally.seconds += time.perf_counter() - start
        return None
    entry_meta, entry_sections = encode_region_entry(found.mask, found.info)
    result.cache_bytes_written += cache.put("region", region_fp, entry_meta, entry_sections)
    tally.computed += count
    tally.seconds += time.perf_counter() - start
    return found.mask


def _mask_batch(items: list[dict[str, Any]], masker, settings: StageSettings, cache: StageCache, result: TaskResult) -> None:
    tally = result.tallies["mask"]
    start = time.perf_counter()
    images = [decode_ingest_image(item["ingest_meta"], item["sections"], item["index"]) for item in items]
    # the masker sees the scan region (weight-free maskers work inside it); finalize clips to it
    metas = [ImageMeta(key=item["meta"].key, relpath=item["meta"].relpath, frame=item["meta"].frame,
                       extra={**item["meta"].extra, "scan_region": item["region"]}) for item in items]
    outputs = _call_masker(masker, images, metas, result)
    finished: list[tuple[dict[str, Any], MaskSet]] = []
    for item, image, output in zip(items, images, outputs):
        relpath, key = item["task"].relpath, item["meta"].key
        if isinstance(output, BaseException):
            reason = _one_line(output)
            if isinstance(output, SampleError):
                cache.put_failure("mask", item["mask_fp"], {"path": relpath, "stage": "mask", "reason": reason})
            else:
                reason = f"unexpected {type(output).__name__}: {reason}"
            result.errors.append(ErrorRecord(relpath, "mask", reason, key))
            tally.failed += 1
            continue
        if output.shape != image.shape:
            result.errors.append(ErrorRecord(relpath, "mask", f"masker returned masks of {output.shape}, image is {image.shape}", key))
            tally.failed += 1
            continue
        if item["region"].shape != image.shape:
            result.errors.append(ErrorRecord(relpath, "mask", f"scan region is {item['region'].shape}, image is {image.shape}", key))
            tally.failed += 1
            continue
        final = output.finalize(**settings.finalize_options, region=item["region"])
        meta, sections = encode_mask_entry(final)
        result.cache_bytes_written += cache.put("mask", item["mask_fp"], meta, sections)
        tally.computed += 1
        finished.append((item, final))
    tally.seconds += time.perf_counter() - start
    for item, final in finished:
        _pyramid(item, final, settings, cache, result)


def _call_masker(masker, images, metas, result: TaskResult) -> list:
    """One masker call for the batch; on a failure, image by image to isolate the bad ones."""
    start = time.perf_counter()
    try:
        outputs = list(masker(images, metas))
        if len(outputs) != len(images):
            raise RuntimeError(f"masker returned {len(outputs)} mask sets for {len(images)} images")
        return outputs
    except Exception as batch_error:
        if len(images) == 1:
            return [batch_error]
        outputs = []
        for image, meta in zip(images, metas):
            try:
                outputs.append(masker([image], [meta])[0])
            except Exception as exc:
                outputs.append(exc)
        return outputs
    finally:
        result.masker_seconds += time.perf_counter() - start


def _pyramid(item: dict[str, Any], mask_set: MaskSet | None, settings: StageSettings, cache: StageCache, result: TaskResult) -> None:
    from shards.sample import compute_mask_pyramid

    tally = result.tallies["pyramid"]
    task, frame_meta = item["task"], item["frame_meta"]
    if cache.has("pyramid", item["pyramid_fp"]):
        tally.reused += 1
    else:
        start = time.perf_counter()
        if mask_set is None:
            mask_set = decode_mask_entry(*cache.get("mask", item["mask_fp"]))
        pyramid = compute_mask_pyramid(mask_set.masks, settings.scales)
        meta, sections = encode_pyramid_entry(pyramid)
        result.cache_bytes_written += cache.put("pyramid", item["pyramid_fp"], meta, sections)
        tally.computed += 1
        tally.seconds += time.perf_counter() - start
    result.samples.append(
        SampleRef(
            key=item["meta"].key, relpath=task.relpath, frame=frame_meta["frame"], index_in_source=item["index"],
            source_sha256=task.source_sha256, ingest_fp=task.ingest_fp, mask_fp=item["mask_fp"], pyramid_fp=item["pyramid_fp"],
            original_size=tuple(frame_meta["original_size"]), source_path=task.path,
        )
    )
    _fault_point("sample")


# ---------------------------------------------------------------------------------------------
# Pack: one shard per task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    out_dir: str
    name: str
    shard_fp: str
    members: tuple[SampleRef, ...]
    cache_root: str
    scales: tuple[int, ...]
    region_digest: str = ""
    groups: tuple[tuple[str, str], ...] = ()  # (relpath, group) from groups.csv, for these members
    anatomy: Any = None  # pipeline.anatomy.AnatomySource: a category per sample (--anatomy)


@dataclass
class ShardResult:
    info: Any  # shards.writer.ShardInfo without its entries (samples=[]): they stay in the pack cache
    seconds: float
    samples: int


def sample_record(ref: SampleRef) -> dict[str, Any]:
    return {
        "source_path": ref.relpath,
        "source_sha256": ref.source_sha256,
        "original_size": list(ref.original_size),
        "frame": ref.frame,
        "fingerprints": {"ingest": ref.ingest_fp, "mask": ref.mask_fp, "pyramid": ref.pyramid_fp},
    }


def load_shard_sample(ref: SampleRef, cache: StageCache, scales: Sequence[int], *, region_digest: str = "",
                      groups: Mapping[str, str] | None = None, anatomy: str | None = None):
    """Assemble the ``ShardSample`` of ``ref`` from its cache entries (ingest, scan region,
    mask, pyramid); the record gets the region's facts, the sample's origin and its group."""
    from pipeline.fingerprint import region_fingerprint
    from pipeline.ingest import sample_group
    from shards.sample import ShardSample

    ingest_meta, ingest_sections = cache.get("ingest", ref.ingest_fp)
    image = decode_ingest_image(ingest_meta, ingest_sections, ref.index_in_source)
    mask_set = decode_mask_entry(*cache.get("mask", ref.mask_fp))
    _, pyramid_sections = cache.get("pyramid", ref.pyramid_fp)
    pyramid = decode_pyramid_entry(pyramid_sections)
    pyramid = {int(s): pyramid[int(s)] for s in scales}
    record = sample_record(ref)
    info = dict(ingest_meta.get("source_info") or {"kind": "image"})
    origin = {"kind": info.get("kind", "image"), "file": ref.relpath}
    if ref.frame is not None:
        origin["frame"] = int(ref.frame)
    if info.get("dicom"):
        origin["dicom"] = dict(info["dicom"])
    group, group_source = sample_group(ref.relpath, info, dict(groups or {}))
    record["origin"] = origin
    record["group"] = {"id": group, "source": group_source}
    region = None
    if region_digest:
        region_fp = region_fingerprint(ingest_fp=ref.ingest_fp, region_digest=region_digest)
        region_meta, region_sections = cache.get("region", region_fp)
        region = decode_region_entry(region_meta, region_sections)
        record["fingerprints"]["region"] = region_fp
        record["scan_region"] = dict(region_meta.get("info", {}))
    record["masks"] = mask_set.records()
    if anatomy is not None:  # precompute-masks --anatomy (pipeline/anatomy.py)
        record["anatomy"] = anatomy
    return ShardSample(key=ref.key, image=image, mask_set=mask_set, mask_pyramid=pyramid, record=record, scan_region=region)


def write_shard_task(task: ShardTask) -> ShardResult:
    """Write one shard from cache entries (atomic), then its info sidecar in the pack cache."""
    from shards.writer import write_shard

    start = time.perf_counter()
    cache = StageCache(task.cache_root)
    groups = dict(task.groups)
    categories = [None] * len(task.members)
    if task.anatomy is not None:
        from pipeline.anatomy import AnatomyResolver

        categories = AnatomyResolver(task.anatomy).categories(task.members, cache)
    info = write_shard(Path(task.out_dir) / task.name,
                       (load_shard_sample(ref, cache, task.scales, region_digest=task.region_digest, groups=groups, anatomy=anatomy)
                        for ref, anatomy in zip(task.members, categories)))
    _fault_point("shard")
    sidecar = shard_info_to_dict(info)
    if task.anatomy is not None:
        sidecar["anatomy"] = categories  # read back for the index column (pipeline.anatomy)
    cache.put("pack", task.shard_fp, sidecar, {})
    # The driver needs name, sha256 and size; the per-sample entries are read back from the pack
    # cache when the index is written (sending them would cost the driver memory per sample).
    light = type(info)(name=info.name, sha256=info.sha256, size=info.size, samples=[])
    return ShardResult(info=light, seconds=time.perf_counter() - start, samples=len(info.samples))


def shard_info_to_dict(info) -> dict[str, Any]:
    return {
        "name": info.name, "sha256": info.sha256, "size": info.size,
        "samples": [[e.key, e.offset, e.size, e.mask_count, list(e.mask_areas), e.source_hash, e.group] for e in info.samples],
    }


def shard_info_from_dict(data: Mapping[str, Any]):
    """The ShardInfo of a pack-cache sidecar; its samples are a compact ``SampleEntryTable``
    (a sequence of ``SampleEntry``), since the driver keeps one per shard of the corpus."""
    from shards.writer import SampleEntryTable, ShardInfo

    return ShardInfo(name=data["name"], sha256=data["sha256"], size=int(data["size"]), samples=SampleEntryTable.from_rows(data["samples"]))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
