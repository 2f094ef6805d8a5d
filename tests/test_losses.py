"""L_ana against two independent references (lightly ``DetConBLoss`` and a numpy re-derivation of
DeepMind's ``byol_nce_detcon``), the cross-rank gather path, mask pooling, L_ctx and BYOL."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anaus_core.losses import (
    anatomy_contrastive_loss,
    byol_regression_loss,
    context_prediction_loss,
    downsample_masks,
    mask_pool,
    symmetric_byol_loss,
)


# ---------------------------------------------------------------------------------------------
# numpy reference: DeepMind detcon ``utils/losses.py::byol_nce_detcon`` re-derived from its
# written formulation (one row at a time, removed columns dropped instead of set to -1e9).
# Validity extension: an entry invalid in a view is neither a row nor a column of that view.
# ---------------------------------------------------------------------------------------------
def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_direction(p, ids_p, valid_p, t_other, ids_other, valid_other, t_same, valid_same, tau, offset):
    """Mean over local rows of weight x soft cross-entropy. t_*/valid_other/valid_same hold the
    global batch; ids_* are the local images' ids; local image i has global index offset + i."""
    batch, masks, _ = p.shape
    global_batch = t_other.shape[0]
    total = 0.0
    for i in range(batch):
        g = offset + i
        for r in range(masks):
            logits, labels = [], []
            for targets, target_ids, target_valid, same_view in (
                (t_other, ids_other, valid_other, False),
                (t_same, ids_p, valid_same, True),
            ):
                for j in range(global_batch):
                    for s in range(masks):
                        if not target_valid[j, s]:
                            continue  # empty mask in that view: not a column
                        # ids are compared only within the own image (global index g)
                        same_region = j == g and target_ids[i, s] == ids_p[i, r]
                        if same_view and same_region:
                            continue  # trivial self-match removed
                        logits.append(float(np.dot(p[i, r], targets[j, s])) / tau)
                        labels.append(1.0 if (same_region and not same_view) else 0.0)
            logits = np.array(logits)
            labels = np.array(labels)
            positives = labels.sum()
            log_softmax = logits - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
            cross_entropy = -np.sum(labels / max(positives, 1.0) * log_softmax)
            duplicates = int(np.sum(ids_p[i] == ids_p[i, r]))
            weight = float(positives > 0) * float(valid_p[i, r]) / duplicates
            total += weight * cross_entropy
    return total / (batch * masks)


def numpy_detcon_b(p1, p2, t1, t2, ids1, ids2, valid1=None, valid2=None, *, tau=0.1, symmetric=True,
                   t1_all=None, t2_all=None, valid1_all=None, valid2_all=None, offset=0):
    p1, p2 = _normalise(p1.astype(np.float64)), _normalise(p2.astype(np.float64))
    t1_all = _normalise((t1 if t1_all is None else t1_all).astype(np.float64))
    t2_all = _normalise((t2 if t2_all is None else t2_all).astype(np.float64))
    valid1 = np.ones(ids1.shape, bool) if valid1 is None else valid1
    valid2 = np.ones(ids2.shape, bool) if valid2 is None else valid2
    valid1_all = valid1 if valid1_all is None else valid1_all
    valid2_all = valid2 if valid2_all is None else valid2_all
    loss = _numpy_direction(p1, ids1, valid1, t2_all, ids2, valid2_all, t1_all, valid1_all, tau, offset)
    if symmetric:
        loss += _numpy_direction(p2, ids2, valid2, t1_all, ids1, valid1_all, t2_all, valid2_all, tau, offset)
    return loss


