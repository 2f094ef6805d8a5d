"""LP-SAM prediction: a valid, deterministic mask set per image; the ``lpsam`` masker; mask-set rules."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_phantom_dataset  # noqa: E402

from anaus_core.lpsam.build import tiny_model_config
from anaus_core.lpsam.checkpoint import load_lpsam
from anaus_core.lpsam.mask_set import class_components, mask_iou, merge_proposals
from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions
from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter
from anaus_core.maskers.base import ImageMeta
from anaus_core.maskset import MaskSet
from anaus_core.sam import save_random_sam_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpsam_predict")
    sam = save_random_sam_checkpoint(root / "sam_tiny.pth", "tiny", seed=0)
    dataset = write_phantom_dataset(root / "data", count=4, size=64, multiclass=True)
    common = dict(datasets=[str(dataset)], sam_checkpoint=str(sam), model=tiny_model_config(), epochs=2, batch_size=4, lr=1e-2, val_fraction=0.0, progress=False)
    stage1 = run_adapt(AdaptConfig(out_dir=str(root / "adapt"), **common))
    stage2 = run_train_prompter(PrompterConfig(out_dir=str(root / "prompter"), adapter_checkpoint=str(stage1.last_checkpoint), **common))
    return {"sam": sam, "checkpoint": stage2.last_checkpoint, "dataset": dataset, "root": root}


def _images(dataset: Path) -> list[np.ndarray]:
    images = [np.asarray(Image.open(p)) for p in sorted((dataset / "img").iterdir())]
    # Different sizes in one batch, and a non-square one.
    images.append(np.asarray(Image.fromarray(images[0]).resize((80, 56))))
    return images


def _check_valid(mask_set: MaskSet, shape: tuple[int, int]):
    assert mask_set.shape == shape
    assert len(set(mask_set.ids.tolist())) == len(mask_set) and (mask_set.ids >= 1).all()
    np.testing.assert_array_equal(mask_set.areas, mask_set.masks.reshape(len(mask_set), -1).sum(1))
    assert ((mask_set.scores >= 0) & (mask_set.scores <= 1)).all()


def test_prediction_returns_valid_deterministic_mask_sets(trained):
    model, _ = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])
    images = _images(trained["dataset"])
    # A threshold low enough that this briefly trained tiny model yields class components.
    options = PredictorOptions(threshold=0.3, min_area=4)
    first = LPSAMPredictor(model, batch_size=2, options=options).predict(images, finalize=True)
    again = LPSAMPredictor(load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0], batch_size=3, options=options).predict(images, finalize=True)
    assert len(first) == len(images)
    for image, mask_set, repeat in zip(images, first, again):
        _check_valid(mask_set, image.shape[:2])
        assert mask_set == repeat  # deterministic, independent of batch size
        named = mask_set.masks[[s != "residual" for s in mask_set.sources]]
        uncovered = ~named.any(0) if len(named) else np.ones(image.shape[:2], bool)
        has_residual = "residual" in mask_set.sources
        assert has_residual == (uncovered.sum() >= options.min_area)
        if has_residual:
            np.testing.assert_array_equal(mask_set.masks[mask_set.sources.index("residual")], uncovered)
        assert all(s == "residual" or s.startswith("lpsam:") for s in mask_set.sources)
    assert any(s.startswith("lpsam:") for m in first for s in m.sources)


def test_amg_proposals_are_merged_by_iou_suppression(trained):
    model, _ = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])
    images = _images(trained["dataset"])[:2]
    options = PredictorOptions(threshold=0.3, min_area=4, amg=True, amg_points_per_side=4, amg_pred_iou_thresh=0.0, amg_stability_score_thresh=0.0, amg_iou_threshold=0.7)
    predictor = LPSAMPredictor(model, batch_size=2, options=options)
    for image, mask_set in zip(images, predictor.predict(images)):
        _check_valid(mask_set, image.shape)
        amg = mask_set.masks[[s == "sam-amg" for s in mask_set.sources]]
        others = mask_set.masks[[s != "sam-amg" for s in mask_set.sources]]
        if len(amg) > 1:
            iou = mask_iou(amg, amg)
            assert (iou[~np.eye(len(amg), dtype=bool)] <= 0.7 + 1e-6).all()
        if len(amg) and len(others):
            assert (mask_iou(amg, others) <= 0.7 + 1e-6).all()


def test_class_components_and_merge_rules():
    probabilities = np.zeros((2, 20, 20), np.float32)
    probabilities[0, 2:6, 2:6] = 0.9  # two components of class 0
    probabilities[0, 10:18, 10:18] = 0.7
    probabilities[0, 0, 19] = 0.99  # one pixel: below min_area
    probabilities[1, 5:15, 5:15] = 0.6  # overlaps class 0: allowed
    mask_set = class_components(probabilities, np.array([0.5, 1.5]), ["a", "b"], threshold=0.5, min_area=4)
    assert mask_set.sources == ["lpsam:a", "lpsam:a", "lpsam:b"]
    np.testing.assert_allclose(mask_set.scores, [0.45, 0.35, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(mask_set.areas, [16, 64, 100])
    proposals = MaskSet(masks=np.stack([mask_set.masks[2], np.pad(np.ones((5, 5), bool), ((0, 15), (15, 0))), np.pad(np.ones((5, 4), bool), ((0, 15), (16, 0)))]), ids=[1, 2, 3], sources=["sam-amg"] * 3, scores=[0.9, 0.8, 0.95])
    merged = merge_proposals(mask_set, proposals, iou_threshold=0.7)
    # Proposal 1 duplicates class b; proposal 3 (higher score) suppresses proposal 2 (IoU 0.8).
    assert merged.sources == ["lpsam:a", "lpsam:a", "lpsam:b", "sam-amg"]
    assert merged.areas[-1] == 20


def test_lpsam_masker(trained):
    from anaus_core.maskers.lpsam import LPSAMMasker

    masker = LPSAMMasker(checkpoint=trained["checkpoint"], sam_checkpoint=trained["sam"], device="cpu", batch_size=2, threshold=0.3, min_area=4)
    images = _images(trained["dataset"])[:3]
    metas = [ImageMeta(key=f"k{i}", relpath=f"img{i}.png") for i in range(3)]
    mask_sets = masker(images, metas)
    assert len(mask_sets) == 3
    for image, mask_set in zip(images, mask_sets):
        _check_valid(mask_set, image.shape)
        assert "residual" not in mask_set.sources  # raw proposals; the pipeline finalizes
    fingerprint = masker.fingerprint()
    assert fingerprint["masker"] == "lpsam" and len(fingerprint["checkpoint_sha256"]) == 64
    assert fingerprint["options"]["threshold"] == 0.3
    import json

    json.dumps(fingerprint)
