"""``PretrainConfig``: every setting of ``anaus pretrain``, loadable from YAML with CLI overrides.

Batch-size convention: ``data.batch_size`` is the **global** batch per optimiser step, summed
over ranks and accumulation micro-steps. Each rank loads ``batch_size / (world_size ×
accumulation_steps)`` images per micro-step, and the learning rate is ``base_lr × batch_size /
256`` whatever the number of GPUs. A 2-GPU run and a 1-GPU run with the same config therefore
see the same global batches and the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from anaus_core.config import ConfigError

from anaus_core.augment.device import DeviceAugmentConfig
from anaus_core.augment.views import ViewConfig
from anaus_core.avit.config import AViTConfig
from anaus_core.evaluate.online import OnlineEvalConfig
from anaus_core.models.anaus_model import AnaUSConfig


@dataclass
class DataConfig:
    """Where the pre-training batches come from (``shards/stream.py`` builds the loader)."""

    shards: str = ""                 # folder written by ``anaus precompute-masks`` (shards + index)
    batch_size: int = 192            # global batch per optimiser step (all ranks, all micro-steps)
    num_workers: int = 4             # DataLoader workers per rank (decode + geometry); locked on resume
    shuffle_buffer: int = 1024       # samples per shuffle window inside a worker's stream
    pin_memory: bool = True          # pinned host memory (only used when training on CUDA)
    prefetch_factor: int = 2         # batches prefetched per worker


@dataclass
class OptimConfig:
    """LARS + cosine schedules (SPEC §6; official-code audit §2.6 for the choices it fixes)."""

    base_lr: float = 0.3             # lr = base_lr × batch_size / 256
    weight_decay: float = 1e-6       # not applied to biases and norm parameters
    final_weight_decay: Optional[float] = None  # cosine from weight_decay to this over the run (DINO: 0.04 -> 0.4); None = constant
    lars_eta: float = 0.001          # LARS trust coefficient; biases and norm params skip LARS
    sgd_momentum: float = 0.9
    warmup_epochs: float = 3.0       # linear warm-up, converted to optimiser steps
    warmup_steps: Optional[int] = None   # overrides warmup_epochs when set
    final_lr: float = 0.0            # value the cosine decay ends at (absolute lr)
    ema_base: float = 0.99           # target EMA decay tau, cosine from ema_base to 1
    accumulation_steps: int = 1      # micro-steps per optimiser step
    grad_clip_norm: Optional[float] = None
    foreach: bool = True             # LARS with torch._foreach_* kernels (False: the per-parameter loop)
    name: Literal["lars", "adamw"] = "lars"   # adamw: the ViT methods' optimiser (DINO/iBOT/MAE); lars_eta/sgd_momentum unused


@dataclass
class RunConfig:
    """Length, device and bookkeeping of the run."""

    steps: Optional[int] = None      # optimiser steps; wins over epochs when set
    epochs: Optional[float] = None   # full passes over the shards (default 300 when steps unset)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True                 # bf16 autocast; only ever active on CUDA
    channels_last: bool = True       # memory format on CUDA (ignored on CPU)
    seed: int = 0
    log_every: int = 10              # optimiser steps between metrics.jsonl lines
    checkpoint_every: int = 1000     # optimiser steps between checkpoints (0 = only at the end)
    keep_step_checkpoints: bool = True   # keep step-XXXXXX.pt files beside last.pt
    keep_last_checkpoints: Optional[int] = None  # keep only the newest N step files (None: all)
    progress: bool = True            # rich progress bar with images/s and ETA
    tensorboard: bool = True         # event files in RUN/tensorboard when tensorboard is installed
    deterministic: bool = False      # torch.use_deterministic_algorithms (slower on CUDA)
    # torch.compile of the method's networks: "auto" = on CUDA (where it pays for its compile
    # time), off on the CPU; "on" / "off" force it
    compile: Literal["auto", "on", "off"] = "auto"


@dataclass
class PretrainConfig:
    """Top-level config of ``anaus pretrain`` (one YAML section per field).

    ``views``: crop geometry and mask sampling done in the loader workers (``size`` = S,
    ``num_mask_samples`` = K). ``augment``: the batched photometric ops on the device.
    ``model``: encoder, heads, objective and ablation switches of AnaUS (incl. ``sync_batchnorm``).
    ``method``: which ``anaus_core.methods`` method trains (each method reads its own section).
    ``eval``: online kNN / linear-probe evaluation during training (off while ``eval.data`` is empty).
    """

    method: str = "anaus"            # pre-training method (anaus_core.methods): "anaus", "avit"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    augment: DeviceAugmentConfig = field(default_factory=DeviceAugmentConfig)
    model: AnaUSConfig = field(default_factory=AnaUSConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    avit: AViTConfig = field(default_factory=AViTConfig)   # method "avit" (docs/avit.md)
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)


def validate_config(config: PretrainConfig, *, world_size: int = 1) -> None:
    """Cross-field checks that the type coercion cannot express; raises ``ConfigError``."""
    data, optim, run = config.data, config.optim, config.run
    from anaus_core.methods import METHOD_BUILDERS

    if config.method not in METHOD_BUILDERS:
        raise ConfigError(f"method: {config.method!r} is not a pre-training method ({', '.join(sorted(METHOD_BUILDERS))})")
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {data.batch_size}")
    if optim.accumulation_steps < 1:
        raise ConfigError(f"optim.accumulation_steps: must be >= 1, got {optim.accumulation_steps}")
    per_step = world_size * optim.accumulation_steps
    if data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is not divisible by world_size × accumulation_steps = {per_step}")
    if run.steps is not None and run.steps < 1:
        raise ConfigError(f"run.steps: must be >= 1, got {run.steps}")
    if run.epochs is not None and run.epochs <= 0:
        raise ConfigError(f"run.epochs: must be > 0, got {run.epochs}")
    if config.views.size % 32:
        raise ConfigError(f"views.size: must be a multiple of 32 (ResNet stride 32), got {config.views.size}")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {data.num_workers}")
    try:
        config.augment.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        config.model.validate()
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("model") else f"model.{exc}") from None
    if run.compile not in ("auto", "on", "off"):
        raise ConfigError(f"run.compile: must be auto, on or off, got {run.compile!r}")
    if run.log_every < 1:
        raise ConfigError(f"run.log_every: must be >= 1, got {run.log_every}")
    if run.keep_last_checkpoints is not None and run.keep_last_checkpoints < 1:
        raise ConfigError(f"run.keep_last_checkpoints: must be >= 1 (or unset to keep all), got {run.keep_last_checkpoints}")
    if optim.final_weight_decay is not None and optim.final_weight_decay < 0:
        raise ConfigError(f"optim.final_weight_decay: must be >= 0, got {optim.final_weight_decay}")
    if not optim.base_lr > 0:
        raise ConfigError(f"optim.base_lr: must be > 0, got {optim.base_lr}")
    if run.checkpoint_every < 0:
        raise ConfigError(f"run.checkpoint_every: must be >= 0, got {run.checkpoint_every}")
    try:
        config.eval.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= optim.ema_base <= 1:
        raise ConfigError(f"optim.ema_base: must be in [0, 1], got {optim.ema_base}")
    if config.method == "avit":
        config.avit.validate()


def micro_batch_size(config: PretrainConfig, world_size: int) -> int:
    """Images per rank per micro-step."""
    return config.data.batch_size // (world_size * config.optim.accumulation_steps)


def effective_base_lr(config: PretrainConfig) -> float:
    """Peak learning rate: ``base_lr × global batch / 256``."""
    return config.optim.base_lr * config.data.batch_size / 256.0
