"""Settings of one ``anaus evaluate`` run (a typed dataclass; YAML + ``--set`` via ``anaus_core.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LinearConfig:
    """Linear probe on cached frozen features: one head per (lr, weight decay) pair, all trained
    together on the same feature batches (SGD, momentum 0.9, cosine schedule)."""

    learning_rates: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-2)
    epochs: int = 100
    batch_size: int = 256


@dataclass
class FinetuneConfig:
    """Fine-tuning (classification and segmentation). Defaults are the paper's classification
    protocol: last three stages trainable, new head, Adam lr 0.01, 30 epochs, batch 32."""

    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 32
    trainable_stages: int = 3
    #: segmentation learning rate (the decoder is new; the backbone is fine-tuned fully)
    segmentation_lr: float = 1e-3
    #: ``--head maskrcnn`` (SGD, momentum 0.9, the paper's segmentation optimiser)
    maskrcnn_lr: float = 0.01


@dataclass
class EvaluateConfig:
    task: Literal["classification", "segmentation"] = "classification"
    data: str = ""
    out: str = ""
    protocols: tuple[str, ...] = ("linear",)
    head: Literal["fpn", "maskrcnn"] = "fpn"
    folds: int = 5
    seed: int = 0
    image_size: int = 224
    val_fraction: float = 0.2
    label_fractions: tuple[float, ...] = (1.0,)
    select_on_test: bool = False
    groups_file: str | None = None
    group_by: Literal["auto", "patient", "video", "folder", "none"] = "auto"
    allow_frame_leak: bool = False
    splits_file: str | None = None
    random_arch: str = "resnet18"
    device: str = "auto"
    progress: bool = True
    bootstrap_resamples: int = 1000
    max_sheet_images: int = 6
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
