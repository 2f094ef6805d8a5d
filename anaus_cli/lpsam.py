"""``anaus lpsam`` sub-app: ``adapt`` (stage 1), ``train-prompter`` (stage 2) and ``predict``."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from anaus_cli.common import app, choice_value, user_errors
from anaus_core.errors import UserInputError


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


_RANDOM_SAM_HELP = "Use a randomly initialised SAM (seeded by --seed) instead of --sam-checkpoint: for tests and demos only, its masks are not meaningful."


def require_sam_checkpoint(sam_checkpoint, *, random_sam: bool, option: str = "--sam-checkpoint") -> None:
    """SAM-based commands need real weights unless a random (seeded) SAM is asked for explicitly."""
    if sam_checkpoint is None and not random_sam:
        raise UserInputError(f"{option}: required (an official SAM checkpoint, e.g. sam_vit_b_01ec64.pth; see README "
                             "'SAM checkpoints'); pass --random-sam for a seeded random SAM (tests only)")
    if sam_checkpoint is not None and not Path(sam_checkpoint).is_file():
        raise UserInputError(f"{sam_checkpoint}: {option} not found")


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
            "model.spec": choice_value(spec),
            "model.image_size": image_size,
            "model.adapter_placement": choice_value(adapter_placement),
            "prompt": choice_value(prompt),
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
