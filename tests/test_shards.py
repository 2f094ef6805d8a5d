"""Shard store: byte format, round trips (project reader, stock webdataset, tar), random access,
pyramid vs torch, atomic writes."""

from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from anaus_core.maskset import MaskSet
from shards.index import INDEX_NAME, MANIFEST_NAME, read_index, write_index
from shards.reader import ShardReader, iter_shard
from shards.sample import (
    DEFAULT_SCALES,
    SampleFormatError,
    ShardSample,
    compute_mask_pyramid,
    consistency_problems,
    decode_mask_layers,
    decode_masks,
    decode_sample,
    encode_masks,
    encode_sample,
    pack_mask_layers,
)
from shards.synthetic import synthetic_sample
from shards.writer import ShardFileWriter, ShardWriter, write_shard


def make_samples(count: int = 7, *, start: int = 0) -> list[ShardSample]:
    # Varied shapes (non-square, odd sizes), mask counts (including M = 0) and overlaps.
    samples = []
    for i in range(start, start + count):
        partition, overlapping = [(5, 2), (0, 0), (3, 0), (1, 3), (6, 1)][i % 5]
        samples.append(synthetic_sample(f"case{i:03d}/frame-0", height=40 + 7 * (i % 3), width=57 + 5 * (i % 4), partition=partition, overlapping=overlapping, seed=i))
    return samples


@pytest.fixture()
def written(tmp_path):
    samples = make_samples(7)
    out = tmp_path / "store"
    with ShardWriter(out, samples_per_shard=3, fingerprints={"ingest": "11aa", "mask": "22bb"}) as writer:
        for sample in samples:
            writer.write(sample)
    return out, samples