def _random_inputs(seed, batch=4, masks=5, dim=8, num_ids=4):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, masks, dim, generator=g) for _ in range(4)]
    ids1 = torch.randint(0, num_ids, (batch, masks), generator=g)
    ids2 = torch.randint(0, num_ids, (batch, masks), generator=g)
    return tensors, ids1, ids2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anatomy_loss_matches_lightly_detconb(seed):
    from lightly.loss import DetConBLoss

    (p1, p2, t1, t2), ids1, ids2 = _random_inputs(seed)
    ours = anatomy_contrastive_loss(p1, p2, t1, t2, ids1, ids2, temperature=0.1)
    reference = DetConBLoss(temperature=0.1, gather_distributed=False)(p1, p2, t1, t2, ids1, ids2)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours.item(), reference.item())
    # shared ids (the AnaUS case: one mask_ids tensor for both views)
    ours = anatomy_contrastive_loss(p1, p2, t1, t2, ids1, ids1, temperature=0.2)
    reference = DetConBLoss(temperature=0.2, gather_distributed=False)(p1, p2, t1, t2, ids1, ids1)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_anatomy_loss_matches_numpy_deepmind(symmetric):
    (p1, p2, t1, t2), ids1, ids2 = _random_inputs(3)
    ours = anatomy_contrastive_loss(p1, p2, t1, t2, ids1, ids2, temperature=0.1, symmetric=symmetric)
    reference = numpy_detcon_b(*(x.numpy() for x in (p1, p2, t1, t2, ids1, ids2)), tau=0.1, symmetric=symmetric)
    assert abs(ours.item() - reference) < 1e-5, (ours.item(), reference)


def test_anatomy_loss_invalid_entries_match_numpy_reference():
    (p1, p2, t1, t2), ids1, _ = _random_inputs(4, batch=3, masks=6)
    g = torch.Generator().manual_seed(7)
    valid1 = torch.rand(ids1.shape, generator=g) > 0.3
    valid2 = torch.rand(ids1.shape, generator=g) > 0.3
    ours = anatomy_contrastive_loss(p1, p2, t1, t2, ids1, ids1, valid1, valid2)
    reference = numpy_detcon_b(*(x.numpy() for x in (p1, p2, t1, t2, ids1, ids1)), valid1.numpy(), valid2.numpy())
    assert abs(ours.item() - reference) < 1e-5, (ours.item(), reference)
    # an invalid entry's vectors must not matter at all (they are zero in the model)
    p1_changed, t2_changed = p1.clone(), t2.clone()
    p1_changed[~valid1] = 123.0
    t2_changed[~valid2] = -7.0
    again = anatomy_contrastive_loss(p1_changed, p2, t1, t2_changed, ids1, ids1, valid1, valid2)
    assert torch.allclose(ours, again, atol=1e-6)


def test_anatomy_loss_gradients_reach_predictions_only():
    (p1, p2, t1, t2), ids1, _ = _random_inputs(5)
    for x in (p1, p2, t1, t2):
        x.requires_grad_(True)
    anatomy_contrastive_loss(p1, p2, t1, t2, ids1, ids1).backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None


