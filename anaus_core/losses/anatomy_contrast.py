"""Anatomy-level contrastive loss L_ana at one scale (paper eq. 5): DetCon-B InfoNCE.

Same formulation as DeepMind ``byol_nce_detcon`` and ``lightly.loss.DetConBLoss`` (see
``docs/objectives.md``), with one extension for masks that are empty in a view:

* row (b, r) of view 1 = online prediction of mask ``ids1[b, r]``; its positives are the view-2
  *target* entries of the same image with the same id (several if the id was drawn more than
  once: soft labels 1/#positives); its negatives are every other (image, mask) target of the
  global batch in *both* views, with the same-view same-image same-id entries removed (logit
  -1e9, label 0);
* row weight = 1[#positives > 0] / #{s : ids1[b, s] = ids1[b, r]} (duplicate draws share one
  unit of weight); the loss of a view is the mean of weight x cross-entropy over all B*K local
  rows (rows with no positive count in the mean with weight 0, as DeepMind);
* ``valid1/valid2`` (B, K) mark entries whose mask is non-empty in that view at this scale. An
  invalid entry is removed everywhere: as a row (weight 0), as a column (logit -1e9, label 0).
  With every entry valid the loss equals DeepMind's / lightly's exactly.

Targets are gathered across ranks with ``torch.distributed.all_gather`` when a process group is
initialised (identity otherwise), or passed in already gathered for the whole optimiser step
(``global_targets``: gradient accumulation keeps the global batch's negatives); no gradient
flows through targets. The loss is computed in
float32 with autocast disabled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

#: stand-in for -inf on removed logits (DeepMind's value); finite so 0 * logit stays 0
_INFINITY_PROXY = 1e9


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def gather_across_ranks(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (identity in a single process).

    No gradient: used for target-network outputs only. Every rank must pass the same shape.
    """
    world_size, _ = _world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _one_direction(
    pred: Tensor,
    ids_pred: Tensor,
    valid_pred: Tensor,
    targets_other: Tensor,
    ids_other: Tensor,
    valid_other_global: Tensor,
    targets_same: Tensor,
    valid_same_global: Tensor,
    own_image: Tensor,
    temperature: float,
) -> Tensor:
    """Mean weighted cross-entropy of ``pred`` rows against [other view | same view] targets.

    pred (B, K, D) normalised; targets_* (B*W, K, D) normalised; valid_*_global (B*W, K);
    ids_pred, ids_other (B, K) local ids of this and the other view; own_image (B, B*W) one-hot
    of each local image's global index.
    """
    batch, num_masks, _ = pred.shape
    logits_other = torch.einsum("brd,jsd->brjs", pred, targets_other) / temperature
    logits_same = torch.einsum("brd,jsd->brjs", pred, targets_same) / temperature

    own = own_image[:, None, :, None]  # (B, 1, BW, 1)
    same_id_other = (ids_pred[:, :, None] == ids_other[:, None, :]).float()[:, :, None, :]  # (B,K,1,K)
    same_id_self = (ids_pred[:, :, None] == ids_pred[:, None, :]).float()[:, :, None, :]
    labels_other = own * same_id_other * valid_other_global[None, None].float()
    self_matches = own * same_id_self

    dead_other = (~valid_other_global)[None, None].float()
    dead_same = torch.clamp(self_matches + (~valid_same_global)[None, None].float(), max=1.0)
    logits_other = logits_other - _INFINITY_PROXY * dead_other
    logits_same = logits_same - _INFINITY_PROXY * dead_same

    logits = torch.cat([logits_other, logits_same], dim=2).reshape(batch, num_masks, -1)
    labels = torch.cat([labels_other, torch.zeros_like(logits_same)], dim=2).reshape(batch, num_masks, -1)
    num_positives = labels.sum(dim=-1)
    labels = labels / num_positives.clamp_min(1.0).unsqueeze(-1)
    duplicates = same_id_self.squeeze(2).sum(dim=-1)  # (B, K), >= 1
    weights = (num_positives > 1e-3).float() * valid_pred.float() / duplicates
    cross_entropy = -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return (weights * cross_entropy).mean()


