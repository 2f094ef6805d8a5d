"""Streaming shards: equal batches per rank on uneven shards, determinism, resume, sources, loader."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anaus_core.errors import UserInputError
from shards.stream import (
    ShardDataSource,
    ShardReadError,
    ShardStream,
    build_pretrain_loader,
    make_epoch_plan,
    resolve_shards,
)


def write_raw_shards(directory: Path, sizes: list[int], *, prefix: str = "shard") -> list[str]:
    """Plain tars (two members per sample) with globally numbered keys; returns keys in order."""
    directory.mkdir(parents=True, exist_ok=True)
    keys, counter = [], 0
    for number, size in enumerate(sizes):
        with tarfile.open(directory / f"{prefix}-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(size):
                key = f"s{counter:05d}"
                for ext, payload in (("txt", key.encode()), ("cls", str(counter).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                keys.append(key)
                counter += 1
    return keys


def collect(source, *, batch_size, rank=0, world_size=1, num_workers=0, seed=0, epoch=0, start_batch=0, shuffle_buffer=4,
            mode="stream"):
    """Run a ShardStream through a real DataLoader; returns a list of batches of keys."""
    dataset = ShardStream(source, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          num_workers=num_workers, start_batch=start_batch, shuffle_buffer=shuffle_buffer)
    assert dataset.mode == mode
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    batches = [[sample["__key__"] for sample in batch] for batch in loader]
    assert len(batches) == len(dataset)
    return batches


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, list[str]]:
    directory = tmp_path_factory.mktemp("uneven")
    return directory, write_raw_shards(directory, [4, 4, 2])


def test_uneven_shards_give_every_rank_the_same_batches(uneven):
    directory, keys = uneven
    source = resolve_shards(directory)
    assert source.sizes == (4, 4, 2)
    per_rank = [collect(source, batch_size=2, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]              # 10 // (2 ranks × 2) = 2 each
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    assert len(seen) == len(set(seen)) == 8 and set(seen) <= set(keys)


@pytest.mark.parametrize("sizes,world,workers,batch", [([7, 1, 3, 5, 0, 2], 3, 2, 2), ([1, 1, 1, 9], 4, 3, 1), ([5, 6], 2, 0, 3)])
def test_equal_batches_for_many_layouts(tmp_path, sizes, world, workers, batch):
    write_raw_shards(tmp_path, sizes)
    source = resolve_shards(tmp_path)
    expected = sum(sizes) // (world * batch)
    per_rank = [collect(source, batch_size=batch, rank=r, world_size=world, num_workers=workers) for r in range(world)]
    assert [len(b) for b in per_rank] == [expected] * world
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert len(seen) == len(set(seen)) == expected * world * batch


def test_order_is_deterministic_per_seed_and_changes_with_seed_and_epoch(uneven):
    directory, _ = uneven
    source = resolve_shards(directory)
    first = collect(source, batch_size=2, num_workers=2, seed=1)
    assert first == collect(source, batch_size=2, num_workers=2, seed=1)
    assert first != collect(source, batch_size=2, num_workers=2, seed=2)
    assert first != collect(source, batch_size=2, num_workers=2, seed=1, epoch=1)
    # the worker count does not change what a rank sees in one process vs workers when planned alike
    assert collect(source, batch_size=2, num_workers=0, seed=1) == collect(source, batch_size=2, num_workers=0, seed=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream(tmp_path, workers):
    write_raw_shards(tmp_path, [6, 3, 5, 4])              # 18 samples, batch 2 -> 9 batches
    source = resolve_shards(tmp_path)
    full = collect(source, batch_size=2, num_workers=workers, seed=4, epoch=3, shuffle_buffer=5)
    assert len(full) == 9
    for start in (1, 3, 4, 8, 9):
        resumed = collect(source, batch_size=2, num_workers=workers, seed=4, epoch=3, start_batch=start, shuffle_buffer=5)
        assert resumed == full[start:], start


def test_rank_batch_samples_predict_the_stream(uneven):
    directory, keys = uneven
    source = resolve_shards(directory)
    for start in (0, 1):
        dataset = ShardStream(source, batch_size=2, seed=0, num_workers=2, shuffle_buffer=4, start_batch=start)
        predicted = [[keys[int(n)] for n in batch] for batch in dataset.rank_batch_samples()]
        assert predicted == collect(source, batch_size=2, num_workers=2, seed=0, start_batch=start)


def test_plan_drops_less_than_one_global_batch():
    plan = make_epoch_plan([4, 4, 2], seed=0, epoch=0, world_size=2, batch_size=3, streams_per_rank=2)
    assert plan.batches_per_epoch == 1
    assert sum(plan.stream_batches) == 2
    with pytest.raises(UserInputError):
        make_epoch_plan([1, 1], seed=0, epoch=0, world_size=2, batch_size=2, streams_per_rank=1)


def test_brace_pattern_and_fsspec_url_read_the_same_samples(uneven):
    directory, _ = uneven
    by_dir = collect(resolve_shards(directory), batch_size=2, seed=5)
    brace = resolve_shards(str(directory / "shard-{000000..000002}.tar"))
    assert brace.sizes == (4, 4, 2)
    assert collect(brace, batch_size=2, seed=5) == by_dir
    url = resolve_shards("file://" + str(directory))
    assert len(url.urls) == 3 and url.urls[0].startswith("file://")
    assert collect(url, batch_size=2, seed=5) == by_dir


def test_short_shard_raises_instead_of_ending_early(uneven):
    directory, _ = uneven
    wrong = resolve_shards(directory, shard_sizes=[4, 5, 2])  # the middle shard holds 4, not 5
    with pytest.raises(ShardReadError, match="shard-000001.tar"):
        collect(wrong, batch_size=1)


def test_bad_source_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no \\*.tar"):
        resolve_shards(tmp_path)
    with pytest.raises(UserInputError):
        resolve_shards(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# with the shard store's real sample format
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from shards.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("store"), count=13, samples_per_shard=5, height=48, width=64)


def test_pretrain_loader_yields_the_contract_batch(store):
    from anaus_core.augment.views import ViewConfig

    source = resolve_shards(store)
    assert source.sizes == (5, 5, 3)  # from manifest.json
    loader = build_pretrain_loader(store, batch_size=4, num_workers=0, seed=0,
                                   view_config=ViewConfig(size=32), num_mask_samples=6)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    batch = batches[0]
    expected = {
        "view1": (torch.uint8, (4, 1, 32, 32)), "view2": (torch.uint8, (4, 1, 32, 32)),
        "masks1": (torch.uint8, (4, 6, 32, 4)), "masks2": (torch.uint8, (4, 6, 32, 4)),
        "mask_ids": (torch.int64, (4, 6)), "mask_valid1": (torch.bool, (4, 6)), "mask_valid2": (torch.bool, (4, 6)),
        "core": (torch.uint8, (4, 1, 32, 32)), "core_valid": (torch.bool, (4,)),
        "crop1": (torch.float32, (4, 4)), "crop2": (torch.float32, (4, 4)),
        "flip1": (torch.bool, (4,)), "flip2": (torch.bool, (4,)), "index": (torch.int64, (4,)),
    }
    assert set(batch) == set(expected)
    for name, (dtype, shape) in expected.items():
        assert batch[name].dtype == dtype and tuple(batch[name].shape) == shape, name
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert len(set(indices)) == 12
    assert (torch.cat([b["mask_ids"] for b in batches]) > 0).all()  # every synthetic image has masks


def test_pretrain_loader_resume_and_workers_reproduce_batches(store):
    from anaus_core.augment.views import ViewConfig

    config = ViewConfig(size=32, num_mask_samples=4)
    full = list(build_pretrain_loader(store, batch_size=2, num_workers=2, seed=3, epoch=1, view_config=config, shuffle_buffer=4))
    resumed = list(build_pretrain_loader(store, batch_size=2, num_workers=2, seed=3, epoch=1, start_batch=2,
                                         view_config=config, shuffle_buffer=4))
    assert len(full) == 6 and len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_data_source_protocol(store):
    from anaus_core.augment.views import ViewConfig

    data = ShardDataSource.open(store, num_workers=0, seed=1, view_config=ViewConfig(size=16, num_mask_samples=2))
    assert data.num_samples == 13
    counts = [len(list(data.loader(epoch=0, skip_batches=0, batch_size=3, rank=r, world_size=2))) for r in range(2)]
    assert counts == [2, 2]


def test_indexed_mode_global_shuffle_equal_batches_resume_and_worker_independence(store):
    from shards.index import read_index

    source = resolve_shards(store)
    assert source.indexed
    keys = read_index(store).keys
    full = collect(source, batch_size=2, num_workers=0, seed=7, shuffle_buffer=0, mode="indexed")
    assert len(full) == 6
    # the sample number is the index row: keys agree with the stored index
    dataset = ShardStream(source, batch_size=2, seed=7, shuffle_buffer=0)
    assert [[keys[int(n)] for n in batch] for batch in dataset.rank_batch_samples()] == full
    assert collect(source, batch_size=2, num_workers=2, seed=7, shuffle_buffer=0, mode="indexed") == full
    for start in (1, 4):
        assert collect(source, batch_size=2, num_workers=2, seed=7, shuffle_buffer=0, start_batch=start,
                       mode="indexed") == full[start:]
    per_rank = [collect(source, batch_size=3, rank=r, world_size=2, num_workers=2, seed=7, shuffle_buffer=0,
                        mode="indexed") for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert len(set(seen)) == 12
    # a global shuffle mixes shards inside a batch (stream mode would need a large window)
    assert collect(source, batch_size=2, seed=8, shuffle_buffer=0, mode="indexed") != full


def test_zero_buffer_without_index_falls_back_to_windows(uneven):
    directory, _ = uneven
    source = resolve_shards(str(directory / "shard-{000000..000002}.tar"))
    dataset = ShardStream(source, batch_size=2, shuffle_buffer=0)
    assert dataset.mode == "stream" and dataset.window == ShardStream.DEFAULT_WINDOW
