"""`anaus evaluate`: data and bad input, groups and folds, encoders, the protocols' selection
and caching, determinism, and the CLI end to end (tiny images, 2-3 folds, 1-2 epochs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from anaus_core.config import load_config
from anaus_core.errors import UserInputError
from anaus_core.evaluate import EncoderSpec, EvaluateConfig, load_encoder, run_evaluation
from anaus_core.evaluate.backbones import ResNetBackbone, build_backbone
from anaus_core.evaluate.datasets import load_classification, load_segmentation
from anaus_core.evaluate.features import FeatureCache
from anaus_core.evaluate.folds import make_folds
from anaus_core.evaluate.groups import assign_groups
from anaus_core.evaluate.progress import Bars
from anaus_core.evaluate.run import _classification_run, build_folds
from anaus_core.evaluate.seg_heads import build_segmenter
from anaus_core.evaluate.tensors import resolve_device
from pipeline.frame_reader import IngestFrameReader

READER = IngestFrameReader()
SIZE = 32


def _class_image(k: int, rng) -> np.ndarray:
    image = rng.integers(0, 60, (SIZE + 8, SIZE), dtype=np.uint8)  # non-square source images
    image[4 + 8 * k: 12 + 8 * k, 6:26] = 220
    return image


@pytest.fixture()
def cls_data(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cls"
    for k, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_class_image(k, rng)).save(root / name / f"{name}{i}.png")
    return root


@pytest.fixture()
def seg_data(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "seg"
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    for i in range(8):
        image = rng.integers(0, 60, (SIZE, SIZE + 8), dtype=np.uint8)
        label = np.zeros_like(image)
        y, x = 4 + i, 6 + 2 * i
        image[y: y + 8, x: x + 10] = 200
        label[y: y + 8, x: x + 10] = 1
        Image.fromarray(image).save(root / "img" / f"s{i}.png")
        Image.fromarray(label).save(root / "label" / f"s{i}.png")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"name": "toy", "classes": {"lesion": 1}}))
    return root


def _config(data, out, **overrides) -> EvaluateConfig:
    base = {"data": str(data), "out": str(out), "folds": 3, "image_size": SIZE, "progress": False, "device": "cpu",
            "linear.epochs": 5, "linear.learning_rates": [0.01, 0.1], "linear.weight_decays": [0.0, 0.01],
            "finetune.epochs": 2, "finetune.batch_size": 4, "bootstrap_resamples": 20}
    base.update(overrides)
    return load_config(EvaluateConfig, None, base)


# -- data and bad input --------------------------------------------------------------------------
def test_empty_class_folder_is_one_line_error(cls_data):
    (cls_data / "d").mkdir()
    with pytest.raises(UserInputError, match=r"cls/d: class folder has no images"):
        load_classification(cls_data, reader=READER, image_size=SIZE, folds=3)


def test_class_with_fewer_images_than_folds(cls_data):
    with pytest.raises(UserInputError, match=r"cls/a: class has 6 readable image\(s\), fewer than the 7 folds"):
        load_classification(cls_data, reader=READER, image_size=SIZE, folds=7)


def test_unreadable_image_is_a_warning_naming_it(cls_data):
    (cls_data / "a" / "broken.png").write_bytes(b"not a png")
    dataset = load_classification(cls_data, reader=READER, image_size=SIZE, folds=3)
    assert len(dataset.items) == 18
    assert any("broken.png" in w for w in dataset.warnings)


def test_label_values_not_in_dataset_yaml(seg_data):
    label = np.array(Image.open(seg_data / "label" / "s3.png"))
    label[0, 0] = 7
    Image.fromarray(label).save(seg_data / "label" / "s3.png")
    with pytest.raises(UserInputError, match=r"label/s3.png: label values \[7\] are not in dataset.yaml"):
        load_segmentation(seg_data, reader=READER, image_size=SIZE)


def test_image_label_size_mismatch(seg_data):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(seg_data / "label" / "s2.png")
    with pytest.raises(UserInputError, match=r"label/s2.png: label is 12x10, its image s2.png is 40x32"):
        load_segmentation(seg_data, reader=READER, image_size=SIZE)


def test_groups_file_naming_unknown_files(cls_data, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("file,group\na/a0.png,p1\na/nope.png,p2\n")
    dataset = load_classification(cls_data, reader=READER, image_size=SIZE, folds=3)
    with pytest.raises(UserInputError, match=r"groups.csv: line 3: 'a/nope.png' is not a file of the dataset"):
        assign_groups(dataset, groups_file=groups)


# -- groups and folds ----------------------------------------------------------------------------
def test_grouped_folds_never_share_a_group_and_stay_stratified():
    rng = np.random.default_rng(0)
    groups, strata = [], []
    for patient in range(40):  # 40 patients, 1-6 images each, one class per patient
        label = patient % 2
        for _ in range(int(rng.integers(1, 7))):
            groups.append(f"p{patient}")
            strata.append(label)
    strata = np.array(strata)
    folds = make_folds(strata, groups, k=5, seed=3, val_fraction=0.2)
    group_array = np.array(groups)
    seen = []
    for fold in folds:
        test_groups = set(group_array[list(fold.test)])
        train_groups = set(group_array[list(fold.train)]) | set(group_array[list(fold.val)])
        assert not test_groups & train_groups
        assert not set(group_array[list(fold.train)]) & set(group_array[list(fold.val)])
        assert set(fold.train) | set(fold.val) | set(fold.test) == set(range(len(groups)))
        share = strata[list(fold.test)].mean()
        assert abs(share - strata.mean()) < 0.2  # stratified: each fold near the overall class balance
        seen += list(fold.test)
    assert sorted(seen) == list(range(len(groups)))


def test_frame_level_split_of_multi_frame_sources_is_refused(cls_data):
    frames = [Image.fromarray(_class_image(0, np.random.default_rng(i))) for i in range(4)]
    frames[0].save(cls_data / "a" / "clip.tif", save_all=True, append_images=frames[1:])
    dataset = load_classification(cls_data, reader=READER, image_size=SIZE, folds=3)
    assert {i.id for i in dataset.items if i.file == "a/clip.tif"} == {f"a/clip.tif#{k}" for k in range(4)}
    with pytest.raises(UserInputError, match=r"--allow-frame-leak"):
        assign_groups(dataset, rule="none")
    assign_groups(dataset, rule="none", allow_frame_leak=True)
    assign_groups(dataset, rule="auto")
    config = _config(cls_data, "unused")
    for fold in build_folds(config, dataset):
        in_test = {dataset.items[p].file == "a/clip.tif" for p in fold.test}
        assert len({dataset.items[p].group for p in fold.test if dataset.items[p].file == "a/clip.tif"}) <= 1
        assert in_test == {False} or all(dataset.items[p].file != "a/clip.tif" for p in fold.train + fold.val)


# -- encoders ------------------------------------------------------------------------------------
def test_bad_encoder_file_fails_in_one_line_naming_it(cls_data, tmp_path):
    from cli import app

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage")
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    for path in (bad, wrong, tmp_path / "missing.pt"):
        result = CliRunner().invoke(app, ["evaluate", str(cls_data), "--out", str(tmp_path / "r"), "--encoder",
                                          f"mine={path}", "--folds", "3", "--no-progress"])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.output
    assert not (tmp_path / "r" / "results.json").exists()


def test_resnet_detection_and_fpn_pt_beside_encoder(tmp_path):
    from anaus_core.models.export import build_export_encoder, export_encoder_state_dict, export_fpn_state_dict

    torch.manual_seed(0)
    model = build_export_encoder("resnet18", fpn_channels=32)
    torch.save(export_encoder_state_dict(model), tmp_path / "encoder.pt")
    torch.save(export_fpn_state_dict(model), tmp_path / "fpn.pt")
    weights = load_encoder(EncoderSpec("ours", tmp_path / "encoder.pt"))
    assert (weights.kind, weights.arch, weights.fpn_path) == ("resnet", "resnet18", tmp_path / "fpn.pt")
    segmenter = build_segmenter(weights, build_backbone(weights), num_classes=2)
    for key, value in export_fpn_state_dict(model).items():
        assert torch.equal(segmenter.encoder.fpn.state_dict()[key], value)
    assert torch.equal(segmenter.encoder.backbone.conv1.weight, model.backbone.conv1.weight)


def test_timm_vit_state_dict_is_detected_and_runs(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    weights = load_encoder(EncoderSpec("vit", tmp_path / "vit.pt"))
    assert weights.kind == "vit" and weights.vit_kwargs["depth"] == 2 and weights.vit_kwargs["embed_dim"] == 64
    backbone = build_backbone(weights)
    images = torch.randn(2, 3, 32, 32)
    vit.eval()
    backbone.eval()
    assert torch.allclose(backbone.features(images), vit.forward_head(vit.forward_features(images), pre_logits=True))
    segmenter = build_segmenter(weights, backbone, num_classes=3)
    assert segmenter(images).shape == (2, 3, 32, 32)


def test_vit_encoder_linear_and_finetune_runs(cls_data, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.save(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=1, num_classes=0).state_dict(),
               tmp_path / "vit.pt")
    config = _config(cls_data, tmp_path / "r", protocols=["linear", "finetune"], **{"finetune.epochs": 1})
    results = run_evaluation(config, [EncoderSpec("vit", tmp_path / "vit.pt")], reader=READER, write_report=False)
    assert [r["protocol"] for r in results["runs"]] == ["linear", "finetune"]
    assert results["encoders"][0]["kind"] == "vit"


# -- protocols -----------------------------------------------------------------------------------
def _loaded(cls_data, config):
    dataset = load_classification(cls_data, reader=READER, image_size=SIZE, folds=config.folds)
    assign_groups(dataset)
    return dataset, build_folds(config, dataset)


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_test_fold_labels_never_influence_selection(cls_data, tmp_path, protocol):
    config = _config(cls_data, tmp_path / "r", **{"finetune.lr": 1e-3})
    dataset, folds = _loaded(cls_data, config)
    weights = load_encoder(EncoderSpec("random", None))
    device = resolve_device("cpu")

    def run(ds, select_on_test=False):
        cfg = dataclasses.replace(config, select_on_test=select_on_test)
        return _classification_run(cfg, ds, folds[:1], weights, protocol, 0, 1.0, FeatureCache(), device, Bars(None))

    poisoned = dataclasses.replace(dataset, items=[dataclasses.replace(i) for i in dataset.items])
    for position in folds[0].test:  # every test label set to class 0
        poisoned.items[position].target = 0
    clean, dirty = run(dataset), run(poisoned)
    assert clean["folds"][0]["selected"] == dirty["folds"][0]["selected"]
    assert clean["per_image"]["prediction"] == dirty["per_image"]["prediction"]
    # the check can fail: selecting on the test fold does see the poisoned labels
    clean_t, dirty_t = run(dataset, True), run(poisoned, True)
    key = "grid" if protocol == "linear" else "selection_curve"
    assert clean_t["folds"][0]["selected"][key] != dirty_t["folds"][0]["selected"][key]


def test_linear_features_computed_once_per_image(cls_data, tmp_path, monkeypatch):
    seen = []
    original = ResNetBackbone.features

    def counting(self, images):
        seen.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(ResNetBackbone, "features", counting)
    config = _config(cls_data, tmp_path / "r", label_fractions=[0.5, 1.0])
    results = run_evaluation(config, [EncoderSpec("random", None)], reader=READER, write_report=False)
    assert len(results["runs"]) == 2 and len(results["runs"][0]["folds"]) == 3
    assert sum(seen) == 18  # 18 images, 3 folds x 2 fractions x 4 heads: one forward pass each


def test_evaluation_is_deterministic_per_seed(cls_data, tmp_path):
    config = _config(cls_data, tmp_path / "r", protocols=["linear", "finetune"], folds=2, **{"finetune.epochs": 1})
    first = run_evaluation(config, [EncoderSpec("random", None)], reader=READER, write_report=False)
    second = run_evaluation(config, [EncoderSpec("random", None)], reader=READER, write_report=False)
    assert json.dumps(first["runs"]) == json.dumps(second["runs"])
    assert first["folds"] == second["folds"]
    other = run_evaluation(dataclasses.replace(config, seed=5, protocols=("linear",)), [EncoderSpec("random", None)],
                           reader=READER, write_report=False)
    assert other["folds"] != first["folds"]  # the seed reaches the folds


def test_cli_classification_report_and_fixed_splits(cls_data, tmp_path):
    from cli import app
    from anaus_core.models.export import build_export_encoder, export_encoder_state_dict

    torch.manual_seed(1)
    torch.save(export_encoder_state_dict(build_export_encoder("resnet18")), tmp_path / "encoder.pt")
    out = tmp_path / "report"
    args = ["evaluate", str(cls_data), "--out", str(out), "--encoder", f"ours={tmp_path / 'encoder.pt'}", "--encoder",
            "random", "--folds", "3", "--image-size", str(SIZE), "--label-fraction", "0.5,1", "--no-progress",
            "--set", "linear.epochs=3", "--set", "bootstrap_resamples=20", "--seed", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("results.json", "results.md", "folds.csv", "predictions.png", "confusion.png", "label_fraction.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert {r["encoder"] for r in results["runs"]} == {"ours", "random"}
    assert any(t["a"] == "ours" and t["b"] == "random" and t["over"] == "folds" for t in results["paired_tests"])
    assert "never used for selection" in (out / "results.md").read_text()
    # the folds written can be given back with --splits (and another seed) and are reproduced
    again = tmp_path / "again"
    result = CliRunner().invoke(app, args[:3] + [str(again)] + args[4:-1] + ["9", "--splits", str(out / "folds.csv"),
                                                                           "--select-on-test"])
    assert result.exit_code == 0, result.output
    results2 = json.loads((again / "results.json").read_text())
    assert [f["test_ids"] for f in results2["folds"]] == [f["test_ids"] for f in results["folds"]]
    assert results2["optimistic"] and "OPTIMISTIC" in (again / "results.md").read_text()


def test_cli_segmentation_report(seg_data, tmp_path):
    from cli import app

    out = tmp_path / "seg_report"
    result = CliRunner().invoke(app, ["evaluate", str(seg_data), "--task", "segmentation", "--out", str(out),
                                      "--encoder", "random", "--folds", "2", "--image-size", str(SIZE), "--epochs", "1",
                                      "--protocol", "finetune-full", "--no-progress", "--set", "finetune.batch_size=4"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert len(run["per_image"]["dice"]) == 8 and all(v is not None for v in run["per_image"]["hd95"])
    assert set(run["summary"]) >= {"dice", "ppv", "sensitivity", "hd95", "hd"}
    assert (out / "predictions.png").is_file()


@pytest.mark.slow
def test_maskrcnn_head_runs_and_loads_fpn(seg_data, tmp_path):
    from anaus_core.evaluate.maskrcnn import build_maskrcnn, instance_targets
    from anaus_core.models.export import build_export_encoder, export_encoder_state_dict, export_fpn_state_dict

    torch.manual_seed(0)
    model = build_export_encoder("resnet18", fpn_channels=32)
    torch.save(export_encoder_state_dict(model), tmp_path / "encoder.pt")
    torch.save(export_fpn_state_dict(model), tmp_path / "fpn.pt")
    weights = load_encoder(EncoderSpec("ours", tmp_path / "encoder.pt"))
    rcnn = build_maskrcnn(weights, build_backbone(weights), num_classes=2, image_size=64, trainable_stages=3)
    assert torch.equal(rcnn.backbone.fpn.inner_blocks[0][0].weight, model.fpn.inner_blocks[0][0].weight)
    label = np.zeros((64, 64), np.int64)
    label[5:10, 5:12], label[40:50, 30:33] = 1, 1
    target = instance_targets(label, 2)
    assert target["boxes"].tolist() == [[5, 5, 12, 10], [30, 40, 33, 50]] and target["masks"].shape == (2, 64, 64)
    out = tmp_path / "rcnn"
    config = _config(seg_data, out, task="segmentation", head="maskrcnn", folds=2, image_size=64, protocols=["finetune"],
                     **{"finetune.epochs": 1})
    results = run_evaluation(config, [EncoderSpec("ours", tmp_path / "encoder.pt")], reader=READER)
    assert len(results["runs"][0]["per_image"]["dice"]) == 8 and (out / "predictions.png").is_file()


@pytest.mark.slow
def test_demo_evaluation_step_on_held_apart_phantoms(tmp_path):
    from anaus_core.evaluate.demo import evaluate_demo_encoder
    from anaus_core.models.export import build_export_encoder, export_encoder_state_dict

    torch.save(export_encoder_state_dict(build_export_encoder("resnet18")), tmp_path / "encoder.pt")
    results = evaluate_demo_encoder(tmp_path / "encoder.pt", tmp_path / "eval", reader=READER, count=24, folds=2,
                                    segmentation_epochs=1, progress=False)
    for task in ("classification", "segmentation"):
        assert {r["encoder"] for r in results[task]["runs"]} == {"demo", "random"}
        assert (tmp_path / "eval" / task / "results.md").is_file()


def _write_dicom(path, pixels, **elements):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.Modality = "US"
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_patient_groups_and_spacing(tmp_path):
    from anaus_core.evaluate.segment import score_segmentation

    root = tmp_path / "dcmseg"
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image = rng.integers(0, 255, (SIZE, SIZE + 4), dtype=np.uint8)
        _write_dicom(root / "img" / f"scan{i}.dcm", image, PatientID=f"P{i // 2}", PixelSpacing=[0.5, 0.25])
        label = np.zeros(image.shape, np.uint8)
        label[4:10, 4 + i: 12 + i] = 1
        Image.fromarray(label).save(root / "label" / f"scan{i}.png")
    (root / "dataset.yaml").write_text("classes: {lesion: 1}\n")
    dataset = load_segmentation(root, reader=READER, image_size=SIZE)
    assert all(item.spacing == (0.5, 0.25) for item in dataset.items)
    assign_groups(dataset, rule="patient")
    assert len({item.group for item in dataset.items}) == 4
    folds = make_folds(dataset.strata, [i.group for i in dataset.items], k=2, seed=0, val_fraction=0.3)
    for fold in folds:
        assert not {dataset.items[p].group for p in fold.test} & {dataset.items[p].group for p in fold.train + fold.val}
    shifted = np.roll(dataset.items[0].target, 4, axis=1)  # 4 columns = 1 mm at 0.25 mm per column
    scores = score_segmentation(shifted, dataset.items[0].target, class_names=["lesion"], spacing=(0.5, 0.25))
    assert scores["mean"]["hd"] == pytest.approx(4.0) and scores["mean"]["hd_mm"] == pytest.approx(1.0)


@pytest.mark.gpu
def test_cuda_bf16_protocols(cls_data, seg_data, tmp_path):
    config = _config(cls_data, tmp_path / "c", device="cuda", protocols=["linear", "finetune"], **{"finetune.epochs": 1})
    results = run_evaluation(config, [EncoderSpec("random", None)], reader=READER, write_report=False)
    assert results["device"].startswith("cuda") and len(results["runs"]) == 2
    seg = _config(seg_data, tmp_path / "s", device="cuda", task="segmentation", folds=2, protocols=["finetune-full"],
                  **{"finetune.epochs": 1})
    assert run_evaluation(seg, [EncoderSpec("random", None)], reader=READER, write_report=False)["runs"][0]["per_image"]["dice"]


def test_best_epoch_keeps_the_first_best_weights_as_a_copy():
    from anaus_core.evaluate.segment import BestEpoch

    model = torch.nn.Linear(2, 1, bias=False)
    best = BestEpoch()
    for epoch, (value, score) in enumerate([(1.0, 0.2), (2.0, 0.5), (3.0, 0.5), (4.0, 0.1)]):
        with torch.no_grad():
            model.weight.fill_(value)
        best.update(model, epoch, score)
    record = best.finish(model)
    assert record.selected_epoch == 1 and record.selection_curve == [0.2, 0.5, 0.5, 0.1]
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))   # epoch 1's weights, not the later tie's
