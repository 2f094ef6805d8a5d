"""Online evaluation during pre-training (issue 14 part 1): the weighted kNN against a brute-force
reference, out-of-fold predictions that never see their own fold's labels, and a tiny pretrain
run that logs the accuracies at the right steps and restores the model's train mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anaus_core.config import load_config
from anaus_core.evaluate.config import LinearConfig
from anaus_core.evaluate.folds import make_folds
from anaus_core.evaluate.knn import knn_class_scores, knn_predict
from anaus_core.evaluate.online import OnlineEvalConfig, OnlineEvaluator, fold_predictions, stratified_subset
from anaus_core.train import PretrainConfig, pretrain, read_metrics

FAST_LINEAR = LinearConfig(learning_rates=(0.1,), weight_decays=(0.0,), epochs=5, batch_size=64)


def _reference_knn(train, labels, queries, *, num_classes, k, temperature):
    """Brute force in numpy: cosine similarity to every training row, full sort, weighted vote."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        similarity = train @ query
        order = np.argsort(-similarity, kind="stable")[:k]
        for j in order:
            out[q, labels[j]] += np.exp(similarity[j] / temperature)
    return out


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_matches_bruteforce_reference(k):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    queries = rng.normal(size=(17, 8)).astype(np.float32)
    got = knn_class_scores(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(queries),
                           num_classes=3, k=k, temperature=0.5, chunk_size=5).numpy()
    want = _reference_knn(train, labels, queries, num_classes=3, k=min(k, 60), temperature=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert (knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(queries), num_classes=3,
                        k=k, temperature=0.5).numpy() == want.argmax(1)).all()


def test_knn_scale_invariant_and_votes_for_nearest_cluster():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[10.0, 1.0], [0.2, 3.0]])  # cosine: the norm does not matter
    assert knn_predict(train, labels, queries, num_classes=2, k=2, temperature=0.1).tolist() == [0, 1]


