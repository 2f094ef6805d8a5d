"""The AnaUS pre-training model: online/target ResNet-FPN, per-scale BYOL heads, L_ana + L_ctx.

``model(prepared_batch, generator=g)`` takes the device-side pre-training batch
(``view1, view2`` (B,3,S,S) normalised; ``masks1, masks2`` (B,K,S,S) in {0,1}; ``mask_ids``
(B,K); ``mask_valid1/2`` (B,K); ``core`` (B,3,S,S); ``core_valid`` (B,); optional
``core_region`` (B,1,S,S) the scan region cut like the core) and returns a dict of
scalar tensors: ``loss`` and its parts (``loss_ana``, ``loss_ana_s7``, ..., ``loss_ctx``,
``loss_ctx_s7``, ...; ``loss_byol*`` instead of ``loss_ana*`` for ``objective="byol"``).
The trainer calls ``update_target(momentum)`` once per optimiser step, after ``optimizer.step()``.
Formulas and conventions: ``docs/objectives.md``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from anaus_core.augment.damage import DamageSettings, damage
from anaus_core.config import ConfigError, apply_overrides
from anaus_core.losses.anatomy_contrast import _world, anatomy_contrastive_loss, gather_across_ranks
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
    # heads see every row and take BatchNorm statistics over the valid ones (same maths as
    # selecting the valid rows, without the host-device sync and data-dependent shapes):
    # "auto" = on accelerators only (on the CPU a sync costs nothing and the invalid rows'
    # work does: 7 % slower there, docs/benchmarks.md), "on" / "off" force it
    static_shapes: Literal["auto", "on", "off"] = "auto"

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
        if self.static_shapes not in ("auto", "on", "off"):
            raise ConfigError(f"model.static_shapes: must be auto, on or off, got {self.static_shapes!r}")
        if self.lambda_ctx < 0:
            raise ConfigError(f"model.lambda_ctx: must be >= 0, got {self.lambda_ctx}")
        for name in ("fpn_channels", "projector_hidden_dim", "projector_dim", "predictor_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1")
        try:
            self.damage_settings()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None


def _project_rows(head: MLPHead, vectors: Tensor, valid: Tensor, static: bool | str = False) -> Tensor:
    """Apply ``head`` to the valid rows of (N, K, C) -> (N, K, D); other rows are zero.

    ``valid`` (N, K) marks the rows holding a real (non-empty mask) pooled vector: only they
    enter the head, so empty masks do not bias BatchNorm statistics. With fewer than two valid
    rows (BatchNorm needs two) all rows go through; they carry zero loss weight anyway, and
    every head parameter stays in the graph (DDP). ``static``: the same maths with static
    shapes (``MLPHead.forward_masked``: no host-device sync).
    """
    batch, num_masks, channels = vectors.shape
    rows = vectors.reshape(batch * num_masks, channels)
    if static == "auto":
        static = vectors.device.type != "cpu"
    if static in (True, "on") and head.supports_masked():
        return head.forward_masked(rows, valid.reshape(-1)).reshape(batch, num_masks, -1)
    index = valid.reshape(-1).nonzero().squeeze(1)
    if index.numel() < 2:
        return head(rows).reshape(batch, num_masks, -1)
    projected = head(rows.index_select(0, index))
    out = projected.new_zeros((batch * num_masks, projected.shape[-1]))
    out = out.index_copy(0, index, projected)
    return out.reshape(batch, num_masks, -1)


def _step_offsets(sizes: Sequence[int]) -> list[int]:
    """Global index of each micro-batch's first image: rank-major, then micro-batch order (the
    order ``all_gather`` concatenates the ranks' step batches in)."""
    _, rank = _world()
    first = rank * sum(sizes)
    offsets = []
    for size in sizes:
        offsets.append(first)
        first += size
    return offsets


