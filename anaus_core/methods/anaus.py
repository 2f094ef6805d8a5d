"""AnaUS as a ``PretrainMethod``: the ``AnaUSModel`` plus its batch preparation, EMA and export.

``AnaUSMethod`` *is* an ``AnaUSModel`` (a subclass, adding only the interface hooks), so its
state dict has exactly the keys of the model's — checkpoints written before the method
interface existed resume unchanged, and the exported ``encoder.pt`` is the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from anaus_core.augment.device import DeviceAugmentConfig, prepare_batch
from anaus_core.methods.base import PretrainMethod
from anaus_core.models.anaus_model import AnaUSConfig, AnaUSModel, build_encoder
from anaus_core.optim.schedules import cosine_momentum

ENCODER_FILENAME = "encoder.pt"
FPN_FILENAME = "fpn.pt"
#: prepared tensors that are images (they get the channels_last memory format on CUDA)
_IMAGE_KEYS = ("view1", "view2", "core")


class AnaUSMethod(AnaUSModel, PretrainMethod):
    """AnaUS (L_ana + L_ctx, or the BYOL/DetCon baselines by config) behind the method interface.

    Args (keyword-only):
        config: the model/objective settings (``PretrainConfig.model``).
        encoder: the online ``ResNetFPN`` (the target is a deep copy).
        augment: the device-side photometric settings (``PretrainConfig.augment``).
        weight_decay: LARS weight decay of the weight group (biases/norms get none).
        ema_base: the EMA decay at step 0; cosine to 1 over the run (BYOL).
        channels_last: put prepared images in channels_last (CUDA only; the trainer also
            converts the parameters).
    """

    name: ClassVar[str] = "anaus"

    def __init__(self, *, config: AnaUSConfig, encoder, augment: DeviceAugmentConfig | None = None,
                 weight_decay: float = 1e-6, ema_base: float = 0.99, channels_last: bool = False) -> None:
        super().__init__(config=config, encoder=encoder)
        self.augment_config = augment if augment is not None else DeviceAugmentConfig()
        self.weight_decay = float(weight_decay)
        self.ema_base = float(ema_base)
        self.channels_last = bool(channels_last)

    # -- interface ------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[dict]:
        from anaus_core.optim import param_groups_excluding_norm_and_bias

        groups = param_groups_excluding_norm_and_bias(self, weight_decay=self.weight_decay)
        return [{**group, "lars_exclude": not group.pop("lars_adaptation")} for group in groups]

    def prepare_batch(self, batch: Mapping[str, Tensor], *, device: torch.device,
                      generator: torch.Generator) -> dict[str, Tensor]:
        prepared = prepare_batch(batch, device=device, generator=generator, config=self.augment_config)
        if self.channels_last and torch.device(device).type == "cuda":
            for key in _IMAGE_KEYS:
                prepared[key] = prepared[key].contiguous(memory_format=torch.channels_last)
        return prepared

    def begin_step(self, prepared: Sequence[Mapping[str, Tensor]], *,
                   generators: Sequence[torch.Generator], step: int = 0) -> None:
        """Target projections of the whole step first (global negatives under accumulation)."""
        self.precompute_step_targets(prepared)

    def after_optimizer_step(self, *, step: int, total_steps: int) -> dict[str, float]:
        momentum = float(cosine_momentum(step, total_steps, base=self.ema_base))
        self.update_target(momentum)
        return {"momentum": momentum}

    def export(self, out_dir: Path) -> list[Path]:
        """``encoder.pt`` (torchvision ResNet state dict without ``fc.*``) and ``fpn.pt``."""
        from anaus_core.models import export_encoder_state_dict, export_fpn_state_dict

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        encoder_path, fpn_path = out_dir / ENCODER_FILENAME, out_dir / FPN_FILENAME
        torch.save(export_encoder_state_dict(self), encoder_path)
        torch.save(export_fpn_state_dict(self), fpn_path)
        return [encoder_path, fpn_path]

    def health(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-scale projection std and RankMe of the last forward (see ``health_monitors``);
        the empty-slot fraction is in the forward's outputs, the EMA momentum in
        ``after_optimizer_step``'s."""
        return self.health_monitors()

    def compile_for_training(self, **kwargs: Any) -> None:
        """``torch.compile`` the four networks in place (``Module.compile``: state-dict keys are
        unchanged, so checkpoints and export do not see it)."""
        # static shapes: the encoders see two batch sizes (2B views, B core), one graph each,
        # no dynamic-shape recompiles; CUDA-graph friendly
        kwargs.setdefault("dynamic", False)
        for module in (self.online_encoder, self.target_encoder):
            module.compile(**kwargs)


def build_anaus_method(config) -> AnaUSMethod:
    """The AnaUS method of a ``PretrainConfig`` (weights from the global torch seed)."""
    model_config: AnaUSConfig = config.model
    model_config.validate()
    return AnaUSMethod(config=model_config, encoder=build_encoder(model_config), augment=config.augment,
                       weight_decay=config.optim.weight_decay, ema_base=config.optim.ema_base,
                       channels_last=config.run.channels_last)
