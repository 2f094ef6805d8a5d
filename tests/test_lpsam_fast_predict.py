"""LP-SAM mask sets on the phantoms: the fast predictor (SDPA attention, batched decoder, device
post-processing, worker threads) gives the mask sets of the reference path (segment_anything's
attention and per-image decoder, CPU post-processing written out here as it was before)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from lpsam_helpers import write_phantom_dataset  # noqa: E402

from anaus_core.lpsam.build import tiny_model_config
from anaus_core.lpsam.checkpoint import load_lpsam
from anaus_core.lpsam.mask_set import class_components
from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions, resolve_precision
from anaus_core.lpsam.train import AdaptConfig, PrompterConfig, run_adapt, run_train_prompter
from anaus_core.sam import save_random_sam_checkpoint
from anaus_core.sam.fast import attention_kind


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpsam_fast")
    sam = save_random_sam_checkpoint(root / "sam_tiny.pth", "tiny", seed=0)
    dataset = write_phantom_dataset(root / "data", count=4, size=64, multiclass=True)
    common = dict(datasets=[str(dataset)], sam_checkpoint=str(sam), model=tiny_model_config(), epochs=2, batch_size=4, lr=1e-2, val_fraction=0.0, progress=False)
    stage1 = run_adapt(AdaptConfig(out_dir=str(root / "adapt"), **common))
    stage2 = run_train_prompter(PrompterConfig(out_dir=str(root / "prompter"), adapter_checkpoint=str(stage1.last_checkpoint), **common))
    images = [np.asarray(Image.open(p)) for p in sorted((dataset / "img").iterdir())]
    images.append(np.asarray(Image.fromarray(images[0]).resize((80, 56))))  # another size, non-square
    images.append(np.repeat(images[1][..., None], 3, axis=2))  # RGB input to a 1-channel model
    return {"sam": sam, "checkpoint": stage2.last_checkpoint, "images": images}


def reference_mask_sets(model, images, options: PredictorOptions, batch_size: int):
    """The pre-issue-13 predictor: CPU resize, reference model path, CPU threshold + components."""
    model.set_fast_path(False)
    assert attention_kind(model) == "reference"
    results = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = []
            for image in chunk:
                tensor = torch.tensor(image[None] if image.ndim == 2 else image.transpose(2, 0, 1), dtype=torch.float32)
                if tensor.shape[0] != model.in_chans:
                    tensor = tensor.mean(0, keepdim=True)
                batch.append(F.interpolate(tensor[None], size=(model.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)[0])
            out = model(torch.stack(batch))
            for index, image in enumerate(chunk):
                probabilities = torch.sigmoid(F.interpolate(out["logits"][index : index + 1], size=image.shape[:2], mode="bilinear", align_corners=False))[0]
                mask_set = class_components(probabilities.numpy(), out["iou"][index].numpy(), model.class_names, threshold=options.threshold, min_area=options.min_area)
                results.append(mask_set.finalize(min_area=options.min_area, max_masks=32, add_residual=True))
    return results


@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("workers", [0, 3])
def test_fast_predictor_mask_sets_equal_reference(trained, threshold, workers):
    options = PredictorOptions(threshold=threshold, min_area=4)
    reference = reference_mask_sets(load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0], trained["images"], options, batch_size=4)
    model = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0]
    assert attention_kind(model) == "sdpa" and model.batched_decoder  # the default build
    predictor = LPSAMPredictor(model, batch_size=4, options=options, postprocess_workers=workers)
    fast = predictor.predict(trained["images"], finalize=True)
    predictor.close()
    assert len(fast) == len(reference)
    assert sum(len(m) for m in reference) > len(reference)  # class components exist, not just residuals
    for got, want in zip(fast, reference):
        assert got.sources == want.sources
        np.testing.assert_array_equal(got.masks, want.masks)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_predict_probabilities_matches_predict_inputs(trained):
    model = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0]
    predictor = LPSAMPredictor(model, batch_size=3)
    pairs = predictor.predict_probabilities(trained["images"])
    for image, (probabilities, iou) in zip(trained["images"], pairs):
        assert probabilities.shape == (len(model.class_names), *image.shape[:2]) and probabilities.dtype == np.float32
        assert iou.shape == (len(model.class_names),)
        assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, amp=True, device=cpu) == "fp32"
    assert resolve_precision(None, amp=True, device=cuda) == "bf16"
    assert resolve_precision(None, amp=False, device=cuda) == "fp32"
    assert resolve_precision("bf16-autocast", amp=True, device=cuda) == "bf16-autocast"
    assert resolve_precision(None, amp=True, device=cuda, amg=True) == "bf16-autocast"
    with pytest.raises(ValueError):
        resolve_precision("fp16", amp=True, device=cpu)


def test_bf16_predictor_runs_on_cpu(trained):
    """The bf16 code path (weights cast, normaliser and positional encodings fp32) end to end."""
    model = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0]
    predictor = LPSAMPredictor(model, batch_size=4, precision="bf16", options=PredictorOptions(threshold=0.3, min_area=4))
    assert model.image_encoder.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    mask_sets = predictor.predict(trained["images"], finalize=True)
    assert [m.shape for m in mask_sets] == [image.shape[:2] for image in trained["images"]]
    # With SAM's automatic-mask generator, bf16 means autocast over fp32 weights.
    model = load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0]
    predictor = LPSAMPredictor(model, precision="bf16", options=PredictorOptions(threshold=0.3, min_area=4, amg=True, amg_points_per_side=4))
    assert predictor.precision == "bf16-autocast" and model.image_encoder.vit.patch_embed.proj.weight.dtype == torch.float32
    assert predictor.predict(trained["images"][:1], finalize=True)[0].shape == trained["images"][0].shape[:2]


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_and_compile_on_cuda_close_to_fp32(trained, compile):
    """CUDA: pure bf16 (and torch.compile) masks agree with fp32 up to bf16 noise on most pixels."""
    images = trained["images"]
    options = PredictorOptions(threshold=0.3, min_area=4)
    fp32 = LPSAMPredictor(load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0], device="cuda", precision="fp32", batch_size=4, options=options)
    fast = LPSAMPredictor(load_lpsam(trained["checkpoint"], sam_checkpoint=trained["sam"])[0], device="cuda", precision="bf16", compile=compile, batch_size=4, options=options)
    for (p32, iou32), (p16, iou16) in zip(fp32.predict_probabilities(images), fast.predict_probabilities(images)):
        assert np.abs(p32 - p16).mean() < 0.02
        np.testing.assert_allclose(iou16, iou32, atol=0.05)
        assert ((p32 > 0.3) == (p16 > 0.3)).mean() > 0.98


def test_lpsam_masker_options_and_fingerprint(trained):
    from anaus_core.maskers.lpsam import LPSAMMasker

    common = dict(checkpoint=trained["checkpoint"], sam_checkpoint=trained["sam"], threshold=0.3, min_area=4, batch_size=4)
    plain = LPSAMMasker(**common, postprocess_workers=0)
    options = plain.fingerprint()["options"]
    assert options["bf16"] is False and "precision" not in options  # fp32 fingerprints as before issue 13
    low = LPSAMMasker(**common, precision="bf16")
    assert low.fingerprint()["options"]["precision"] == "bf16" and low.fingerprint() != plain.fingerprint()
    assert LPSAMMasker(**common, compile=True).fingerprint() == plain.fingerprint()  # compile changes no output
    threaded = LPSAMMasker(**common, postprocess_workers=3)
    images = trained["images"]
    for a, b in zip(plain(images, [None] * len(images)), threaded(images, [None] * len(images))):
        assert a == b
    with pytest.raises(ValueError):
        LPSAMMasker(**common, precision="fp16")
