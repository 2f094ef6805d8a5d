"""LP-SAM stage 1 (``adapt``: adapters) and stage 2 (``train-prompter``: latent prompt engine)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn import functional as F

from anaus_core.errors import UserInputError
from anaus_core.lpsam.build import LPSAMModelConfig, build_lpsam, load_partial_state
from anaus_core.lpsam.checkpoint import check_base_sam, read_checkpoint, save_checkpoint, apply_checkpoint_tensors
from anaus_core.lpsam.data import SegmentationPairs, read_description, split_indices, union_class_names
from anaus_core.lpsam.losses import bce_dice_loss, dice_score
from anaus_core.lpsam.model import LPSAM, is_adapter_key
from anaus_core.lpsam.prompts import boxes_from_masks, choose_prompt_classes, sample_foreground_points
from anaus_core.sam import file_sha256, resolve_spec

log = logging.getLogger(__name__)

PROMPT_MODES = ("box", "point", "box+point")


@dataclass
class AdaptConfig:
    """``anaus lpsam adapt``: stage 1, adapters trained on image-mask pairs, SAM frozen."""

    datasets: list[str] = field(default_factory=list)  # dataset folders (see anaus_core/lpsam/data.py)
    val_datasets: list[str] = field(default_factory=list)  # empty: hold out val_fraction of the training pairs
    val_fraction: float = 0.1
    sam_checkpoint: str | None = None  # official SAM checkpoint; None = random SAM (tests only)
    out_dir: str = "runs/lpsam-adapt"
    model: LPSAMModelConfig = field(default_factory=LPSAMModelConfig)
    epochs: int = 20
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    alpha: float = 0.8  # loss = (1 - alpha) * BCE + alpha * Dice
    prompt: str = "box+point"  # box | point | box+point, derived from the ground-truth mask
    points_per_prompt: int = 1
    box_jitter: float = 0.05
    hflip: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    resume: str | None = None  # a last.pt of the same run
    progress: bool = True


@dataclass
class PrompterConfig:
    """``anaus lpsam train-prompter``: stage 2, only the latent prompt engine trains."""

    datasets: list[str] = field(default_factory=list)
    val_datasets: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    sam_checkpoint: str | None = None
    adapter_checkpoint: str = ""  # the stage-1 checkpoint (best.pt or last.pt of `adapt`)
    out_dir: str = "runs/lpsam-prompter"
    # Engine settings are taken from here; encoder settings (spec, size, adapters) from stage 1.
    model: LPSAMModelConfig = field(default_factory=LPSAMModelConfig)
    train_decoder: bool = False  # the official code also trained SAM's mask decoder; the paper freezes it
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    alpha: float = 0.8
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    resume: str | None = None
    progress: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    history: list[dict[str, Any]]  # per epoch: epoch, train_loss, first_loss, val_dice {class: dice}, val_mean_dice


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_context(device: torch.device, enabled: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _datasets(paths: list[str], option: str):
    if not paths:
        raise UserInputError(f"{option}: give at least one dataset folder")
    return [read_description(p) for p in paths]


def _splits(config, class_names: list[str], image_size: int, in_chans: int):
    train_descriptions = _datasets(config.datasets, "--data")
    if config.val_datasets:
        val_descriptions = [read_description(p) for p in config.val_datasets]
        train_set = SegmentationPairs(train_descriptions, class_names=class_names, image_size=image_size, in_chans=in_chans)
        val_set = SegmentationPairs(val_descriptions, class_names=class_names, image_size=image_size, in_chans=in_chans)
    else:
        total = sum(len(d.pairs) for d in train_descriptions)
        groups = [g for d in train_descriptions for g in (d.groups or [f"{d.name}/{i}" for i in range(len(d.pairs))])]
        train_idx, val_idx = split_indices(total, val_fraction=config.val_fraction, seed=config.seed, groups=groups)
        train_set = SegmentationPairs(train_descriptions, class_names=class_names, image_size=image_size, in_chans=in_chans, indices=train_idx)
        val_set = SegmentationPairs(train_descriptions, class_names=class_names, image_size=image_size, in_chans=in_chans, indices=val_idx)
    return train_set, val_set


def _loader(dataset, config, *, shuffle: bool, epoch: int) -> torch.utils.data.DataLoader:
    # A fresh generator per epoch: the data order of epoch e is the same whether or not the run resumed.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=config.num_workers,
        drop_last=False,
    )


def _hflip(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    flip = torch.rand(batch["pixels"].shape[0], generator=generator) < 0.5
    if flip.any():
        batch = dict(batch)
        batch["pixels"] = torch.where(flip[:, None, None, None], batch["pixels"].flip(-1), batch["pixels"])
        batch["masks"] = torch.where(flip[:, None, None, None], batch["masks"].flip(-1), batch["masks"])
    return batch


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


# -- stage-specific forward passes ------------------------------------------------------------------
def stage1_logits(model: LPSAM, batch: dict[str, torch.Tensor], *, prompt: str, points_per_prompt: int, box_jitter: float, generator: torch.Generator | None):
    """Prompted masks for one class per image: (logits (N, S, S), target (N, S, S)), N = images
    with a non-empty declared class."""
    classes = choose_prompt_classes(batch["masks"], batch["class_valid"], generator=generator)
    keep = classes >= 0
    if not keep.any():
        return None
    pixels = batch["pixels"][keep]
    target = batch["masks"][keep.nonzero()[:, 0], classes[keep]]
    boxes = points = labels = None
    if "box" in prompt:
        boxes = boxes_from_masks(target.bool(), jitter=box_jitter, generator=generator)
    if "point" in prompt:
        points = sample_foreground_points(target.bool(), count=points_per_prompt, generator=generator)
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
    _, embeddings = model.embed(pixels)
    low_res, _ = model.decode_prompted(embeddings, boxes=boxes, points=points, point_labels=labels)
    return _upsample(low_res, pixels.shape[-1])[:, 0], target


def stage2_logits(model: LPSAM, batch: dict[str, torch.Tensor]):
    """Prompt-free masks of every class: (logits (B, K, S, S), target (B, K, S, S))."""
    with torch.no_grad():  # encoder and adapters are frozen in stage 2
        normalised, embeddings = model.embed(batch["pixels"])
    low_res, _ = model.decode_latent(normalised, embeddings)
    return _upsample(low_res, batch["pixels"].shape[-1]), batch["masks"]


# -- the shared loop ---------------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from anaus_core.progress import make_progress

    return make_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled, transient=True)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _run_loop(
    *,
    stage: str,
    config,
    model: LPSAM,
    trainable: dict[str, torch.nn.Parameter],
    train_set,
    val_set,
    train_loss: Callable[[dict[str, torch.Tensor], torch.Generator], torch.Tensor | None],
    validate: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    payload_base: dict[str, Any],
    trained_state: Callable[[], dict[str, dict[str, torch.Tensor]]],
    device: torch.device,
) -> TrainResult:
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, history, best = 0, [], -math.inf
    if config.resume:
        data = read_checkpoint(config.resume)
        if data.get("stage") != stage:
            raise UserInputError(f"{config.resume}: is a {data.get('stage')!r} checkpoint; --resume needs a {stage!r} one")
        if data.get("base_sam_sha256") != payload_base["base_sam_sha256"]:
            raise UserInputError(f"{config.resume}: was trained on another base SAM checkpoint (sha256 differs)")
        apply_checkpoint_tensors(model, data, source=str(config.resume))
        optimizer.load_state_dict(data["optimizer"])
        start_epoch, history = int(data["epoch"]) + 1, list(data["history"])
        best = max((h["val_mean_dice"] for h in history), default=-math.inf)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    generator = torch.Generator().manual_seed(config.seed)
    class_names = model.class_names
    with _progress(config.progress) as progress:
        for epoch in range(start_epoch, config.epochs):
            generator.manual_seed(config.seed * 7919 + epoch)
            loader = _loader(train_set, config, shuffle=True, epoch=epoch)
            steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
            task = progress.add_task(f"{stage} epoch {epoch + 1}/{config.epochs}", total=steps, info="")
            model.eval()  # SAM's modules have no dropout/batch-norm; eval keeps frozen parts exact
            losses = []
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                if config.hflip:
                    batch = _hflip(batch, generator)
                batch = _to_device(batch, device)
                with autocast_context(device, config.amp):
                    loss = train_loss(batch, generator)
                if loss is None:
                    progress.advance(task)
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                progress.update(task, advance=1, info=f"loss {losses[-1]:.4f}")
            progress.remove_task(task)
            val_dice = _validate(model, val_set, config, validate, device, class_names)
            scored = [v for v in val_dice.values() if v is not None]
            record = {
                "epoch": epoch,
                "train_loss": sum(losses) / len(losses) if losses else None,
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "val_dice": val_dice,
                "val_mean_dice": sum(scored) / len(scored) if scored else 0.0,
            }
            history.append(record)
            dice_text = ", ".join(f"{k} {v:.3f}" for k, v in val_dice.items() if v is not None)
            progress.console.print(f"{stage}: epoch {epoch + 1}/{config.epochs}  loss {record['train_loss'] if record['train_loss'] is not None else float('nan'):.4f}  val Dice: {dice_text or 'n/a'}", markup=False, highlight=False)
            payload = {**payload_base, "stage": stage, "epoch": epoch, "trained": trained_state(), "optimizer": optimizer.state_dict(), "history": history}
            save_checkpoint(last_path, payload)
            # no validation set (val_fraction 0, one group): best.pt follows the last epoch
            if record["val_mean_dice"] > best or not best_path.exists() or len(val_set) == 0:
                best = max(best, record["val_mean_dice"])
                save_checkpoint(best_path, payload)
    if not last_path.exists():
        raise UserInputError(f"{config.resume or out_dir}: nothing to do (epochs={config.epochs} already reached)")
    return TrainResult(out_dir=out_dir, last_checkpoint=last_path, best_checkpoint=best_path, history=history)


@torch.no_grad()
def _validate(model, val_set, config, validate, device, class_names) -> dict[str, float | None]:
    """Mean hard Dice (logit > 0) per class over the validation images where it counts.

    ``validate(batch)`` returns logits (B, K, S, S) and a bool (B, K) of the (image, class)
    pairs to score."""
    totals = torch.zeros(len(class_names), dtype=torch.float64)
    counts = torch.zeros(len(class_names), dtype=torch.float64)
    for batch in _loader(val_set, config, shuffle=False, epoch=0):
        batch = _to_device(batch, device)
        with autocast_context(device, config.amp):
            logits, valid = validate(batch)
        dice = dice_score((logits.float() > 0).flatten(0, 1), batch["masks"].flatten(0, 1)).view(valid.shape)
        valid = valid.double().cpu()
        totals += (dice.double().cpu() * valid).sum(0)
        counts += valid.sum(0)
    return {name: (float(totals[k] / counts[k]) if counts[k] > 0 else None) for k, name in enumerate(class_names)}


def _freeze_all_but(model: LPSAM, predicate: Callable[[str], bool]) -> dict[str, torch.nn.Parameter]:
    trainable = {}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(predicate(name))
        if predicate(name):
            trainable[name] = parameter
    return trainable


def _config_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# -- stage 1 -------------------------------------------------------------------------------------
def run_adapt(config: AdaptConfig) -> TrainResult:
    """Train the adapters (and the input projection for C not in {1, 3}); everything else frozen."""
    if config.prompt not in PROMPT_MODES:
        raise UserInputError(f"--prompt: must be one of {PROMPT_MODES}, got {config.prompt!r}")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    descriptions = _datasets(config.datasets, "--data")
    class_names = union_class_names(descriptions + [read_description(p) for p in config.val_datasets])
    spec = resolve_spec(config.model.spec)
    base_sha = file_sha256(config.sam_checkpoint) if config.sam_checkpoint else ""
    model = build_lpsam(config.model, class_names=class_names, sam_checkpoint=config.sam_checkpoint).to(device)
    trainable = _freeze_all_but(model, is_adapter_key)
    train_set, val_set = _splits(config, class_names, config.model.image_size, config.model.in_chans)

    def train_loss(batch, generator):
        out = stage1_logits(model, batch, prompt=config.prompt, points_per_prompt=config.points_per_prompt, box_jitter=config.box_jitter, generator=generator)
        if out is None:
            return None
        logits, target = out
        return bce_dice_loss(logits, target, alpha=config.alpha)

    def validate(batch):
        # Deterministic prompts: the tight box (and a fixed-seed point) of every present declared class.
        fixed = torch.Generator().manual_seed(0)
        present = batch["masks"].flatten(2).bool().any(2) & batch["class_valid"]
        logits = torch.zeros(batch["masks"].shape, device=device)
        for k in range(present.shape[1]):
            rows = present[:, k]
            if not rows.any():
                continue
            sub = {"pixels": batch["pixels"][rows], "masks": batch["masks"][rows][:, k : k + 1], "class_valid": torch.ones(int(rows.sum()), 1, dtype=torch.bool, device=device)}
            sub_logits, _ = stage1_logits(model, sub, prompt=config.prompt, points_per_prompt=config.points_per_prompt, box_jitter=0.0, generator=fixed)
            logits[rows, k] = sub_logits.float()
        return logits, present  # absent classes are not prompted and not scored

    payload = {
        "model_config": config.model.to_dict(),
        "spec": spec.to_dict(),
        "class_names": class_names,
        "base_sam_sha256": base_sha,
        "train_config": _config_dict(config),
    }
    return _run_loop(
        stage="adapt",
        config=config,
        model=model,
        trainable=trainable,
        train_set=train_set,
        val_set=val_set,
        train_loss=train_loss,
        validate=validate,
        payload_base=payload,
        trained_state=lambda: {"adapters": _cpu_copy(model.adapter_state_dict())},
        device=device,
    )


def _cpu_copy(state: dict) -> dict:
    """Detached CPU copies of a state dict's tensors (what a checkpoint stores)."""
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


