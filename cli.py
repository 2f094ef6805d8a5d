"""The ``anaus`` command line: a thin typer app over library functions that tests call directly.

Each command parses options, calls one library function and turns ``UserInputError`` /
``ConfigError`` (and OS errors such as a read-only or full disk) into a one-line message on
stderr with a non-zero exit code. Every writing command holds its output folder through
``anaus_core.outputs.claim_output`` (one writer per folder, stale temp files removed). Options
whose default comes from a config dataclass show that default in their help text
(tests/test_harden_cli.py checks they agree).
"""

from __future__ import annotations

import enum
import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError, one_line

app = typer.Typer(
    name="anaus",
    help="Anatomy-anchored self-supervised pre-training for ultrasound (AnaUS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click output: a bad option is one "Error: ..." line, not a framed panel
)


def user_errors(func):
    """Decorator for command functions: ``UserInputError``/``ConfigError`` become one line on
    stderr (``error: <file>: <reason>``) and exit code 2, also under typer's CliRunner."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserInputError, ConfigError) as exc:
            raise fail(one_line(str(exc)), getattr(exc, "exit_code", 2)) from None
        except OSError as exc:  # read-only or full disk, unreachable scheduler, ...: the file and the reason
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise fail(one_line(f"{where}{exc.strerror or exc}"), 1) from None

    return wrapper


def echo_warning(message: str) -> None:
    """A warning line on stderr (the commands' stdout stays for results)."""
    typer.echo(message, err=True)


class MaskerName(str, enum.Enum):
    """``--masker`` choices of precompute-masks (anaus_core.maskers.build_masker)."""

    felzenszwalb = "felzenszwalb"
    kmeans = "kmeans"
    labels = "labels"
    sam = "sam"
    lpsam = "lpsam"


class DemoMasker(str, enum.Enum):
    """Weight-free maskers the demo can run."""

    felzenszwalb = "felzenszwalb"
    kmeans = "kmeans"
    labels = "labels"


class SamSpecName(str, enum.Enum):
    vit_b = "vit_b"
    vit_l = "vit_l"
    vit_h = "vit_h"
    tiny = "tiny"


class AdapterPlacement(str, enum.Enum):
    all = "all"
    global_ = "global"


class PromptMode(str, enum.Enum):
    box = "box"
    point = "point"
    box_point = "box+point"


class TrainDevice(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _value(choice):
    return choice.value if isinstance(choice, enum.Enum) else choice


_RANDOM_SAM_HELP = "Use a randomly initialised SAM (seeded by --seed) instead of --sam-checkpoint: for tests and demos only, its masks are not meaningful."


def require_sam_checkpoint(sam_checkpoint, *, random_sam: bool, option: str = "--sam-checkpoint") -> None:
    """SAM-based commands need real weights unless a random (seeded) SAM is asked for explicitly."""
    if sam_checkpoint is None and not random_sam:
        raise UserInputError(f"{option}: required (an official SAM checkpoint, e.g. sam_vit_b_01ec64.pth; see README "
                             "'SAM checkpoints'); pass --random-sam for a seeded random SAM (tests only)")
    if sam_checkpoint is not None and not Path(sam_checkpoint).is_file():
        raise UserInputError(f"{sam_checkpoint}: {option} not found")


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` on one line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# make-phantoms
# ---------------------------------------------------------------------------------------------


@app.command("make-phantoms", epilog="Example: anaus make-phantoms corpus --count 24 --size 128  (then: anaus precompute-masks corpus --out shards)")
@user_errors
def make_phantoms_command(
    out: Path = typer.Argument(..., help="Output folder; gets img/<id>.png, label/<id>.png and label/<id>.json."),
    count: int = typer.Option(24, "--count", "-n", help="Number of phantoms (>= 1)."),
    size: int = typer.Option(256, "--size", "-s", help="Image side in pixels, 32..4096."),
    seed: int = typer.Option(0, "--seed", help="Corpus seed (>= 0); phantom i depends only on (seed, i, size)."),
    annotations: bool = typer.Option(False, "--annotations", help="Burn in text, a depth ruler, calipers, a colour bar and a logo (RGB images; true field of view and overlay masks in truth/)."),
    geometry: Optional[str] = typer.Option(None, "--geometry", help="linear or sector for all phantoms (default: alternate)."),
) -> None:
    """Write a synthetic B-mode ultrasound corpus with labelled structures (linear and sector probes).

    Speckle from random scatterers, a depth-dependent point-spread function, envelope detection, attenuation with TGC and log compression.

    Labels: 0 = background tissue (and outside the fan), 1..n = the structures named in label/<id>.json (cyst, hypo, hyper, layer).
    """
    from anaus_core.outputs import claim_output
    from anaus_core.phantoms import make_phantom_corpus

    with claim_output(out, command="make-phantoms", option="OUT"):
        ids = make_phantom_corpus(out, count=count, size=size, seed=seed, progress=True, annotations=annotations, geometry=geometry)
    typer.echo(f"wrote {len(ids)} phantoms ({size}x{size}) to {out}")

# ---------------------------------------------------------------------------------------------
# inspect-shard
# ---------------------------------------------------------------------------------------------


@app.command("inspect-shard", epilog="Example: anaus inspect-shard shards --png sheet.png")
@user_errors
def inspect_shard_command(
    path: Path = typer.Argument(..., help="A shard (.tar) or a shard directory (shards + index.zarr + manifest.json)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary and validation result as JSON."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write a contact sheet: N samples with masks overlaid and their pyramid levels."),
    samples: int = typer.Option(4, "--samples", "-n", min=1, help="Samples on the contact sheet."),
) -> None:
    """Summarise and validate shards (exit 1 when validation fails, 2 for unreadable input)."""
    import json

    from shards.inspect import inspect_path, render_text, write_contact_sheet

    summary, kept = inspect_path(path, keep_samples=samples if png is not None else 0)
    if png is not None:
        write_contact_sheet(kept, png, title=str(path))
        summary["contact_sheet"] = str(png)
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from rich.console import Console

        render_text(summary, Console())
        if png is not None:
            typer.echo(f"contact sheet: {png}")
    if not summary["validation"]["ok"]:
        errors = summary["validation"]["errors"]
        first = next(p["text"] for p in summary["validation"]["problems"] if p["severity"] == "error")
        typer.echo(f"error: validation failed ({errors} problem{'s' if errors != 1 else ''}; first: {first})", err=True)
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# precompute-masks
# ---------------------------------------------------------------------------------------------


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
        "masker": _value(masker),
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


# ---------------------------------------------------------------------------------------------
# lpsam (sub-app: adapt, train-prompter, predict)
# ---------------------------------------------------------------------------------------------

lpsam_app = typer.Typer(
    name="lpsam",
    help="LP-SAM: adapt SAM to ultrasound (stage 1: adapters, stage 2: latent prompt engine) and predict mask sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click output: a bad option is one "Error: ..." line, not a framed panel
)


def _lpsam_overrides(pairs: dict, extra: Optional[list[str]]) -> dict:
    """Options given on the command line (not None) + ``--set key=value`` pairs (dotted keys)."""
    overrides = {key: value for key, value in pairs.items() if value is not None}
    for item in extra or []:
        if "=" not in item:
            raise UserInputError(f"--set {item}: expected KEY=VALUE, e.g. model.image_size=1024")
        key, value = item.split("=", 1)
        overrides[key.strip()] = __import__("yaml").safe_load(value)
    return overrides


def _lpsam_training_options(*, data, val_data, sam_checkpoint, out, epochs, batch_size, lr, alpha, device, resume, progress,
                            random_sam=False, seed=None) -> dict:
    """The config keys both LP-SAM training stages take from the same command-line options
    (checked here: a SAM checkpoint or an explicit --random-sam, a device this machine has,
    positive sizes and rates)."""
    from anaus_core.machine import check_device

    require_sam_checkpoint(sam_checkpoint, random_sam=random_sam)
    check_device(device)
    if lr is not None and not lr > 0:
        raise UserInputError(f"--lr {lr}: must be > 0")
    if alpha is not None and not 0 <= alpha <= 1:
        raise UserInputError(f"--alpha {alpha}: must be in [0, 1]")
    return {
        "seed": seed,
        "datasets": [str(p) for p in data] if data else None,
        "val_datasets": [str(p) for p in val_data] if val_data else None,
        "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint else None,
        "out_dir": str(out) if out else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "alpha": alpha,
        "device": device,
        "resume": str(resume) if resume else None,
        "progress": progress,
    }


_LPSAM_DATA_HELP = "Dataset folder with dataset.yaml (classes: {name: label value}) and img/ + label/ (repeatable)."


def _run_lpsam_stage(run, config, command: str):
    """Run one LP-SAM training stage holding its output folder."""
    from anaus_core.outputs import claim_output

    with claim_output(config.out_dir, command=command):
        return run(config)


@lpsam_app.command("adapt", epilog="Example: anaus lpsam adapt --data phantoms --sam-checkpoint sam_vit_b_01ec64.pth --out runs/adapt --epochs 20")
@user_errors
def lpsam_adapt_command(
    data: Optional[list[Path]] = typer.Option(None, "--data", help=_LPSAM_DATA_HELP),
    val_data: Optional[list[Path]] = typer.Option(None, "--val-data", help="Validation dataset folder (repeatable); default: hold out --val-fraction."),
    sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="Official SAM checkpoint (e.g. sam_vit_b_01ec64.pth)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (last.pt, best.pt)."),
    spec: Optional[SamSpecName] = typer.Option(None, "--spec", help="SAM architecture (default vit_b; tiny: tests)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Encoder input size (default 256 with interpolated position embeddings; 1024 is SAM's native size)."),
    adapter_placement: Optional[AdapterPlacement] = typer.Option(None, "--adapter-placement", help="'all' blocks (paper; default) or 'global' attention blocks only (official code)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the training pairs (default 20)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Pairs per step (default 4)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Loss = (1-alpha)*BCE + alpha*Dice (default 0.8)."),
    prompt: Optional[PromptMode] = typer.Option(None, "--prompt", help="Prompts from the ground truth (default box+point)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Training schedule: 'paper' (200 epochs, batch 16, Adam 5e-4); explicit options win over it. Default: the short schedule in docs/lpsam.md."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (default auto)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="last.pt of an interrupted run."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with AdaptConfig fields (options override it)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config field, dotted: --set model.bottleneck_ratio=0.125 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    random_sam: bool = typer.Option(False, "--random-sam", help=_RANDOM_SAM_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed of the data split, order and (with --random-sam) the SAM weights (default 0)."),
) -> None:
    """Stage 1: train bottleneck adapters in SAM's image encoder on image-mask pairs (SAM frozen)."""
    from anaus_core.config import load_config
    from anaus_core.lpsam.presets import preset_overrides
    from anaus_core.lpsam.train import AdaptConfig, run_adapt

    overrides = _lpsam_overrides(
        {
            **_lpsam_training_options(data=data, val_data=val_data, sam_checkpoint=sam_checkpoint, out=out, epochs=epochs, batch_size=batch_size,
                                      lr=lr, alpha=alpha, device=device, resume=resume, progress=progress, random_sam=random_sam, seed=seed),
            "model.spec": _value(spec),
            "model.image_size": image_size,
            "model.adapter_placement": _value(adapter_placement),
            "prompt": _value(prompt),
        },
        set_,
    )
    overrides = {**preset_overrides(preset, "adapt"), **overrides}
    result = _run_lpsam_stage(run_adapt, load_config(AdaptConfig, config, overrides), "lpsam adapt")
    typer.echo(f"stage 1 done: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")


@lpsam_app.command("train-prompter", epilog="Example: anaus lpsam train-prompter --data phantoms --sam-checkpoint sam_vit_b_01ec64.pth --adapter-checkpoint runs/adapt/best.pt --out runs/prompter")
@user_errors
def lpsam_train_prompter_command(
    data: Optional[list[Path]] = typer.Option(None, "--data", help=_LPSAM_DATA_HELP),
    val_data: Optional[list[Path]] = typer.Option(None, "--val-data", help="Validation dataset folder (repeatable)."),
    sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="The base SAM checkpoint of stage 1 (sha256 checked)."),
    adapter_checkpoint: Optional[Path] = typer.Option(None, "--adapter-checkpoint", help="Stage-1 checkpoint (best.pt of `anaus lpsam adapt`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (last.pt, best.pt)."),
    train_decoder: Optional[bool] = typer.Option(None, "--train-decoder/--no-train-decoder", help="Also train SAM's mask decoder (the official code did; the paper freezes it). Off by default."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Training schedule: 'paper' (100 epochs); explicit options win over it. Default: the short schedule in docs/lpsam.md."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the training pairs (default 20)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Pairs per step (default 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Loss = (1-alpha)*BCE + alpha*Dice (default 0.8)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (default auto)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="last.pt of an interrupted run."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with PrompterConfig fields."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config field, dotted: --set model.engine_rounds=4 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    random_sam: bool = typer.Option(False, "--random-sam", help=_RANDOM_SAM_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed of the data split, order and (with --random-sam) the SAM weights (default 0)."),
) -> None:
    """Stage 2: train the latent prompt engine (one token group per class); SAM and adapters frozen."""
    from anaus_core.config import load_config
    from anaus_core.lpsam.presets import preset_overrides
    from anaus_core.lpsam.train import PrompterConfig, run_train_prompter

    overrides = _lpsam_overrides(
        {
            **_lpsam_training_options(data=data, val_data=val_data, sam_checkpoint=sam_checkpoint, out=out, epochs=epochs, batch_size=batch_size,
                                      lr=lr, alpha=alpha, device=device, resume=resume, progress=progress, random_sam=random_sam, seed=seed),
            "adapter_checkpoint": str(adapter_checkpoint) if adapter_checkpoint else None,
            "train_decoder": train_decoder,
        },
        set_,
    )
    overrides = {**preset_overrides(preset, "train-prompter"), **overrides}
    result = _run_lpsam_stage(run_train_prompter, load_config(PrompterConfig, config, overrides), "lpsam train-prompter")
    typer.echo(f"stage 2 done: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")


@lpsam_app.command("predict", epilog="Example: anaus lpsam predict scans/ --checkpoint runs/prompter/best.pt --sam-checkpoint sam_vit_b_01ec64.pth --out masks --png")
@user_errors
def lpsam_predict_command(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Stage-2 LP-SAM checkpoint."),
    sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="The base SAM checkpoint it was trained on."),
    out: Path = typer.Option(..., "--out", help="Output folder: <name>.npz + <name>.json per image, predictions.json."),
    png: bool = typer.Option(False, "--png", help="Also write <name>_overlay.png."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N (bf16 on CUDA unless --precision fp32)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 (bf16 weights; CUDA default) or bf16-autocast."),
    compile_model: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model (CUDA, long runs)."),
    threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0, help="Class-mask probability threshold."),
    min_area: int = typer.Option(16, "--min-area", min=0, help="Minimum component / mask area in pixels."),
    max_masks: int = typer.Option(32, "--max-masks", min=1, help="At most this many masks per image (residual included)."),
    amg: bool = typer.Option(False, "--amg/--no-amg", help="Add SAM automatic-mask proposals from the adapted encoder."),
    amg_points_per_side: int = typer.Option(16, "--amg-points-per-side", min=1, help="AMG point grid per side."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    random_sam: bool = typer.Option(False, "--random-sam", help=_RANDOM_SAM_HELP),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the random SAM (--random-sam only)."),
) -> None:
    """Predict the mask set of each image (class components, optional AMG proposals, residual)."""
    from anaus_core.lpsam.checkpoint import load_lpsam
    from anaus_core.lpsam.export import collect_images, predict_files
    from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions
    from anaus_core.lpsam.train import resolve_device

    import torch

    from anaus_core.machine import check_device
    from anaus_core.outputs import claim_output

    require_sam_checkpoint(sam_checkpoint, random_sam=random_sam)
    check_device(device)
    files = collect_images(images)
    with claim_output(out, command="lpsam predict"):
        torch.manual_seed(seed)  # only a --random-sam base SAM draws from it: the same command, the same masks
        model, _ = load_lpsam(checkpoint, sam_checkpoint=sam_checkpoint)
        options = PredictorOptions(threshold=threshold, min_area=min_area, amg=amg, amg_points_per_side=amg_points_per_side)
        try:
            predictor = LPSAMPredictor(model, device=resolve_device(device), batch_size=batch_size, precision=precision, compile=compile_model, options=options)
        except ValueError as exc:
            raise UserInputError(f"--precision: {exc}") from None
        summary = predict_files(predictor, files, out, png=png, max_masks=max_masks, progress=progress)
        predictor.close()
    typer.echo(f"{len(summary)} images, {sum(len(r['masks']) for r in summary)} masks -> {out}")


app.add_typer(lpsam_app, name="lpsam")

# ---------------------------------------------------------------------------------------------
# pretrain, export-encoder
# ---------------------------------------------------------------------------------------------

def _parse_set_options(values: Optional[list[str]]) -> dict:
    """``--set section.key=value`` pairs -> override dict (values parsed as YAML scalars)."""
    import yaml

    overrides = {}
    for item in values or []:
        if "=" not in item:
            raise UserInputError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


def shard_data_source(config, *, source=None):
    """The trainer's ``PretrainDataSource`` over ``config.data.shards`` (``shards.stream``).

    ``source``: an already opened and checked ``ShardSource``; by default the shards are opened
    with ``shards.vet.open_vetted_shards`` under the default URL policy (local files only) and
    any bad shard is an error."""
    import torch

    from shards.stream import ShardDataSource
    from shards.vet import open_vetted_shards

    data = config.data
    if source is None:
        source = open_vetted_shards(data.shards)
    on_cuda = config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())
    batch_transform = None
    if config.method == "avit":  # A-ViT's multi-crop views, decoded with the store's checks
        from anaus_core.methods.avit import avit_batch_transform
        from shards.anatomy_sample import decode_image_and_anatomy

        batch_transform = avit_batch_transform(config, decode=decode_image_and_anatomy)
    return ShardDataSource(source, num_workers=data.num_workers, seed=config.run.seed,
                           view_config=config.views.resolved(on_cuda=on_cuda), shuffle_buffer=data.shuffle_buffer,
                           pin_memory=data.pin_memory and on_cuda, prefetch_factor=data.prefetch_factor,
                           batch_transform=batch_transform)


def store_anatomy_categories(config):
    """``avit.categories`` from the store's manifest (``precompute-masks --anatomy``) when the
    config names none; a config that lists them (or a resumed run's) is kept as it is."""
    if config.method != "avit" or config.avit.categories:
        return config
    from dataclasses import replace

    from shards.index import MANIFEST_NAME, read_manifest

    if not (Path(config.data.shards) / MANIFEST_NAME).is_file():  # shard URLs without a store: no vocabulary
        return config
    categories = read_manifest(config.data.shards).get("anatomy", {}).get("categories", [])
    return replace(config, avit=replace(config.avit, categories=[c for c in categories if c != "unknown"]))


def _init_overrides(init: Optional[str], weights: Optional[Path]) -> dict:
    """``--init``/``--weights`` -> ``model.pretrained_weights`` (nothing is ever downloaded)."""
    if init is None and weights is None:
        return {}
    if init not in (None, "random", "imagenet"):
        raise UserInputError(f"--init {init!r}: choose random or imagenet")
    if init == "random":
        if weights is not None:
            raise UserInputError("--weights: only used with --init imagenet")
        return {}
    if weights is None:
        raise UserInputError("--init imagenet: give the weights file with --weights FILE (a torchvision ResNet state dict; nothing is downloaded)")
    if not weights.is_file():
        raise UserInputError(f"{weights}: --weights file not found")
    return {"model.pretrained_weights": str(weights)}


@app.command("pretrain", epilog="Example: anaus pretrain --shards shards --out runs/r1 --steps 2000 --batch-size 64  (continue: anaus pretrain --out runs/r1 --resume)")
@user_errors
def pretrain_command(
    shards: Optional[str] = typer.Option(None, "--shards", help="Shard folder written by `anaus precompute-masks` (shards + index.zarr). Required unless the config or the resumed run names it."),
    out: Path = typer.Option(..., "--out", help="Run folder: config.yaml, metrics.jsonl, loss_curve.png, checkpoints/, encoder.pt, fpn.pt."),
    method: Optional[str] = typer.Option(None, "--method", help="Pre-training method: anaus (default) or avit."),
    init: Optional[str] = typer.Option(None, "--init", help="Encoder initialisation: random (default) or imagenet (the paper's §3.1; needs --weights)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --init imagenet: a local torchvision-format ResNet state dict (e.g. resnet18-f37072fd.pth; fc.* ignored)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps to train (wins over --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the shards (default 300 when --steps is not given)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch per optimiser step, over all GPUs and accumulation steps (default 192). lr = base_lr x batch/256."),
    device: Optional[TrainDevice] = typer.Option(None, "--device", help="Where to train (default auto: CUDA when available)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML config (sections data/model/augment/optim/run); command-line options override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt (its config, options on top)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint file instead of --out/checkpoints/last.pt."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=0, help="DataLoader workers per process, decode + geometry (default 4, at most the CPU cores)."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="View/crop side in pixels, a multiple of 32 (default 224)."),
    masks_per_image: Optional[int] = typer.Option(None, "--masks-per-image", help="K: mask ids sampled per image (default 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate before batch scaling (default 0.3)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up length in epochs (default 3)."),
    accumulation_steps: Optional[int] = typer.Option(None, "--accumulation-steps", min=1, help="Micro-batches per optimiser step, gradient accumulation (default 1)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA, never on CPU (default on)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format on CUDA (default on)."),
    compile_mode: Optional[str] = typer.Option(None, "--compile", help="torch.compile of the networks: auto (on CUDA only, default), on, off."),
    sync_batchnorm: Optional[bool] = typer.Option(None, "--sync-batchnorm/--no-sync-batchnorm", help="SyncBatchNorm across GPUs under torchrun, CUDA only (default off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the weights, the data order and every augmentation (default 0)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", min=1, help="Optimiser steps between metrics.jsonl lines (default 10)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=0, help="Optimiser steps between checkpoints, 0: only at the end (default 1000)."),
    keep_last_checkpoints: Optional[int] = typer.Option(None, "--keep-last-checkpoints", min=1, help="Keep only the newest N step-XXXXXX.pt files beside last.pt (default: keep all)."),
    skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="Train on the readable shards when some are missing or damaged (one warning with a count); default: stop with an error naming the first."),
    allow_pipe_shards: bool = typer.Option(False, "--allow-pipe-shards", help="Accept a pipe:CMD --shards source typed on this command line (runs CMD in a shell). Never taken from --config or a checkpoint."),
    allow_remote_shards: bool = typer.Option(False, "--allow-remote-shards", help="Accept remote shard URLs (s3://, http://, ... via fsspec)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar with images/s and ETA; a line every 30 s when not on a terminal (default on)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help="Any config field, e.g. --set model.objective=byol --set optim.final_lr=0.001 (repeatable)."),
) -> None:
    """Pre-train a ResNet-FPN encoder with AnaUS on precomputed mask shards (torchrun for multi-GPU)."""
    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig, load_checkpoint, pretrain, resolve_resume_path

    if crop_size is not None and (crop_size < 32 or crop_size % 32):
        raise UserInputError(f"--crop-size {crop_size}: must be a positive multiple of 32 (the ResNet stride)")
    if lr is not None and not lr > 0:
        raise UserInputError(f"--lr {lr}: must be > 0")
    if steps is not None and steps < 1:
        raise UserInputError(f"--steps {steps}: must be >= 1")
    if epochs is not None and not epochs > 0:
        raise UserInputError(f"--epochs {epochs}: must be > 0")
    if batch_size is not None and batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be >= 1")
    overrides = {
        "run.keep_last_checkpoints": keep_last_checkpoints,
        "method": method, "data.shards": str(shards) if shards is not None else None,
        "data.batch_size": batch_size, "data.num_workers": num_workers, "views.size": crop_size,
        "views.num_mask_samples": masks_per_image, "optim.base_lr": lr, "optim.warmup_epochs": warmup_epochs,
        "optim.accumulation_steps": accumulation_steps, "run.steps": steps, "run.epochs": epochs,
        "run.device": _value(device), "run.amp": amp, "run.channels_last": channels_last, "run.compile": compile_mode,
        "model.sync_batchnorm": sync_batchnorm, "run.seed": seed, "run.log_every": log_every,
        "run.checkpoint_every": checkpoint_every, "run.progress": progress,
    }
    overrides.update(_parse_set_options(set_values))
    overrides.update(_init_overrides(init, weights))
    resume_arg = resume_from if resume_from is not None else (True if resume else None)
    resume_path = resolve_resume_path(resume_arg, out)
    try:
        if resume_path is not None and config_file is None:
            # a resumed run keeps its own settings; options given now apply on top (e.g. more --steps)
            from anaus_core.config import _from_mapping, apply_overrides

            base = _from_mapping(PretrainConfig, load_checkpoint(resume_path)["config"], "")
            config = apply_overrides(base, overrides)
        else:
            config = load_config(PretrainConfig, config_file, overrides)
    except ConfigError:
        raise
    except ValueError as exc:  # dataclass __post_init__ checks (e.g. views.size) raise ValueError
        raise ConfigError(f"{config_file or 'options'}: {exc}") from None
    if not config.data.shards:
        raise UserInputError("--shards: no shard folder given (option or data.shards in --config)")
    config = store_anatomy_categories(config)
    result = _pretrain_checked(config, out, resume_path=resume_path, typed_shards=shards, allow_pipe=allow_pipe_shards,
                               allow_remote=allow_remote_shards, skip_bad=skip_bad_shards)
    if result.encoder_path is not None:
        typer.echo(f"pretrain: {result.steps_done} steps; encoder -> {result.encoder_path}; loss curve -> {result.loss_curve}")
    else:
        typer.echo(f"pretrain: stopped at step {result.steps_done}/{result.total_steps}; checkpoint -> {result.last_checkpoint}")


def _pretrain_checked(config, out: Path, *, resume_path, typed_shards, allow_pipe: bool, allow_remote: bool, skip_bad: bool):
    """Pre-train holding ``out``: device and shard source checked first (a ``pipe:`` source only
    when typed on this command line with --allow-pipe-shards), defaults fitted to the machine
    and the corpus on a fresh run (anaus_core/machine.py)."""
    import os

    from anaus_core.machine import check_device, fit_pretrain_to_machine, usable_cpu_count
    from anaus_core.outputs import claim_output, is_primary_process
    from anaus_core.shard_urls import ShardUrlPolicy, check_shard_source
    from anaus_core.train import pretrain
    from shards.vet import first_image_size, open_vetted_shards

    check_device(config.run.device, option="--device")
    typed_here = typed_shards is not None and str(typed_shards) == str(config.data.shards)
    policy = ShardUrlPolicy(allow_pipe=allow_pipe and typed_here, allow_remote=allow_remote)
    origin = "--shards" if typed_here else ("data.shards of the resumed checkpoint" if resume_path is not None else "data.shards of --config")
    check_shard_source(config.data.shards, policy=policy, origin=origin)
    with claim_output(out, command="pretrain"):
        source = open_vetted_shards(config.data.shards, policy=policy, skip_bad=skip_bad, warn=echo_warning)
        if resume_path is None:
            world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))  # torchrun: every rank decides alike
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # ranks sharing this machine's cores
            config, notes = fit_pretrain_to_machine(config, corpus_samples=source.num_samples, stored_size=first_image_size(source),
                                                    world_size=world, cpu_count=max(1, usable_cpu_count() // local))
            for note in notes if is_primary_process() else []:
                echo_warning(note)
        return pretrain(config, out, data=shard_data_source(config, source=source), resume=resume_path)


@app.command("export-encoder", epilog="Example: anaus export-encoder runs/r1/checkpoints/last.pt runs/r1/export")
@user_errors
def export_encoder_command(
    checkpoint: Path = typer.Argument(..., help="Pre-training checkpoint (RUN/checkpoints/last.pt or step-XXXXXX.pt)."),
    out: Path = typer.Argument(..., help="Output folder for encoder.pt (torchvision ResNet state dict, no fc) and fpn.pt."),
) -> None:
    """Export the online encoder of a checkpoint as a torchvision ResNet state dict (+ FPN)."""
    from anaus_core.outputs import claim_output
    from anaus_core.train import export_encoder_from_checkpoint

    if not checkpoint.is_file():
        raise UserInputError(f"{checkpoint}: checkpoint not found")
    with claim_output(out, command="export-encoder", option="OUT"):
        encoder_path, fpn_path = export_encoder_from_checkpoint(checkpoint, out)
    typer.echo(f"export-encoder: {encoder_path} (load into torchvision.models.resnet18() with strict=False, only fc.* missing), {fpn_path}")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def run_demo(out: Path, *, count: int = 24, size: int = 128, masker: str = "felzenszwalb", seed: int = 0, progress: bool = True, pretrain_steps: int = 200,
             annotations: bool = False, eval_count: int = 0) -> dict:
    """The README demo, end to end on a machine without weights. Steps (each a library call):

    1. phantoms: ``count`` phantom images + labels under ``OUT/corpus`` (``make_phantom_corpus``);
    2. precompute: ``precompute-masks OUT/corpus/img --out OUT/shards`` with a weight-free
       masker (``labels`` reads ``OUT/corpus/label``);
    3. inspect: validate the shard directory, print its summary, write ``OUT/contact_sheet.png``.

    Later steps (pre-training on ``OUT/shards``; with ``eval_count``, evaluating its encoder
    against ``random`` on that many held-apart phantoms under ``OUT/evaluate``) append to the
    returned dict. Running the demo
    again re-uses everything already computed (step 2 reports "nothing to do").
    """
    from rich.console import Console

    from anaus_core.phantoms import make_phantom_corpus
    from pipeline.config import PrecomputeConfig
    from pipeline.job import run_precompute
    from shards.inspect import inspect_path, render_text, write_contact_sheet

    out = Path(out)
    console = Console()
    result: dict = {"out": out}

    from anaus_core.outputs import claim_output

    console.rule("1. phantom corpus")
    corpus = out / "corpus"
    with claim_output(corpus, command="demo"):
        make_phantom_corpus(corpus, count=count, size=size, seed=seed, progress=progress, annotations=annotations)
    result["corpus"] = corpus

    console.rule(f"2. precompute-masks (--masker {masker})")
    shards_dir = out / "shards"
    config = PrecomputeConfig(
        corpus=str(corpus / "img"),
        out=str(shards_dir),
        masker=masker,
        labels=str(corpus / "label") if masker == "labels" else None,
        stored_size=size,
        samples_per_shard=max(4, count // 4),
        progress=progress,
    )
    report = run_precompute(config, console=console, show_report=True)
    if report.exit_code:
        raise UserInputError(f"{shards_dir}: precompute-masks skipped {report.skipped} input(s) in the demo corpus (see errors.jsonl)")
    result["shards"] = shards_dir
    result["precompute_report"] = report

    console.rule("3. inspect-shard")
    summary, kept = inspect_path(shards_dir, keep_samples=4)
    render_text(summary, console)
    sheet = write_contact_sheet(kept, out / "contact_sheet.png", title=f"{shards_dir} ({masker})")
    console.print(f"contact sheet: {sheet}")
    if not summary["validation"]["ok"]:
        raise UserInputError(f"{shards_dir}: demo shards failed validation")
    result["inspect_summary"] = summary
    result["contact_sheet"] = Path(sheet)

    if pretrain_steps > 0:
        console.rule(f"4. pretrain ({pretrain_steps} steps on the CPU)")
        result.update(_demo_pretrain(shards_dir, out / "pretrain", steps=pretrain_steps, seed=seed,
                                     progress=progress, console=console))
        if eval_count > 0:
            from anaus_core.evaluate.demo import evaluate_demo_encoder
            from pipeline.frame_reader import IngestFrameReader

            console.rule(f"5. evaluate the demo encoder vs random ({eval_count} held-apart phantoms)")
            result["evaluation"] = evaluate_demo_encoder(result["encoder"], out / "evaluate", reader=IngestFrameReader(),
                                                         count=eval_count, seed=seed, progress=progress, console=console)
    return result


def demo_pretrain_config(shards_dir: Path, *, steps: int, seed: int = 0, batch_size: int = 8):
    """The demo's CPU-sized pre-training: 64 px views, K = 8, a 64-channel FPN, slimmer heads and
    blur than the paper's (which are for 224 px on GPUs), a short-schedule peak lr of 0.5 (the
    setting of the phantom learning-signal experiment, docs/benchmarks.md (pretrain)); everything
    else is the default AnaUS objective (multi-scale L_ana + L_ctx)."""
    from anaus_core.config import load_config
    from anaus_core.train import PretrainConfig

    return load_config(PretrainConfig, None, {
        "data.shards": str(shards_dir), "data.batch_size": batch_size, "data.num_workers": 0,
        "views.size": 64, "views.num_mask_samples": 8,
        "augment.view1.blur_kernel": 9, "augment.view2.blur_kernel": 9,
        "model.fpn_channels": 64, "model.projector_hidden_dim": 512, "model.predictor_hidden_dim": 1024,
        "optim.base_lr": 16.0, "optim.warmup_steps": max(1, steps // 20),
        "run.steps": steps, "run.device": "cpu", "run.seed": seed, "run.log_every": max(1, min(10, steps // 20)),
        "run.checkpoint_every": max(50, steps // 4), "run.keep_step_checkpoints": False, "run.tensorboard": False,
    })


def _demo_pretrain(shards_dir: Path, run_dir: Path, *, steps: int, seed: int, progress: bool, console) -> dict:
    """Demo step 4: pre-train on the demo shards (resuming an interrupted demo run, skipping a
    finished one) and report the loss curve and the exported encoder."""
    import dataclasses
    import json as _json

    from anaus_core.train import pretrain
    from shards.index import read_manifest

    samples = sum(int(entry["samples"]) for entry in read_manifest(shards_dir)["shards"])
    config = demo_pretrain_config(shards_dir, steps=steps, seed=seed, batch_size=max(2, min(8, samples)))
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, progress=progress))
    summary_path, last = run_dir / "summary.json", run_dir / "checkpoints" / "last.pt"
    done = summary_path.exists() and _json.loads(summary_path.read_text()).get("steps_done") == steps
    if done and (run_dir / "encoder.pt").exists():
        console.print(f"pretrain: {run_dir} already holds the finished {steps}-step run (nothing to do)")
    else:
        from anaus_core.outputs import claim_output

        with claim_output(run_dir, command="demo"):
            pretrain(config, run_dir, data=shard_data_source(config), resume=True if last.exists() else None,
                     console=console)
    console.print(f"loss curve: {run_dir / 'loss_curve.png'}; encoder: {run_dir / 'encoder.pt'}")
    return {"pretrain_run": run_dir, "loss_curve": run_dir / "loss_curve.png", "encoder": run_dir / "encoder.pt"}


@app.command("demo", epilog="Example: anaus demo demo-out --count 24 --size 128 --pretrain-steps 200")
@user_errors
def demo_command(
    out: Path = typer.Argument(..., help="Output folder (corpus/, shards/, contact_sheet.png)."),
    count: int = typer.Option(24, min=1, help="Phantom images to generate."),
    size: int = typer.Option(128, min=32, max=4096, help="Phantom size in pixels (also the stored size)."),
    masker: DemoMasker = typer.Option(DemoMasker.felzenszwalb, help="Weight-free mask source."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    pretrain_steps: int = typer.Option(200, "--pretrain-steps", min=0, help="CPU pre-training steps on the demo shards (0 skips the step)."),
    annotations: bool = typer.Option(False, "--annotations", help="Phantoms with burned-in text, rulers, calipers and a colour bar (the scan region removes them)."),
    eval_count: int = typer.Option(60, "--eval-count", min=0, help="Held-apart phantoms on which the demo encoder is evaluated against random (0 skips the step)."),
) -> None:
    """Run the README demo: phantoms -> precompute-masks -> inspect-shard -> pretrain + loss curve (no weights needed)."""
    from anaus_core.outputs import ensure_writable_dir

    ensure_writable_dir(out, option="OUT")  # each step then holds its own sub-folder (corpus/, shards/, pretrain/)
    run_demo(out, count=count, size=size, masker=_value(masker), progress=not no_progress, pretrain_steps=pretrain_steps,
             annotations=annotations, eval_count=eval_count)



# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------

def _parse_fractions(values: Optional[list[str]]) -> Optional[list[float]]:
    """``--label-fraction 0.01,0.1 --label-fraction 1`` -> [0.01, 0.1, 1.0]."""
    if not values:
        return None
    fractions = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                fractions.append(float(part))
            except ValueError:
                raise UserInputError(f"--label-fraction {part!r}: expected a number in (0, 1]") from None
    return fractions


@app.command("evaluate", epilog="Example: anaus evaluate data/BUSI_cls --out reports/busi --protocol linear --encoder anaus=runs/anaus/encoder.pt --encoder random")
@user_errors
def evaluate_command(
    data: Path = typer.Argument(..., help="Labelled data: class-per-folder images (classification) or img/ + label/ + dataset.yaml (segmentation)."),
    out: Path = typer.Option(..., "--out", help="Report folder: results.json, results.md, folds.csv, predictions.png, confusion.png, label_fraction.png."),
    encoder: Optional[list[str]] = typer.Option(None, "--encoder", help="NAME=PATH of a torchvision ResNet-18/50 or timm ViT state dict (repeatable), or 'random'."),
    task: str = typer.Option("classification", "--task", help="classification or segmentation."),
    protocol: Optional[list[str]] = typer.Option(None, "--protocol", help="linear (default), finetune, finetune-full (repeatable)."),
    head: str = typer.Option("fpn", "--head", help="Segmentation head: fpn (light decoder on the ResNet-FPN / ViT tokens) or maskrcnn."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Outer cross-validation folds (default 5)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of folds, label fractions, initialisation and batches (default 0)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Network input size in pixels (default 224)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning / segmentation epochs (default 30)."),
    label_fraction: Optional[list[str]] = typer.Option(None, "--label-fraction", help="Fractions of each training fold, e.g. 0.01,0.1,1.0 (repeatable)."),
    select_on_test: bool = typer.Option(False, "--select-on-test", help="Select epoch/head on the test fold like USCL/the official code; marks every figure optimistic."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="groups.csv with rows file,group (file relative to DATA)."),
    group_by: str = typer.Option("auto", "--group-by", help="auto (frames of a video/multi-frame file together), video, patient (DICOM PatientID), folder, none."),
    allow_frame_leak: bool = typer.Option(False, "--allow-frame-leak", help="Allow frames of one source in different folds (leaks; off by default)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Fixed outer folds: CSV rows file,fold (e.g. a published split, or a previous folds.csv)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML evaluation config (see docs/evaluate.md)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key, e.g. --set linear.epochs=50 (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Evaluate encoders on labelled data with grouped k-fold cross-validation (selection never on the test fold)."""
    from anaus_core.config import load_config
    from anaus_core.evaluate import EvaluateConfig, parse_encoder_option, run_evaluation
    from pipeline.frame_reader import IngestFrameReader

    overrides = {"task": task, "data": str(data), "out": str(out), "head": head, "folds": folds, "seed": seed,
                 "image_size": image_size, "finetune.epochs": epochs, "label_fractions": _parse_fractions(label_fraction),
                 "protocols": protocol or None, "select_on_test": select_on_test or None,
                 "groups_file": str(groups) if groups else None, "group_by": group_by,
                 "allow_frame_leak": allow_frame_leak or None, "splits_file": str(splits) if splits else None,
                 "device": device, "progress": False if no_progress else None}
    overrides.update(_parse_set_options(set_))
    eval_config = load_config(EvaluateConfig, config, overrides)
    from anaus_core.machine import check_device
    from anaus_core.outputs import claim_output

    check_device(eval_config.device)
    specs = [parse_encoder_option(text) for text in (encoder or [])]
    with claim_output(out, command="evaluate"):
        results = run_evaluation(eval_config, specs, reader=IngestFrameReader())
    typer.echo(f"report: {out / 'results.md'} ({len(results['runs'])} runs; selection: {results['selection']})")



def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (UserInputError, ConfigError) as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