# -- pyramid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 37, 53), (4, 256, 200), (1, 5, 9)])
def test_pyramid_matches_torch_adaptive_avg_pool(shape):
    generator = np.random.default_rng(sum(shape))
    masks = generator.random(shape) < 0.3
    masks[0, : shape[1] // 2] = True  # structure as well as noise
    pyramid = compute_mask_pyramid(masks, DEFAULT_SCALES)
    pooled_input = torch.from_numpy(masks.astype(np.float64))[None]
    for scale in DEFAULT_SCALES:
        reference = torch.nn.functional.adaptive_avg_pool2d(pooled_input, scale)[0].numpy()
        quantised = np.rint(reference * 255)
        difference = np.abs(pyramid[scale].astype(np.int64) - quantised)
        assert pyramid[scale].dtype == np.uint8 and pyramid[scale].shape == (shape[0], scale, scale)
        # Only exact halves may differ (torch rounds half to even, the store rounds half up).
        assert difference.max() <= 1
        assert np.all(np.isclose(reference * 255 % 1, 0.5)[difference == 1])


def test_pyramid_of_no_masks_is_empty():
    pyramid = compute_mask_pyramid(np.zeros((0, 30, 20), bool))
    assert [p.shape for p in pyramid.values()] == [(0, s, s) for s in DEFAULT_SCALES]


# -- masks --------------------------------------------------------------------------------------


def test_overlapping_masks_round_trip_losslessly():
    generator = np.random.default_rng(0)
    masks = generator.random((6, 33, 47)) < 0.5  # heavy overlap: several layers
    masks[2] = masks[1]  # identical masks
    masks[3] = False  # empty mask
    layers, layer_of_mask = pack_mask_layers(masks)
    assert len(layers) >= 2
    data = encode_masks(masks)
    assert np.array_equal(decode_masks(data), masks)
    decoded_layers, decoded_layer_of_mask = decode_mask_layers(data)
    assert np.array_equal(decoded_layers, layers) and np.array_equal(decoded_layer_of_mask, layer_of_mask)


def test_many_masks_use_16_bit_labels():
    masks = np.zeros((300, 20, 30), bool)
    for i in range(300):
        masks[i].flat[i] = True
    assert np.array_equal(decode_masks(encode_masks(masks)), masks)


# -- sample encoding ----------------------------------------------------------------------------


def test_encode_decode_sample_is_bit_identical():
    for sample in make_samples(5):
        encoded = encode_sample(sample)
        assert set(encoded) == {"__key__", "png", "masks.bin", "pyramid.bin", "json"}
        assert encoded == encode_sample(sample)  # deterministic bytes
        decoded = decode_sample(encoded)
        assert decoded == sample
        assert decoded.mask_set.masks.dtype == bool and decoded.image.dtype == np.uint8


def test_encode_rejects_inconsistent_samples():
    sample = make_samples(1)[0]
    with pytest.raises(ValueError, match="invalid sample key"):
        encode_sample(ShardSample(key="a.b", image=sample.image, mask_set=sample.mask_set, mask_pyramid=sample.mask_pyramid, record=sample.record))
    bad_pyramid = {s: p.copy() for s, p in sample.mask_pyramid.items()}
    bad_pyramid[14][0] = 255 - bad_pyramid[14][0]
    with pytest.raises(ValueError, match="pyramid level 14"):
        encode_sample(ShardSample(key="k", image=sample.image, mask_set=sample.mask_set, mask_pyramid=bad_pyramid, record=sample.record))
    record = dict(sample.record, masks=[])
    with pytest.raises(ValueError, match="disagrees with the mask set"):
        encode_sample(ShardSample(key="k", image=sample.image, mask_set=sample.mask_set, mask_pyramid=sample.mask_pyramid, record=record))


def test_decode_and_consistency_detect_record_array_disagreement():
    sample = make_samples(1)[0]
    encoded = encode_sample(sample)
    tampered = dict(encoded, png=encoded["png"][:-1] + bytes([encoded["png"][-1] ^ 1]))
    with pytest.raises(SampleFormatError, match="png: crc32 mismatch"):
        decode_sample(tampered)
    record = json.loads(encoded["json"])
    record["storage"]["mask_count"] += 1
    with pytest.raises(SampleFormatError, match="record mask_count"):
        decode_sample(dict(encoded, json=json.dumps(record).encode()))
    # The json member cannot carry its own crc: an edited area decodes, and the full
    # consistency check (what validate() runs) names it.
    record = json.loads(encoded["json"])
    record["masks"][0]["area"] += 1
    decoded = decode_sample(dict(encoded, json=json.dumps(record).encode()))
    assert any("mask 0" in p and "record area" in p for p in consistency_problems(decoded))
    # A pyramid rewritten with a valid crc but wrong values is caught by the consistency check.
    decoded = decode_sample(encoded)
    assert consistency_problems(decoded) == []
    decoded.mask_pyramid[7] = 255 - decoded.mask_pyramid[7]
    assert any("pyramid level 7" in p for p in consistency_problems(decoded))


# -- writing and reading ------------------------------------------------------------------------


def test_round_trip_through_shard_reader(written):
    out, samples = written
    reader = ShardReader(out, verify_shards=True)
    assert len(reader) == len(samples)
    assert reader.keys() == [s.key for s in samples]
    assert list(reader) == samples
    assert reader.fingerprints == {"ingest": "11aa", "mask": "22bb"}
    assert reader.scales == DEFAULT_SCALES
    assert sorted(p.name for p in out.iterdir()) == [INDEX_NAME, MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_random_access_by_key_reads_only_that_sample(written, monkeypatch):
    out, samples = written
    reader = ShardReader(out)
    reads = []
    original_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = original_open(path, mode, *args, **kwargs)
        if str(path).endswith(".tar"):
            original_read = handle.read
            handle_reads = reads

            class Wrapper:
                def __init__(self):
                    self._h = handle

                def read(self, n=-1):
                    handle_reads.append(n)
                    return original_read(n)

                def __getattr__(self, name):
                    return getattr(self._h, name)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    self._h.close()

            return Wrapper()
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    for sample in reversed(samples):
        assert reader[sample.key] == sample
    # One read per lookup, each exactly the indexed size (no scan of the shard).
    index = read_index(out)
    assert reads == [int(index.size[index.position(s.key)]) for s in reversed(samples)]
    assert reader[3] == samples[3]
    with pytest.raises(KeyError):
        reader["no-such-key"]


def test_round_trip_through_stock_webdataset(written):
    import webdataset as wds

    out, samples = written
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False)
    decoded = [decode_sample(raw) for raw in dataset]
    assert decoded == samples
    # Stock decoders still see the image as a PNG.
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("l8")))
    assert np.array_equal(first["png"], samples[0].image)


def test_shards_are_plain_tars(written):
    out, samples = written
    shard = out / "shard-000000.tar"
    listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == [f"{s.key}.{f}" for s in samples[:3] for f in ("png", "masks.bin", "pyramid.bin", "json")]
    with tarfile.open(shard) as tar:
        raw = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.name.startswith(samples[1].key + ".")}
    assert decode_sample({"__key__": samples[1].key, **raw}) == samples[1]
    assert [s for s in iter_shard(shard)] == samples[:3]


