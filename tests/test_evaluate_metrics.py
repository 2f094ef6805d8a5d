"""Evaluation metrics against independent references: scipy's directed_hausdorff on boundary
points, hand-computed overlap cases (empty masks included), sklearn's ROC AUC, scipy's Wilcoxon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist, directed_hausdorff

from anaus_core.evaluate.metrics.bootstrap import bootstrap_ci
from anaus_core.evaluate.metrics.classification import binary_auroc, classification_metrics
from anaus_core.evaluate.metrics.hausdorff import hausdorff_distances
from anaus_core.evaluate.metrics.overlap import overlap_metrics
from anaus_core.evaluate.metrics.paired_test import paired_wilcoxon


def _blob(shape, rng, count=3):
    mask = np.zeros(shape, bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(2, shape[0] / 4), rng.uniform(2, shape[1] / 4)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def _boundary_points(mask):
    # boundary = mask minus its erosion (pixels outside the image count as background)
    return np.argwhere(mask & ~binary_erosion(mask, border_value=0)).astype(float)


@pytest.mark.parametrize("shape", [(40, 40), (24, 56), (56, 24)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hausdorff_equals_scipy_on_boundary_points(shape, seed):
    rng = np.random.default_rng(seed)
    pred, gt = _blob(shape, rng), _blob(shape, rng)
    a, b = _boundary_points(pred), _boundary_points(gt)
    expected_hd = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
    distances = cdist(a, b)
    expected_hd95 = max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))
    got = hausdorff_distances(pred, gt)
    assert got["hd"] == pytest.approx(expected_hd, abs=1e-5)
    assert got["hd95"] == pytest.approx(expected_hd95, abs=1e-5)
    # both orientations: the transposed pair gives the same distances
    got_t = hausdorff_distances(pred.T, gt.T)
    assert got_t["hd"] == pytest.approx(expected_hd, abs=1e-5)
    assert got_t["hd95"] == pytest.approx(expected_hd95, abs=1e-5)


def test_hausdorff_non_square_offset_is_exact():
    # two single pixels 30 columns apart on a 10 x 60 image: HD = 30 (rows-as-points would give 0)
    pred, gt = np.zeros((10, 60), bool), np.zeros((10, 60), bool)
    pred[5, 10], gt[5, 40] = True, True
    assert hausdorff_distances(pred, gt) == {"hd": pytest.approx(30.0), "hd95": pytest.approx(30.0)}
    assert hausdorff_distances(pred.T, gt.T)["hd"] == pytest.approx(30.0)


def test_hausdorff_spacing_in_mm():
    pred, gt = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    pred[5, 5], gt[5, 25] = True, True
    assert hausdorff_distances(pred, gt, spacing=(0.5, 0.2))["hd"] == pytest.approx(20 * 0.2)
    pred2, gt2 = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    pred2[2, 5], gt2[12, 5] = True, True
    assert hausdorff_distances(pred2, gt2, spacing=(0.5, 0.2))["hd"] == pytest.approx(10 * 0.5)


def test_hausdorff_empty_policy():
    empty, full = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    full[10:20, 10:20] = True
    assert hausdorff_distances(empty, empty) == {"hd": 0.0, "hd95": 0.0}
    diagonal = math.hypot(30, 40)
    assert hausdorff_distances(empty, full) == {"hd": diagonal, "hd95": diagonal}
    assert hausdorff_distances(full, empty) == {"hd": diagonal, "hd95": diagonal}


def test_overlap_hand_computed():
    gt = np.zeros((8, 8), bool)
    gt[0:4, 0:4] = True  # 16 px
    pred = np.zeros((8, 8), bool)
    pred[2:6, 0:4] = True  # 16 px, 8 overlap
    got = overlap_metrics(pred, gt)
    assert got["dice"] == pytest.approx(2 * 8 / 32)
    assert got["ppv"] == pytest.approx(8 / 16)
    assert got["sensitivity"] == pytest.approx(8 / 16)
    pred2 = np.zeros((8, 8), bool)
    pred2[0:2, 0:2] = True  # 4 px inside gt
    got2 = overlap_metrics(pred2, gt)
    assert got2 == {"dice": pytest.approx(8 / 20), "ppv": pytest.approx(1.0), "sensitivity": pytest.approx(4 / 16)}


def test_overlap_empty_mask_policy():
    empty, some = np.zeros((6, 9), bool), np.zeros((6, 9), bool)
    some[1:3, 2:5] = True
    assert overlap_metrics(empty, empty) == {"dice": 1.0, "ppv": 1.0, "sensitivity": 1.0}
    # empty prediction on a non-empty target: a failure everywhere, never NaN
    assert overlap_metrics(empty, some) == {"dice": 0.0, "ppv": 0.0, "sensitivity": 0.0}
    # false alarm on an empty target: Dice and PPV pay, nothing was missed
    assert overlap_metrics(some, empty) == {"dice": 0.0, "ppv": 0.0, "sensitivity": 1.0}


def test_binary_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 50).astype(bool)
        s = np.round(rng.random(50), 1)  # ties included
        assert binary_auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_classification_metrics_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    got = classification_metrics(labels, probabilities, num_classes=3, ci_resamples=50)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert got["sensitivity"] == pytest.approx([0.5, 1.0, 0.5])
    assert got["specificity"] == pytest.approx([3 / 4, 3 / 4, 1.0])
    low, high = got["auroc_ci95"]
    assert low <= got["auroc"] <= high


def test_bootstrap_and_wilcoxon():
    from scipy.stats import wilcoxon

    values = np.arange(20, dtype=float)
    low, high = bootstrap_ci(lambda idx: float(values[idx].mean()), 20, resamples=200, seed=1)
    assert low < values.mean() < high
    a, b = np.array([0.9, 0.8, 0.85, 0.7, 0.95]), np.array([0.6, 0.7, 0.5, 0.65, 0.8])
    assert paired_wilcoxon(a, b)["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert paired_wilcoxon(a, a)["p_value"] == 1.0
