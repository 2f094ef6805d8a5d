"""Augmentations for pre-training: paired views with their masks (CPU, per sample, in DataLoader
workers) and the batched photometric / damage operations that run on the training device.

Kept light on purpose: import the submodule you need (``anaus_core.augment.views``,
``anaus_core.augment.device``, ...). Nothing here imports ``shards`` or ``pipeline``.
"""
