"""AViTMethod behind the pre-training interface: EMA teacher, export, training, resume (CPU, micro ViT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anaus_core.avit.backbone import build_vit
from anaus_core.avit.method import AViTMethod
from tests.avit_helpers import tiny_avit_config

CPU = torch.device("cpu")


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    # smooth blobs + speckle: something a decoder can learn to reconstruct
    yy, xx = np.mgrid[0:48, 0:56]
    out = []
    for _ in range(count):
        cy, cx = rng.uniform(10, 38), rng.uniform(10, 46)
        blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 120.0)
        out.append(np.clip(blob + rng.normal(0, 10, blob.shape), 0, 255).astype(np.uint8))
    return out


def _batch(method, step, count=4):
    transform = method.batch_transform(0)
    return transform.build(_images(count, seed=step), [1, 2, 0, 1][:count], list(range(count)), transform.generator(0, step))


def _optimizer(method):
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in method.optimizer_param_groups()]
    return torch.optim.AdamW(groups, lr=1e-3)


def _step(method, optimizer, step, total):
    generator = torch.Generator().manual_seed(1000 + step)
    prepared = method.prepare_batch(_batch(method, step), device=CPU, generator=generator)
    out = method(prepared, generator=generator, step=step, total_steps=total)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    logs = method.after_optimizer_step(step=step, total_steps=total)
    return {k: float(v.detach()) for k, v in out.items()}, logs


def test_teacher_changes_only_by_ema():
    torch.manual_seed(0)
    method = AViTMethod(config=tiny_avit_config())
    optimizer = _optimizer(method)
    teacher_params = list(method.teacher.parameters()) + list(method.teacher_head.parameters())
    assert not any(p.requires_grad for p in teacher_params)
    assert all(id(p) not in {id(q) for g in optimizer.param_groups for q in g["params"]} for p in teacher_params)
    # one step without the EMA hook: the teacher is untouched by backward and the optimiser
    before = [p.detach().clone() for p in teacher_params]
    generator = torch.Generator().manual_seed(0)
    prepared = method.prepare_batch(_batch(method, 0), device=CPU, generator=generator)
    method(prepared, step=0, total_steps=10)["loss"].backward()
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, teacher_params))
    assert all(p.grad is None for p in teacher_params)
    # the hook: teacher = m·teacher + (1 − m)·student, exactly
    student_params = list(method.student.parameters()) + list(method.student_head.parameters())
    student = [p.detach().clone() for p in student_params]
    momentum = method.after_optimizer_step(step=3, total_steps=10)["momentum"]
    assert momentum == pytest.approx(1 - (1 - 0.996) * (np.cos(np.pi * 0.3) + 1) / 2)
    for old, new, online in zip(before, teacher_params, student):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * online, rtol=1e-6, atol=1e-7)


def test_export_loads_into_timm_strictly(tmp_path):
    method = AViTMethod(config=tiny_avit_config())
    paths = method.export(tmp_path)
    assert [p.name for p in paths] == ["encoder.pt", "encoder.json", "acdt.pt"]
    meta = json.loads((tmp_path / "encoder.json").read_text())
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**meta["timm_kwargs"])
    vit.load_state_dict(torch.load(tmp_path / "encoder.pt"), strict=True)
    rebuilt = build_vit(size="micro", img_size=32, patch_size=8)
    rebuilt.load_state_dict(torch.load(tmp_path / "encoder.pt"), strict=True)
    images = torch.randn(2, 3, 32, 32)
    # encoder.pt is the teacher's ViT: same tokens as the teacher's backbone
    torch.testing.assert_close(vit.forward_features(images), method.teacher.vit.forward_features(images))
    side = torch.load(tmp_path / "acdt.pt")
    assert side["categories"] == ["unknown", "liver", "thyroid"] and side["conditioning"] == "acdt"
    # encoder.pt + acdt.pt rebuild the whole anatomy-aware teacher
    from anaus_core.avit.encoder import build_anatomy_vit

    whole = build_anatomy_vit(size="micro", img_size=32, patch_size=8, num_categories=3,
                              conditioning=side["conditioning"], conditioning_after=side["conditioning_after"],
                              offset_groups=side["offset_groups"])
    whole.vit.load_state_dict(torch.load(tmp_path / "encoder.pt"), strict=True)
    missing, unexpected = whole.load_state_dict(side["state_dict"], strict=False)
    assert not unexpected and all(k.startswith("vit.") for k in missing)
    anatomy = torch.tensor([1, 2])
    torch.testing.assert_close(whole(images, anatomy)["tokens"], method.teacher(images, anatomy)["tokens"])


@pytest.mark.parametrize("variant", ["acdt", "none"])
def test_tiny_avit_trains_on_cpu(variant):
    torch.manual_seed(0)
    method = AViTMethod(config=tiny_avit_config(acdt=variant))
    optimizer = _optimizer(method)
    history = [_step(method, optimizer, step, 12)[0] for step in range(12)]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert {"loss", "loss_dino", "loss_mim", "loss_adv", "loss_disc", "adv_lambda", "teacher_entropy"} <= set(history[0])
    assert all(0 <= h["teacher_entropy"] <= np.log(128) + 1e-4 for h in history)
    # the reconstruction improves (every step sees new images and masks: compare averages)
    assert np.mean([h["loss_mim"] for h in history[-4:]]) < np.mean([h["loss_mim"] for h in history[:4]])
    # every trainable parameter got a gradient (no silently dead module)
    dead = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not dead, dead


def test_loss_ablations_remove_terms():
    generator = torch.Generator().manual_seed(0)
    for weights, absent in (({"weight_adv": 0.0, "weight_disc": 0.0}, {"loss_adv", "loss_disc"}),
                            ({"weight_mim": 0.0, "weight_adv": 0.0, "weight_disc": 0.0}, {"loss_mim", "loss_adv"}),
                            ({"weight_dino": 0.0}, {"loss_dino"})):
        method = AViTMethod(config=tiny_avit_config(**weights))
        prepared = method.prepare_batch(_batch(method, 0), device=CPU, generator=generator)
        out = method(prepared, step=0, total_steps=4)
        assert not absent & set(out) and torch.isfinite(out["loss"])
        assert method.has_unused_parameters()
    assert not AViTMethod(config=tiny_avit_config()).has_unused_parameters()
    # the flag matches what actually gets no gradient
    for overrides in ({"mask_ratio": 0.0}, {"acdt": "none", "anatomy_embedding": False}, {"acdt": "none"}):
        method = AViTMethod(config=tiny_avit_config(**overrides))
        prepared = method.prepare_batch(_batch(method, 0), device=CPU, generator=torch.Generator().manual_seed(0))
        method(prepared, step=0, total_steps=4)["loss"].backward()
        unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert bool(unused) == method.has_unused_parameters(), (overrides, unused)


def test_state_dict_round_trip_continues_with_the_same_losses(tmp_path):
    """Minimal loop: 4 steps straight vs 2 steps, state saved/loaded into a fresh method, 2 more."""
    total = 4

    def fresh():
        torch.manual_seed(0)
        method = AViTMethod(config=tiny_avit_config())
        return method, _optimizer(method)

    method, optimizer = fresh()
    straight = [_step(method, optimizer, step, total)[0]["loss"] for step in range(total)]

    method, optimizer = fresh()
    first = [_step(method, optimizer, step, total)[0]["loss"] for step in range(2)]
    torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    torch.manual_seed(123)   # a different process state: nothing may depend on it
    method = AViTMethod(config=tiny_avit_config())
    optimizer = _optimizer(method)
    state = torch.load(tmp_path / "ckpt.pt")
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    resumed = first + [_step(method, optimizer, step, total)[0]["loss"] for step in range(2, total)]
    assert resumed == pytest.approx(straight, rel=1e-5, abs=1e-6)


def test_export_is_read_by_anaus_evaluate(tmp_path):
    """``anaus evaluate --encoder avit=encoder.pt`` recognises the export as a timm ViT and its
    features are the teacher's CLS token."""
    from anaus_core.evaluate.backbones import build_backbone
    from anaus_core.evaluate.encoders import EncoderSpec, load_encoder

    method = AViTMethod(config=tiny_avit_config())
    method.export(tmp_path)
    weights = load_encoder(EncoderSpec("avit", tmp_path / "encoder.pt"))
    assert weights.kind == "vit"
    backbone = build_backbone(weights).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(images), method.teacher.vit.forward_features(images)[:, 0])
