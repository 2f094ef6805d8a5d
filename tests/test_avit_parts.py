"""A-ViT building blocks, each against an independent computation (tiny sizes, CPU)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from anaus_core.avit.acdt import build_acdt_block, tokens_to_grid
from anaus_core.avit.adversarial import adaptive_weight, build_patch_discriminator, frozen_call, generator_adversarial_loss, hinge_d_loss
from anaus_core.avit.anatomy import category_indices
from anaus_core.avit.backbone import build_vit, vit_kwargs
from anaus_core.avit.conditioning import build_conditioning_block
from anaus_core.avit.dino import build_dino_loss, teacher_temperature
from anaus_core.avit.encoder import build_anatomy_vit
from anaus_core.avit.mim import build_pixel_decoder, masked_mse, patchify, random_patch_mask, unpatchify
from anaus_core.avit.multicrop import MultiCropTransform
from anaus_core.augment.geometry import CropBox, warp_image

DIM, HEADS, GRID = 32, 2, (4, 4)


def _tokens(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 + GRID[0] * GRID[1], DIM, generator=generator)


def _randomise_offsets(block, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.offset_out.weight.normal_(0, 0.2, generator=generator)
        block.offset_out.bias.normal_(0, 0.5, generator=generator)


# -- ACDT ----------------------------------------------------------------------------------------
def test_acdt_two_categories_give_different_offsets_and_outputs():
    torch.manual_seed(0)
    block = build_acdt_block(dim=DIM, num_heads=HEADS, offset_groups=2)
    _randomise_offsets(block)
    embedding = torch.nn.Embedding(2, DIM)
    tokens = _tokens(1).repeat(2, 1, 1)                  # the same image twice
    anatomy = embedding(torch.tensor([0, 1]))          # two categories
    out, offsets = block(tokens, anatomy, GRID)
    assert offsets.shape == (2, 2 * 2 * 9, *GRID)
    assert (offsets[0] - offsets[1]).abs().max() > 1e-3
    assert (out[0] - out[1]).abs().max() > 1e-4
    # the same category twice: identical
    same_out, same_offsets = block(tokens, embedding(torch.tensor([1, 1])), GRID)
    torch.testing.assert_close(same_offsets[0], same_offsets[1])
    torch.testing.assert_close(same_out[0], same_out[1])


def test_acdt_with_zeroed_conditioning_is_the_plain_deformable_block():
    torch.manual_seed(0)
    conditioned = build_acdt_block(dim=DIM, num_heads=HEADS, offset_groups=2, mlp_ratio=2.0)
    _randomise_offsets(conditioned)
    with torch.no_grad():
        conditioned.film.weight.zero_()
        conditioned.film.bias.zero_()
    plain = build_acdt_block(dim=DIM, num_heads=HEADS, offset_groups=2, conditioned=False, mlp_ratio=2.0)
    state = {k: v for k, v in conditioned.state_dict().items() if not k.startswith("film.")}
    plain.load_state_dict(state, strict=True)
    tokens = _tokens()
    anatomy = torch.randn(2, DIM)
    out_c, offsets_c = conditioned(tokens, anatomy, GRID)
    out_p, offsets_p = plain(tokens, None, GRID)
    torch.testing.assert_close(offsets_c, offsets_p)
    torch.testing.assert_close(out_c, out_p)
    # and the plain block is "deformable conv features as keys/values": recompute it by hand
    features = tokens_to_grid(plain.norm_features(tokens[:, 1:]), GRID)
    offsets = plain.offset_out(F.gelu(plain.offset_hidden(features)))
    deformed = deform_conv2d(features, offsets, plain.deform_weight, plain.deform_bias, padding=1).flatten(2).transpose(1, 2)
    keys = plain.norm_kv(deformed)
    attended = plain.attn(plain.norm_query(tokens), keys, keys, need_weights=False)[0]
    expected = tokens + attended
    expected = expected + plain.mlp(plain.norm_mlp(expected))
    torch.testing.assert_close(out_p, expected)


def test_acdt_starts_as_a_regular_convolution():
    """Zero-initialised offsets: the deformable features equal an ordinary k×k conv."""
    block = build_acdt_block(dim=DIM, num_heads=HEADS, offset_groups=2)
    features = torch.randn(2, DIM, *GRID)
    offsets = block.offsets(features, torch.randn(2, DIM))
    assert offsets.abs().max() == 0
    torch.testing.assert_close(block.deformable_features(features, offsets),
                               F.conv2d(features, block.deform_weight, block.deform_bias, padding=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["cross_attention", "film", "lora"])
def test_ablation_blocks_depend_on_anatomy(variant):
    torch.manual_seed(0)
    block = build_conditioning_block(variant=variant, dim=DIM, num_heads=HEADS)
    if variant == "lora":   # LoRA's up-projection starts at zero (identity block): give it weights
        torch.nn.init.normal_(block.up.weight, std=0.1)
    tokens = _tokens(1).repeat(2, 1, 1)
    out, offsets = block(tokens, torch.randn(2, DIM), GRID)
    assert offsets is None and out.shape == tokens.shape
    assert (out[0] - out[1]).abs().max() > 1e-5


def test_encoder_adds_anatomy_and_runs_every_variant():
    images = torch.randn(2, 3, 32, 32)
    for variant in ("acdt", "none", "cross_attention", "film", "lora"):
        model = build_anatomy_vit(size="micro", img_size=32, patch_size=8, num_categories=3, conditioning=variant)
        out = model(images, torch.tensor([1, 2]))
        assert out["tokens"].shape == (2, 17, 64) and out["grid"] == (4, 4)
        assert len(out["offsets"]) == (1 if variant == "acdt" else 0)
        # local crops: the position embedding is interpolated
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([0, 0]))["patches"].shape == (2, 4, 64)
    # the anatomy reaches the CLS token even without a conditioning block
    model = build_anatomy_vit(size="micro", img_size=32, patch_size=8, num_categories=3, conditioning="none")
    same = images[:1].repeat(2, 1, 1, 1)
    cls = model(same, torch.tensor([1, 2]))["cls"]
    assert (cls[0] - cls[1]).abs().max() > 1e-5
    assert category_indices(["thyroid", None, "kidney", "liver"], ["liver", "thyroid"]) == [2, 0, 0, 1]


def test_encoder_mask_token_replaces_masked_patches_only():
    model = build_anatomy_vit(size="micro", img_size=32, patch_size=8, num_categories=2, conditioning="none")
    images = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    other = images.clone()
    other[..., 8:16, 16:24] += 5.0           # change only the masked patch's pixels
    a = model(images, torch.tensor([1]), mask)["tokens"]
    b = model(other, torch.tensor([1]), mask)["tokens"]
    torch.testing.assert_close(a, b)


def test_vit_sizes_are_timm_architectures():
    import timm

    for size, name in (("small", "vit_small_patch16_224"), ("base", "vit_base_patch16_224")):
        with torch.device("meta"):   # shapes and names only: skips the 86M-parameter init
            ours = build_vit(size=size, img_size=224, patch_size=16)
            reference = timm.create_model(name, pretrained=False, num_classes=0)
        theirs = reference.state_dict()
        mine = ours.state_dict()
        assert list(mine) == list(theirs)
        assert all(mine[k].shape == theirs[k].shape for k in mine)
        reference.load_state_dict(mine, strict=True, assign=True)
    assert vit_kwargs(size="tiny")["embed_dim"] == 192


# -- DINO -----------------------------------------------------------------------------------------
def test_dino_loss_centring_and_sharpening_hand_computed():
    """2 teacher (global) views, 3 student views (2 global + 1 local), B = 2, K = 3; reference
    computed with explicit loops from the DINO paper's formula."""
    t_temp, s_temp, momentum = 0.5, 0.25, 0.9
    loss_fn = build_dino_loss(output_dim=3, teacher_temp=t_temp, student_temp=s_temp, center_momentum=momentum)
    centre = np.array([0.2, -0.1, 0.0])
    loss_fn.center.copy_(torch.tensor(centre, dtype=torch.float32).view(1, 1, 3))
    teacher = [np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), np.array([[0.0, 2.0, 0.0], [1.0, -1.0, 0.5]])]
    student = [np.array([[0.3, 0.1, 0.2], [0.0, 0.0, 1.0]]), np.array([[1.0, 1.0, 0.0], [-0.5, 0.2, 0.1]]),
               np.array([[0.2, -0.3, 0.4], [0.9, 0.1, -0.2]])]

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    total, terms = 0.0, 0
    for t_index, t_out in enumerate(teacher):
        for s_index, s_out in enumerate(student):
            if s_index == t_index:
                continue
            for b in range(2):
                p_teacher = softmax((t_out[b] - centre) / t_temp)      # centred, sharpened
                log_p_student = np.log(softmax(s_out[b] / s_temp))
                total += -(p_teacher * log_p_student).sum()
            terms += 1
    expected = total / (terms * 2)
    got = loss_fn([torch.tensor(t, dtype=torch.float32) for t in teacher],
                  [torch.tensor(s, dtype=torch.float32) for s in student], teacher_temp=t_temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    batch_mean = np.mean(np.concatenate(teacher), axis=0)
    np.testing.assert_allclose(loss_fn.center.view(-1).numpy(), momentum * centre + (1 - momentum) * batch_mean, rtol=1e-5)


def test_teacher_temperature_schedule():
    kwargs = dict(total_steps=100, warmup_fraction=0.3, start=0.04, end=0.07)
    assert teacher_temperature(0, **kwargs) == pytest.approx(0.04)
    assert teacher_temperature(15, **kwargs) == pytest.approx(0.055)
    assert teacher_temperature(30, **kwargs) == pytest.approx(0.07)
    assert teacher_temperature(99, **kwargs) == pytest.approx(0.07)


# -- MIM ------------------------------------------------------------------------------------------
def test_random_patch_mask_counts_and_patchify_round_trip():
    generator = torch.Generator().manual_seed(0)
    mask = random_patch_mask(5, (4, 6), 0.4, generator=generator)
    assert mask.shape == (5, 4, 6) and (mask.flatten(1).sum(1) == round(0.4 * 24)).all()
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    torch.testing.assert_close(patches[0, 4], images[0, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3), 3), images)


