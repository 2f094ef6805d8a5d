"""The SDPA attention and the batched mask decoder against segment_anything's own code paths."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from segment_anything.modeling.image_encoder import Block

from anaus_core.lpsam.build import build_lpsam, tiny_model_config
from anaus_core.sam import build_sam
from anaus_core.sam.fast import SDPAEncoderAttention, SDPATokenAttention, attention_kind, decode_single_masks, set_attention


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize("window_size", [0, 3])
def test_sdpa_block_equals_segment_anything(use_rel_pos, window_size):
    """A whole ViT block (window partition with padding on a 7x5 grid when windowed)."""
    torch.manual_seed(0)
    reference = Block(dim=16, num_heads=2, use_rel_pos=use_rel_pos, window_size=window_size, input_size=(7, 5))
    _randomise(reference, 1)
    fast = copy.deepcopy(reference)
    assert set_attention(fast, "sdpa") == 1
    assert isinstance(fast.attn, SDPAEncoderAttention) and type(reference.attn) is sam_image_encoder.Attention
    x = torch.randn(2, 7, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), atol=1e-4, rtol=0)
        # the attention on its own, on a non-square grid, with relative positions
        torch.testing.assert_close(fast.attn(x), reference.attn(x), atol=1e-4, rtol=0) if window_size == 0 else None


def test_sdpa_token_attention_equals_segment_anything():
    reference = sam_transformer.Attention(16, 4, downsample_rate=2)
    _randomise(reference, 3)
    fast = copy.deepcopy(reference)
    set_attention(fast, "sdpa")
    assert type(fast) is SDPATokenAttention
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, n, 16, generator=generator) for n in (5, 9, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(q, k, v), reference(q, k, v), atol=1e-4, rtol=0)


def test_set_attention_round_trip_keeps_state_dict():
    sam = build_sam("tiny", image_size=64, attention="reference")
    assert attention_kind(sam) == "reference"
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    count = set_attention(sam, "sdpa")
    assert count == 2 + 2 * 3 + 1  # encoder blocks; two-way blocks (self, token->image, image->token); final token->image
    assert attention_kind(sam) == "sdpa"
    assert sam.state_dict().keys() == before.keys()
    set_attention(sam, "reference")
    assert attention_kind(sam) == "reference"
    with pytest.raises(ValueError):
        set_attention(sam, "flash")


def test_sdpa_sam_encoder_equals_reference():
    """Tiny SAM at 64 px: a windowed block (window 14 on a 4x4 grid: padded) and a global one."""
    torch.manual_seed(0)
    reference = build_sam("tiny", image_size=64, attention="reference")
    _randomise(reference.image_encoder, 5)
    fast = copy.deepcopy(reference)
    set_attention(fast, "sdpa")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(fast.image_encoder(x), reference.image_encoder(x), atol=1e-4, rtol=0)


def test_batched_decoder_equals_per_image_loop():
    torch.manual_seed(0)
    sam = build_sam("tiny", image_size=64, attention="reference")
    _randomise(sam.mask_decoder, 7)
    generator = torch.Generator().manual_seed(8)
    batch, prompts, length = 3, 4, 2
    embeddings = torch.randn(batch, 32, 4, 4, generator=generator)
    sparse = torch.randn(batch, prompts, length, 32, generator=generator)
    image_pe = sam.prompt_encoder.get_dense_pe()
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    with torch.no_grad():
        logits, iou = decode_single_masks(sam.mask_decoder, image_embeddings=embeddings, image_pe=image_pe, sparse_prompts=sparse, dense_prompts=no_mask)
        for b in range(batch):
            ref_logits, ref_iou = sam.mask_decoder(
                image_embeddings=embeddings[b : b + 1], image_pe=image_pe, sparse_prompt_embeddings=sparse[b],
                dense_prompt_embeddings=no_mask.expand(prompts, -1, 4, 4), multimask_output=False,
            )
            torch.testing.assert_close(logits[b], ref_logits[:, 0], atol=1e-4, rtol=0)
            torch.testing.assert_close(iou[b], ref_iou[:, 0], atol=1e-4, rtol=0)
    assert logits.shape == (batch, prompts, 16, 16)


def _tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    reference = build_lpsam(tiny_model_config(image_size=64), class_names=["a", "b", "c"], fast=False)
    _randomise(reference, seed + 10)
    fast = copy.deepcopy(reference).set_fast_path(True)
    return reference, fast


def test_lpsam_fast_forward_equals_reference():
    reference, fast = _tiny_pair()
    assert attention_kind(reference) == "reference" and attention_kind(fast) == "sdpa"
    assert not reference.batched_decoder and fast.batched_decoder
    pixels = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        out_ref, out_fast = reference(pixels), fast(pixels)
    torch.testing.assert_close(out_fast["logits"], out_ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out_fast["iou"], out_ref["iou"], atol=1e-4, rtol=0)


def test_lpsam_batched_prompted_decoder_equals_loop():
    reference, fast = _tiny_pair(1)
    pixels = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 12.0, 60.0, 30.0]])
    points = torch.tensor([[[20.5, 20.5], [30.5, 8.5]], [[12.5, 40.5], [50.5, 50.5]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    with torch.no_grad():
        _, embeddings = reference.embed(pixels)
        for kwargs in (dict(boxes=boxes), dict(points=points, point_labels=labels), dict(boxes=boxes, points=points, point_labels=labels)):
            ref_logits, ref_iou = reference.decode_prompted(embeddings, **kwargs)
            fast_logits, fast_iou = fast.decode_prompted(embeddings, **kwargs)
            torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(fast_iou, ref_iou, atol=1e-4, rtol=0)


def test_lpsam_fast_path_gradients_match_reference():
    """Training runs through the same modules: gradients of the adapters agree too."""
    reference, fast = _tiny_pair(2)
    pixels = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3)) * 255
    grads = []
    for model in (reference, fast):
        model.zero_grad()
        model(pixels)["logits"].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    # The batched decoder skips the three multimask hypernetworks (unused by single-mask output):
    # they get no gradient instead of a zero one.
    assert grads[1] and set(grads[1]) <= set(grads[0])
    for key in set(grads[0]) - set(grads[1]):
        assert ".output_hypernetworks_mlps." in key and not grads[0][key].any(), key
    for key in grads[1]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-4, rtol=1e-3)


def test_bf16_weights_close_to_fp32_on_cpu():
    """The pure-bf16 path (what the predictor runs on CUDA) is usable: same masks up to bf16 noise."""
    _, fast = _tiny_pair(3)
    pixels = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4)) * 255
    low = copy.deepcopy(fast).to(torch.bfloat16)
    low.image_encoder.normalizer.float()
    low.prompt_encoder.float()
    with torch.no_grad():
        ref = fast(pixels)["logits"]
        out = low(pixels)["logits"]
    assert out.dtype == torch.bfloat16
    error = (out.float() - ref).abs().max() / ref.abs().max()
    assert error < 0.1, error


def test_sam_masker_with_sdpa_equals_reference_attention(tmp_path):
    """The vanilla-SAM masker (SDPA by default) gives the reference attention's mask sets."""
    import numpy as np

    from anaus_core.maskers import build_masker
    from anaus_core.sam import save_random_sam_checkpoint

    checkpoint = save_random_sam_checkpoint(tmp_path / "tiny_sam.pth", "tiny", seed=0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :64]
    image = np.clip(rng.gamma(2.0, 30.0, (80, 64)) + 100 * (np.hypot(yy - 40, xx - 30) < 18), 0, 255).astype(np.uint8)
    options = dict(checkpoint=checkpoint, image_size=64, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    fast_masker = build_masker("sam", **options)
    assert attention_kind(fast_masker.sam) == "sdpa"
    reference_masker = build_masker("sam", **options)
    set_attention(reference_masker.sam, "reference")
    (fast,) = fast_masker([image], [None])
    (reference,) = reference_masker([image], [None])
    assert len(fast) == len(reference) >= 1 and fast.sources == reference.sources
    np.testing.assert_allclose(fast.scores, reference.scores, atol=1e-4)
    for a, b in zip(fast.masks, reference.masks):
        assert (a & b).sum() / max((a | b).sum(), 1) > 0.99
