"""Online evaluation during pre-training: a frozen-feature kNN and linear probe on a small
labelled validation set, every ``eval.every`` optimiser steps (lightly / solo-learn style).

Two tasks: ``classification`` (one label per image, global pooled features) and ``regions``
(the segmentation layout; one sample per image and labelled class, features pooled inside the
class's pixels, ``anaus_core.evaluate.regions``; folds over images, so an image's regions are
never split between fitting and scoring).

Built on the evaluation library: the data is the ``anaus evaluate`` classification layout read by
``datasets.load_classification`` through the injected ``FrameReader``; items are grouped by
``groups.assign_groups`` and split by ``folds.make_folds`` (grouped, stratified k-fold with an inner
validation split drawn from the training folds); the linear probe is ``linear.train_linear_grid``
(head chosen on the inner validation split, scored on the held-out fold); the kNN is
``knn.knn_class_scores`` fitted on the training folds. Nothing is ever trained or selected on the
fold it is scored on.

Cost is bounded: at most ``max_images`` images are kept (a stratified draw with the seed), decoded
and resized once when the evaluator is built; each evaluation is one forward pass over them plus
the probes on (max_images, D) features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from anaus_core.errors import UserInputError
from anaus_core.evaluate.config import LinearConfig
from anaus_core.evaluate.datasets import EvalDataset, load_classification, load_segmentation
from anaus_core.evaluate.features import extract_features
from anaus_core.evaluate.folds import Fold, make_folds
from anaus_core.evaluate.groups import assign_groups
from anaus_core.evaluate.knn import knn_class_scores
from anaus_core.evaluate.linear import train_linear_grid
from anaus_core.evaluate.reader import FrameReader
from anaus_core.evaluate.regions import region_features

TASKS = ("classification", "regions")


def _online_linear() -> LinearConfig:
    # a smaller grid and fewer epochs than `anaus evaluate`: it runs many times per pre-training
    return LinearConfig(learning_rates=(0.01, 0.1, 1.0), weight_decays=(0.0, 1e-3), epochs=50, batch_size=256)


@dataclass
class OnlineEvalConfig:
    """``eval`` section of ``PretrainConfig``. Off while ``data`` is empty.

    ``data``: class-per-folder labelled images (the ``anaus evaluate`` classification layout), or
    for ``task: regions`` the segmentation layout (``dataset.yaml`` + images + label maps).
    ``task``: ``classification`` (one class per image) or ``regions`` (one sample per labelled
    class in each image, mask-pooled features).
    ``every``: optimiser steps between evaluations (0 = only at the end of the run).
    ``max_images``: at most this many images are used (stratified draw with ``seed``).
    ``image_size``: network input side (None = ``views.size``).
    ``folds``: k of the grouped k-fold; ``group_by``: the ``anaus evaluate`` grouping rule.
    ``knn_k``, ``knn_temperature``: the weighted kNN (DINO uses k = 20, T = 0.07).
    ``linear``: the linear probe's (lr x weight decay) grid, epochs, batch size.
    """

    data: str = ""
    task: str = "classification"
    every: int = 500
    max_images: int = 512
    image_size: int | None = None
    folds: int = 5
    group_by: str = "auto"
    val_fraction: float = 0.2
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 64
    seed: int = 0
    linear: LinearConfig = field(default_factory=_online_linear)

    @property
    def enabled(self) -> bool:
        return bool(self.data)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for an out-of-range setting."""
        if self.task not in TASKS:
            raise ValueError(f"eval.task: one of {', '.join(TASKS)}, got {self.task!r}")
        if self.every < 0:
            raise ValueError(f"eval.every: must be >= 0, got {self.every}")
        if self.folds < 2:
            raise ValueError(f"eval.folds: at least 2, got {self.folds}")
        if self.max_images < 2 * self.folds:
            raise ValueError(f"eval.max_images: at least 2 x eval.folds = {2 * self.folds}, got {self.max_images}")
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ValueError(f"eval.knn_k must be >= 1 and eval.knn_temperature > 0, got {self.knn_k}, {self.knn_temperature}")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"eval.image_size: at least 32, got {self.image_size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"eval.val_fraction: must be in (0, 1), got {self.val_fraction}")


