"""Region probes (issue 14): features pooled inside labelled regions, checked against an
independent formulation (mean over the region's pixels of the nearest-upsampled feature maps that
torchvision's own feature extractor returns), folds that keep an image's regions together and
never score a region with a probe fitted on its own fold, and the phantom regions layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from anaus_core.evaluate.config import LinearConfig
from anaus_core.evaluate.online import OnlineEvalConfig, OnlineEvaluator, fold_predictions
from anaus_core.evaluate.regions import feature_maps, region_features
from anaus_core.evaluate.tensors import network_input

FAST_LINEAR = LinearConfig(learning_rates=(0.1, 1.0), weight_decays=(0.0,), epochs=50, batch_size=64)


def _reference_region_means(maps: list[np.ndarray], label: np.ndarray) -> dict[int, np.ndarray]:
    """{class: concatenated per-level mean of the nearest-upsampled (to the label's size) map over
    the class's pixels}; exact when the label side is a multiple of every map side."""
    out = {}
    for value in sorted(set(np.unique(label).tolist()) - {0}):
        parts = []
        for fmap in maps:  # (C, h, w)
            scale = label.shape[0] // fmap.shape[1]
            upsampled = fmap.repeat(scale, axis=1).repeat(scale, axis=2)
            parts.append(upsampled[:, label == value].mean(axis=1))
        out[value] = np.concatenate(parts)
    return out


def test_resnet_region_features_match_pixel_means_of_upsampled_maps():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64), dtype=np.uint8)
    labels = [np.zeros((64, 64), np.int64) for _ in range(3)]
    labels[0][5:30, 7:50] = 1
    labels[0][40:41, 40:42] = 3            # a 2-pixel region, smaller than any C5 cell
    labels[1][:] = 2
    labels[1][10:20, 10:20] = 1
    # labels[2] has no region at all: it contributes no row
    features, classes, owners = region_features(resnet, images, labels, device=torch.device("cpu"), batch_size=2)
    assert features.shape == (4, 128 + 256 + 512)
    assert classes.tolist() == [1, 3, 1, 2] and owners.tolist() == [0, 0, 1, 1]
    extractor = create_feature_extractor(resnet.eval(), {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    with torch.no_grad():
        maps = extractor(network_input(images, torch.device("cpu")))
    for row, (cls, owner) in enumerate(zip(classes, owners)):
        reference = _reference_region_means([maps[k][owner].numpy() for k in ("c3", "c4", "c5")], labels[owner])
        np.testing.assert_allclose(features[row].numpy(), reference[cls], rtol=1e-4, atol=1e-5)
    # the regions of one image differ (the test can fail if pooling ignored the masks)
    assert not torch.allclose(features[0], features[1])


def test_region_features_of_a_downsized_label_map_and_a_vit():
    """A label map at another size than the network input pools the same cells (area shares), and
    a ViT pools its patch tokens."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    images = np.random.default_rng(1).integers(0, 255, (1, 32, 32), dtype=np.uint8)
    label = np.zeros((32, 32), np.int64)
    label[8:24, 0:16] = 1
    features, classes, _ = region_features(vit, images, [label], device=torch.device("cpu"))
    (tokens,) = feature_maps(vit, network_input(images, torch.device("cpu")))
    assert tokens.shape == (1, 24, 4, 4)
    expected = tokens[0, :, 1:3, 0:2].mean((1, 2))       # the 2 x 2 patches the region covers
    torch.testing.assert_close(features[0], expected.detach(), rtol=1e-4, atol=1e-5)
    half, _, _ = region_features(vit, images, [label[::2, ::2]], device=torch.device("cpu"))
    torch.testing.assert_close(half, features, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="ResNet or a ViT"):
        feature_maps(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 32, 32))


def _write_region_folder(root, count=24, size=48):
    """Images with a dark and/or a bright square on mid-grey tissue; classes dark=1, bright=2,
    tissue=3 (a probe of mean intensity separates them)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    for i in range(count):
        image = np.clip(120 + rng.normal(0, 15, (size, size)), 0, 255)
        label = np.full((size, size), 3, np.uint8)
        for value, level in ((1, 30), (2, 230)):
            if i % 3 == value - 1 or i % 3 == 2:
                y, x = rng.integers(0, size - 14, 2)
                image[y:y + 12, x:x + 12] = level + rng.normal(0, 15, (12, 12))
                label[y:y + 12, x:x + 12] = value
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").save(root / "img" / f"scan{i:02d}.png")
        Image.fromarray(label, "L").save(root / "label" / f"scan{i:02d}.png")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": {"dark": 1, "bright": 2, "tissue": 3}}))
    return root


def test_online_region_probe_keeps_images_together_and_never_fits_on_the_scored_fold(tmp_path):
    from pipeline.frame_reader import IngestFrameReader

    folder = _write_region_folder(tmp_path / "regions")
    config = OnlineEvalConfig(data=str(folder), task="regions", max_images=24, folds=3, knn_k=3, linear=FAST_LINEAR)
    evaluator = OnlineEvaluator(config, reader=IngestFrameReader(), image_size=64)
    torch.manual_seed(0)
    encoder = torchvision.models.resnet18()
    encoder.fc = torch.nn.Identity()
    encoder.train()
    features, labels, folds, owners = evaluator.samples(encoder)
    assert all(m.training for m in encoder.modules())                 # train mode restored
    _, _, independent = region_features(encoder, evaluator.images, evaluator.label_maps, device=torch.device("cpu"))
    np.testing.assert_array_equal(owners, independent)
    assert len(labels) == len(owners) and set(labels.tolist()) == {0, 1, 2}
    covered = []
    for fold in folds:
        fit = {int(owners[r]) for r in fold.train + fold.val}
        scored = {int(owners[r]) for r in fold.test}
        assert not fit & scored                                        # an image's regions stay together
        covered += list(fold.test)
    assert sorted(covered) == list(range(len(labels)))                 # every region scored exactly once
    common = dict(num_classes=3, knn_k=3, knn_temperature=0.07, linear=FAST_LINEAR, seed=0, device=torch.device("cpu"))
    clean = fold_predictions(features, labels, folds, **common)
    held = np.array(folds[0].test)
    poisoned = labels.copy()
    poisoned[held] = (poisoned[held] + 1) % 3
    dirty = fold_predictions(features, poisoned, folds, **common)
    np.testing.assert_array_equal(dirty["knn"][held], clean["knn"][held])
    np.testing.assert_array_equal(dirty["linear"][held], clean["linear"][held])
    out_of_fold = evaluator.predictions(encoder)
    np.testing.assert_array_equal(out_of_fold["linear"], clean["linear"])
    np.testing.assert_array_equal(out_of_fold["image"], owners)
    scores = evaluator.evaluate(encoder)
    assert scores["eval_images"] == 24
    assert scores["eval_knn_top1"] > 0.9 and scores["eval_linear_acc"] > 0.9   # intensity is in any encoder's features


def test_region_task_errors_name_the_problem(tmp_path):
    from anaus_core.errors import UserInputError
    from pipeline.frame_reader import IngestFrameReader

    with pytest.raises(ValueError, match="eval.task"):
        OnlineEvalConfig(data="x", task="pixels").validate()
    folder = _write_region_folder(tmp_path / "few", count=3)
    with pytest.raises(UserInputError, match="fewer than eval.folds"):
        OnlineEvaluator(OnlineEvalConfig(data=str(folder), task="regions", folds=3, max_images=8),
                        reader=IngestFrameReader(), image_size=32)


def test_phantom_regions_layout(tmp_path):
    from anaus_core.evaluate.phantom_tasks import REGION_CLASSES, write_phantom_tasks
    from anaus_core.phantoms import make_phantom_corpus
    from anaus_core.phantoms.geometry import fan_mask

    make_phantom_corpus(tmp_path / "corpus", count=6, size=48, seed=3, progress=False)
    tasks = write_phantom_tasks(tmp_path / "corpus", tmp_path / "tasks", min_per_class=2)
    description = yaml.safe_load((tasks["regions"] / "dataset.yaml").read_text())
    classes = description["classes"]
    assert classes["tissue"] == REGION_CLASSES["tissue"] and set(classes.items()) <= set(REGION_CLASSES.items())
    for sidecar_path in sorted((tmp_path / "corpus" / "label").glob("*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        truth = np.asarray(Image.open(sidecar_path.with_suffix(".png")))
        regions = np.asarray(Image.open(tasks["regions"] / "label" / f"{sidecar_path.stem}.png"))
        view = fan_mask(48, sidecar.get("fan"))
        assert (regions[~view & (truth == 0)] == 0).all()
        assert (regions[view & (truth == 0)] == classes["tissue"]).all()
        for structure in sidecar["structures"]:
            inside = truth == int(structure["label"])
            assert (regions[inside] == classes.get(structure["kind"], 0)).all()
