"""LP-SAM stage 1 (adapters) and stage 2 (prompt engine) on phantom pairs and the DDTI fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_ddti_dataset, write_phantom_dataset  # noqa: E402

from anaus_core.errors import UserInputError
from anaus_core.lpsam.build import build_lpsam, tiny_model_config
from anaus_core.lpsam.checkpoint import apply_checkpoint_tensors, load_lpsam, read_checkpoint
from anaus_core.lpsam.data import SegmentationPairs, read_description
from anaus_core.lpsam.losses import bce_dice_loss
from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter, stage1_logits, stage2_logits
from anaus_core.sam import file_sha256, save_random_sam_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lpsam_train")


@pytest.fixture(scope="module")
def sam_checkpoint(workdir):
    return save_random_sam_checkpoint(workdir / "sam_tiny.pth", "tiny", seed=0)


@pytest.fixture(scope="module")
def phantom_dataset(workdir):
    return write_phantom_dataset(workdir / "phantoms", count=4, size=64, seed=1)


@pytest.fixture(scope="module")
def ddti_dataset(workdir, ddti_dir):
    return write_ddti_dataset(ddti_dir, workdir / "ddti")


def _adapt(dataset, sam_checkpoint, out_dir, **overrides):
    values = dict(datasets=[str(dataset)], sam_checkpoint=str(sam_checkpoint), out_dir=str(out_dir), model=tiny_model_config(), epochs=6, batch_size=4, lr=1e-2, val_fraction=0.0, hflip=False, box_jitter=0.0, progress=False)
    values.update(overrides)
    return run_adapt(AdaptConfig(**values))


def _first_batch(dataset, class_names, size=64):
    pairs = SegmentationPairs([read_description(dataset)], class_names=class_names, image_size=size)
    return next(iter(torch.utils.data.DataLoader(pairs, batch_size=len(pairs))))


@torch.no_grad()
def _stage1_loss(model, batch):
    logits, target = stage1_logits(model, batch, prompt="box+point", points_per_prompt=1, box_jitter=0.0, generator=torch.Generator().manual_seed(0))
    return float(bce_dice_loss(logits, target))


@torch.no_grad()
def _stage2_loss(model, batch):
    logits, target = stage2_logits(model, batch)
    return float(bce_dice_loss(logits.flatten(0, 1), target.flatten(0, 1), weight=batch["class_valid"].flatten()))


@pytest.mark.parametrize("which", ["phantom", "ddti"])
def test_both_stages_reduce_loss_and_stage2_freezes_sam_and_adapters(which, workdir, sam_checkpoint, request):
    dataset = request.getfixturevalue(f"{which}_dataset")
    class_names = list(read_description(dataset).classes)
    batch = _first_batch(dataset, class_names)

    # Stage 1: the same fixed prompts give a lower loss with the trained adapters.
    stage1 = _adapt(dataset, sam_checkpoint, workdir / f"{which}_adapt")
    untrained = build_lpsam(tiny_model_config(), class_names=class_names, sam_checkpoint=sam_checkpoint)
    adapted = build_lpsam(tiny_model_config(), class_names=class_names, sam_checkpoint=sam_checkpoint)
    stage1_data = read_checkpoint(stage1.last_checkpoint)
    apply_checkpoint_tensors(adapted, stage1_data, source="stage1")
    before, after = _stage1_loss(untrained, batch), _stage1_loss(adapted, batch)
    assert after < before - 1e-3, (before, after)
    losses = [h["train_loss"] for h in stage1.history]
    assert losses[-1] < losses[0]
    # Only adapters are stored, plus the base SAM hash.
    assert set(stage1_data["trained"]) == {"adapters"} and all(".adapter." in k for k in stage1_data["trained"]["adapters"])
    assert stage1_data["base_sam_sha256"] == file_sha256(sam_checkpoint)
    assert set(stage1.history[-1]["val_dice"]) == set(class_names)

    # Stage 2: prompt engine only; every other tensor stays bit-identical.
    frozen_before = {k: v.clone() for k, v in adapted.state_dict().items() if not k.startswith("prompt_engine.")}
    engine_before = _stage2_loss(adapted, batch)
    stage2 = run_train_prompter(
        PrompterConfig(datasets=[str(dataset)], sam_checkpoint=str(sam_checkpoint), adapter_checkpoint=str(stage1.last_checkpoint), out_dir=str(workdir / f"{which}_prompter"), model=tiny_model_config(), epochs=6, batch_size=4, lr=3e-3, val_fraction=0.0, hflip=False, progress=False)
    )
    model, data = load_lpsam(stage2.last_checkpoint, sam_checkpoint=sam_checkpoint)
    assert set(data["trained"]) == {"prompt_engine"}
    assert data["adapter_checkpoint_sha256"] == file_sha256(stage1.last_checkpoint)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen_before.items())
    # The engine did change, and the prompt-free loss went down.
    assert not all(torch.equal(state[k], v) for k, v in build_lpsam(tiny_model_config(), class_names=class_names).engine_state_dict().items())
    assert _stage2_loss(model, batch) < engine_before - 1e-3
    losses = [h["train_loss"] for h in stage2.history]
    assert losses[-1] < losses[0]


def test_stage2_freezes_frozen_tensors_during_training(workdir, sam_checkpoint, phantom_dataset):
    # Independent of checkpoint I/O: watch the live model's tensors while run_train_prompter trains.
    import anaus_core.lpsam.train as train_module

    stage1 = _adapt(phantom_dataset, sam_checkpoint, workdir / "watch_adapt", epochs=1)
    captured = {}
    original = train_module._run_loop

    def spy(**kwargs):
        model = kwargs["model"]
        captured["before"] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prompt_engine.")}
        result = original(**kwargs)
        captured["after"] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prompt_engine.")}
        captured["trainable"] = sorted(kwargs["trainable"])
        return result

    train_module._run_loop = spy
    try:
        run_train_prompter(PrompterConfig(datasets=[str(phantom_dataset)], sam_checkpoint=str(sam_checkpoint), adapter_checkpoint=str(stage1.last_checkpoint), out_dir=str(workdir / "watch_prompter"), model=tiny_model_config(), epochs=2, batch_size=2, lr=1e-2, val_fraction=0.0, progress=False))
    finally:
        train_module._run_loop = original
    assert captured["trainable"] and all(k.startswith("prompt_engine.") for k in captured["trainable"])
    assert captured["before"].keys() == captured["after"].keys()
    for key, value in captured["before"].items():
        assert torch.equal(value, captured["after"][key]), key


def test_resume_continues_and_matches_uninterrupted_run(workdir, sam_checkpoint, phantom_dataset):
    full = _adapt(phantom_dataset, sam_checkpoint, workdir / "full", epochs=3, hflip=True, box_jitter=0.05)
    _adapt(phantom_dataset, sam_checkpoint, workdir / "part", epochs=2, hflip=True, box_jitter=0.05)
    resumed = _adapt(phantom_dataset, sam_checkpoint, workdir / "part", epochs=3, hflip=True, box_jitter=0.05, resume=str(workdir / "part" / "last.pt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    a = read_checkpoint(full.last_checkpoint)["trained"]["adapters"]
    b = read_checkpoint(resumed.last_checkpoint)["trained"]["adapters"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_checkpoint_mismatches_fail_in_one_line(workdir, sam_checkpoint, phantom_dataset):
    stage1 = _adapt(phantom_dataset, sam_checkpoint, workdir / "mismatch", epochs=1)
    other_sam = save_random_sam_checkpoint(workdir / "other_sam.pth", "tiny", seed=5)
    with pytest.raises(UserInputError) as info:
        run_train_prompter(PrompterConfig(datasets=[str(phantom_dataset)], sam_checkpoint=str(other_sam), adapter_checkpoint=str(stage1.last_checkpoint), out_dir=str(workdir / "x"), model=tiny_model_config(), epochs=1, progress=False))
    assert "\n" not in str(info.value) and "sha256" in str(info.value)
    # Prediction needs a stage-2 checkpoint.
    with pytest.raises(UserInputError, match="train-prompter"):
        load_lpsam(stage1.last_checkpoint, sam_checkpoint=sam_checkpoint)
    # Shape mismatch: adapters of another bottleneck size.
    data = read_checkpoint(stage1.last_checkpoint)
    model = build_lpsam(tiny_model_config(bottleneck_ratio=0.5), class_names=["disc"], sam_checkpoint=sam_checkpoint)
    with pytest.raises(UserInputError) as info:
        apply_checkpoint_tensors(model, data, source="ckpt.pt")
    assert "\n" not in str(info.value) and "shape" in str(info.value)


def test_dataset_layouts_and_label_values(workdir, ddti_dataset):
    camus = write_phantom_dataset(workdir / "camus", count=2, size=48, multiclass=True)
    description = read_description(camus)
    assert description.classes == {"disc": 1, "ring": 2}
    pairs = SegmentationPairs([read_description(ddti_dataset), description], class_names=["nodule", "disc", "ring"], image_size=64)
    ddti_item, camus_item = pairs[0], pairs[1]
    # {0, 1} labels are read as is: the nodule is there after resizing.
    assert ddti_item["masks"][0].sum() > 0 and ddti_item["class_valid"].tolist() == [True, False, False]
    assert camus_item["class_valid"].tolist() == [False, True, True]
    assert camus_item["masks"][1].sum() > 0 and camus_item["masks"][2].sum() > 0
    assert ddti_item["pixels"].shape == (1, 64, 64) and ddti_item["pixels"].max() <= 255
    with pytest.raises(UserInputError, match="dataset.yaml"):
        read_description(workdir / "camus" / "img")
