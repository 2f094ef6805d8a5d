"""BYOL projector / predictor MLPs (Linear - BatchNorm1d - ReLU - Linear), one per scale.

Same block as BYOL, DetCon and the official AnaUS code; written here (a dozen lines) rather than
imported from lightly, which is not a runtime dependency.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLPHead(nn.Module):
    """Linear(in, hidden) - BatchNorm1d(hidden) - ReLU - Linear(hidden, out).

    Input (N, in_dim) -> (N, out_dim). BatchNorm statistics are over the N rows, so callers feed
    only rows that hold a real (non-empty) mask-pooled vector.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def supports_masked(self) -> bool:
        """``forward_masked`` reproduces plain ``BatchNorm1d`` only (not SyncBatchNorm)."""
        norm = self.layers[1]
        return type(norm) is nn.BatchNorm1d and norm.track_running_stats and norm.momentum is not None

    def forward_masked(self, x: Tensor, valid: Tensor) -> Tensor:
        """``forward`` of the rows where ``valid`` (N,) is True, with static shapes.

        Equals running ``forward`` on ``x[valid]`` alone and scattering the result into zero
        rows — BatchNorm statistics (and the running-statistics update) over the valid rows
        only — but computes every row and never asks the host how many rows are valid (a
        data-dependent shape needs ``nonzero``, a host-device synchronisation, and defeats CUDA
        graphs). With fewer than two valid rows all rows are used, as ``forward`` on all rows.
        Input (N, in_dim), valid bool (N,) -> (N, out_dim).
        """
        linear1, norm, relu, linear2 = self.layers
        hidden = linear1(x)
        weight = valid.to(hidden.dtype)
        count = weight.sum()
        use_all = count < 2
        weight = torch.where(use_all, torch.ones_like(weight), weight)
        count = weight.sum()
        if self.training:
            # float32 statistics, as BatchNorm computes them under autocast
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                h32 = hidden.float()
                w32 = weight.float()[:, None]
                mean = (h32 * w32).sum(0) / count
                var = ((h32 - mean).pow(2) * w32).sum(0) / count
                normed = (h32 - mean) * torch.rsqrt(var + norm.eps)
                normed = (normed * norm.weight + norm.bias).to(hidden.dtype)
            with torch.no_grad():
                norm.running_mean.lerp_(mean.detach(), norm.momentum)
                norm.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1.0), norm.momentum)
                norm.num_batches_tracked.add_(1)
        else:
            normed = norm(hidden)
        out = linear2(relu(normed))
        return torch.where(use_all, out, out * weight[:, None].to(out.dtype))


def build_projector(*, in_dim: int, hidden_dim: int = 1024, out_dim: int = 256) -> MLPHead:
    """Projector g_s: encoder channels -> ``out_dim`` (official: 512/256 -> 1024 -> 256)."""
    return MLPHead(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)


def build_predictor(*, dim: int = 256, hidden_dim: int = 4096) -> MLPHead:
    """Predictor q_s: ``dim`` -> ``hidden_dim`` -> ``dim`` (official: 256 -> 4096 -> 256)."""
    return MLPHead(in_dim=dim, hidden_dim=hidden_dim, out_dim=dim)
