"""Validation of a shard directory or a single shard: every problem, each naming shard and key.

Checks, per shard, independently (a bad shard never stops the others from being checked):
- the shard named by the manifest exists (``missing``), its size and sha256 match the
  manifest (``checksum``: truncated when shorter, altered otherwise);
- the tar parses to the end, end-of-archive marker included (``structure``);
- every sample decodes with matching member crc32s (``sample``) and its record agrees with
  its arrays: shape, mask count, areas, scales, and the stored pyramid equals the pyramid
  recomputed from the masks within ±1 (``consistency``);
- the index agrees with the shard: same keys in the same order, offsets and sizes that point
  at those keys, mask counts, areas and source hashes (``index``).
Directory-level: manifest and index readable and in step (``manifest`` / ``index``);
``*.tar`` files the manifest does not name and leftover temporary files are warnings.

A single ``.tar`` without a manifest beside it gets the structure and sample checks only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from anaus_core.errors import UserInputError
from shards.index import INDEX_NAME, MANIFEST_NAME, ShardIndex, read_index, read_manifest
from shards.reader import RawSample, ShardReadError, file_sha256, iter_raw_samples
from shards.sample import SampleFormatError, ShardSample, consistency_problems, decode_sample


@dataclass
class Problem:
    """One finding. ``severity`` is ``error`` (validation fails) or ``warning``."""

    kind: str
    message: str
    shard: str | None = None
    key: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = " ".join(part for part in (self.shard, f"[{self.key}]" if self.key else None) if part)
        return f"{self.severity}: {where + ': ' if where else ''}{self.message} ({self.kind})"


@dataclass
class ShardCheck:
    name: str
    ok: bool
    samples: int
    size: int
    sha256: str | None = None


@dataclass
class ValidationReport:
    path: str
    ok: bool = True
    problems: list[Problem] = field(default_factory=list)
    shards: list[ShardCheck] = field(default_factory=list)
    samples_checked: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)
        if problem.severity == "error":
            self.ok = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "samples_checked": self.samples_checked,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) | {"text": str(p)} for p in self.problems],
            "shards": [asdict(s) for s in self.shards],
        }


SampleCallback = Callable[[str, ShardSample, RawSample], None]


def _check_shard_contents(
    path: Path,
    report: ValidationReport,
    *,
    index: ShardIndex | None,
    shard_number: int | None,
    expected_samples: int | None,
    check_pyramid: bool,
    on_sample: SampleCallback | None,
) -> tuple[int, bool]:
    """Parse and decode every sample of one shard; returns (samples seen, ok)."""
    name = path.name
    ok = True
    rows = list(index.rows_of_shard(shard_number)) if index is not None and shard_number is not None else None
    seen = 0
    try:
        for raw in iter_raw_samples(path):
            if rows is not None:
                if seen >= len(rows):
                    report.add(Problem("index", f"sample {seen} is not in the index", name, raw.key))
                    ok = False
                else:
                    row = rows[seen]
                    expected_key = index.keys[row]
                    if raw.key != expected_key:
                        report.add(Problem("index", f"sample {seen} is {raw.key!r}, index says {expected_key!r}", name, raw.key))
                        ok = False
                    elif (int(index.offset[row]), int(index.size[row])) != (raw.offset, raw.size):
                        report.add(Problem("index", f"index says bytes {int(index.offset[row])}+{int(index.size[row])}, tar has {raw.offset}+{raw.size}", name, raw.key))
                        ok = False
            seen += 1
            try:
                sample = decode_sample(raw.as_webdataset_dict(str(path)), verify=True)
            except SampleFormatError as exc:
                report.add(Problem("sample", str(exc).removeprefix(f"{raw.key}: "), name, raw.key))
                ok = False
                continue
            problems = consistency_problems(sample) if check_pyramid else []
            for message in problems:
                report.add(Problem("consistency", message, name, raw.key))
                ok = False
            if rows is not None and seen <= len(rows) and raw.key == index.keys[rows[seen - 1]]:
                row = rows[seen - 1]
                areas = [int(a) for a in sample.mask_set.areas]
                if int(index.mask_count[row]) != len(areas) or [int(a) for a in index.areas_of(row)] != areas:
                    report.add(Problem("index", "index mask count/areas disagree with the sample", name, raw.key))
                    ok = False
                if index.source_hash[row] != str(sample.record.get("source_sha256", "")):
                    report.add(Problem("index", "index source hash disagrees with the record", name, raw.key))
                    ok = False
            report.samples_checked += 1
            if on_sample is not None:
                on_sample(name, sample, raw)
    except ShardReadError as exc:
        report.add(Problem("structure", str(exc).removeprefix(f"{path}: "), name))
        return seen, False
    if rows is not None and seen < len(rows):
        report.add(Problem("index", f"index lists {len(rows)} samples, shard holds {seen}", name))
        ok = False
    if expected_samples is not None and seen != expected_samples:
        report.add(Problem("manifest", f"manifest says {expected_samples} samples, shard holds {seen}", name))
        ok = False
    return seen, ok


def _validate_directory(directory: Path, report: ValidationReport, *, check_pyramid: bool, on_sample: SampleCallback | None) -> None:
    index: ShardIndex | None = None
    manifest: dict[str, Any] | None = None
    try:
        index = read_index(directory)
        manifest = index.manifest
    except UserInputError as exc:
        report.add(Problem("index", str(exc)))
        try:
            manifest = read_manifest(directory)
        except UserInputError:
            manifest = None  # already reported (read_index reads the manifest first)

    named: list[dict[str, Any]] = list(manifest["shards"]) if manifest is not None else []
    if manifest is None:
        # Without a manifest every tar on disk is checked for structure and consistency.
        named = [{"name": p.name, "sha256": None, "size": None, "samples": None} for p in sorted(directory.glob("*.tar"))]
    names = {entry["name"] for entry in named}
    for number, entry in enumerate(named):
        path = directory / entry["name"]
        if not path.is_file():
            report.add(Problem("missing", f"shard named by {MANIFEST_NAME} is missing", entry["name"]))
            report.shards.append(ShardCheck(entry["name"], False, 0, 0))
            continue
        ok = True
        size = path.stat().st_size
        sha256 = None
        if entry["sha256"] is not None:
            try:
                sha256 = file_sha256(path)
            except OSError as exc:
                report.add(Problem("structure", f"cannot read ({exc.strerror or exc})", entry["name"]))
                report.shards.append(ShardCheck(entry["name"], False, 0, size))
                continue
            if sha256 != entry["sha256"] or size != entry["size"]:
                what = "truncated" if size < entry["size"] else ("altered" if size == entry["size"] else "grown")
                report.add(Problem("checksum", f"sha256 mismatch: {what} ({size} bytes, manifest {entry['size']})", entry["name"]))
                ok = False
        seen, contents_ok = _check_shard_contents(
            path,
            report,
            index=index,
            shard_number=number if index is not None else None,
            expected_samples=entry["samples"],
            check_pyramid=check_pyramid,
            on_sample=on_sample,
        )
        report.shards.append(ShardCheck(entry["name"], ok and contents_ok, seen, size, sha256))
    if manifest is not None:
        for orphan in sorted(p.name for p in directory.glob("*.tar") if p.name not in names):
            report.add(Problem("orphan", f"shard not named by {MANIFEST_NAME} (not part of the dataset)", orphan, severity="warning"))
    for leftover in sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and ".tmp-" in p.name):
        report.add(Problem("temp", "temporary file of an interrupted write (safe to delete)", leftover, severity="warning"))


def validate(path: str | os.PathLike, *, check_pyramid: bool = True, on_sample: SampleCallback | None = None) -> ValidationReport:
    """Validate a shard directory or one ``.tar``. Never raises for bad data: problems are in the
    report. Raises UserInputError only when ``path`` does not exist or is neither."""
    path = Path(path)
    report = ValidationReport(path=str(path))
    if path.is_dir():
        _validate_directory(path, report, check_pyramid=check_pyramid, on_sample=on_sample)
        return report
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if not path.is_file():
        raise UserInputError(f"{path}: neither a shard (.tar) nor a shard directory")
    entry = None
    manifest_path = path.parent / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            entry = next((s for s in read_manifest(path.parent)["shards"] if s["name"] == path.name), None)
        except UserInputError as exc:
            report.add(Problem("manifest", str(exc), severity="warning"))
    ok = True
    sha256 = None
    size = path.stat().st_size
    if entry is not None:
        try:
            sha256 = file_sha256(path)
        except OSError as exc:
            report.add(Problem("structure", f"cannot read ({exc.strerror or exc})", path.name))
            report.shards.append(ShardCheck(path.name, False, 0, size))
            return report
        if sha256 != entry["sha256"] or size != entry["size"]:
            what = "truncated" if size < entry["size"] else ("altered" if size == entry["size"] else "grown")
            report.add(Problem("checksum", f"sha256 mismatch: {what} ({size} bytes, manifest {entry['size']})", path.name))
            ok = False
    seen, contents_ok = _check_shard_contents(
        path,
        report,
        index=None,
        shard_number=None,
        expected_samples=entry["samples"] if entry is not None else None,
        check_pyramid=check_pyramid,
        on_sample=on_sample,
    )
    report.shards.append(ShardCheck(path.name, ok and contents_ok, seen, size, sha256))
    return report


__all__ = ["Problem", "ShardCheck", "ValidationReport", "validate", "INDEX_NAME"]
