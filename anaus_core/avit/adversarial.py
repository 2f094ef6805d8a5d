"""The adversarial objective on MIM reconstructions: VQGAN's patch discriminator, hinge losses
and adaptive weight.

* ``PatchDiscriminator``: pix2pix/VQGAN ``NLayerDiscriminator`` (4×4 convs, stride 2, LeakyReLU
  0.2, BatchNorm except first and last layer) giving one logit per overlapping patch.
* ``hinge_d_loss`` (VQGAN's default ``disc_loss="hinge"``) trains the discriminator;
  ``generator_adversarial_loss`` = −mean(D(reconstruction)) trains the generator.
* ``adaptive_weight``: λ = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4), clamped to [0, 1e4] and detached,
  W = the decoder's last layer (VQGAN's ``calculate_adaptive_weight``).

One optimiser trains everything (the interface has one): the discriminator's loss is computed
on detached reconstructions, and the generator's adversarial loss runs the discriminator with
detached parameters (``torch.func.functional_call``), so one backward gives the discriminator
only its own loss's gradient and the generator only its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class PatchDiscriminator(nn.Module):
    """Patch logits of images.

    Args:
        in_channels: C of the images; channels: width of the first conv; layers: strided convs
            after the first.

    Forward: (B, C, H, W) -> (B, 1, H', W') logits (H' ≈ H / 2^layers − 2).
    """

    def __init__(self, *, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for index in range(1, layers + 1):
            previous, width = width, channels * min(2 ** index, 8)
            stride = 2 if index < layers else 1
            modules += [nn.Conv2d(previous, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*modules)
        for module in self.modules():   # VQGAN's weights_init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_patch_discriminator(*, in_channels: int = 3, channels: int = 64, layers: int = 3) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels=in_channels, channels=channels, layers=layers)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 − D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean D(reconstruction)."""
    return -logits_fake.mean()


def frozen_call(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``module(images)`` with its parameters detached: gradients reach ``images`` only. The
    module stays in its mode (VQGAN runs the discriminator in train mode for the generator's
    loss too: BatchNorm normalises with the batch's own statistics)."""
    params = {name: value.detach() for name, value in module.named_parameters()}
    return functional_call(module, params, (images,), strict=False)


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """λ = ‖∂rec/∂W‖ / (‖∂adv/∂W‖ + eps), clamped to [0, max_weight], detached (0-d tensor).

    Both losses must depend on ``last_layer`` through a retained graph.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (adv_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
