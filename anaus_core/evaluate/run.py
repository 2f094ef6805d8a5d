"""One evaluation run: data -> groups -> folds -> every encoder x protocol x label fraction x
fold on exactly the same folds and seeds -> metrics -> paired tests -> report."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console

from anaus_core.config import config_to_dict
from anaus_core.errors import UserInputError
from anaus_core.evaluate.backbones import build_backbone, check_input_size, set_trainable
from anaus_core.evaluate.config import EvaluateConfig
from anaus_core.evaluate.datasets import EvalDataset, load_classification, load_segmentation
from anaus_core.evaluate.encoders import EncoderSpec, EncoderWeights, load_encoder
from anaus_core.evaluate.features import FeatureCache, extract_features
from anaus_core.evaluate.finetune import finetune_classifier
from anaus_core.evaluate.folds import Fold, label_fraction_subset, make_folds, read_splits_file
from anaus_core.evaluate.groups import assign_groups
from anaus_core.evaluate.linear import train_linear_grid
from anaus_core.evaluate.metrics.classification import classification_metrics
from anaus_core.evaluate.metrics.paired_test import paired_wilcoxon
from anaus_core.evaluate.progress import progress_bars
from anaus_core.evaluate.reader import FrameReader
from anaus_core.evaluate.seg_heads import build_segmenter, fpn_channels_of
from anaus_core.evaluate.tensors import resolve_device

CLASSIFICATION_PROTOCOLS = ("linear", "finetune", "finetune-full")
SEGMENTATION_PROTOCOLS = ("linear", "finetune", "finetune-full")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "auroc")
#: the metric of each task that paired tests compare over folds, and per image
PRIMARY = {"classification": "accuracy", "segmentation": "dice"}


def check_config(config: EvaluateConfig) -> None:
    protocols = CLASSIFICATION_PROTOCOLS if config.task == "classification" else SEGMENTATION_PROTOCOLS
    for protocol in config.protocols:
        if protocol not in protocols:
            raise UserInputError(f"--protocol {protocol!r}: choose from {', '.join(protocols)} for {config.task}")
    if config.folds < 2:
        raise UserInputError(f"--folds {config.folds}: at least 2")
    if not 0 < config.val_fraction < 1:
        raise UserInputError(f"val_fraction {config.val_fraction}: must be in (0, 1)")
    for fraction in config.label_fractions:
        if not 0 < fraction <= 1:
            raise UserInputError(f"--label-fraction {fraction}: must be in (0, 1]")
    if config.image_size < 32:
        raise UserInputError(f"--image-size {config.image_size}: at least 32")
    if config.head == "maskrcnn" and config.task != "segmentation":
        raise UserInputError("--head maskrcnn is a segmentation head (use --task segmentation)")


def load_dataset(config: EvaluateConfig, reader: FrameReader, bars) -> EvalDataset:
    if config.task == "classification":
        return load_classification(config.data, reader=reader, image_size=config.image_size, folds=config.folds,
                                   progress=bars.bind("reading images"))
    return load_segmentation(config.data, reader=reader, image_size=config.image_size, progress=bars.bind("reading images"))


def build_folds(config: EvaluateConfig, dataset: EvalDataset) -> list[Fold]:
    groups = [item.group for item in dataset.items]
    assignment = None
    if config.splits_file:
        assignment = read_splits_file(config.splits_file, [i.id for i in dataset.items], [i.file for i in dataset.items])
        for group in set(groups):
            folds_of_group = {int(assignment[p]) for p, g in enumerate(groups) if g == group}
            if len(folds_of_group) > 1 and not config.allow_frame_leak:
                raise UserInputError(f"{config.splits_file}: group {group.split(':', 1)[1]!r} is split across folds "
                                     f"{sorted(folds_of_group)}; fix the split or pass --allow-frame-leak")
    return make_folds(dataset.strata, groups, k=config.folds, seed=config.seed, val_fraction=config.val_fraction,
                      assignment=assignment)


def _fold_seed(config: EvaluateConfig, fold: Fold, fraction_index: int) -> int:
    """The same for every encoder: encoders differ only in their weights."""
    return config.seed * 100_003 + fold.index * 101 + fraction_index


def _summary(values: Sequence[float]) -> dict:
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0}


def _classification_run(config, dataset, folds, weights, protocol, fraction_index, fraction, cache, device, bars) -> dict:
    images = np.stack([item.image for item in dataset.items])
    labels = np.array([int(item.target) for item in dataset.items])
    strata = dataset.strata
    num_classes = len(dataset.class_names)
    probabilities = np.zeros((len(images), num_classes))
    fold_results = []
    if protocol == "linear":
        def compute():
            torch.manual_seed(config.seed)
            backbone = build_backbone(weights)
            check_input_size(backbone, config.image_size)
            return extract_features(backbone, images, device=device, progress=bars.bind(f"{weights.name}: features"))
        features = cache.get(weights.name, compute)
    for fold in bars.wrap(folds, f"{weights.name} {protocol} @{fraction:g}: folds"):
        seed = _fold_seed(config, fold, fraction_index)
        train = np.array(label_fraction_subset(fold.train, strata, fraction=fraction, seed=seed))
        if config.select_on_test:  # the USCL/official selection, kept only to compare with published numbers
            train = np.array(label_fraction_subset(fold.train + fold.val, strata, fraction=fraction, seed=seed))
            select = np.array(fold.test)
        else:
            select = np.array(fold.val)
        test = np.array(fold.test)
        if protocol == "linear":
            result = train_linear_grid(features[train], torch.from_numpy(labels[train]), features[select],
                                       torch.from_numpy(labels[select]), features[test], num_classes=num_classes,
                                       config=config.linear, seed=seed, device=device)
            fold_probabilities, selected = result.probabilities, {"head": result.grid[result.selected], "grid": result.grid}
        else:
            torch.manual_seed(config.seed)
            backbone = build_backbone(weights)
            check_input_size(backbone, config.image_size)
            result = finetune_classifier(backbone, images=images, labels=labels, train=train, select=select, test=test,
                                         num_classes=num_classes, config=config.finetune, full=protocol == "finetune-full",
                                         seed=seed, device=device, progress=bars.bind(f"fold {fold.index}: epochs"))
            fold_probabilities = result.probabilities
            selected = {"epoch": result.selected_epoch, "selection_curve": result.selection_curve}
        probabilities[test] = fold_probabilities
        # the bootstrap CI is computed on the pooled predictions only (per-fold sets are small)
        metrics = classification_metrics(labels[test], fold_probabilities, num_classes=num_classes, ci_resamples=0)
        fold_results.append({"fold": fold.index, "train_images": int(len(train)), "metrics": metrics, "selected": selected})
    pooled = classification_metrics(labels, probabilities, num_classes=num_classes,
                                    ci_resamples=config.bootstrap_resamples, seed=config.seed)
    return {
        "folds": fold_results,
        "summary": {m: _summary([f["metrics"][m] for f in fold_results]) for m in CLASSIFICATION_METRICS},
        "pooled": pooled,
        # per image: the probability given to the true class (what the per-image paired test compares)
        "per_image": {"true_class_probability": probabilities[np.arange(len(labels)), labels].tolist(),
                      "prediction": probabilities.argmax(1).tolist()},
    }


def _segmentation_run(config, dataset, folds, weights, protocol, fraction_index, fraction, device, bars,
                      default_fpn_channels, sheet_positions) -> dict:
    from anaus_core.evaluate.segment import (SEGMENTATION_METRICS, predict_logits, resize_label, score_segmentation,
                                             train_segmenter, upsample_prediction)

    images = np.stack([item.image for item in dataset.items])
    targets = np.stack([resize_label(item.target, config.image_size) for item in dataset.items])
    num_classes = len(dataset.class_names) + 1
    strata = dataset.strata
    per_image: list[dict | None] = [None] * len(images)
    # millimetre distances only when every image states its pixel spacing (a mean over a mix would mislead)
    metric_names = list(SEGMENTATION_METRICS) + (["hd95_mm", "hd_mm"] if all(i.spacing for i in dataset.items) else [])
    sheet: dict[int, list] = {}
    fold_results = []
    for fold in bars.wrap(folds, f"{weights.name} {protocol} @{fraction:g}: folds"):
        seed = _fold_seed(config, fold, fraction_index)
        train = np.array(label_fraction_subset(fold.train, strata, fraction=fraction, seed=seed))
        if config.select_on_test:
            train = np.array(label_fraction_subset(fold.train + fold.val, strata, fraction=fraction, seed=seed))
            select = np.array(fold.test)
        else:
            select = np.array(fold.val)
        test = np.array(fold.test)
        torch.manual_seed(config.seed)
        backbone = build_backbone(weights)
        check_input_size(backbone, config.image_size)
        torch.manual_seed(seed)
        if config.head == "maskrcnn":
            from anaus_core.evaluate.maskrcnn import build_maskrcnn, predict_maskrcnn_scores, train_maskrcnn

            model = build_maskrcnn(weights, backbone, num_classes=num_classes, image_size=config.image_size,
                                   trainable_stages={"linear": 0, "finetune": config.finetune.trainable_stages,
                                                     "finetune-full": None}[protocol],
                                   default_fpn_channels=default_fpn_channels)
            training = train_maskrcnn(model, images=images, targets=targets, train=train, select=select,
                                      num_classes=num_classes, config=config.finetune, seed=seed, device=device,
                                      progress=bars.bind(f"fold {fold.index}: epochs"))
            scores = predict_maskrcnn_scores(model, images[test], num_classes=num_classes, device=device)
        else:
            model = build_segmenter(weights, backbone, num_classes=num_classes, default_fpn_channels=default_fpn_channels)
            set_trainable(backbone, last_stages={"linear": 0, "finetune": config.finetune.trainable_stages,
                                                 "finetune-full": None}[protocol])
            training = train_segmenter(model, images=images, targets=targets, train=train, select=select,
                                       num_classes=num_classes, epochs=config.finetune.epochs,
                                       lr=config.finetune.segmentation_lr, weight_decay=config.finetune.weight_decay,
                                       batch_size=config.finetune.batch_size, seed=seed, device=device,
                                       progress=bars.bind(f"fold {fold.index}: epochs"))
            scores = predict_logits(model, images[test], device=device, batch_size=config.finetune.batch_size)
        fold_scores = []
        for row, position in enumerate(test):
            item = dataset.items[position]
            prediction = upsample_prediction(scores[row], item.target.shape)
            per_image[position] = score_segmentation(prediction, item.target, class_names=dataset.class_names,
                                                     spacing=item.spacing)
            fold_scores.append(per_image[position]["mean"])
            if position in sheet_positions:
                sheet[int(position)] = prediction.tolist()
        fold_results.append({
            "fold": fold.index, "train_images": int(len(train)),
            "metrics": {m: _summary([s[m] for s in fold_scores])["mean"] for m in metric_names},
            "selected": {"epoch": training.selected_epoch, "selection_curve": training.selection_curve},
        })
    pooled = {m: _summary([p["mean"][m] for p in per_image]) for m in metric_names}
    pooled_per_class = {name: {m: _summary([p["per_class"][name][m] for p in per_image])["mean"] for m in metric_names}
                        for name in dataset.class_names}
    return {
        "folds": fold_results,
        "summary": {m: _summary([f["metrics"][m] for f in fold_results]) for m in metric_names},
        "pooled": {"mean_over_images": pooled, "per_class": pooled_per_class},
        "per_image": {m: [p["mean"][m] for p in per_image] for m in metric_names},
        "sheet_predictions": sheet,
    }


def paired_tests(task: str, runs: list[dict]) -> list[dict]:
    """Wilcoxon signed-rank between every pair of encoders of each (protocol, fraction): over the
    folds' primary metric and over the images' per-image scores."""
    tests = []
    keys = sorted({(r["protocol"], r["label_fraction"]) for r in runs})
    per_image_metrics = ["true_class_probability"] if task == "classification" else ["dice", "hd95"]  # see docs/evaluate.md
    for protocol, fraction in keys:
        group = [r for r in runs if r["protocol"] == protocol and r["label_fraction"] == fraction]
        for a, b in combinations(group, 2):
            metric = PRIMARY[task]
            fold_a = [f["metrics"][metric] for f in a["folds"]]
            fold_b = [f["metrics"][metric] for f in b["folds"]]
            tests.append({"protocol": protocol, "label_fraction": fraction, "a": a["encoder"], "b": b["encoder"],
                          "over": "folds", "metric": metric, **paired_wilcoxon(fold_a, fold_b)})
            for metric in per_image_metrics:
                tests.append({"protocol": protocol, "label_fraction": fraction, "a": a["encoder"], "b": b["encoder"],
                              "over": "images", "metric": metric,
                              **paired_wilcoxon(a["per_image"][metric], b["per_image"][metric])})
    return tests


def run_evaluation(config: EvaluateConfig, encoders: Sequence[EncoderSpec], *, reader: FrameReader,
                   console: Console | None = None, write_report: bool = True) -> dict:
    """Evaluate every encoder on ``config.data``; return the results dict (also written to
    ``config.out`` as results.json/results.md/figures when ``write_report``)."""
    console = console or Console()
    check_config(config)
    if not encoders:
        raise UserInputError("no encoder to evaluate: give --encoder NAME=PATH and/or --encoder random")
    names = [spec.name for spec in encoders]
    if len(set(names)) != len(names):
        raise UserInputError(f"--encoder: names must be unique, got {names}")
    # every encoder file is checked before any image is read or any network trained
    loaded: list[EncoderWeights] = [load_encoder(spec, random_arch=config.random_arch) for spec in encoders]
    device = resolve_device(config.device)
    with progress_bars(console, config.progress) as bars:
        dataset = load_dataset(config, reader, bars)
        warnings = list(dataset.warnings)
        warnings += assign_groups(dataset, rule=config.group_by, groups_file=config.groups_file,
                                  allow_frame_leak=config.allow_frame_leak)
        folds = build_folds(config, dataset)
        for warning in warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        cache = FeatureCache()
        default_fpn_channels = next((fpn_channels_of(w.fpn_state) for w in loaded if w.fpn_state), None) or 256
        sheet_positions = set(range(0, len(dataset.items), max(1, len(dataset.items) // config.max_sheet_images))[: config.max_sheet_images])
        runs = []
        for protocol in config.protocols:
            for fraction_index, fraction in enumerate(config.label_fractions):
                for weights in loaded:
                    if config.task == "classification":
                        result = _classification_run(config, dataset, folds, weights, protocol, fraction_index, fraction,
                                                     cache, device, bars)
                    else:
                        result = _segmentation_run(config, dataset, folds, weights, protocol, fraction_index, fraction,
                                                   device, bars, default_fpn_channels, sheet_positions)
                    runs.append({"encoder": weights.name, "protocol": protocol, "label_fraction": fraction, **result})
    results = {
        "task": config.task,
        "optimistic": bool(config.select_on_test),
        "selection": ("TEST FOLD (--select-on-test): every figure is optimistic" if config.select_on_test
                      else "inner validation split of the training folds; the test fold is never used for selection"),
        "dataset": {"root": str(dataset.root), "classes": dataset.class_names, "images": len(dataset.items),
                    "groups": len({i.group for i in dataset.items})},
        "device": str(device),
        "config": config_to_dict(config),
        "encoders": [w.describe() for w in loaded],
        "warnings": warnings,
        "folds": [{"fold": f.index, "train": len(f.train), "val": len(f.val), "test": len(f.test),
                   "test_ids": [dataset.items[p].id for p in f.test]} for f in folds],
        "items": [{"id": i.id, "group": i.group,
                   "target": int(i.target) if config.task == "classification" else None} for i in dataset.items],
        "runs": runs,
        "paired_tests": paired_tests(config.task, runs),
    }
    if write_report and config.out:
        from anaus_core.evaluate.report import write_report as _write

        _write(results, dataset, folds, Path(config.out))
    return results


__all__ = ["check_config", "paired_tests", "run_evaluation"]
