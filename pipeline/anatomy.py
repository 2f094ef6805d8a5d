"""Anatomy category of every sample: ``precompute-masks --anatomy FROM``.

One category name per sample, written into the shard record (``record["anatomy"]``, what the
A-ViT loader reads), the pack-cache sidecar and the index (``anatomy`` column of codes into the
manifest's ``anatomy.categories`` list, with per-category counts). ``FROM`` is one of

* ``csv:FILE`` (or a path ending in ``.csv``): rows ``file,category``; ``file`` is matched
  against the sample's corpus-relative path, then its file name; a header row whose second
  cell is ``category`` is skipped;
* ``folder``: the name of the file's parent folder (files at the corpus root: unknown);
* ``dicom``: the DICOM ``BodyPartExamined`` attribute (0018,0015) of the source file, lower-cased;
* ``lpsam``: the LP-SAM class with the largest total mask area in the sample (masks whose
  source is ``lpsam:<class>``; needs ``--masker lpsam``).

``unknown`` when the source has nothing for a sample. The category is a function of the
sample's key/source file (``folder``, ``dicom``), its masks (``lpsam``, through the pyramid
fingerprint) and the CSV's bytes (its sha256), so it enters only the PACK stage fingerprint:
adding or changing ``--anatomy`` on an existing store rewrites the shards and the index and
recomputes nothing else (tests/test_anatomy_store.py).
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from anaus_core.errors import UserInputError

UNKNOWN = "unknown"
RECORD_KEY = "anatomy"
KINDS = ("csv", "folder", "dicom", "lpsam")


@dataclass(frozen=True)
class AnatomySource:
    """A parsed ``--anatomy`` value (picklable: it travels with the pack tasks)."""

    kind: str
    corpus: str = ""
    csv_path: str = ""
    csv_sha256: str = ""
    table: tuple[tuple[str, str], ...] = ()   # (file, category) rows of the CSV

    def pack_option(self) -> dict[str, str]:
        """What enters the pack stage fingerprint."""
        option = {"anatomy": self.kind}
        if self.kind == "csv":
            option["anatomy_csv_sha256"] = self.csv_sha256
        return option


def parse_anatomy_source(value: str | None, *, corpus: str = "") -> AnatomySource | None:
    """``--anatomy`` -> ``AnatomySource`` (None when unset); one-line ``UserInputError`` for bad input."""
    if value is None or str(value).strip() == "":
        return None
    value = str(value).strip()
    if value in ("folder", "dicom", "lpsam"):
        return AnatomySource(kind=value, corpus=str(corpus))
    path = value[4:] if value.startswith("csv:") else value
    if not (value.startswith("csv:") or path.lower().endswith(".csv")):
        raise UserInputError(f"--anatomy {value}: must be csv:FILE (or a .csv path), folder, dicom or lpsam")
    csv_path = Path(path)
    if not csv_path.is_file():
        raise UserInputError(f"{csv_path}: anatomy CSV not found")
    data = csv_path.read_bytes()
    rows: list[tuple[str, str]] = []
    try:
        reader = csv.reader(data.decode("utf-8-sig").splitlines())
        for number, row in enumerate(reader, start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise UserInputError(f"{csv_path}: line {number}: expected 'file,category', got {','.join(row)!r}")
            name, category = row[0].strip(), row[1].strip()
            if number == 1 and category.lower() == "category":
                continue
            rows.append((name, category or UNKNOWN))
    except UnicodeDecodeError:
        raise UserInputError(f"{csv_path}: anatomy CSV is not UTF-8 text") from None
    return AnatomySource(kind="csv", corpus=str(corpus), csv_path=str(csv_path),
                         csv_sha256=hashlib.sha256(data).hexdigest(), table=tuple(rows))


class AnatomyResolver:
    """Category of each ``SampleRef`` under one ``AnatomySource`` (built once per pack task)."""

    def __init__(self, source: AnatomySource) -> None:
        self.source = source
        self._by_path: dict[str, str] = {}
        self._by_name: dict[str, str] = {}
        for name, category in source.table:
            self._by_path[PurePosixPath(name.replace("\\", "/")).as_posix()] = category
            self._by_name.setdefault(PurePosixPath(name.replace("\\", "/")).name, category)
        self._dicom_memo: dict[str, str] = {}

    def category(self, ref: Any, cache: Any = None) -> str:
        kind = self.source.kind
        relpath = PurePosixPath(str(ref.relpath).replace("\\", "/"))
        if kind == "csv":
            found = self._by_path.get(relpath.as_posix(), self._by_name.get(relpath.name))
            return found or UNKNOWN
        if kind == "folder":
            parent = relpath.parent.name
            return parent or UNKNOWN
        if kind == "dicom":
            path = ref.source_path or str(Path(self.source.corpus) / relpath)
            if path not in self._dicom_memo:   # every frame of a multi-frame file shares one read
                self._dicom_memo[path] = dicom_body_part(path)
            return self._dicom_memo[path]
        if kind == "lpsam":
            if cache is None:
                raise ValueError("anatomy from lpsam needs the stage cache")
            return largest_lpsam_class(*cache.get("mask", ref.mask_fp))
        raise ValueError(f"unknown anatomy source {kind!r}")

    def categories(self, refs: Iterable[Any], cache: Any = None) -> list[str]:
        return [self.category(ref, cache) for ref in refs]


def dicom_body_part(path: str | Path) -> str:
    """``BodyPartExamined`` of a DICOM file, lower-cased; ``unknown`` when absent or not DICOM."""
    try:
        import pydicom

        dataset = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["BodyPartExamined"], force=False)
    except Exception:  # not DICOM (a PNG or video in a mixed corpus) or unreadable header
        return UNKNOWN
    value = str(getattr(dataset, "BodyPartExamined", "") or "").strip().lower()
    return value or UNKNOWN


def largest_lpsam_class(meta: Mapping[str, Any], sections: Mapping[str, bytes]) -> str:
    """The LP-SAM class whose masks (source ``lpsam:<class>``) cover the most pixels."""
    sources = list(meta.get("sources", []))
    if not any(str(s).startswith("lpsam:") for s in sources):
        return UNKNOWN
    from shards.sample import decode_masks

    masks = decode_masks(sections["masks"])
    areas: Counter[str] = Counter()
    for source, mask in zip(sources, masks):
        if str(source).startswith("lpsam:"):
            areas[str(source)[len("lpsam:"):]] += int(np.count_nonzero(mask))
    if not areas:
        return UNKNOWN
    # ties: the alphabetically first class, so the result does not depend on mask order
    best = max(areas.values())
    return min(name for name, area in areas.items() if area == best)


def category_table(per_shard: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Per-shard category lists (index order) -> (sorted vocabulary with ``unknown`` first, int16 codes)."""
    names = sorted({name for shard in per_shard for name in shard} - {UNKNOWN})
    vocabulary = [UNKNOWN, *names]
    lookup = {name: code for code, name in enumerate(vocabulary)}
    codes = np.fromiter((lookup[name] for shard in per_shard for name in shard), dtype=np.int16)
    return vocabulary, codes


def category_counts(vocabulary: Sequence[str], codes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(codes, np.int64), minlength=len(vocabulary))
    return {name: int(count) for name, count in zip(vocabulary, counts)}


def index_anatomy(cache: Any, shard_fps: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(vocabulary, codes) of every sample in index order, from the shards' pack-cache sidecars
    (one sidecar read per shard; reused shards keep the categories they were written with)."""
    per_shard = []
    for shard_fp in shard_fps:
        meta = cache.get_meta("pack", shard_fp, probe_bytes=1 << 16)
        if "anatomy" not in meta:
            raise ValueError(f"pack entry {shard_fp[:12]} has no anatomy categories")
        per_shard.append([str(name) for name in meta["anatomy"]])
    return category_table(per_shard)
