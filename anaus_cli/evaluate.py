"""``anaus evaluate``: options -> ``EvaluateConfig`` -> ``anaus_core.evaluate.run_evaluation``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from anaus_cli.common import app, parse_set_options, user_errors
from anaus_core.errors import UserInputError


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
    overrides.update(parse_set_options(set_))
    eval_config = load_config(EvaluateConfig, config, overrides)
    from anaus_core.machine import check_device
    from anaus_core.outputs import claim_output

    check_device(eval_config.device)
    specs = [parse_encoder_option(text) for text in (encoder or [])]
    with claim_output(out, command="evaluate"):
        results = run_evaluation(eval_config, specs, reader=IngestFrameReader())
    typer.echo(f"report: {out / 'results.md'} ({len(results['runs'])} runs; selection: {results['selection']})")
