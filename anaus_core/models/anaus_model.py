"""The AnaUS pre-training model: online/target ResNet-FPN, per-scale BYOL heads, L_ana + L_ctx.

``model(prepared_batch, generator=g)`` takes the device-side batch of ``CONTRACTS.md``
(``view1, view2`` (B,3,S,S) normalised; ``masks1, masks2`` (B,K,S,S) in {0,1}; ``mask_ids``
(B,K); ``mask_valid1/2`` (B,K); ``core`` (B,3,S,S); ``core_valid`` (B,)) and returns a dict of
scalar tensors: ``loss`` and its parts (``loss_ana``, ``loss_ana_s7``, ..., ``loss_ctx``,
``loss_ctx_s7``, ...; ``loss_byol*`` instead of ``loss_ana*`` for ``objective="byol"``).
The trainer calls ``update_target(momentum)`` once per optimiser step, after ``optimizer.step()``.
Formulas and conventions: ``docs/objectives.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from anaus_core.augment.damage import DamageSettings, damage
from anaus_core.config import ConfigError, apply_overrides
from anaus_core.losses.anatomy_contrast import anatomy_contrastive_loss
from anaus_core.losses.byol import symmetric_byol_loss
from anaus_core.losses.context import context_prediction_loss
from anaus_core.losses.mask_pooling import downsample_masks, mask_pool
from anaus_core.models.ema import ema_update_
from anaus_core.models.heads import MLPHead, build_predictor, build_projector
from anaus_core.models.resnet_fpn import ResNetFPN, build_resnet_fpn, check_scales


@dataclass
class AnaUSConfig:
    """Model and objective settings (``model:`` section of the pre-training config).

    Ablation switches (paper Table 2): ``symmetric`` (l~), ``multi_scale`` (MG; False = L_ana at
    ``single_scale`` only), ``context`` (CP), ``damage_shuffle/noise/occlusion`` (right half).
    Baselines: whole-image BYOL = ``objective: byol`` (+ ``context: false``; + ``multi_scale:
    false`` for classic single-scale BYOL); DetCon = ``objective: anaus``, ``context: false`` on
    Felzenszwalb-mask shards.
    """

    arch: Literal["resnet18", "resnet50"] = "resnet18"
    pretrained_weights: str | None = None   # local torchvision-format ResNet state dict; None = random init
    fpn_channels: int = 256
    scales: tuple[int, ...] = (7, 14, 28, 56)   # grid sizes at 224 px: 7 = C5, 14/28/56 = P4/P3/P2
    projector_hidden_dim: int = 1024
    projector_dim: int = 256
    predictor_hidden_dim: int = 4096
    objective: Literal["anaus", "byol"] = "anaus"
    temperature: float = 0.1                # tau of L_ana (eq. 5)
    symmetric: bool = True                  # l + l~ (False: view 1 -> view 2 only)
    multi_scale: bool = True                # False: L_ana / BYOL term only at single_scale
    single_scale: int = 7
    min_mask_area: float = 1e-3             # pooled area (feature cells) below which a mask is empty at a scale
    context: bool = True                    # L_ctx (contextual prediction, CP)
    lambda_ctx: float = 1.0
    shuffle_prob: float = 0.15              # alpha: probability that a patch is shuffled
    noise_std: float = 0.2                  # beta: Gaussian noise std, normalised units
    occlusion_fraction: float = 0.05        # gamma: fraction of the crop occluded
    damage_patch_size: int = 8
    damage_shuffle: bool = True
    damage_noise: bool = True
    damage_occlusion: bool = True
    sync_batchnorm: bool = False            # SyncBatchNorm conversion, applied by the trainer

    def damage_settings(self) -> DamageSettings:
        return DamageSettings(
            shuffle_prob=self.shuffle_prob,
            noise_std=self.noise_std,
            occlusion_fraction=self.occlusion_fraction,
            patch_size=self.damage_patch_size,
            shuffle=self.damage_shuffle,
            noise=self.damage_noise,
            occlusion=self.damage_occlusion,
        )

    def contrast_scales(self) -> tuple[int, ...]:
        """Scales carrying the L_ana (or BYOL) term, and hence heads."""
        return tuple(self.scales) if self.multi_scale else (self.single_scale,)

    def validate(self) -> None:
        """Cross-field checks; raises ``ConfigError``."""
        check_scales(self.scales)
        if self.arch not in ("resnet18", "resnet50"):
            raise ConfigError(f"model.arch: {self.arch!r} not supported (resnet18, resnet50)")
        if self.objective not in ("anaus", "byol"):
            raise ConfigError(f"model.objective: {self.objective!r} not supported (anaus, byol)")
        if not self.multi_scale and self.single_scale not in self.scales:
            raise ConfigError(f"model.single_scale: {self.single_scale} is not in model.scales {list(self.scales)}")
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature: must be > 0, got {self.temperature}")
        if self.lambda_ctx < 0:
            raise ConfigError(f"model.lambda_ctx: must be >= 0, got {self.lambda_ctx}")
        for name in ("fpn_channels", "projector_hidden_dim", "projector_dim", "predictor_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1")
        try:
            self.damage_settings()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None


def _project_rows(head: MLPHead, vectors: Tensor, index: Tensor) -> Tensor:
    """Apply ``head`` to the rows ``index`` of (N, K, C) flattened -> (N, K, D); other rows are zero.

    ``index`` lists the valid (non-empty mask) rows: only real mask-pooled vectors enter the
    head, so empty masks do not bias BatchNorm statistics. With fewer than two valid rows
    (BatchNorm needs two) all rows go through; they carry zero loss weight anyway, and every
    head parameter stays in the graph (DDP).
    """
    batch, num_masks, channels = vectors.shape
    rows = vectors.reshape(batch * num_masks, channels)
    if index.numel() < 2:
        return head(rows).reshape(batch, num_masks, -1)
    projected = head(rows.index_select(0, index))
    out = projected.new_zeros((batch * num_masks, projected.shape[-1]))
    out = out.index_copy(0, index, projected)
    return out.reshape(batch, num_masks, -1)


def _mask_pyramid(masks: Tensor, sizes: dict[int, tuple[int, int]]) -> dict[int, Tensor]:
    """Area-fraction masks at each scale's grid; coarser grids are pooled from finer ones when
    the sizes divide evenly (exact, and avoids re-reading the full-resolution masks)."""
    out: dict[int, Tensor] = {}
    previous = masks
    for scale, size in sorted(sizes.items(), key=lambda item: -item[1][0] * item[1][1]):
        source = previous
        if source.shape[-2] % size[0] or source.shape[-1] % size[1]:
            source = masks
        out[scale] = downsample_masks(source, size)
        previous = out[scale]
    return out


class AnaUSModel(nn.Module):
    """Online encoder + per-scale projector/predictor; target = EMA copy of encoder + projectors."""

    def __init__(self, *, config: AnaUSConfig, encoder: ResNetFPN) -> None:
        super().__init__()
        self.config = config
        self.contrast_scales = config.contrast_scales()
        self.online_encoder = encoder
        self.projectors = nn.ModuleDict(
            {
                str(scale): build_projector(
                    in_dim=encoder.channels(scale), hidden_dim=config.projector_hidden_dim, out_dim=config.projector_dim
                )
                for scale in self.contrast_scales
            }
        )
        self.predictors = nn.ModuleDict(
            {
                str(scale): build_predictor(dim=config.projector_dim, hidden_dim=config.predictor_hidden_dim)
                for scale in self.contrast_scales
            }
        )
        # the target starts as an exact copy of the online network (BYOL), never a fresh init
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projectors = copy.deepcopy(self.projectors)
        for parameter in list(self.target_encoder.parameters()) + list(self.target_projectors.parameters()):
            parameter.requires_grad_(False)
        self.damage_settings = config.damage_settings()

    # -- accessors used by the trainer / export -----------------------------------------------
    @property
    def online_backbone(self) -> nn.Module:
        """The online torchvision ResNet (``fc`` = Identity)."""
        return self.online_encoder.backbone

    @property
    def fpn(self) -> nn.Module | None:
        """The online ``torchvision.ops.FeaturePyramidNetwork`` (None when only scale 7 is used)."""
        return self.online_encoder.fpn

    def has_unused_parameters(self) -> bool:
        """False: heads exist only for scales with a loss term and unused FPN smoothing convs are
        Identity, so every trainable parameter gets a gradient each step (plain DDP works)."""
        return False

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """One EMA step ``target <- momentum * target + (1 - momentum) * online`` (parameters)."""
        ema_update_(self.target_encoder, self.online_encoder, momentum)
        ema_update_(self.target_projectors, self.projectors, momentum)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                step: int = 0) -> dict[str, Tensor]:
        config = self.config
        view1, view2 = batch["view1"], batch["view2"]
        batch_size = view1.shape[0]
        views = torch.cat([view1, view2], dim=0)
        online_maps = self.online_encoder(views)
        with torch.no_grad():
            target_maps = self.target_encoder(views)

        losses: dict[str, Tensor] = {}
        if config.objective == "anaus":
            contrast = self._anatomy_terms(batch, online_maps, target_maps, batch_size)
            prefix = "loss_ana"
        else:
            contrast = self._byol_terms(online_maps, target_maps, batch_size)
            prefix = "loss_byol"
        for scale, value in contrast.items():
            losses[f"{prefix}_s{scale}"] = value
        total_contrast = torch.stack(list(contrast.values())).sum()
        losses[prefix] = total_contrast
        total = total_contrast

        if config.context:
            context = self._context_terms(batch, generator)
            for scale, value in context.items():
                losses[f"loss_ctx_s{scale}"] = value
            losses["loss_ctx"] = torch.stack(list(context.values())).sum()
            total = total + config.lambda_ctx * losses["loss_ctx"]
        losses["loss"] = total
        return {"loss": losses.pop("loss"), **losses}

    def _anatomy_terms(
        self,
        batch: Mapping[str, Tensor],
        online_maps: dict[int, Tensor],
        target_maps: dict[int, Tensor],
        batch_size: int,
    ) -> dict[int, Tensor]:
        masks = torch.cat([batch["masks1"], batch["masks2"]], dim=0)
        ids = batch["mask_ids"]
        present = torch.cat(
            [
                batch.get("mask_valid1", torch.ones_like(ids, dtype=torch.bool)),
                batch.get("mask_valid2", torch.ones_like(ids, dtype=torch.bool)),
            ],
            dim=0,
        ).bool()
        sizes = {scale: tuple(online_maps[scale].shape[-2:]) for scale in self.contrast_scales}
        cell_masks = _mask_pyramid(masks, sizes)
        terms: dict[int, Tensor] = {}
        for scale in self.contrast_scales:
            key = str(scale)
            online_pooled, area_valid = mask_pool(
                online_maps[scale], cell_masks[scale], min_area=self.config.min_mask_area
            )
            valid = area_valid & present
            rows = valid.reshape(-1).nonzero().squeeze(1)
            projection = _project_rows(self.projectors[key], online_pooled, rows)
            prediction = _project_rows(self.predictors[key], projection, rows)
            with torch.no_grad():
                target_pooled, _ = mask_pool(target_maps[scale], cell_masks[scale], min_area=self.config.min_mask_area)
                target_projection = _project_rows(self.target_projectors[key], target_pooled, rows)
            terms[scale] = anatomy_contrastive_loss(
                prediction[:batch_size],
                prediction[batch_size:],
                target_projection[:batch_size],
                target_projection[batch_size:],
                ids,
                ids,
                valid[:batch_size],
                valid[batch_size:],
                temperature=self.config.temperature,
                symmetric=self.config.symmetric,
            )
        return terms

    def _byol_terms(
        self, online_maps: dict[int, Tensor], target_maps: dict[int, Tensor], batch_size: int
    ) -> dict[int, Tensor]:
        terms: dict[int, Tensor] = {}
        for scale in self.contrast_scales:
            key = str(scale)
            # one whole-image mask: the pooled vector is the global average of the map
            prediction = self.predictors[key](self.projectors[key](online_maps[scale].mean(dim=(2, 3))))
            with torch.no_grad():
                target_projection = self.target_projectors[key](target_maps[scale].mean(dim=(2, 3)))
            terms[scale] = symmetric_byol_loss(
                prediction[:batch_size],
                prediction[batch_size:],
                target_projection[:batch_size],
                target_projection[batch_size:],
                symmetric=self.config.symmetric,
            )
        return terms

    def _context_terms(self, batch: Mapping[str, Tensor], generator: torch.Generator | None) -> dict[int, Tensor]:
        core = batch["core"]
        core_valid = batch.get("core_valid")
        damaged = damage(core, settings=self.damage_settings, generator=generator)
        online_maps = self.online_encoder(damaged)
        with torch.no_grad():
            target_maps = self.target_encoder(core)
        return {
            scale: context_prediction_loss(online_maps[scale], target_maps[scale], core_valid)
            for scale in self.online_encoder.scales
        }


def build_anaus_model(config: AnaUSConfig | Mapping[str, Any] | None = None) -> AnaUSModel:
    """Build the model from an ``AnaUSConfig`` (or a mapping of its fields; None = defaults)."""
    if config is None:
        config = AnaUSConfig()
    elif isinstance(config, Mapping):
        config = apply_overrides(AnaUSConfig(), dict(config))
    config.validate()
    return AnaUSModel(config=config, encoder=build_encoder(config))


def build_encoder(config: AnaUSConfig) -> ResNetFPN:
    """The online ResNet-FPN of ``config`` (random init, or ``pretrained_weights``)."""
    # without L_ctx only the contrast scales need features (e.g. no FPN for scale 7 alone)
    encoder_scales = tuple(config.scales) if config.context else config.contrast_scales()
    return build_resnet_fpn(
        arch=config.arch,
        scales=encoder_scales,
        fpn_channels=config.fpn_channels,
        pretrained_weights=config.pretrained_weights,
    )
