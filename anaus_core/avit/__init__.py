"""A-ViT: anatomy-aware ViT pre-training (ACDT + MIM + adversarial + DINO), docs/avit.md.

Modules: ``config`` (AViTConfig), ``backbone`` (timm ViT sizes), ``anatomy`` (category
embedding), ``acdt`` (anatomy-conditioned deformable block), ``conditioning`` (ablation
blocks), ``encoder`` (AnatomyViT), ``dino`` (head, loss, schedules), ``mim`` (masking, decoder,
masked MSE), ``adversarial`` (patch discriminator, hinge losses, adaptive λ), ``multicrop``
(the loader's batch transform), ``method`` (AViTMethod behind the pre-training interface).
"""
