"""``anaus inspect-shard``: summary, JSON and contact sheet of a shard or a shard directory.

Everything is computed in one validating pass (:func:`shards.validate.validate`), so the
summary always comes with the validation result, and samples in bad shards that still decode
are counted while the bad shard is reported.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from anaus_core.errors import UserInputError
from shards.index import MANIFEST_NAME, read_manifest
from shards.reader import RawSample
from shards.sample import FIELDS, ShardSample
from shards.validate import validate

#: Mask area histogram bin edges, as fractions of the image area.
AREA_EDGES = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _check_readable(path: Path) -> None:
    """Input that cannot be inspected at all is a user error (exit 2), not a validation failure."""
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file() and not any(path.glob("*.tar")):
            raise UserInputError(f"{path}: not a shard directory (no {MANIFEST_NAME}, no *.tar)")
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot open ({exc.strerror or exc})") from None
    if len(head) < 512:
        raise UserInputError(f"{path}: not a tar ({len(head)} bytes)")
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.TarError as exc:
        raise UserInputError(f"{path}: not a tar ({exc})") from None


def inspect_path(path: str | os.PathLike, *, keep_samples: int = 0) -> tuple[dict[str, Any], list[ShardSample]]:
    """Validate ``path`` and summarise it. Returns (summary dict, first ``keep_samples`` samples)."""
    path = Path(path)
    _check_readable(path)
    mask_counts: list[int] = []
    area_fractions: list[float] = []
    sources: Counter[str] = Counter()
    shapes: list[tuple[int, int]] = []
    member_bytes: dict[str, list[int]] = {name: [] for name in FIELDS}
    sample_bytes: list[int] = []
    scales: set[tuple[int, ...]] = set()
    record_fingerprints: Counter[str] = Counter()
    anatomy: Counter[str] = Counter()  # precompute-masks --anatomy categories (records without one: none)
    kept: list[ShardSample] = []

    def on_sample(shard_name: str, sample: ShardSample, raw: RawSample) -> None:
        height, width = sample.image.shape
        shapes.append((height, width))
        mask_counts.append(len(sample.mask_set))
        area_fractions.extend((sample.mask_set.areas / float(height * width)).tolist())
        sources.update(sample.mask_set.sources)
        for name in FIELDS:
            member_bytes[name].append(len(raw.fields.get(name, b"")))
        sample_bytes.append(raw.size)
        scales.add(tuple(sample.mask_pyramid))
        for stage, value in sorted(sample.record.get("fingerprints", {}).items()):
            record_fingerprints[f"{stage}={value}"] += 1
        if "anatomy" in sample.record:
            anatomy[str(sample.record["anatomy"])] += 1
        if len(kept) < keep_samples:
            kept.append(sample)

    report = validate(path, on_sample=on_sample)
    fingerprints: dict[str, Any] = {}
    manifest_scales = None
    format_version = None
    manifest_dir = path if path.is_dir() else path.parent
    if (manifest_dir / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(manifest_dir)
            fingerprints = dict(manifest.get("fingerprints", {}))
            manifest_scales = manifest.get("scales")
            format_version = manifest.get("format_version")
        except UserInputError:
            pass  # reported by validate
    counts, _ = np.histogram(area_fractions, bins=AREA_EDGES)
    total_bytes = sum(check.size for check in report.shards)
    summary: dict[str, Any] = {
        "path": str(path),
        "kind": "directory" if path.is_dir() else "shard",
        "shards": len(report.shards),
        "samples": len(mask_counts),
        "bytes": total_bytes,
        "bytes_per_sample": (total_bytes / len(mask_counts)) if mask_counts else None,
        "member_bytes_mean": {name: (float(np.mean(v)) if v else None) for name, v in member_bytes.items()},
        "sample_bytes_mean": float(np.mean(sample_bytes)) if sample_bytes else None,
        "image_size": {
            "min": [min(s[0] for s in shapes), min(s[1] for s in shapes)] if shapes else None,
            "max": [max(s[0] for s in shapes), max(s[1] for s in shapes)] if shapes else None,
        },
        "masks_per_sample": {
            "min": int(min(mask_counts)) if mask_counts else None,
            "mean": float(np.mean(mask_counts)) if mask_counts else None,
            "max": int(max(mask_counts)) if mask_counts else None,
            "total": int(sum(mask_counts)),
        },
        "mask_area_histogram": {"edges": list(AREA_EDGES), "counts": [int(c) for c in counts], "unit": "fraction of image area"},
        "mask_sources": dict(sorted(sources.items())),
        "anatomy": dict(sorted(anatomy.items())),
        "scales": list(manifest_scales) if manifest_scales is not None else (list(next(iter(scales))) if len(scales) == 1 else sorted(list(s) for s in scales)),
        "fingerprints": fingerprints,
        "record_fingerprints": dict(sorted(record_fingerprints.items())),
        "format_version": format_version,
        "shard_list": [
            {"name": c.name, "ok": c.ok, "samples": c.samples, "bytes": c.size, "sha256": c.sha256} for c in report.shards
        ],
        "validation": report.to_dict(),
    }
    return summary, kept


def _format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return str(value)


def render_text(summary: dict[str, Any], console=None, *, max_problems: int = 20) -> None:
    """Print a readable summary with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    validation = summary["validation"]
    status = "[green]OK[/green]" if validation["ok"] else f"[red]FAILED[/red] ({validation['errors']} errors)"
    overview = Table(show_header=False, box=None, pad_edge=False)
    overview.add_column(style="bold")
    overview.add_column()
    masks = summary["masks_per_sample"]
    overview.add_row("path", f"{summary['path']} ({summary['kind']})")
    overview.add_row("shards", str(summary["shards"]))
    overview.add_row("samples", str(summary["samples"]))
    overview.add_row("size", f"{_format_bytes(summary['bytes'])} ({_format_bytes(summary['bytes_per_sample'])} per sample)")
    members = summary["member_bytes_mean"]
    overview.add_row("per-sample members", ", ".join(f"{k} {_format_bytes(v)}" for k, v in members.items()))
    if summary["image_size"]["min"] is not None:
        lo, hi = summary["image_size"]["min"], summary["image_size"]["max"]
        overview.add_row("image size (H×W)", f"{lo[0]}×{lo[1]}" + ("" if lo == hi else f" … {hi[0]}×{hi[1]}"))
    if masks["min"] is not None:
        overview.add_row("masks per sample", f"min {masks['min']}  mean {masks['mean']:.2f}  max {masks['max']}  (total {masks['total']})")
    overview.add_row("mask sources", ", ".join(f"{k} {v}" for k, v in summary["mask_sources"].items()) or "-")
    if summary.get("anatomy"):
        overview.add_row("anatomy", ", ".join(f"{k} {v}" for k, v in summary["anatomy"].items()))
    overview.add_row("scales", ", ".join(str(s) for s in summary["scales"]) or "-")
    fingerprints = summary["fingerprints"] or {}
    overview.add_row("stage fingerprints", ", ".join(f"{k}={v}" for k, v in fingerprints.items()) or "(no manifest)")
    overview.add_row("format version", str(summary["format_version"] or "-"))
    overview.add_row("validation", status)
    console.print(overview)

    histogram = summary["mask_area_histogram"]
    peak = max(histogram["counts"], default=0) or 1
    console.print("\n[bold]mask area histogram[/bold] (fraction of image area)")
    edges = histogram["edges"]
    for low, high, count in zip(edges[:-1], edges[1:], histogram["counts"]):
        bar = "█" * int(round(30 * count / peak))
        console.print(f"  {low:>6.3f}–{high:<6.3f} {count:>7d} {bar}")

    shards = Table(title="shards", title_justify="left")
    for column in ("name", "samples", "size", "status"):
        shards.add_column(column)
    for shard in summary["shard_list"][:50]:
        shards.add_row(shard["name"], str(shard["samples"]), _format_bytes(shard["bytes"]), "ok" if shard["ok"] else "[red]bad[/red]")
    if len(summary["shard_list"]) > 50:
        shards.add_row(f"… {len(summary['shard_list']) - 50} more", "", "", "")
    console.print(shards)

    problems = validation["problems"]
    if problems:
        console.print(f"[bold]problems[/bold] ({validation['errors']} errors, {validation['warnings']} warnings)")
        for problem in problems[:max_problems]:
            colour = "red" if problem["severity"] == "error" else "yellow"
            console.print(f"  [{colour}]{problem['text']}[/{colour}]", markup=True, highlight=False, soft_wrap=True)
        if len(problems) > max_problems:
            console.print(f"  … {len(problems) - max_problems} more (use --json for all)")


