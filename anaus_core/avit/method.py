"""A-ViT as a pre-training method: DINO self-distillation + MIM + adaptive adversarial loss.

One forward (one micro-batch of B images, 2 global crops of G px + n local crops of L px)::

    student(global crops, anatomy, MIM mask) ──► CLS ─► student head ──┐
    student(local crops, anatomy)            ──► CLS ─► student head ──┤ DINO loss (lightly)
    teacher(global crops, anatomy) [no grad] ──► CLS ─► teacher head ──┘ (centred, sharpened)
    student global patch tokens ─► pixel decoder ─► masked MSE against the crop's patches
    reconstruction (masked patches predicted, visible ones copied) ─► discriminator:
        generator term −mean D(rec) × adaptive λ (VQGAN), discriminator hinge on real vs rec

    loss = w_dino·L_dino + w_mim·L_mim + w_adv·λ·L_G + w_disc·L_D

The teacher (encoder + head) is an EMA of the student, updated once per optimiser step in
``after_optimizer_step`` with DINO's cosine momentum schedule; it is what ``export`` writes (DINO
and iBOT evaluate the teacher).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from anaus_core.augment.device import DeviceAugmentConfig, normalize_gray
from anaus_core.augment.photometric import PhotometricConfig, apply_params, sample_params
from anaus_core.avit.adversarial import (
    adaptive_weight,
    build_patch_discriminator,
    frozen_call,
    generator_adversarial_loss,
    hinge_d_loss,
)
from anaus_core.avit.backbone import VIT_DIMENSIONS, vit_kwargs
from anaus_core.avit.config import AViTConfig
from anaus_core.avit.dino import build_dino_head, build_dino_loss, teacher_temperature
from anaus_core.avit.encoder import build_anatomy_vit
from anaus_core.avit.mim import build_pixel_decoder, masked_mse, patchify, random_patch_mask, unpatchify
from anaus_core.avit.multicrop import MultiCropTransform
from anaus_core.models.ema import ema_update_
from anaus_core.optim.schedules import cosine_momentum

from anaus_core.methods.base import PretrainMethod

ENCODER_FILENAME = "encoder.pt"
ENCODER_META_FILENAME = "encoder.json"
ACDT_FILENAME = "acdt.pt"

#: timm model names whose architecture equals a (size, 224 px, patch 16) A-ViT encoder
TIMM_NAMES = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224"}


def local_view_config() -> PhotometricConfig:
    """DINO's local crops: colour jitter 0.8, blur 0.5, no solarisation."""
    return PhotometricConfig(blur_p=0.5, solarize_p=0.0)


