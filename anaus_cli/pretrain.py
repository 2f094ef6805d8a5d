"""``anaus pretrain`` (options -> ``PretrainConfig`` -> ``anaus_core.train.pretrain`` over the shard
data source of ``anaus_cli.shard_data``) and ``anaus export-encoder``."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from anaus_cli.common import app, choice_value, echo_warning, parse_set_options, user_errors
from anaus_cli.shard_data import shard_data_source, store_anatomy_categories
from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError


class TrainDevice(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Online evaluation: class-per-folder labelled images (the `anaus evaluate` layout); kNN + linear probe on held-out folds, logged to metrics.jsonl."),
    eval_task: Optional[str] = typer.Option(None, "--eval-task", help="Online evaluation task: classification (class-per-folder images) or regions (the segmentation layout: features pooled inside each labelled class of each image)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=0, help="Optimiser steps between online evaluations (default 500; 0 = only at the end)."),
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
        "run.device": choice_value(device), "run.amp": amp, "run.channels_last": channels_last, "run.compile": compile_mode,
        "model.sync_batchnorm": sync_batchnorm, "run.seed": seed, "run.log_every": log_every,
        "run.checkpoint_every": checkpoint_every, "run.progress": progress,
        "eval.data": str(eval_data) if eval_data is not None else None, "eval.task": eval_task, "eval.every": eval_every,
    }
    overrides.update(parse_set_options(set_values))
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
    evaluator = online_evaluator(config)  # first: a bad --eval-data fails before any shard is opened
    result = _pretrain_checked(config, out, resume_path=resume_path, typed_shards=shards, allow_pipe=allow_pipe_shards,
                               allow_remote=allow_remote_shards, skip_bad=skip_bad_shards, evaluator=evaluator)
    if result.encoder_path is not None:
        typer.echo(f"pretrain: {result.steps_done} steps; encoder -> {result.encoder_path}; loss curve -> {result.loss_curve}")
    else:
        typer.echo(f"pretrain: stopped at step {result.steps_done}/{result.total_steps}; checkpoint -> {result.last_checkpoint}")


def online_evaluator(config):
    """The trainer's online evaluation over ``config.eval.data`` read through the same frame
    reader as ``anaus evaluate`` (None when ``eval.data`` is empty, and on every rank but 0 under
    torchrun: only the main rank evaluates). Built before training so a bad folder fails at once."""
    import os

    if not config.eval.enabled or int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        config.eval.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    import torch

    from anaus_core.evaluate.online import OnlineEvaluator
    from pipeline.frame_reader import IngestFrameReader

    on_cuda = config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())
    return OnlineEvaluator(config.eval, reader=IngestFrameReader(), image_size=config.views.size,
                           device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if on_cuda else "cpu")


def _pretrain_checked(config, out: Path, *, resume_path, typed_shards, allow_pipe: bool, allow_remote: bool, skip_bad: bool,
                      evaluator=None):
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
        return pretrain(config, out, data=shard_data_source(config, source=source), resume=resume_path,
                        evaluator=evaluator)


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