def stratified_subset(labels: np.ndarray, *, max_items: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``max_items`` items, each class keeping about its share (at
    least one item per class), drawn with ``seed``; all positions when there are few enough."""
    labels = np.asarray(labels)
    if len(labels) <= max_items:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * max_items / len(labels)).astype(int))
    keep: list[int] = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        keep += rng.choice(members, size=min(q, len(members)), replace=False).tolist()
    return np.sort(np.asarray(keep[:max_items] if len(keep) > max_items else keep))


def fold_predictions(features: Tensor, labels: np.ndarray, folds: list[Fold], *, num_classes: int,
                     knn_k: int, knn_temperature: float, linear: LinearConfig, seed: int,
                     device: torch.device) -> dict[str, np.ndarray]:
    """Out-of-fold predicted classes of every item: ``{"knn": (N,), "linear": (N,)}``.

    For each fold the kNN votes from the training folds (``train`` + ``val``) and the linear
    grid trains on ``train``, picks its head on ``val`` and predicts ``test``. An item's
    prediction therefore never depends on its own label or on any label of its fold."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    knn = np.full(len(labels), -1, dtype=np.int64)
    lin = np.full(len(labels), -1, dtype=np.int64)
    for fold in folds:
        train, val, test = (np.asarray(x, dtype=np.int64) for x in (fold.train, fold.val, fold.test))
        fit = np.concatenate([train, val])
        scores = knn_class_scores(features[fit], labels_t[fit], features[test], num_classes=num_classes, k=knn_k,
                                  temperature=knn_temperature)
        knn[test] = scores.argmax(1).cpu().numpy()
        result = train_linear_grid(features[train], labels_t[train], features[val], labels_t[val], features[test],
                                   num_classes=num_classes, config=linear, seed=seed + fold.index, device=device)
        lin[test] = result.probabilities.argmax(1)
    return {"knn": knn, "linear": lin}


class OnlineEvaluator:
    """Holds the decoded validation images, their labels and folds; ``evaluate(encoder)`` scores
    an encoder view ((B, 3, H, W) -> (B, D)).

    Args (keyword-only):
        config: the ``eval`` section.
        reader: the injected ``FrameReader`` (the CLI passes the ingest-backed one).
        image_size: input side used when ``config.image_size`` is None (the view size).
        device: where features are computed and probes trained.
    """

    def __init__(self, config: OnlineEvalConfig, *, reader: FrameReader, image_size: int,
                 device: torch.device | str = "cpu", progress: Callable | None = None) -> None:
        config.validate()
        self.config = config
        self.image_size = int(config.image_size or image_size)
        self.device = torch.device(device)
        if config.task == "regions":
            dataset = load_segmentation(config.data, reader=reader, image_size=self.image_size, progress=progress)
        else:
            dataset = load_classification(config.data, reader=reader, image_size=self.image_size, folds=config.folds,
                                          progress=progress)
        keep = stratified_subset(dataset.strata, max_items=config.max_images, seed=config.seed)
        dataset.items = [dataset.items[i] for i in keep]
        self.warnings = list(dataset.warnings)
        self.warnings += assign_groups(dataset, rule=config.group_by)
        self.dataset: EvalDataset = dataset
        self.images = np.stack([item.image for item in dataset.items])
        if config.task == "regions":
            self.label_maps = [np.asarray(item.target) for item in dataset.items]
            # a class counts once per image that holds it: folds are drawn over images
            counts = np.zeros(len(dataset.class_names), dtype=np.int64)
            for label in self.label_maps:
                present = np.unique(label)
                counts[present[present > 0] - 1] += 1
            what = "image(s) holding it"
        else:
            self.labels = np.array([int(item.target) for item in dataset.items])
            counts = np.bincount(self.labels, minlength=len(dataset.class_names))
            what = "image(s)"
        if counts.min() < config.folds:
            short = dataset.class_names[int(counts.argmin())]
            raise UserInputError(f"{config.data}: class {short!r} keeps {counts.min()} {what} of the eval.max_images "
                                 f"= {config.max_images} drawn, fewer than eval.folds = {config.folds}")
        self.folds = make_folds(dataset.strata, [item.group for item in dataset.items], k=config.folds,
                                seed=config.seed, val_fraction=config.val_fraction)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def features(self, encoder: nn.Module) -> Tensor:
        """(N, D) features of the validation images, computed with the encoder in eval mode and
        without gradients; every module's train/eval flag is restored afterwards."""
        modes = [(module, module.training) for module in encoder.modules()]
        try:
            return extract_features(encoder, self.images, device=self.device, batch_size=self.config.batch_size)
        finally:
            for module, training in modes:
                module.training = training

    def samples(self, encoder: nn.Module) -> tuple[Tensor, np.ndarray, list[Fold], np.ndarray]:
        """(features (S, D), labels (S,), folds over the samples, image position of each sample
        (S,)): the images themselves for ``classification``; for ``regions`` one sample per
        (image, class), each image's folds mapped onto its regions."""
        if self.config.task != "regions":
            return self.features(encoder), self.labels, self.folds, np.arange(len(self.labels))
        modes = [(module, module.training) for module in encoder.modules()]
        try:
            features, classes, owners = region_features(encoder, self.images, self.label_maps, device=self.device,
                                                        batch_size=self.config.batch_size)
        finally:
            for module, training in modes:
                module.training = training
        by_image = [np.flatnonzero(owners == i) for i in range(len(self.images))]

        def regions_of(images) -> tuple[int, ...]:
            return tuple(int(r) for i in images for r in by_image[i])

        folds = [Fold(f.index, regions_of(f.train), regions_of(f.val), regions_of(f.test)) for f in self.folds]
        return features, classes - 1, folds, owners

    def predictions(self, encoder: nn.Module) -> dict[str, np.ndarray]:
        """Out-of-fold predictions of every sample: ``{"label", "image", "knn", "linear"}`` (S,)
        arrays (``image``: the sample's image position, for per-image paired tests)."""
        features, labels, folds, owners = self.samples(encoder)
        predicted = fold_predictions(features, labels, folds, num_classes=self.num_classes,
                                     knn_k=self.config.knn_k, knn_temperature=self.config.knn_temperature,
                                     linear=self.config.linear, seed=self.config.seed, device=self.device)
        return {"label": labels, "image": owners, **predicted}

    def fold_accuracies(self, encoder: nn.Module) -> dict[str, list[float]]:
        """``{"knn": [...], "linear": [...]}``: accuracy on each held-out fold (over its images, or
        its regions for ``task: regions``), for paired tests."""
        features, labels, folds, _ = self.samples(encoder)
        predictions = fold_predictions(features, labels, folds, num_classes=self.num_classes,
                                       knn_k=self.config.knn_k, knn_temperature=self.config.knn_temperature,
                                       linear=self.config.linear, seed=self.config.seed, device=self.device)
        return {name: [float((predicted[list(f.test)] == labels[list(f.test)]).mean()) for f in folds]
                for name, predicted in predictions.items()}

    def evaluate(self, encoder: nn.Module) -> dict[str, float]:
        """``{"eval_knn_top1", "eval_linear_acc", "eval_images", "eval_seconds"}``: mean accuracy
        over the held-out folds."""
        started = time.perf_counter()
        accuracies = self.fold_accuracies(encoder)
        return {
            "eval_knn_top1": float(np.mean(accuracies["knn"])),
            "eval_linear_acc": float(np.mean(accuracies["linear"])),
            "eval_images": float(len(self.images)),
            "eval_seconds": time.perf_counter() - started,
        }


__all__ = ["OnlineEvalConfig", "OnlineEvaluator", "fold_predictions", "stratified_subset"]