class AViTMethod(PretrainMethod):
    """A-ViT behind the pre-training method interface.

    Args (keyword-only):
        config: the A-ViT settings (``PretrainConfig.avit``).
        augment: mean/std and the photometric switch (``PretrainConfig.augment``; its view1 /
            view2 settings are used for the two global crops, DINO's local setting for the rest).
        weight_decay: weight decay of the weight group (biases/norms get none).
        seed: seed of the loader's crop draws (``batch_transform``).
    """

    name: ClassVar[str] = "avit"

    def __init__(self, *, config: AViTConfig, augment: DeviceAugmentConfig | None = None,
                 weight_decay: float = 0.04, seed: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.augment_config = augment if augment is not None else DeviceAugmentConfig()
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        crops = config.crops
        self.student = build_anatomy_vit(
            size=config.size, img_size=crops.global_size, patch_size=config.patch_size,
            num_categories=config.num_categories, conditioning=config.acdt, conditioning_after=config.acdt_after,
            add_anatomy_embedding=config.anatomy_embedding, kernel_size=config.acdt_kernel,
            offset_groups=config.acdt_offset_groups, lora_rank=config.lora_rank)
        dim = self.student.embed_dim
        self.student_head = build_dino_head(input_dim=dim, hidden_dim=config.head_hidden_dim,
                                            bottleneck_dim=config.head_bottleneck_dim, output_dim=config.head_output_dim)
        self.teacher = copy.deepcopy(self.student)
        # lightly's head uses weight_norm, which deepcopy cannot copy: build a twin and load
        self.teacher_head = build_dino_head(input_dim=dim, hidden_dim=config.head_hidden_dim,
                                            bottleneck_dim=config.head_bottleneck_dim, output_dim=config.head_output_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for parameter in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            parameter.requires_grad_(False)
        self.dino_loss = build_dino_loss(output_dim=config.head_output_dim, teacher_temp=config.teacher_temp,
                                         student_temp=config.student_temp, center_momentum=config.center_momentum)
        grid = crops.global_size // config.patch_size
        self.decoder = build_pixel_decoder(input_dim=dim, dim=config.decoder_dim, depth=config.decoder_depth,
                                           num_heads=config.decoder_heads, patch_size=config.patch_size, channels=3,
                                           num_patches=grid * grid)
        self.discriminator = build_patch_discriminator(in_channels=3, channels=config.disc_channels,
                                                       layers=config.disc_layers)
        self._photometric = (self.augment_config.view1, self.augment_config.view2, local_view_config())
        # the run length, for the teacher-temperature schedule: the trainer passes it to
        # after_optimizer_step only, so it is remembered (and checkpointed: get_extra_state)
        self._total_steps = 0

    def get_extra_state(self) -> dict:
        return {"total_steps": self._total_steps}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self._total_steps = int(state.get("total_steps", 0))

    def teacher_temperature(self, step: int, total_steps: int | None = None) -> float:
        """DINO's schedule at ``step``; before the run length is known (step 0 of a fresh run)
        the warm-up's start value."""
        config = self.config
        total = int(total_steps or self._total_steps)
        if total <= 0:
            return float(config.warmup_teacher_temp if config.warmup_teacher_temp_fraction > 0 else config.teacher_temp)
        return teacher_temperature(step, total_steps=total, warmup_fraction=config.warmup_teacher_temp_fraction,
                                   start=config.warmup_teacher_temp, end=config.teacher_temp)

    # -- interface ------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[dict]:
        from anaus_core.optim import param_groups_excluding_norm_and_bias

        groups = param_groups_excluding_norm_and_bias(self, weight_decay=self.weight_decay)
        return [{**group, "lars_exclude": not group.pop("lars_adaptation")} for group in groups]

    def batch_transform(self, seed: int | None = None) -> MultiCropTransform:  # type: ignore[override]
        """The loader's picklable multi-crop transform (``shards.stream.PretrainBatchTransform``'s signature)."""
        return MultiCropTransform(self.config.crops, categories=self.config.categories,
                                  seed=self.seed if seed is None else seed)

    def has_unused_parameters(self) -> bool:
        config = self.config
        # before adv_start_step (or with a loss removed) whole modules get no gradient; without
        # masking the mask token is unused, without any conditioning the anatomy table is
        return (config.adv_start_step > 0 or config.weight_adv == 0 or config.weight_disc == 0
                or config.weight_mim == 0 or config.weight_dino == 0 or config.mask_ratio == 0
                or (config.acdt == "none" and not config.anatomy_embedding))

    def prepare_batch(self, batch: Mapping[str, Tensor], *, device: torch.device,
                      generator: torch.Generator) -> dict[str, Tensor]:
        """Multi-crop batch -> normalised float crops on ``device`` + the MIM masks.

        Returns ``global`` (2B, 3, G, G) (crop 1 of every image, then crop 2), ``local``
        (n·B, 3, L, L) (local crop j of every image in block j), ``anatomy`` (B,),
        ``mim_mask`` bool (2B, G/p, G/p). ``generator`` (on ``device``) decides every draw.
        """
        device = torch.device(device)
        non_blocking = device.type == "cuda"
        config, augment = self.config, self.augment_config
        crops = batch["global"].to(device, non_blocking=non_blocking)      # (B, 2, 1, G, G) uint8
        locals_ = batch["local"].to(device, non_blocking=non_blocking)     # (B, n, 1, L, L)
        size = crops.shape[0]
        views = []
        for index in range(2):
            views.append(self._photometric_view(crops[:, index], self._photometric[index], generator, device))
        local_views = [self._photometric_view(locals_[:, index], self._photometric[2], generator, device)
                       for index in range(locals_.shape[1])]
        grid = crops.shape[-1] // config.patch_size
        out = {
            "global": torch.cat(views),
            "anatomy": batch["anatomy"].to(device, non_blocking=non_blocking).long(),
            "mim_mask": random_patch_mask(2 * size, (grid, grid), config.mask_ratio, generator=generator, device=device),
        }
        out["local"] = torch.cat(local_views) if local_views else crops.new_zeros((0, 3, 1, 1), dtype=torch.float32)
        if "index" in batch:
            out["index"] = batch["index"].to(device, non_blocking=non_blocking)
        return out

    def _photometric_view(self, images: Tensor, photometric: PhotometricConfig, generator: torch.Generator,
                          device: torch.device) -> Tensor:
        images = images.float().div_(255.0)
        if self.augment_config.photometric:
            params = sample_params(images.shape[0], photometric, generator=generator, device=device)
            images = apply_params(images, params, photometric)
        return normalize_gray(images, self.augment_config.mean, self.augment_config.std)

    def forward(self, prepared: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                step: int = 0, total_steps: int | None = None) -> dict[str, Tensor]:
        config = self.config
        globals_, locals_, anatomy = prepared["global"], prepared["local"], prepared["anatomy"]
        batch = anatomy.shape[0]
        anatomy_global = anatomy.repeat(2)
        use_mim = config.weight_mim > 0
        mask = prepared["mim_mask"] if use_mim and config.mask_ratio > 0 else None
        student_global = self.student(globals_, anatomy_global, mask)
        zero = globals_.new_zeros(())
        out: dict[str, Tensor] = {}
        loss = zero
        if config.weight_dino > 0:
            student_cls = [student_global["cls"]]
            if locals_.shape[0]:
                student_cls.append(self.student(locals_, anatomy.repeat(locals_.shape[0] // batch))["cls"])
            student_out = self.student_head(torch.cat(student_cls)).float().chunk(2 + locals_.shape[0] // batch)
            with torch.no_grad():
                teacher_out = self.teacher_head(self.teacher(globals_, anatomy_global)["cls"]).float().chunk(2)
            temperature = self.teacher_temperature(step, total_steps)
            with torch.no_grad():  # collapse monitor: ~0 = one prototype wins, log K = uniform
                centred = (torch.stack(teacher_out) - self.dino_loss.center) / temperature
                out["teacher_entropy"] = torch.special.entr(centred.softmax(dim=-1)).sum(dim=-1).mean()
            loss_dino = self.dino_loss(list(teacher_out), list(student_out), teacher_temp=temperature)
            out["loss_dino"] = loss_dino.detach()
            out["teacher_temp"] = zero.detach() + temperature
            loss = loss + config.weight_dino * loss_dino
        if use_mim:
            patch = config.patch_size
            prediction = self.decoder(student_global["patches"]).float()          # (2B, N, p²·3)
            target = patchify(globals_.float(), patch)
            full_mask = mask if mask is not None else torch.ones(prediction.shape[:2], dtype=torch.bool, device=prediction.device)
            loss_mim = masked_mse(prediction, target, full_mask, norm_pix=config.norm_pix_loss)
            out["loss_mim"] = loss_mim.detach()
            loss = loss + config.weight_mim * loss_mim
            adversarial = step >= config.adv_start_step and (config.weight_adv > 0 or config.weight_disc > 0)
            if adversarial:
                flat_mask = full_mask.reshape(full_mask.shape[0], -1, 1)
                # the discriminator judges the predicted patches in their real context
                composite = torch.where(flat_mask, prediction, target)
                reconstruction = unpatchify(composite, patch, student_global["grid"], 3)
                if config.weight_adv > 0:
                    loss_gen = generator_adversarial_loss(frozen_call(self.discriminator, reconstruction).float())
                    if torch.is_grad_enabled():
                        lam = adaptive_weight(loss_mim, loss_gen, self.decoder.last_layer,
                                              max_weight=config.adaptive_lambda_max) * config.adv_weight
                    else:  # evaluation without a graph: no gradient norms to compare
                        lam = zero.detach() + config.adv_weight
                    out["loss_adv"] = loss_gen.detach()
                    out["adv_lambda"] = lam
                    loss = loss + config.weight_adv * lam * loss_gen
                if config.weight_disc > 0:
                    logits_real = self.discriminator(globals_.detach())
                    logits_fake = self.discriminator(reconstruction.detach())
                    loss_disc = hinge_d_loss(logits_real.float(), logits_fake.float())
                    out["loss_disc"] = loss_disc.detach()
                    loss = loss + config.weight_disc * loss_disc
        out["loss"] = loss
        return out

    def before_optimizer_step(self, *, step: int) -> None:
        """DINO's ``cancel_gradients_last_layer``: for the first ``freeze_last_layer_steps`` steps the
        student head's prototype layer gets no gradient (so AdamW leaves it, decay included,
        untouched), which DINO found to stabilise the start of training."""
        if step < self.config.freeze_last_layer_steps:
            for parameter in self.student_head.last_layer.parameters():
                parameter.grad = None

    def after_optimizer_step(self, *, step: int, total_steps: int) -> dict[str, float]:
        """Teacher <- EMA of the student (encoder and head), DINO's cosine momentum."""
        self._total_steps = int(total_steps)
        momentum = float(cosine_momentum(step, total_steps, base=self.config.ema_base))
        ema_update_(self.teacher, self.student, momentum)
        ema_update_(self.teacher_head, self.student_head, momentum)
        return {"momentum": momentum}

    def export(self, out_dir: Path) -> list[Path]:
        """``encoder.pt``: the teacher's timm ViT state dict (loads into ``build_vit(...)`` or the
        matching ``timm.create_model`` strictly); ``encoder.json``: how to build that ViT;
        ``acdt.pt``: the teacher's anatomy embedding, mask token and conditioning blocks with
        the settings needed to rebuild the ``AnatomyViT`` around ``encoder.pt``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = self.config
        encoder_path, meta_path, acdt_path = out_dir / ENCODER_FILENAME, out_dir / ENCODER_META_FILENAME, out_dir / ACDT_FILENAME
        torch.save({k: v.detach().cpu().clone() for k, v in self.teacher.vit.state_dict().items()}, encoder_path)
        kwargs = vit_kwargs(size=config.size, img_size=config.crops.global_size, patch_size=config.patch_size)
        timm_name = TIMM_NAMES.get(config.size) if (config.crops.global_size, config.patch_size) == (224, 16) else None
        meta = {"family": "timm_vit", "size": config.size, "timm_kwargs": kwargs, "timm_name": timm_name,
                "embed_dim": VIT_DIMENSIONS[config.size][0], "input": "grayscale repeated to 3 channels, ImageNet mean/std"}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        torch.save({"state_dict": {k: v.detach().cpu().clone() for k, v in self.teacher.side_state_dict().items()},
                    "categories": ["unknown", *config.categories], "conditioning": config.acdt,
                    "conditioning_after": list(self.teacher.conditioning_after),
                    "anatomy_embedding": config.anatomy_embedding, "kernel_size": config.acdt_kernel,
                    "offset_groups": config.acdt_offset_groups, "lora_rank": config.lora_rank}, acdt_path)
        return [encoder_path, meta_path, acdt_path]

    def health(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def eval_encoder(self) -> torch.nn.Module:
        """The exported network (the teacher's timm ViT) behind the evaluation library's
        ``ViTBackbone`` view: (B, 3, H, W) -> (B, D) class-token (or mean-token) features, as
        ``anaus evaluate`` computes them from ``encoder.pt``; shares the live weights."""
        from anaus_core.evaluate.backbones import ViTBackbone

        vit = self.teacher.vit
        return ViTBackbone(vit=vit, in_chans=int(vit.patch_embed.proj.in_channels))


def build_avit_method(config: Any) -> AViTMethod:
    """From a ``PretrainConfig``: its ``avit`` section, ``augment`` (photometric settings),
    ``optim.weight_decay`` (the trainer's LARS decay) and ``run.seed`` (crop draws)."""
    return AViTMethod(config=config.avit, augment=config.augment, weight_decay=config.optim.weight_decay,
                      seed=config.run.seed)


def avit_batch_transform(config: Any, *, decode=None) -> MultiCropTransform:
    """The loader's multi-crop transform of a ``PretrainConfig`` (what ``AViTMethod.batch_transform``
    gives, without building the model); ``decode`` = the store's verifying decoder."""
    return MultiCropTransform(config.avit.crops, categories=config.avit.categories, seed=config.run.seed, decode=decode)
