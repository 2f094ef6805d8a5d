"""A-ViT in the method registry; the implementation lives in ``anaus_core/avit/`` (docs/avit.md)."""

from anaus_core.avit.method import AViTMethod, avit_batch_transform, build_avit_method

__all__ = ["AViTMethod", "avit_batch_transform", "build_avit_method"]
