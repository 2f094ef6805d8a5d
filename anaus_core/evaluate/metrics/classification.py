"""Classification metrics of one set of predictions (scikit-learn): accuracy, macro F1, per-class
sensitivity and specificity, one-vs-rest AUROC (with a bootstrap 95% CI) and the confusion matrix."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from anaus_core.evaluate.metrics.bootstrap import bootstrap_ci


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half): the same
    value as ``sklearn.metrics.roc_auc_score`` (a test holds it there) at a small fraction of its
    per-call cost, which matters inside a 1000-resample bootstrap."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ovr(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``labels``; NaN when fewer than two are.

    ``probabilities``: (N, K) rows summing to 1. Classes absent from ``labels`` have no ROC curve
    and are left out of the macro average (scikit-learn would refuse them).
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if present.size < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return binary_auroc(labels == 1, probabilities[:, 1])
    scores = [binary_auroc(labels == k, probabilities[:, k]) for k in present]
    return float(np.mean(scores))


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, *, num_classes: int, ci_resamples: int = 1000, seed: int = 0
) -> dict:
    """(N,) int labels and (N, K) class probabilities -> a JSON-ready dict.

    Sensitivity of class k = recall of k; specificity of class k = true negatives / negatives of
    k (one-vs-rest). A class with no positives (or negatives) gets NaN for that entry, written
    as ``null``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(axis=1)
    classes = list(range(num_classes))
    matrix = confusion_matrix(labels, predictions, labels=classes)
    total = matrix.sum()
    sensitivity, specificity = [], []
    for k in classes:
        tp = matrix[k, k]
        fn = matrix[k].sum() - tp
        fp = matrix[:, k].sum() - tp
        tn = total - tp - fn - fp
        sensitivity.append(float(tp / (tp + fn)) if tp + fn else math.nan)
        specificity.append(float(tn / (tn + fp)) if tn + fp else math.nan)
    auroc = auroc_ovr(labels, probabilities)
    low, high = bootstrap_ci(lambda idx: auroc_ovr(labels[idx], probabilities[idx]), len(labels),
                             resamples=ci_resamples, seed=seed)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "auroc": auroc,
        "auroc_ci95": [low, high],
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion": matrix.tolist(),
    }
