"""Damage function D: equals an independent per-image loop given the same draws, component
semantics (alpha, beta, gamma), switches, determinism, no in-place writes."""

from __future__ import annotations

import pytest
import torch

from anaus_core.augment.damage import DamageSettings, apply_damage, damage, sample_damage


def loop_damage(images: torch.Tensor, draws) -> torch.Tensor:
    """Reference: the same D applied one patch / one image at a time with plain slicing."""
    out = images.clone()
    batch, channels, height, width = images.shape
    if draws.shuffle_patches is not None:
        patch = draws.patch_size
        for (b, r, c), order in zip(draws.shuffle_patches.tolist(), draws.shuffle_order):
            window = out[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            flat = window.reshape(channels, patch * patch)
            out[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = flat[:, order].reshape(channels, patch, patch)
    if draws.noise is not None:
        for b in range(batch):
            out[b] = out[b] + draws.noise[b, 0]
    if draws.occlusion_boxes is not None:
        for b in range(batch):
            top, left, box_h, box_w = (int(v) for v in draws.occlusion_boxes[b])
            for ch in range(channels):
                darkest = out[b, ch].min()
                out[b, ch, top:top + box_h, left:left + box_w] = darkest
    return out


@pytest.mark.parametrize("shape, patch", [((3, 3, 32, 32), 4), ((3, 3, 37, 45), 4), ((2, 1, 8, 8), 8)])
def test_vectorised_damage_equals_per_image_loop(shape, patch):
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    copy = images.clone()
    settings = DamageSettings(shuffle_prob=0.5, patch_size=patch)
    draws = sample_damage(tuple(images.shape), settings=settings, generator=torch.Generator().manual_seed(1))
    assert draws.shuffle_patches.shape[0] > 0
    assert torch.equal(apply_damage(images, draws), loop_damage(images, draws))
    assert torch.equal(images, copy)


def test_deterministic_with_generator_and_input_untouched():
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    copy = images.clone()
    first = damage(images, generator=torch.Generator().manual_seed(3))
    second = damage(images, generator=torch.Generator().manual_seed(3))
    third = damage(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert torch.equal(images, copy)
    # channels_last input (the trainer's CUDA layout): same values, same layout back
    last = damage(images.contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(3))
    assert torch.equal(last, first) and last.is_contiguous(memory_format=torch.channels_last)


def test_shuffle_permutes_within_patches_at_rate_alpha():
    settings = DamageSettings(shuffle_prob=0.15, patch_size=8, noise=False, occlusion=False)
    images = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    out = damage(images, settings=settings, generator=torch.Generator().manual_seed(1))

    def patches(x):
        return x.reshape(16, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(16, 64, 64)

    before, after = patches(images), patches(out)
    assert torch.equal(before.sort(dim=-1).values, after.sort(dim=-1).values)  # same pixels per patch
    changed = (before != after).any(dim=-1).float().mean().item()
    assert 0.11 < changed < 0.19  # 1024 patches, alpha = 0.15
    gray = torch.randn(2, 1, 16, 16).repeat(1, 3, 1, 1)
    shuffled = damage(gray, settings=DamageSettings(shuffle_prob=1.0, noise=False, occlusion=False))
    assert torch.equal(shuffled[:, 0], shuffled[:, 2])  # one permutation shared by the channels


def test_noise_has_std_beta_and_is_shared_by_channels():
    settings = DamageSettings(noise_std=0.2, shuffle=False, occlusion=False)
    images = torch.zeros(8, 3, 64, 64)
    out = damage(images, settings=settings, generator=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(0.2, rel=0.03)
    assert torch.equal(out[:, 0], out[:, 1])


def test_occlusion_covers_gamma_with_the_darkest_value():
    settings = DamageSettings(occlusion_fraction=0.05, shuffle=False, noise=False)
    images = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(0)) + 1.0
    out = damage(images, settings=settings, generator=torch.Generator().manual_seed(1))
    changed = (out != images).any(dim=1).float().mean(dim=(1, 2))
    # one rectangle of round(0.05 * 4096) ~ 205 px, up to rounding of its sides
    assert torch.all((changed - 0.05).abs() < 0.012), changed
    minima = images.amin(dim=(2, 3), keepdim=True).expand_as(images)
    assert torch.equal(out[out != images], minima[out != images])


def test_switches_off_is_identity_copy():
    images = torch.randn(2, 3, 16, 16)
    settings = DamageSettings(shuffle=False, noise=False, occlusion=False)
    out = damage(images, settings=settings, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()
    with pytest.raises(ValueError):
        DamageSettings(shuffle_prob=1.5)


@pytest.mark.gpu
def test_cpu_generator_gives_same_damage_on_cuda():
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = damage(images, generator=torch.Generator().manual_seed(2))
    cuda = damage(images.to("cuda"), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(cpu, cuda.cpu(), atol=1e-6)
    on_device = damage(images.to("cuda"), generator=torch.Generator(device="cuda").manual_seed(2))
    assert on_device.shape == images.shape and on_device.device.type == "cuda"
