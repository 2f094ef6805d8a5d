"""LP-SAM model: zero-initialised adapters reproduce vanilla SAM; prompt engine shapes; channels."""

from __future__ import annotations

import pytest
import torch

from anaus_core.lpsam.build import build_lpsam, tiny_model_config
from anaus_core.lpsam.prompt_engine import LatentPromptEngine
from anaus_core.sam import build_sam, save_random_sam_checkpoint


@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory):
    return save_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", "tiny", seed=3)


def _vanilla_outputs(sam, pixels, box):
    with torch.no_grad():
        embeddings = sam.image_encoder(torch.stack([sam.preprocess(p) for p in pixels.expand(-1, 3, -1, -1)]))
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=embeddings[:1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    return embeddings, masks, iou


@pytest.mark.parametrize("image_size,placement", [(1024, "all"), (128, "all"), (128, "global")])
def test_zero_initialised_lpsam_equals_vanilla_sam(tiny_sam_checkpoint, image_size, placement):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 1, image_size, image_size, generator=generator) * 255
    box = torch.tensor([[0.2, 0.25, 0.7, 0.8]]) * image_size
    vanilla = build_sam("tiny", checkpoint=tiny_sam_checkpoint, image_size=image_size)
    model = build_lpsam(tiny_model_config(image_size=image_size, adapter_placement=placement), class_names=["a"], sam_checkpoint=tiny_sam_checkpoint)
    adapters = model.adapter_state_dict()
    assert adapters and all(".adapter." in k for k in adapters)
    # The adapters are really there and really zero-initialised only in the up-projection.
    assert any(k.endswith("down.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    expected_embeddings, expected_masks, expected_iou = _vanilla_outputs(vanilla, pixels, box)
    with torch.no_grad():
        _, embeddings = model.embed(pixels)
        masks, iou = model.decode_prompted(embeddings, boxes=box)
    assert embeddings.shape == expected_embeddings.shape == (1, 32, image_size // 16, image_size // 16)
    assert (embeddings - expected_embeddings).abs().max() < 1e-5
    assert (masks - expected_masks).abs().max() < 1e-5
    assert (iou - expected_iou).abs().max() < 1e-5
    # A trained (non-zero) adapter changes the embedding: the test above can fail.
    with torch.no_grad():
        next(m for n, m in model.named_modules() if n.endswith("adapter.up")).weight.fill_(0.1)
        _, changed = model.embed(pixels)
    assert (changed - expected_embeddings).abs().max() > 1e-3


def test_latent_forward_shapes_and_channels(tiny_sam_checkpoint):
    for in_chans in (1, 3, 2):
        model = build_lpsam(tiny_model_config(in_chans=in_chans), class_names=["nodule", "gland"], sam_checkpoint=tiny_sam_checkpoint)
        with torch.no_grad():
            out = model(torch.rand(3, in_chans, 64, 64) * 255)
        assert out["logits"].shape == (3, 2, 16, 16) and out["iou"].shape == (3, 2)
        assert torch.isfinite(out["logits"]).all()
        has_projection = any("normalizer.projection" in k for k in model.adapter_state_dict())
        assert has_projection == (in_chans == 2)


def test_prompt_engine_reuses_original_cnn_features():
    engine = LatentPromptEngine(dim=32, num_classes=3, tokens_per_class=2, num_rounds=2, num_heads=2, mlp_dim=16, cnn_channels=(8, 8, 8, 8))
    calls = []
    engine.local_cnn.register_forward_hook(lambda *args: calls.append(1))
    tokens = engine(torch.randn(2, 3, 64, 64), torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4))
    assert tokens.shape == (2, 6, 32) and len(calls) == 1  # F_c computed once, shared by every round
    assert engine.class_prompts(tokens).shape == (2, 3, 2, 32)


def test_vit_b_parameter_counts_on_meta_device():
    from anaus_core.lpsam.build import LPSAMModelConfig
    from anaus_core.lpsam.params import count_parameters

    with torch.device("meta"):
        model = build_lpsam(LPSAMModelConfig(spec="vit_b", image_size=1024), class_names=["a", "b", "c"])
    counts = count_parameters(model)
    assert counts["sam"] == 93_735_472  # official ViT-B SAM
    # 12 blocks x 2 adapters x (768*192 + 192 + 192*768 + 768)
    assert counts["adapters"] == 12 * 2 * (2 * 768 * 192 + 192 + 768)
