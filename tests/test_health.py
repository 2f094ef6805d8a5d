"""Collapse monitors on constructed cases, against a numpy re-derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anaus_core.methods.health import embedding_std, rankme


def _rankme_numpy(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_collapsed_batch_has_rank_one_and_zero_std():
    row = torch.randn(1, 32)
    collapsed = row.repeat(256, 1) * torch.rand(256, 1).add(0.5)   # same direction, any norm
    assert float(rankme(collapsed)) == pytest.approx(1.0, abs=1e-3)
    assert float(embedding_std(collapsed)) == pytest.approx(0.0, abs=1e-4)


def test_full_rank_batch_has_rank_near_its_dimension():
    torch.manual_seed(0)
    embeddings = torch.randn(4096, 32)
    value = float(rankme(embeddings))
    assert 30.0 < value <= 32.0
    assert value == pytest.approx(_rankme_numpy(embeddings.numpy()), rel=1e-4)
    # spread over the sphere: per-dimension std of unit vectors ~ 1/sqrt(D)
    assert float(embedding_std(embeddings)) == pytest.approx(32 ** -0.5, rel=0.05)


def test_weights_leave_rows_out():
    torch.manual_seed(1)
    embeddings = torch.randn(64, 8)
    weights = torch.zeros(64, dtype=torch.bool)
    weights[:20] = True
    embeddings_masked = embeddings.clone()
    embeddings_masked[20:] = 1e3   # garbage in the left-out rows
    assert float(rankme(embeddings_masked, weights)) == pytest.approx(_rankme_numpy(embeddings[:20].numpy()), rel=1e-4)
    assert float(embedding_std(embeddings_masked, weights)) == pytest.approx(float(embedding_std(embeddings[:20])), rel=1e-5)
