"""``anaus precompute-masks``: options -> ``PrecomputeConfig`` -> ``pipeline.job.run_precompute``."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from anaus_cli.common import app, choice_value, fail, user_errors
from anaus_core.errors import UserInputError


class MaskerName(str, enum.Enum):
    """``--masker`` choices of precompute-masks (anaus_core.maskers.build_masker)."""

    felzenszwalb = "felzenszwalb"
    kmeans = "kmeans"
    labels = "labels"
    sam = "sam"
    lpsam = "lpsam"


def _parse_masker_options(values: Optional[list[str]], option: str = "--masker-option") -> dict:
    """``key=value`` strings -> dict; values are parsed as YAML scalars (``300`` -> int)."""
    import yaml

    options = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"{option} {item!r}: expected key=value")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            options[key.strip()] = raw
    return options


def _parse_scales(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        scales = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserInputError(f"--scales {text!r}: expected comma-separated integers, e.g. 7,14,28,56") from None
    if not scales:
        raise UserInputError("--scales: empty")
    return scales


@app.command("precompute-masks", epilog="Example: anaus precompute-masks corpus/img --out shards --masker felzenszwalb --stored-size 256")
@user_errors
def precompute_masks_command(
    corpus: Optional[Path] = typer.Argument(None, help="Image folder (recursive), a media file, or a text list of paths."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory: shards, index.zarr, manifest.json, cache/."),
    masker: Optional[MaskerName] = typer.Option(None, help="Mask source (default felzenszwalb). An existing --out keeps its masker unless --allow-masker-change."),
    labels: Optional[Path] = typer.Option(None, help="Label folder mirroring the corpus (--masker labels)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The masker's checkpoint: SAM for --masker sam, LP-SAM (train-prompter) for --masker lpsam."),
    sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="Base SAM checkpoint the LP-SAM checkpoint was trained on (--masker lpsam; sha256 checked)."),
    masker_option: Optional[list[str]] = typer.Option(None, "--masker-option", help="Masker option key=value (repeatable)."),
    stored_size: Optional[int] = typer.Option(None, help="Short side of stored images in pixels, 1..4096 (default 256)."),
    every_nth_frame: Optional[int] = typer.Option(None, help="Keep every n-th video frame (default 1)."),
    scales: Optional[str] = typer.Option(None, help="Pyramid scales, comma-separated (default 7,14,28,56)."),
    min_area: Optional[int] = typer.Option(None, help="Drop masks smaller than this many pixels (default 16)."),
    max_masks: Optional[int] = typer.Option(None, help="Keep at most this many masks per image, residual included (default 32)."),
    samples_per_shard: Optional[int] = typer.Option(None, help="Mean samples per shard (default 1000)."),
    anatomy: Optional[str] = typer.Option(None, "--anatomy", help="Anatomy category per sample (A-ViT): csv:FILE, folder, dicom (BodyPartExamined) or lpsam (largest class); pack stage only."),
    workers: Optional[int] = typer.Option(None, help="Local worker processes (default 0 = in this process)."),
    scheduler: Optional[str] = typer.Option(None, help="dask.distributed scheduler address (tcp://host:8786)."),
    scheduler_timeout: Optional[float] = typer.Option(None, "--scheduler-timeout", help="Seconds to wait for --scheduler before giving up with an error (default 30)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per task and per masker call (default 8)."),
    device: Optional[str] = typer.Option(None, help="Device for model maskers: cpu, cuda or cuda:N (default cpu)."),
    prefetch: Optional[int] = typer.Option(None, "--prefetch", min=0, help="In-process runs: source batches ingested ahead in threads while the masker runs (default: 2 for sam/lpsam, else 0)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be recomputed per stage, write nothing."),
    strict: bool = typer.Option(False, "--strict", help="Any skipped input fails the run (index left unchanged, exit 3)."),
    gc: bool = typer.Option(False, "--gc", help="Delete cache entries the current corpus no longer uses."),
    allow_shrink: bool = typer.Option(False, "--allow-shrink", help="Let this run remove more than --max-shrink of an existing output's samples."),
    max_shrink: Optional[float] = typer.Option(None, "--max-shrink", help="Largest fraction of an existing output's samples a run may remove without --allow-shrink (default 0.5)."),
    allow_masker_change: bool = typer.Option(False, "--allow-masker-change", help="Rebuild an existing output made with another masker."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    no_scan_region: bool = typer.Option(False, "--no-scan-region", help="Use the whole image instead of the detected scan region (fan/rectangle of echo data)."),
    region_option: Optional[list[str]] = typer.Option(None, "--region-option", help="Scan-region setting key=value (repeatable; see docs/precompute.md)."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="groups.csv (columns path,group) naming each source's group (default: CORPUS/groups.csv if present)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with PrecomputeConfig fields; options override it."),
) -> None:
    """Compute mask sets, pyramids and shards for a corpus; incremental and restartable.

    Exit code 0: every input written; 1: some inputs skipped (listed in OUT/errors.jsonl);
    2: bad options, missing or empty corpus, OUT locked by another run, or a guard refused to
    shrink OUT or change its masker; 3: --strict and something skipped.
    """
    from anaus_core.config import load_config
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute
    from pipeline.report import EXIT_STRICT_FAILURE

    overrides = {
        "corpus": str(corpus) if corpus is not None else None,
        "out": str(out) if out is not None else None,
        "masker": choice_value(masker),
        "labels": str(labels) if labels is not None else None,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint is not None else None,
        "stored_size": stored_size,
        "every_nth_frame": every_nth_frame,
        "scales": _parse_scales(scales),
        "min_area": min_area,
        "max_masks": max_masks,
        "samples_per_shard": samples_per_shard,
        "anatomy": anatomy,
        "workers": workers,
        "scheduler": scheduler,
        "scheduler_timeout": scheduler_timeout,
        "batch_size": batch_size,
        "device": device,
        "prefetch": prefetch,
        "dry_run": True if dry_run else None,
        "strict": True if strict else None,
        "gc": True if gc else None,
        "progress": False if no_progress else None,
        "allow_shrink": True if allow_shrink else None,
        "max_shrink": max_shrink,
        "allow_masker_change": True if allow_masker_change else None,
        "scan_region": False if no_scan_region else None,
        "region_options": _parse_masker_options(region_option, "--region-option") if region_option else None,
        "groups": str(groups) if groups is not None else None,
    }
    settings = load_config(PrecomputeConfig, config, overrides)
    from anaus_core.machine import check_device

    check_device(settings.device, allowed=("cpu", "cuda"))
    if str(settings.masker) == "lpsam" and not settings.sam_checkpoint:
        # an LP-SAM checkpoint made on a random base SAM would otherwise run on a new, unseeded one
        raise UserInputError("--sam-checkpoint: required with --masker lpsam (the base SAM the LP-SAM checkpoint was trained on)")
    extra = _parse_masker_options(masker_option)
    if extra:
        settings.masker_options = {**settings.masker_options, **extra}
    report = run_precompute(settings, show_report=True)
    if report.exit_code == EXIT_STRICT_FAILURE:
        raise fail(f"--strict: {report.skipped} input(s) skipped (see {Path(settings.out) / 'errors.jsonl'}); shards and index left unchanged", EXIT_STRICT_FAILURE)
    if report.exit_code:
        raise typer.Exit(report.exit_code)