def test_anatomy_loss_under_bf16_autocast_is_float32():
    (p1, p2, t1, t2), ids1, _ = _random_inputs(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = anatomy_contrastive_loss(p1.bfloat16(), p2.bfloat16(), t1.bfloat16(), t2.bfloat16(), ids1, ids1)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------
# gather path: 2 processes (gloo) == one process on the concatenated batch
# ---------------------------------------------------------------------------------------------
def _gather_worker(rank: int, world_size: int, init_file: str, inputs: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        half = inputs["p1"].shape[0] // world_size
        part = {k: v[rank * half:(rank + 1) * half].clone() for k, v in inputs.items()}
        p1 = part["p1"].requires_grad_(True)
        p2 = part["p2"].requires_grad_(True)
        loss = anatomy_contrastive_loss(
            p1, p2, part["t1"], part["t2"], part["ids"], part["ids"], part["v1"], part["v2"], temperature=0.1
        )
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": p1.grad, "g2": p2.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_two_process_gloo_equals_single_process():
    import torch.multiprocessing as mp

    (p1, p2, t1, t2), ids, _ = _random_inputs(8, batch=4, masks=3, dim=6)
    g = torch.Generator().manual_seed(9)
    v1 = torch.rand(ids.shape, generator=g) > 0.2
    v2 = torch.rand(ids.shape, generator=g) > 0.2
    inputs = {"p1": p1, "p2": p2, "t1": t1, "t2": t2, "ids": ids, "v1": v1, "v2": v2}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        # fork: the children reuse this process's imported torch (spawn re-imports it, ~10 s here)
        mp.start_processes(_gather_worker, args=(2, init_file, inputs, tmp), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    p1s, p2s = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    single = anatomy_contrastive_loss(p1s, p2s, t1, t2, ids, ids, v1, v2, temperature=0.1)
    single.backward()
    # DDP averages the ranks' losses/gradients: mean over ranks == loss on the whole batch
    mean_loss = (results[0]["loss"] + results[1]["loss"]) / 2
    assert torch.allclose(mean_loss, single.detach(), atol=1e-6), (mean_loss.item(), single.item())
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    grads1 = torch.cat([results[0]["g1"], results[1]["g1"]]) / 2
    grads2 = torch.cat([results[0]["g2"], results[1]["g2"]]) / 2
    assert torch.allclose(grads1, p1s.grad, atol=1e-6)
    assert torch.allclose(grads2, p2s.grad, atol=1e-6)
    # and rank 1's loss is the numpy reference with its images at global offset 2
    reference = numpy_detcon_b(
        p1[2:].numpy(), p2[2:].numpy(), t1[2:].numpy(), t2[2:].numpy(), ids[2:].numpy(), ids[2:].numpy(),
        v1[2:].numpy(), v2[2:].numpy(), t1_all=t1.numpy(), t2_all=t2.numpy(), valid1_all=v1.numpy(),
        valid2_all=v2.numpy(), offset=2,
    )
    assert abs(results[1]["loss"].item() - reference) < 1e-5


# ---------------------------------------------------------------------------------------------
# mask pooling, L_ctx, BYOL
# ---------------------------------------------------------------------------------------------
def test_mask_pooling_is_area_weighted_mean_and_validity_per_scale():
    features = torch.randn(1, 3, 4, 4)
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, :8, :8] = 1  # exactly the 2x2 top-left cells
    masks[0, 1, 0, 0] = 1    # one pixel = 1/16 of one cell
    cells = downsample_masks(masks, (4, 4))
    assert torch.allclose(cells[0, 0].sum(), torch.tensor(4.0))
    assert cells[0, 1, 0, 0].item() == pytest.approx(1 / 16)
    pooled, valid = mask_pool(features, cells)
    assert torch.allclose(pooled[0, 0], features[0, :, :2, :2].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(pooled[0, 1], features[0, :, 0, 0], atol=1e-6)
    assert valid.tolist() == [[True, True, False]] and pooled[0, 2].abs().sum() == 0
    # validity is decided per scale: one pixel of a 224 px crop is 1/1024 of a C5 cell (below
    # the 1e-3 threshold) but 1/16 of a P2 cell
    big = torch.zeros(1, 1, 224, 224)
    big[0, 0, 5, 5] = 1
    _, valid7 = mask_pool(torch.randn(1, 2, 7, 7), downsample_masks(big, (7, 7)))
    _, valid56 = mask_pool(torch.randn(1, 2, 56, 56), downsample_masks(big, (56, 56)))
    assert not valid7.item() and valid56.item()


def test_context_loss_is_per_location_normalised_mse():
    g = torch.Generator().manual_seed(0)
    online = torch.randn(3, 5, 2, 2, generator=g, requires_grad=True)
    target = torch.randn(3, 5, 2, 2, generator=g, requires_grad=True)
    loss = context_prediction_loss(online, target)
    cos = F.cosine_similarity(online, target, dim=1)
    assert torch.allclose(loss, (2 - 2 * cos).mean(), atol=1e-6)
    assert context_prediction_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    # scale invariance per location, and valid selects images
    assert torch.allclose(context_prediction_loss(online * 3.0, target), loss, atol=1e-6)
    valid = torch.tensor([True, False, True])
    assert torch.allclose(context_prediction_loss(online, target, valid), (2 - 2 * cos)[[0, 2]].mean(), atol=1e-6)
    none = context_prediction_loss(online, target, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    loss.backward()
    assert online.grad is not None and target.grad is None


def test_byol_loss_hand_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert byol_regression_loss(a, b).item() == pytest.approx((0.0 + 2.0) / 2)
    assert symmetric_byol_loss(a, a, b, b).item() == pytest.approx(2.0)
    assert symmetric_byol_loss(a, a, b, b, symmetric=False).item() == pytest.approx(1.0)
