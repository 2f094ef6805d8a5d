"""Collapse and health monitors of self-supervised embeddings (pure functions of tensors).

* ``embedding_std``: the mean over dimensions of the per-dimension standard deviation of the
  L2-normalised embeddings (SimSiam's collapse indicator): about 1/sqrt(D) for embeddings spread
  over the sphere, 0 when every row is the same vector.
* ``rankme``: RankMe (Garrido et al., ICML 2023), the effective rank exp(H(p)) of the embedding
  matrix with p_k = σ_k / Σσ + ε from its singular values: 1 for a rank-one (collapsed) batch, up
  to min(N, D) for a full-rank one.

Both take optional row weights in {0, 1} (valid rows): a zero-weight row counts nowhere. They run
in float32 without autocast and never synchronise with the host; read them at log steps only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Garrido et al.'s epsilon in p_k = σ_k / ||σ||_1 + ε
RANKME_EPSILON = 1e-7


def _weights(embeddings: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return torch.ones(embeddings.shape[0], device=embeddings.device, dtype=torch.float32)
    return weights.reshape(-1).float()


@torch.no_grad()
def embedding_std(embeddings: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean per-dimension std of the L2-normalised rows of ``embeddings`` (N, D) -> 0-d float32."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        rows = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]).float(), dim=-1)
        w = _weights(rows, weights)[:, None]
        count = w.sum().clamp_min(1.0)
        mean = (rows * w).sum(0) / count
        var = ((rows - mean).pow(2) * w).sum(0) / (count - 1).clamp_min(1.0)
        return var.sqrt().mean()


@torch.no_grad()
def rankme(embeddings: Tensor, weights: Tensor | None = None, epsilon: float = RANKME_EPSILON) -> Tensor:
    """RankMe effective rank of ``embeddings`` (N, D) (zero-weight rows left out) -> 0-d float32."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        rows = embeddings.reshape(-1, embeddings.shape[-1]).float() * _weights(embeddings, weights)[:, None]
        # zero rows add nothing to the singular values, so masking equals selecting the rows
        singular = torch.linalg.svdvals(rows)
        p = singular / singular.sum().clamp_min(torch.finfo(torch.float32).tiny) + epsilon
        return torch.exp(-(p * torch.log(p)).sum())