def _features_with_signal(n=60, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    centres = rng.normal(size=(classes, 16)) * 3
    features = centres[labels] + rng.normal(size=(n, 16))
    return torch.tensor(features, dtype=torch.float32), labels


def test_out_of_fold_predictions_ignore_their_own_folds_labels():
    features, labels = _features_with_signal()
    groups = [f"g{i // 2}" for i in range(len(labels))]  # pairs of items share a group
    folds = make_folds(labels, groups, k=5, seed=0, val_fraction=0.25)
    for fold in folds:  # the library's split: held-out fold disjoint from training and selection parts
        assert not set(fold.test) & (set(fold.train) | set(fold.val))
        assert not {groups[p] for p in fold.test} & {groups[p] for p in fold.train + fold.val}
    common = dict(num_classes=3, knn_k=5, knn_temperature=0.1, linear=FAST_LINEAR, seed=0, device=torch.device("cpu"))
    clean = fold_predictions(features, labels, folds, **common)
    assert (clean["knn"] == labels).mean() > 0.9 and (clean["linear"] == labels).mean() > 0.9
    held = np.array(folds[0].test)
    poisoned = labels.copy()
    poisoned[held] = (poisoned[held] + 1) % 3  # every held-out label wrong
    dirty = fold_predictions(features, poisoned, folds, **common)
    # predictions of the held-out fold are untouched by its own (poisoned) labels ...
    np.testing.assert_array_equal(dirty["knn"][held], clean["knn"][held])
    np.testing.assert_array_equal(dirty["linear"][held], clean["linear"][held])
    # ... while the folds that trained on them do see the change (the test can fail)
    others = np.setdiff1d(np.arange(len(labels)), held)
    assert (dirty["knn"][others] != clean["knn"][others]).any() or (dirty["linear"][others] != clean["linear"][others]).any()


def test_stratified_subset_keeps_every_class():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    keep = stratified_subset(labels, max_items=20, seed=0)
    assert len(keep) <= 20 and set(labels[keep]) == {0, 1, 2}
    assert (np.diff(keep) > 0).all()
    assert len(stratified_subset(labels, max_items=500, seed=0)) == 100


def _write_eval_folder(root, per_class=10, size=40):
    """Two classes a frozen random encoder can tell apart: dark vs bright noisy squares."""
    rng = np.random.default_rng(0)
    for name, level in (("dark", 50), ("bright", 190)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(level + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(image, "L").save(root / name / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    return _write_eval_folder(tmp_path_factory.mktemp("eval-data"))


def test_evaluator_loads_once_bounds_images_and_restores_modes(eval_folder):
    from pipeline.frame_reader import IngestFrameReader

    config = OnlineEvalConfig(data=str(eval_folder), max_images=16, folds=4, knn_k=3, linear=FAST_LINEAR)
    evaluator = OnlineEvaluator(config, reader=IngestFrameReader(), image_size=32)
    assert evaluator.images.shape == (16, 32, 32) and sorted(set(evaluator.labels)) == [0, 1]
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    encoder.train()
    seen = []
    encoder[1].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    stats = encoder[1].running_mean.clone()
    scores = evaluator.evaluate(encoder)
    assert seen and all(mode == (False, False) for mode in seen)   # BatchNorm in eval mode, no gradients
    assert torch.equal(stats, encoder[1].running_mean)              # statistics untouched
    assert all(m.training for m in encoder.modules())               # train mode restored
    assert set(scores) >= {"eval_knn_top1", "eval_linear_acc"} and scores["eval_images"] == 16
    assert scores["eval_knn_top1"] > 0.9  # brightness is in the pooled features of any encoder


def test_pretrain_logs_online_evaluation_at_eval_steps(eval_folder, tmp_path):
    from shards.synthetic import write_synthetic_store
    from anaus_cli.pretrain import online_evaluator
    from cli import shard_data_source
    from tests.test_pretrain import TINY

    shards = write_synthetic_store(tmp_path / "shards", count=8, samples_per_shard=4, height=48, width=48)
    config = load_config(PretrainConfig, None, {
        **TINY, "data.shards": str(shards), "run.steps": 5, "run.log_every": 2, "eval.data": str(eval_folder),
        "eval.every": 2, "eval.max_images": 12, "eval.folds": 3, "eval.knn_k": 3,
        "eval.linear.learning_rates": [0.1], "eval.linear.weight_decays": [0.0], "eval.linear.epochs": 3})
    evaluator = online_evaluator(config)
    calls = []

    class Spy:
        def evaluate(self, encoder):
            calls.append(encoder)
            return evaluator.evaluate(encoder)

    result = pretrain(config, tmp_path / "run", data=shard_data_source(config), evaluator=Spy())
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    eval_steps = [r["step"] for r in records if "eval_knn_top1" in r]
    assert eval_steps == [2, 4, 5]                                   # every 2 steps and at the end
    assert [r["step"] for r in result.eval_records] == eval_steps
    assert all(0.0 <= r["eval_linear_acc"] <= 1.0 for r in records if "eval_linear_acc" in r)
    assert calls[0] is result.model.online_backbone                  # the live encoder, not a copy
    assert all(m.training for m in result.model.online_encoder.modules())
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == [2, 4, 5]
    from PIL import Image as _Image

    width = _Image.open(tmp_path / "run" / "loss_curve.png").size[0]
    assert width > 1500  # three panels (loss, per scale, online evaluation); two are 1210 px wide


def test_cli_eval_options_and_bad_eval_folder(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert "--eval-data" in result.output and "--eval-every" in result.output and "--eval-task" in result.output
    (tmp_path / "shards").mkdir()
    result = CliRunner().invoke(app, ["pretrain", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "r"),
                                      "--eval-data", str(tmp_path / "missing"), "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "missing" in result.output and "not found" in result.output
    (tmp_path / "val").mkdir()
    result = CliRunner().invoke(app, ["pretrain", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "r2"),
                                      "--eval-data", str(tmp_path / "val"), "--eval-task", "pixels", "--steps", "1"])
    assert result.exit_code == 2 and "eval.task" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_learning_signal_benchmark_end_to_end_toy(tmp_path):
    """The benchmark at a toy size: phantoms -> shards -> random / BYOL / AnaUS arms with online
    curves -> table, paired tests and the curve figure (about 40 s on the 2-core machine)."""
    from benchmarks.learning_signal import main

    results = main(["--work", str(tmp_path / "ls"), "--size", "48", "--view-size", "32", "--steps", "2",
                    "--eval-every", "1", "--batch-size", "4", "--pretrain-count", "12", "--eval-count", "16",
                    "--folds", "2", "--seeds", "0", "--arms", "random", "byol", "anaus-ultrasound-labels",
                    "--figure", str(tmp_path / "curve.png")])
    assert results["probes"] == ["regions", "image"]
    assert [(row["probe"], row["arm"]) for row in results["table"]] == [
        (probe, arm) for probe in ("regions", "image") for arm in ("random", "byol", "anaus-ultrasound-labels")]
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and (tmp_path / "ls" / "report.md").exists()
    curve = json.loads((tmp_path / "ls" / "runs" / "byol-s0" / "result.json").read_text())["curve"]
    assert [point["step"] for point in curve] == [0, 1, 2]
    random_run = json.loads((tmp_path / "ls" / "runs" / "random-s0" / "result.json").read_text())
    for key in ("eval_regions_linear_acc", "eval_image_knn_top1"):
        assert curve[0][key] == random_run["curve"][0][key]  # same initialisation
    assert curve[0]["eval_linear_acc"] == curve[0]["eval_regions_linear_acc"]  # the primary probe
    pairs = {(t["probe"], t["a"], t["b"], t["protocol"]) for t in results["tests"]}
    assert ("regions", "anaus-ultrasound-labels", "byol", "linear") in pairs and ("image", "byol", "random", "knn") in pairs
    assert all(t["n"] == 2 * 2 for t in results["tests"])  # folds x geometries x seeds


def test_avit_eval_encoder_gives_the_exported_features(tmp_path):
    """A-ViT's online-evaluation view equals what `anaus evaluate` computes from its encoder.pt."""
    from anaus_core.avit.method import AViTMethod
    from anaus_core.evaluate.backbones import build_backbone
    from anaus_core.evaluate.encoders import EncoderSpec, load_encoder
    from anaus_core.evaluate.features import extract_features
    from tests.avit_helpers import tiny_avit_config

    method = AViTMethod(config=tiny_avit_config())
    method.export(tmp_path)
    exported = build_backbone(load_encoder(EncoderSpec("avit", tmp_path / "encoder.pt")))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    live = extract_features(method.eval_encoder(), images, device=torch.device("cpu"))
    torch.testing.assert_close(live, extract_features(exported, images, device=torch.device("cpu")))
    assert method.eval_encoder().vit is method.teacher.vit  # live weights, not a copy