def test_index_is_plain_zarr(written):
    import zarr

    out, samples = written
    group = zarr.open_group(out / INDEX_NAME, mode="r")
    assert group["key"][:].tolist() == [s.key for s in samples]
    assert group["shard"][:].tolist() == [0, 0, 0, 1, 1, 1, 2]
    starts = group["mask_areas_start"][:]
    areas = group["mask_areas"][:]
    for row, sample in enumerate(samples):
        assert group["mask_count"][row] == len(sample.mask_set)
        assert areas[starts[row] : starts[row + 1]].tolist() == sample.mask_set.areas.tolist()
        assert group["source_hash"][row] == sample.record["source_sha256"]
    assert group.attrs["scales"] == list(DEFAULT_SCALES)
    assert group.attrs["fingerprints"] == {"ingest": "11aa", "mask": "22bb"}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["index_id"] == group.attrs["index_id"]
    # One seek + read at the indexed offset gives a tar stream holding exactly that sample.
    with open(out / "shard-000001.tar", "rb") as handle:
        handle.seek(int(group["offset"][4]))
        chunk = handle.read(int(group["size"][4]))
    import io

    with tarfile.open(fileobj=io.BytesIO(chunk)) as tar:
        assert {m.name for m in tar} == {f"{samples[4].key}.{f}" for f in ("png", "masks.bin", "pyramid.bin", "json")}


def test_writes_are_deterministic(tmp_path):
    samples = make_samples(4)
    first = write_shard(tmp_path / "a.tar", samples)
    second = write_shard(tmp_path / "b.tar", samples)
    assert first.sha256 == second.sha256 and first.samples == second.samples


def test_interrupted_write_leaves_no_tar_and_index_names_only_final_shards(tmp_path):
    samples = make_samples(5)
    out = tmp_path / "store"

    class Killed(Exception):
        pass

    def dying_stream():
        yield from samples[:2]
        raise Killed()

    out.mkdir()
    with pytest.raises(Killed):
        write_shard(out / "shard-000000.tar", dying_stream())
    assert list(out.iterdir()) == []

    # A ShardWriter that dies mid-shard keeps the finished shards, drops the partial one and
    # writes no index.
    with pytest.raises(Killed):
        with ShardWriter(out, samples_per_shard=2) as writer:
            for sample in samples[:3]:
                writer.write(sample)
            raise Killed()
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]

    # A writer that is still in progress has only a hidden temporary file, which the index refuses.
    in_progress = ShardFileWriter(out / "shard-000001.tar")
    in_progress.add(samples[2])
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    from shards.writer import ShardInfo

    with pytest.raises(ValueError, match="not final"):
        write_index(out, [ShardInfo(name="shard-000001.tar", sha256="0", size=0)], scales=DEFAULT_SCALES)
    with pytest.raises(ValueError, match="only name final shards"):
        write_index(out, [ShardInfo(name=in_progress.tmp_path.name, sha256="0", size=0)], scales=DEFAULT_SCALES)
    in_progress.abort()
    assert not in_progress.tmp_path.exists()


def test_rewrite_one_shard_and_reindex(written):
    """The incremental pipeline's path: replace one shard, rebuild the index from the old one."""
    out, samples = written
    infos = read_index(out).shard_infos()
    replacement = make_samples(2, start=20)
    infos[1] = write_shard(out / infos[1].name, replacement)
    write_index(out, infos, scales=DEFAULT_SCALES, fingerprints={"mask": "33cc"})
    reader = ShardReader(out, verify_shards=True)
    assert list(reader) == samples[:3] + replacement + samples[6:]
    assert reader.fingerprints == {"mask": "33cc"}
    with pytest.raises(ValueError, match="duplicate key"):
        write_index(out, infos + [infos[0]], scales=DEFAULT_SCALES)


def test_empty_mask_sets_and_empty_store(tmp_path):
    image = np.full((16, 24), 7, np.uint8)
    sample = ShardSample.build(key="blank", image=image, mask_set=MaskSet.empty(16, 24), record={"source_sha256": "x"})
    with ShardWriter(tmp_path / "one") as writer:
        writer.write(sample)
    assert ShardReader(tmp_path / "one")["blank"] == sample
    with ShardWriter(tmp_path / "none"):
        pass
    assert len(ShardReader(tmp_path / "none")) == 0