def anatomy_contrastive_loss(
    pred1: Tensor,
    pred2: Tensor,
    target1: Tensor,
    target2: Tensor,
    ids1: Tensor,
    ids2: Tensor,
    valid1: Tensor | None = None,
    valid2: Tensor | None = None,
    *,
    temperature: float = 0.1,
    symmetric: bool = True,
    gather: bool = True,
    global_targets: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    image_offset: int = 0,
) -> Tensor:
    """DetCon-B InfoNCE between mask-pooled predictions and targets of two views.

    Args:
        pred1, pred2: online predictions (B, K, D) of view 1 / 2.
        target1, target2: target projections (B, K, D) of view 1 / 2 (detached here); ignored
            when ``global_targets`` is given.
        ids1, ids2: int (B, K) mask ids per view (AnaUS passes the same tensor twice).
        valid1, valid2: bool (B, K), entries with a non-empty mask (default: all valid).
        temperature: tau in eq. 5.
        symmetric: ``loss_a + loss_b`` (l + l~); False keeps only view 1 -> view 2 (``loss_a``).
        gather: gather targets (and validity) across ranks when distributed.
        global_targets: ``(T1, T2, V1, V2)``, the target projections (N, K, D) and validity
            (N, K) of the whole global batch — every micro-batch of the optimiser step on every
            rank, already gathered — whose rows ``image_offset .. image_offset + B`` are this
            micro-batch's images. The negatives are then the global batch's, as the paper
            describes, also under gradient accumulation. No gather is done here.
        image_offset: global index of this micro-batch's first image in ``global_targets``.

    Returns:
        Scalar float32 loss.
    """
    if pred1.shape != pred2.shape or (global_targets is None and (pred1.shape != target1.shape
                                                                   or pred1.shape != target2.shape)):
        raise ValueError("anatomy_contrastive_loss: predictions and targets must all be (B, K, D)")
    if valid1 is None:
        valid1 = torch.ones(ids1.shape, dtype=torch.bool, device=pred1.device)
    if valid2 is None:
        valid2 = torch.ones(ids2.shape, dtype=torch.bool, device=pred1.device)
    device_type = pred1.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        pred1 = F.normalize(pred1.float(), dim=-1)
        pred2 = F.normalize(pred2.float(), dim=-1)
        batch = pred1.shape[0]
        if global_targets is not None:
            target1_all, target2_all, valid1_all, valid2_all = global_targets
            target1_all = F.normalize(target1_all.detach().float(), dim=-1)
            target2_all = F.normalize(target2_all.detach().float(), dim=-1)
            valid1_all, valid2_all = valid1_all.bool(), valid2_all.bool()
            columns, first = target1_all.shape[0], int(image_offset)
            if target1_all.shape[1:] != pred1.shape[1:] or first < 0 or first + batch > columns:
                raise ValueError("anatomy_contrastive_loss: global_targets do not hold this micro-batch")
        else:
            target1 = F.normalize(target1.detach().float(), dim=-1)
            target2 = F.normalize(target2.detach().float(), dim=-1)
            world_size, rank = _world() if gather else (1, 0)
            if world_size > 1:
                targets = gather_across_ranks(torch.stack([target1, target2], dim=1))  # (BW, 2, K, D)
                valids = gather_across_ranks(torch.stack([valid1, valid2], dim=1).to(torch.uint8)).bool()
                target1_all, target2_all = targets[:, 0], targets[:, 1]
                valid1_all, valid2_all = valids[:, 0], valids[:, 1]
            else:
                target1_all, target2_all, valid1_all, valid2_all = target1, target2, valid1, valid2
            columns, first = batch * world_size, rank * batch
        global_index = torch.arange(batch, device=pred1.device) + first
        own_image = F.one_hot(global_index, num_classes=columns).float()
        # ids are only compared within one image (positives and self-matches need j == own
        # image), so other images' ids are never needed: the local ids of the other view suffice
        loss = _one_direction(
            pred1, ids1, valid1, target2_all, ids2, valid2_all, target1_all, valid1_all,
            own_image, temperature,
        )
        if symmetric:
            loss = loss + _one_direction(
                pred2, ids2, valid2, target1_all, ids1, valid1_all, target2_all, valid2_all,
                own_image, temperature,
            )
    return loss
