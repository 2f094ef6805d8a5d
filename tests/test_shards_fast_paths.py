"""Shard store fast paths: each must give exactly what the straightforward implementation gives.

Sub-filtered PNGs (checked by Pillow and by libpng through torchvision), vectorised label-layer
unpacking, prefix-sum pyramid, the hand-written tar header parser (against ``tarfile``), and
what the default ("crc") and full verification levels catch.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from anaus_core.maskset import MaskSet
from shards.reader import ShardReader, _iter_members, _scan_members, iter_raw_samples, iter_shard
from shards.sample import (
    SampleFormatError,
    ShardSample,
    adaptive_bin_edges,
    compute_mask_pyramid,
    decode_sample,
    encode_image,
    encode_pyramid,
    encode_sample,
    pack_mask_layers,
    unpack_mask_layers,
)
from shards.synthetic import synthetic_sample
from shards.validate import validate
from shards.writer import ShardFileWriter, ShardWriter, write_shard


def speckle(generator: np.random.Generator, height: int, width: int) -> np.ndarray:
    smooth = np.cumsum(generator.normal(size=(height, width)), axis=1)
    return np.clip(128 + 20 * smooth / np.sqrt(width) + generator.gamma(2.0, 15.0, (height, width)) - 30, 0, 255).astype(np.uint8)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 57), (256, 256)])
@pytest.mark.parametrize("level", [0, 1, 6])
def test_sub_filtered_png_decodes_exactly_with_pillow_and_libpng(shape, level):
    generator = np.random.default_rng(sum(shape) + level)
    for image in (speckle(generator, *shape), generator.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8)):
        data = encode_image(image, compress_level=level, png_filter="sub")
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.mode == "L" and decoded.size == (shape[1], shape[0])
            assert np.array_equal(np.asarray(decoded), image)
        by_libpng = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        assert np.array_equal(by_libpng.numpy()[0], image)


def test_sub_png_is_deterministic_and_levels_1_to_9_are_the_same_bytes():
    image = speckle(np.random.default_rng(0), 64, 48)
    reference = encode_image(image, compress_level=1)
    assert all(encode_image(image, compress_level=level) == reference for level in range(1, 10))
    assert len(encode_image(image, compress_level=0)) > len(reference)
    with pytest.raises(ValueError, match="png_filter"):
        encode_image(image, png_filter="paeth")
    with Image.open(io.BytesIO(encode_image(image, png_filter="adaptive"))) as decoded:  # Pillow's encoder, still available
        assert np.array_equal(np.asarray(decoded), image)


def reference_unpack(layers: np.ndarray, layer_of_mask: np.ndarray) -> np.ndarray:
    return np.stack([layers[layer_of_mask[i]] == i + 1 for i in range(len(layer_of_mask))]) if len(layer_of_mask) else np.zeros((0, *layers.shape[1:]), bool)


def test_vectorised_unpack_matches_per_mask_loop():
    generator = np.random.default_rng(3)
    # Packed by pack_mask_layers (runs of masks per layer) ...
    for count in (0, 1, 5, 300):
        masks = generator.random((count, 23, 31)) < 0.08
        layers, layer_of_mask = pack_mask_layers(masks)
        assert np.array_equal(unpack_mask_layers(layers, layer_of_mask), reference_unpack(layers, layer_of_mask))
        assert np.array_equal(unpack_mask_layers(layers, layer_of_mask), masks)
    # ... and layers whose masks are interleaved (not a run), which the packer never makes.
    layers = np.zeros((2, 6, 7), np.uint8)
    layers[0, :3] = 1
    layers[1, :, :2] = 2
    layers[0, 3:] = 3
    layers[1, :, 5:] = 4
    layer_of_mask = np.array([0, 1, 0, 1])
    assert np.array_equal(unpack_mask_layers(layers, layer_of_mask), reference_unpack(layers, layer_of_mask))


def reference_pyramid(masks: np.ndarray, scales) -> dict[int, np.ndarray]:
    """Cell by cell, straight from the definition in docs/shard-format.md."""
    count, height, width = masks.shape
    result = {}
    for s in scales:
        row_start, row_end = adaptive_bin_edges(height, s)
        col_start, col_end = adaptive_bin_edges(width, s)
        level = np.zeros((count, s, s), np.uint8)
        for i in range(s):
            for j in range(s):
                cell = masks[:, row_start[i] : row_end[i], col_start[j] : col_end[j]]
                area = cell.reshape(count, -1).sum(axis=1).astype(np.int64)
                cells = cell.shape[1] * cell.shape[2]
                level[:, i, j] = (510 * area + cells) // (2 * cells)
        result[s] = level
    return result


@pytest.mark.parametrize("shape, scales", [((3, 37, 53), (7, 14)), ((2, 5, 9), (1, 2, 7, 12)), ((4, 64, 64), (7, 14, 28, 56)), ((1, 3, 3), (4,))])
def test_prefix_sum_pyramid_matches_definition(shape, scales):
    masks = np.random.default_rng(shape[1]).random(shape) < 0.4
    expected = reference_pyramid(masks, scales)
    pyramid = compute_mask_pyramid(masks, scales)
    assert list(pyramid) == list(scales)
    assert all(pyramid[s].dtype == np.uint8 and np.array_equal(pyramid[s], expected[s]) for s in scales)


def test_tar_header_parser_matches_tarfile(tmp_path):
    samples = [synthetic_sample(f"a/b{i}", height=30, width=41, partition=3, overlapping=1, seed=i) for i in range(4)]
    info = write_shard(tmp_path / "x.tar", samples)
    with open(tmp_path / "x.tar", "rb") as handle:
        fast = list(_scan_members(handle, "x"))
        handle.seek(0)
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            slow = list(_iter_members(tar, "x"))
    assert fast == slow and len(fast) == 16
    assert [(raw.offset, raw.size) for raw in iter_raw_samples(tmp_path / "x.tar")] == [(e.offset, e.size) for e in info.samples]


def test_long_keys_fall_back_to_tarfile(tmp_path):
    # Member names over 100 bytes get a pax header, which the fast parser hands to tarfile.
    long_key = "study/" + "x" * 120 + "/frame-1"
    samples = [synthetic_sample("first", height=20, width=24, partition=2, seed=1),
               synthetic_sample(long_key, height=20, width=24, partition=2, seed=2),
               synthetic_sample("last", height=20, width=24, partition=2, seed=3)]
    out = tmp_path / "store"
    with ShardWriter(out) as writer:
        for sample in samples:
            writer.write(sample)
    shard = next(out.glob("*.tar"))
    assert list(iter_shard(shard)) == samples
    reader = ShardReader(out)
    assert list(reader) == samples and reader[long_key] == samples[1] and reader["last"] == samples[2]
    assert validate(out).ok


def _with_storage(encoded: dict, **members: bytes) -> dict:
    """``encoded`` with members replaced and their crc32s updated, as a careful forger would."""
    record = json.loads(encoded["json"])
    for name, data in members.items():
        record["storage"]["crc32"][name] = zlib.crc32(data)
    return dict(encoded, **members, json=json.dumps(record, sort_keys=True, separators=(",", ":")).encode())


def test_default_verification_checks_crcs_and_full_adds_consistency(tmp_path):
    sample = synthetic_sample("k", height=48, width=40, partition=4, overlapping=1, seed=5)
    encoded = encode_sample(sample)
    assert decode_sample(encoded) == decode_sample(encoded, verify="full") == decode_sample(encoded, verify=False) == sample
    with pytest.raises(ValueError, match="verify"):
        decode_sample(encoded, verify="sometimes")

    # An altered member without an updated crc: caught by the default check, not by "none".
    altered = bytearray(encoded["pyramid.bin"])
    altered[-1] ^= 1
    with pytest.raises(SampleFormatError, match="pyramid.bin: crc32 mismatch"):
        decode_sample(dict(encoded, **{"pyramid.bin": bytes(altered)}))

    # A pyramid that disagrees with the masks but carries a valid crc: the default check does
    # not recompute pyramids; "full" and validate() do.
    wrong = {s: level.copy() for s, level in sample.mask_pyramid.items()}
    wrong[7][0] = 255 - wrong[7][0]
    forged = _with_storage(encoded, **{"pyramid.bin": encode_pyramid(wrong)})
    assert np.array_equal(decode_sample(forged).mask_pyramid[7], wrong[7])
    with pytest.raises(SampleFormatError, match="k: pyramid level 7 mask 0 differs"):
        decode_sample(forged, verify="full")
    # A record area that disagrees with the masks: likewise.
    record = json.loads(encoded["json"])
    record["masks"][1]["area"] += 1
    edited = dict(encoded, json=json.dumps(record).encode())
    assert decode_sample(edited).mask_set.areas[1] == sample.mask_set.areas[1] + 1  # taken from the record
    with pytest.raises(SampleFormatError, match="mask 1 .*record area"):
        decode_sample(edited, verify="full")

    with ShardFileWriter(tmp_path / "bad.tar") as writer:
        writer.add(encode_sample(synthetic_sample("good", height=48, width=40, partition=3, seed=6)))
        writer.add(forged)
        writer.finish()
    report = validate(tmp_path / "bad.tar")
    assert not report.ok
    assert [(p.kind, p.key) for p in report.errors] == [("consistency", "k")]
    assert "pyramid level 7" in report.errors[0].message
    assert [s.key for s in iter_shard(tmp_path / "bad.tar")] == ["good", "k"]  # plain reads take it
    with pytest.raises(Exception, match="pyramid level 7"):
        list(iter_shard(tmp_path / "bad.tar", verify="full"))


def test_encode_skips_the_pyramid_recompute_only_for_built_samples(monkeypatch):
    import shards.sample as sample_module

    sample = synthetic_sample("k", height=30, width=30, partition=3, seed=2)
    assert sample.pyramid_from_masks
    bad_pyramid = {s: 255 - level for s, level in sample.mask_pyramid.items()}
    direct = ShardSample(key="k", image=sample.image, mask_set=sample.mask_set, mask_pyramid=bad_pyramid, record=sample.record)
    assert not direct.pyramid_from_masks
    with pytest.raises(ValueError, match="pyramid level"):
        encode_sample(direct)
    encode_sample(direct, check_pyramid=False)  # the caller vouches for it
    with pytest.raises(ValueError, match="pyramid level"):
        encode_sample(ShardSample(key="k", image=sample.image, mask_set=sample.mask_set, mask_pyramid=bad_pyramid, record=sample.record, pyramid_from_masks=True), check_pyramid=True)

    calls = []
    original = sample_module.compute_mask_pyramid
    monkeypatch.setattr(sample_module, "compute_mask_pyramid", lambda *a, **k: calls.append(1) or original(*a, **k))
    built = ShardSample.build(key="b", image=sample.image, mask_set=sample.mask_set, record={"source_path": "x"})
    assert len(calls) == 1
    encoded = encode_sample(built)
    assert len(calls) == 1  # no second pyramid for a built sample
    assert encoded == encode_sample(built, check_pyramid=True)  # and the same bytes either way
    # Shapes are still checked without the recompute.
    truncated = dict(built.mask_pyramid)
    truncated[7] = truncated[7][:-1]
    with pytest.raises(ValueError, match="pyramid level 7 has shape"):
        encode_sample(ShardSample(key="b", image=built.image, mask_set=built.mask_set, mask_pyramid=truncated, record=built.record, pyramid_from_masks=True))
    # pyramid_from_masks is not part of equality
    assert built == ShardSample(key="b", image=built.image, mask_set=built.mask_set, mask_pyramid=built.mask_pyramid, record=built.record)


def test_direct_png_decoder_matches_pillow_and_falls_back():
    import shards.sample as sample_module

    generator = np.random.default_rng(11)
    for shape in [(1, 1), (1, 9), (7, 2), (33, 130), (256, 256)]:
        image = generator.integers(0, 256, shape, dtype=np.uint8)
        data = encode_image(image)
        direct = sample_module._decode_png_sub(data)
        with Image.open(io.BytesIO(data)) as by_pillow:
            assert direct is not None and direct.dtype == np.uint8 and np.array_equal(direct, np.asarray(by_pillow))
        # Pillow's own PNGs (adaptive filters) and stored ones are not taken by the direct path
        # but still decode, through Pillow.
        for other in (encode_image(image, png_filter="adaptive"), encode_image(image, png_filter="adaptive", compress_level=0)):
            assert np.array_equal(sample_module.decode_image(other), image)
    image = generator.integers(0, 256, (20, 20), dtype=np.uint8)
    data = bytearray(encode_image(image))
    data[60] ^= 0xFF  # inside the deflate stream
    with pytest.raises(SampleFormatError, match="png: cannot decode"):
        sample_module.decode_image(bytes(data))