def test_masked_mse_counts_masked_patches_only():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 6, 4, generator=generator)
    target = torch.randn(2, 6, 4, generator=generator)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    expected = np.mean([((prediction[b, n] - target[b, n]) ** 2).mean().item()
                        for b in range(2) for n in range(6) if mask[b, n]])
    assert masked_mse(prediction, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed = prediction.clone()
    changed[~mask] += 100.0                               # unmasked patches do not count
    assert masked_mse(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed[0, 0] += 1.0                                  # a masked one does
    assert masked_mse(changed, target, mask).item() != pytest.approx(expected, rel=1e-6)
    # gradient reaches masked patches only
    leaf = prediction.clone().requires_grad_(True)
    masked_mse(leaf, target, mask).backward()
    assert (leaf.grad[~mask] == 0).all() and (leaf.grad[mask].abs().sum(-1) > 0).all()


# -- adversarial ----------------------------------------------------------------------------------
def test_adaptive_lambda_equals_manual_gradient_norm_ratio():
    torch.manual_seed(0)
    decoder = build_pixel_decoder(input_dim=16, dim=16, depth=1, num_heads=2, patch_size=8, channels=3, num_patches=4)
    discriminator = build_patch_discriminator(channels=8, layers=2)
    tokens = torch.randn(2, 4, 16)
    images = torch.randn(2, 3, 16, 16)
    prediction = decoder(tokens)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    rec = masked_mse(prediction, patchify(images, 8), mask)
    reconstruction = unpatchify(prediction, 8, (2, 2), 3)
    adv = generator_adversarial_loss(frozen_call(discriminator, reconstruction))
    got = adaptive_weight(rec, adv, decoder.last_layer)
    # manual: the same ratio from two separate graphs and autograd.grad on the weight
    prediction2 = decoder(tokens)
    grad_rec = torch.autograd.grad(masked_mse(prediction2, patchify(images, 8), mask), decoder.to_pixels.weight)[0]
    prediction3 = decoder(tokens)
    grad_adv = torch.autograd.grad(-discriminator(unpatchify(prediction3, 8, (2, 2), 3)).mean(), decoder.to_pixels.weight)[0]
    expected = grad_rec.norm() / (grad_adv.norm() + 1e-4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad


def test_generator_loss_does_not_train_the_discriminator():
    discriminator = build_patch_discriminator(channels=8, layers=2)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    generator_adversarial_loss(frozen_call(discriminator, fake)).backward()
    assert all(p.grad is None for p in discriminator.parameters())
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    real = torch.randn(2, 3, 32, 32)
    loss = hinge_d_loss(discriminator(real), discriminator(fake.detach()))
    logits_real, logits_fake = discriminator(real), discriminator(fake.detach())
    expected = 0.5 * (torch.clamp(1 - logits_real, min=0).mean() + torch.clamp(1 + logits_fake, min=0).mean())
    torch.testing.assert_close(loss, expected)


# -- multi-crop -----------------------------------------------------------------------------------
def test_multicrop_is_seeded_picklable_and_uses_the_view_geometry():
    from anaus_core.avit.config import MultiCropConfig

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 5 * i, 50), dtype=np.uint8) for i in range(3)]
    transform = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16, num_local=3), categories=["liver"], seed=7)
    transform = pickle.loads(pickle.dumps(transform))
    one = transform.build(images, [1, 0, 1], [10, 11, 12], transform.generator(2, 5))
    two = transform.build(images, [1, 0, 1], [10, 11, 12], transform.generator(2, 5))
    other = transform.build(images, [1, 0, 1], [10, 11, 12], transform.generator(2, 6))
    assert one["global"].shape == (3, 2, 1, 32, 32) and one["local"].shape == (3, 3, 1, 16, 16)
    assert torch.equal(one["global"], two["global"]) and torch.equal(one["local"], two["local"])
    assert not torch.equal(one["global"], other["global"])
    assert one["anatomy"].tolist() == [1, 0, 1] and one["index"].tolist() == [10, 11, 12]
    # each crop is geometry.warp_image of its recorded box (flipped or not), inside the image
    for row, image in enumerate(images):
        for name, size in (("global", 32), ("local", 16)):
            for view in range(one[name].shape[1]):
                top, left, height, width = (int(v) for v in one[f"{name}_crops"][row, view])
                assert top >= 0 and left >= 0 and top + height <= image.shape[0] and left + width <= image.shape[1]
                crop = one[name][row, view, 0].numpy()
                box = CropBox(top, left, height, width)
                assert any(np.array_equal(crop, warp_image(image, box, flip, size)) for flip in (False, True))
    # local crops are smaller regions than global ones on average (DINO scales)
    area = lambda c: (c[..., 2] * c[..., 3]).mean()
    assert area(one["local_crops"]) < area(one["global_crops"])