def _gather_step_targets(per_batch: Sequence[Mapping[int, tuple[Tensor, Tensor]]],
                         sizes: Sequence[int]) -> dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per scale ``(T1, T2, V1, V2)`` of the whole step: the micro-batches' view-1 / view-2 target
    projections (N, K, D) and validity (N, K), concatenated, then gathered over ranks."""
    out = {}
    for scale in per_batch[0]:
        t1 = torch.cat([p[scale][0][:n] for p, n in zip(per_batch, sizes)])
        t2 = torch.cat([p[scale][0][n:] for p, n in zip(per_batch, sizes)])
        v1 = torch.cat([p[scale][1][:n] for p, n in zip(per_batch, sizes)])
        v2 = torch.cat([p[scale][1][n:] for p, n in zip(per_batch, sizes)])
        world_size, _ = _world()
        if world_size > 1:
            targets = gather_across_ranks(torch.stack([t1, t2], dim=1))
            valids = gather_across_ranks(torch.stack([v1, v2], dim=1).to(torch.uint8)).bool()
            t1, t2, v1, v2 = targets[:, 0], targets[:, 1], valids[:, 0], valids[:, 1]
        out[scale] = (t1, t2, v1, v2)
    return out


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


@contextlib.contextmanager
def frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, ``module``'s BatchNorm layers still normalise with batch statistics
    (train mode) but their running statistics (and ``num_batches_tracked``) are left as they
    were: a forward pass inside leaves no trace in the exported statistics.

    Each layer updates a scratch copy of its buffers, and the original tensors are put back
    afterwards. (Writing the old values back in place would not do: the autograd graph of the
    forward holds the running statistics and checks that they are not modified before the
    backward. Toggling ``momentum`` would make ``torch.compile`` recompile: it guards module
    attributes.)
    """
    layers = [layer for layer in module.modules()
              if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats]
    if not layers or not module.training:
        yield
        return
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [{name: getattr(layer, name) for name in names} for layer in layers]
    for layer, originals in zip(layers, saved):
        for name, tensor in originals.items():
            if tensor is not None:
                setattr(layer, name, tensor.clone())
    try:
        yield
    finally:
        for layer, originals in zip(layers, saved):
            for name, tensor in originals.items():
                setattr(layer, name, tensor)


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
        self._step_targets: dict | None = None   # set by precompute_step_targets, used by forward
        # the last forward's online projections per scale (detached) for health_monitors
        self._health_inputs: dict[int, tuple[Tensor, Tensor | None]] = {}

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

    # -- targets of the whole optimiser step ----------------------------------------------------
    @torch.no_grad()
    def _target_projections(self, batch: Mapping[str, Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per contrast scale: target projections (2B, K, D) of [view1; view2] and their
        validity (2B, K) (mask non-empty at that scale and present in that view)."""
        views = torch.cat([batch["view1"], batch["view2"]], dim=0)
        target_maps = self.target_encoder(views)
        cell_masks, present = self._cell_masks(batch, {s: target_maps[s] for s in self.contrast_scales})
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for scale in self.contrast_scales:
            pooled, area_valid = mask_pool(target_maps[scale], cell_masks[scale], min_area=self.config.min_mask_area)
            valid = area_valid & present
            out[scale] = (_project_rows(self.target_projectors[str(scale)], pooled, valid, self.config.static_shapes), valid)
        return out

    @torch.no_grad()
    def precompute_step_targets(self, batches: Sequence[Mapping[str, Tensor]]) -> None:
        """Target projections of every micro-batch of the optimiser step (and, distributed, of
        every rank), computed before the first online forward of the step.

        ``forward`` then takes micro-batch i's negatives from this global batch: with gradient
        accumulation the contrast is over the global batch the paper describes, not over one
        micro-batch. The target network does not change within a step (EMA after the step), so
        these are the projections the forward would compute itself. Consumed by the next
        ``len(batches)`` forwards, in order.
        """
        self._step_targets = None
        if self.config.objective != "anaus" or not batches:
            return
        per_batch = [self._target_projections(batch) for batch in batches]
        sizes = [int(batch["view1"].shape[0]) for batch in batches]
        self._step_targets = {"targets": _gather_step_targets(per_batch, sizes), "sizes": sizes, "next": 0,
                              "offsets": _step_offsets(sizes)}

    def _next_step_targets(self, batch: Mapping[str, Tensor]) -> tuple[dict[int, tuple[Tensor, ...]], int]:
        """(global targets per scale, this micro-batch's offset): the precomputed ones in order,
        else this batch's own (one micro-batch per step, the path of a plain ``model(batch)``)."""
        pending = getattr(self, "_step_targets", None)
        size = int(batch["view1"].shape[0])
        if pending is not None:
            index = pending["next"]
            pending["next"] += 1
            if pending["next"] >= len(pending["sizes"]):
                self._step_targets = None
            if pending["sizes"][index] != size:
                raise RuntimeError(f"micro-batch {index} has {size} images; begin_step saw {pending['sizes'][index]}")
            return pending["targets"], pending["offsets"][index]
        targets = _gather_step_targets([self._target_projections(batch)], [size])
        return targets, _step_offsets([size])[0]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                step: int = 0) -> dict[str, Tensor]:
        config = self.config
        view1, view2 = batch["view1"], batch["view2"]
        batch_size = view1.shape[0]
        views = torch.cat([view1, view2], dim=0)
        online_maps = self.online_encoder(views)

        losses: dict[str, Tensor] = {}
        if config.objective == "anaus":
            targets, offset = self._next_step_targets(batch)
            contrast = self._anatomy_terms(batch, online_maps, targets, offset, batch_size)
            prefix = "loss_ana"
        else:
            with torch.no_grad():
                target_maps = self.target_encoder(views)
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
        if config.objective == "anaus":
            # slots whose mask is missing from a view have no positive (a wasted slot)
            used = batch["mask_ids"] != 0
            both = batch.get("mask_valid1", used) & batch.get("mask_valid2", used)
            losses["health_empty_slots"] = 1.0 - both.float().mean()
        return {"loss": losses.pop("loss"), **losses}

    @torch.no_grad()
    def health_monitors(self) -> dict[str, Tensor]:
        """Collapse monitors of the last forward's online projections, per scale: the std of the
        normalised projections (``health_std_s7``, ...; 0 = collapsed, ~1/sqrt(D) = spread) and
        their RankMe effective rank (``health_rankme_s7``, ...; 1 = collapsed, up to D).
        Device tensors; the trainer reads them at log steps only."""
        from anaus_core.methods.health import embedding_std, rankme

        out: dict[str, Tensor] = {}
        for scale, (projection, valid) in self._health_inputs.items():
            rows = projection.reshape(-1, projection.shape[-1])
            weights = None if valid is None else valid.reshape(-1)
            out[f"health_std_s{scale}"] = embedding_std(rows, weights)
            out[f"health_rankme_s{scale}"] = rankme(rows, weights)
        return out

    def _cell_masks(self, batch: Mapping[str, Tensor], maps: Mapping[int, Tensor]) -> tuple[dict[int, Tensor], Tensor]:
        """Area-fraction masks of [masks1; masks2] on each map's grid, and the (2B, K) presence flags."""
        masks = torch.cat([batch["masks1"], batch["masks2"]], dim=0)
        ids = batch["mask_ids"]
        present = torch.cat(
            [
                batch.get("mask_valid1", torch.ones_like(ids, dtype=torch.bool)),
                batch.get("mask_valid2", torch.ones_like(ids, dtype=torch.bool)),
            ],
            dim=0,
        ).bool()
        sizes = {scale: tuple(value.shape[-2:]) for scale, value in maps.items()}
        return _mask_pyramid(masks, sizes), present

    def _anatomy_terms(
        self,
        batch: Mapping[str, Tensor],
        online_maps: dict[int, Tensor],
        targets: Mapping[int, tuple[Tensor, Tensor, Tensor, Tensor]],
        offset: int,
        batch_size: int,
    ) -> dict[int, Tensor]:
        ids = batch["mask_ids"]
        cell_masks, present = self._cell_masks(batch, {s: online_maps[s] for s in self.contrast_scales})
        terms: dict[int, Tensor] = {}
        for scale in self.contrast_scales:
            key = str(scale)
            online_pooled, area_valid = mask_pool(
                online_maps[scale], cell_masks[scale], min_area=self.config.min_mask_area
            )
            valid = area_valid & present
            projection = _project_rows(self.projectors[key], online_pooled, valid, self.config.static_shapes)
            prediction = _project_rows(self.predictors[key], projection, valid, self.config.static_shapes)
            self._health_inputs[scale] = (projection.detach(), valid)
            terms[scale] = anatomy_contrastive_loss(
                prediction[:batch_size],
                prediction[batch_size:],
                prediction[:batch_size],   # unused: the targets come from global_targets
                prediction[batch_size:],
                ids,
                ids,
                valid[:batch_size],
                valid[batch_size:],
                temperature=self.config.temperature,
                symmetric=self.config.symmetric,
                global_targets=targets[scale],
                image_offset=offset,
            )
        return terms

    def _byol_terms(
        self, online_maps: dict[int, Tensor], target_maps: dict[int, Tensor], batch_size: int
    ) -> dict[int, Tensor]:
        terms: dict[int, Tensor] = {}
        for scale in self.contrast_scales:
            key = str(scale)
            # one whole-image mask: the pooled vector is the global average of the map
            projection = self.projectors[key](online_maps[scale].mean(dim=(2, 3)))
            prediction = self.predictors[key](projection)
            self._health_inputs[scale] = (projection.detach(), None)
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
        # damaged, un-augmented core crops must not shape the exported encoder's BatchNorm
        # running statistics (downstream heads that freeze BN inherit them): batch statistics
        # normalise this forward as usual, the running statistics come from the clean views only
        with frozen_batchnorm_statistics(self.online_encoder):
            online_maps = self.online_encoder(damaged)
        with torch.no_grad():
            target_maps = self.target_encoder(core)
        # the scan region cut like the core (when the batch has one), pooled to each feature grid
        # like the masks: cells outside the region do not count (issue 10)
        region = batch.get("core_region")
        return {
            scale: context_prediction_loss(
                online_maps[scale], target_maps[scale], core_valid,
                None if region is None else downsample_masks(region, tuple(online_maps[scale].shape[-2:])),
            )
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
