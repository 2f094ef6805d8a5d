"""BYOL projector / predictor MLPs (Linear - BatchNorm1d - ReLU - Linear), one per scale.

Same block as BYOL, DetCon and the official AnaUS code; written here (a dozen lines) rather than
imported from lightly, which is not a runtime dependency.
"""

from __future__ import annotations

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


def build_projector(*, in_dim: int, hidden_dim: int = 1024, out_dim: int = 256) -> MLPHead:
    """Projector g_s: encoder channels -> ``out_dim`` (official: 512/256 -> 1024 -> 256)."""
    return MLPHead(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)


def build_predictor(*, dim: int = 256, hidden_dim: int = 4096) -> MLPHead:
    """Predictor q_s: ``dim`` -> ``hidden_dim`` -> ``dim`` (official: 256 -> 4096 -> 256)."""
    return MLPHead(in_dim=dim, hidden_dim=hidden_dim, out_dim=dim)
