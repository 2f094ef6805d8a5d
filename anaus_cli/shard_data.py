"""What the trainer gets from a shard store, built here because ``anaus_core`` imports no ``shards``:
the ``PretrainDataSource`` over the shards (``shard_data_source``) and the store's A-ViT anatomy
vocabulary (``store_anatomy_categories``). Used by ``pretrain`` and ``demo`` (and tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path


def shard_data_source(config, *, source=None):
    """The trainer's ``PretrainDataSource`` over ``config.data.shards`` (``shards.stream``).

    ``source``: an already opened and checked ``ShardSource``; by default the shards are opened
    with ``shards.vet.open_vetted_shards`` under the default URL policy (local files only) and
    any bad shard is an error."""
    import torch

    from shards.stream import ShardDataSource
    from shards.vet import open_vetted_shards

    data = config.data
    if source is None:
        source = open_vetted_shards(data.shards)
    on_cuda = config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())
    batch_transform = None
    if config.method == "avit":  # A-ViT's multi-crop views, decoded with the store's checks
        from anaus_core.methods.avit import avit_batch_transform
        from shards.anatomy_sample import decode_image_and_anatomy

        batch_transform = avit_batch_transform(config, decode=decode_image_and_anatomy)
    return ShardDataSource(source, num_workers=data.num_workers, seed=config.run.seed,
                           view_config=config.views.resolved(on_cuda=on_cuda), shuffle_buffer=data.shuffle_buffer,
                           pin_memory=data.pin_memory and on_cuda, prefetch_factor=data.prefetch_factor,
                           batch_transform=batch_transform)


def store_anatomy_categories(config):
    """``avit.categories`` from the store's manifest (``precompute-masks --anatomy``) when the
    config names none; a config that lists them (or a resumed run's) is kept as it is."""
    if config.method != "avit" or config.avit.categories:
        return config
    from dataclasses import replace

    from shards.index import MANIFEST_NAME, read_manifest

    if not (Path(config.data.shards) / MANIFEST_NAME).is_file():  # shard URLs without a store: no vocabulary
        return config
    categories = read_manifest(config.data.shards).get("anatomy", {}).get("categories", [])
    return replace(config, avit=replace(config.avit, categories=[c for c in categories if c != "unknown"]))