# -- stage 2 -------------------------------------------------------------------------------------
ENGINE_FIELDS = ("tokens_per_class", "engine_rounds", "engine_heads", "engine_mlp_dim", "engine_cnn_channels")


def run_train_prompter(config: PrompterConfig) -> TrainResult:
    """Train the latent prompt engine (and SAM's decoder only with ``train_decoder``); SAM and the
    stage-1 adapters stay bit-identical."""
    if not config.adapter_checkpoint:
        raise UserInputError("--adapter-checkpoint: give the stage-1 checkpoint written by `anaus lpsam adapt`")
    stage1 = read_checkpoint(config.adapter_checkpoint)
    if stage1.get("stage") != "adapt":
        raise UserInputError(f"{config.adapter_checkpoint}: is a {stage1.get('stage')!r} checkpoint; --adapter-checkpoint needs an 'adapt' one")
    base_sha = check_base_sam(stage1, config.sam_checkpoint, source=config.adapter_checkpoint)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    descriptions = _datasets(config.datasets, "--data")
    class_names = union_class_names(descriptions + [read_description(p) for p in config.val_datasets])
    model_config = LPSAMModelConfig.from_dict({**stage1["model_config"], **{f: getattr(config.model, f) for f in ENGINE_FIELDS}})
    config = dataclasses.replace(config, model=model_config)
    from anaus_core.sam import SamSpec

    spec = SamSpec.from_dict(stage1["spec"])
    model = build_lpsam(model_config, class_names=class_names, sam_checkpoint=config.sam_checkpoint, spec=spec)
    adapters = stage1["trained"]["adapters"]
    load_partial_state(model, adapters, source=config.adapter_checkpoint, what="adapter")
    model = model.to(device)
    train_prefixes = ("prompt_engine.",) + (("mask_decoder.",) if config.train_decoder else ())
    trainable = _freeze_all_but(model, lambda name: name.startswith(train_prefixes))
    train_set, val_set = _splits(config, class_names, model_config.image_size, model_config.in_chans)

    def train_loss(batch, generator):
        logits, target = stage2_logits(model, batch)
        return bce_dice_loss(logits.flatten(0, 1), target.flatten(0, 1), alpha=config.alpha, weight=batch["class_valid"].flatten())

    def validate(batch):
        logits, _ = stage2_logits(model, batch)
        return logits, batch["class_valid"]

    def trained_state():
        state = {"prompt_engine": _cpu_copy(model.engine_state_dict())}
        if config.train_decoder:
            state["mask_decoder"] = _cpu_copy(model.decoder_state_dict())
        return state

    payload = {
        "model_config": model_config.to_dict(),
        "spec": spec.to_dict(),
        "class_names": class_names,
        "base_sam_sha256": base_sha,
        "adapters": {k: v.clone() for k, v in adapters.items()},
        "adapter_checkpoint_sha256": file_sha256(config.adapter_checkpoint),
        "train_config": _config_dict(config),
    }
    return _run_loop(
        stage="prompter",
        config=config,
        model=model,
        trainable=trainable,
        train_set=train_set,
        val_set=val_set,
        train_loss=train_loss,
        validate=validate,
        payload_base=payload,
        trained_state=trained_state,
        device=device,
    )
