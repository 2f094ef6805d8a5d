"""AnaUS pre-training model: ResNet-FPN encoder, BYOL heads, online/target model, export."""

from anaus_core.models.anaus_model import AnaUSConfig, AnaUSModel, build_anaus_model
from anaus_core.models.ema import ema_update_
from anaus_core.models.export import build_export_encoder, export_encoder_state_dict, export_fpn_state_dict
from anaus_core.models.heads import MLPHead, build_predictor, build_projector
from anaus_core.models.resnet_fpn import SCALE_TO_STAGE, ResNetFPN, build_resnet_fpn

__all__ = [
    "SCALE_TO_STAGE",
    "AnaUSConfig",
    "AnaUSModel",
    "MLPHead",
    "ResNetFPN",
    "build_anaus_model",
    "build_export_encoder",
    "build_predictor",
    "build_projector",
    "build_resnet_fpn",
    "ema_update_",
    "export_encoder_state_dict",
    "export_fpn_state_dict",
]
