"""Weighted k-nearest-neighbour classification on frozen features (the kNN monitor of DINO /
solo-learn): cosine similarity, the ``k`` most similar training items vote with weight
``exp(similarity / temperature)``; the class with the largest summed weight wins."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


@torch.no_grad()
def knn_class_scores(train_features: Tensor, train_labels: Tensor, query_features: Tensor, *, num_classes: int,
                     k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """(N, D) training features with (N,) integer labels, (Q, D) queries -> (Q, num_classes)
    summed vote weights. ``k`` is capped at N; queries are processed ``chunk_size`` at a time so
    the similarity matrix stays (chunk, N)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = max(1, min(int(k), train.shape[0]))
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        similarity = query[start:start + chunk_size] @ train.T                    # (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)                     # (q, k)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[top_index], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes)
    return torch.cat(scores)


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, *, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> Tensor:
    """(Q,) predicted class indices (ties go to the lower class index)."""
    return knn_class_scores(train_features, train_labels, query_features, num_classes=num_classes, k=k,
                            temperature=temperature).argmax(1)


__all__ = ["knn_class_scores", "knn_predict"]