def _mask_colours(count: int) -> np.ndarray:
    """Distinct RGB colours in [0, 1] for ``count`` masks (tab20, then evenly spaced hues)."""
    import matplotlib

    if count <= 20:
        return np.asarray(matplotlib.colormaps["tab20"].colors[:count] if count else np.zeros((0, 3)))
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return matplotlib.colors.hsv_to_rgb(np.stack([hues, np.full(count, 0.85), np.full(count, 0.95)], axis=1))


def overlay_masks(image: np.ndarray, masks: np.ndarray, colours: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB float (H, W, 3): grayscale image with each mask tinted and outlined in its colour."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    for mask, colour in zip(masks, colours):
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    for mask, colour in zip(masks, colours):
        rgb[find_boundaries(mask, mode="inner")] = colour
    return rgb


def pyramid_rgb(level: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGB float (s, s, 3): each cell is the area-weighted mix of its masks' colours."""
    weights = level.astype(np.float32) / 255.0  # (M, s, s)
    total = weights.sum(axis=0)
    mixed = np.einsum("mij,mc->ijc", weights, colours) / np.maximum(total, 1.0)[..., None]
    return np.clip(mixed, 0, 1)


def write_contact_sheet(samples: list[ShardSample], path: str | os.PathLike, *, title: str = "") -> Path:
    """One row per sample: image with masks overlaid and the scan region outlined (green),
    then each pyramid level beside it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    if not samples:
        raise UserInputError(f"{path}: no readable samples to draw")
    scales = sorted({s for sample in samples for s in sample.mask_pyramid})
    columns = 1 + len(scales)
    figure, axes = plt.subplots(len(samples), columns, figsize=(2.6 * columns, 2.7 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        colours = _mask_colours(len(sample.mask_set))
        axes[row, 0].imshow(overlay_masks(sample.image, sample.mask_set.masks, colours), interpolation="nearest")
        height, width = sample.image.shape
        region_note = ""
        if sample.scan_region is not None:
            # the scan region's outline (every mask lies inside it)
            axes[row, 0].contour(sample.scan_region.astype(np.uint8), levels=[0.5], colors=["#00ff66"], linewidths=0.9)
            region_note = f", region {sample.scan_region.mean():.0%}"
        axes[row, 0].set_title(f"{sample.key}\n{height}×{width}, {len(sample.mask_set)} masks{region_note}", fontsize=8)
        for column, scale in enumerate(scales, start=1):
            axis = axes[row, column]
            if scale in sample.mask_pyramid:
                # Cells are drawn with the image's aspect ratio so levels line up with the image.
                axis.imshow(pyramid_rgb(sample.mask_pyramid[scale], colours), interpolation="nearest", aspect=height / width)
            axis.set_title(f"pyramid {scale}×{scale}", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(figure)
    return path


__all__ = ["AREA_EDGES", "inspect_path", "overlay_masks", "pyramid_rgb", "render_text", "write_contact_sheet"]
