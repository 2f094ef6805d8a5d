"""Decode a raw shard sample into what pre-training needs (``TrainingSample``), without expanding
the label layers; header peeks that let a batch be allocated before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np



@dataclass
class TrainingSample:
    """What pre-training needs of a stored sample, without expanding the masks.

    Attributes:
        key: the sample key.
        image: uint8 (H, W).
        mask_layers: the stored label layers (``anaus_core.augment.views.MaskLayers``): mask ``i``
            is the pixels equal to ``i + 1`` in layer ``layer_of_mask[i]``.
        mask_ids: int64 (M,) ids from the record.
        area_grid: uint8 (M, g, g), the finest stored pyramid level (area fraction × 255), or None.
        scan_region: bool (H, W), the stored ``region.png`` (the pixels holding echo data), or
            None for a sample written without one (older stores): the whole image counts then.
    """

    key: str
    image: np.ndarray
    mask_layers: Any
    mask_ids: np.ndarray
    area_grid: np.ndarray | None
    scan_region: np.ndarray | None = None


def decode_training_sample(raw: Mapping[str, Any], *, verify: bool = True, layers_out: np.ndarray | None = None) -> TrainingSample:
    """Raw webdataset sample -> ``TrainingSample``: PNG, label layers, finest pyramid level, ids.

    The pipeline's decode. Unlike ``shards.sample.decode_sample`` it never expands the label
    layers into M boolean planes (the view code gathers the K sampled masks from the layers)
    and reads only the id of each mask from the record. ``verify`` checks every member's crc32
    and the record against the headers (shape, mask count), as ``decode_sample``'s default does.

    ``layers_out``: a writable uint8 (L, H, W) array (a slot of the batch being built); when the
    stored layers are zstd-compressed 8-bit labels of exactly that shape they are decompressed
    straight into it (``result.mask_layers.layers is layers_out``), saving the copy into the
    batch. Otherwise it is left untouched and the layers come back in a fresh array.
    """
    import json
    import zlib

    from anaus_core.augment.views import MaskLayers
    from shards.sample import (REGION_FIELD, STORAGE_KEY, SampleFormatError, decode_image, decode_mask_layers,
                               decode_pyramid, decode_region)

    key = str(raw.get("__key__", "?"))
    members = {}
    for name in ("json", "png", "masks.bin", "pyramid.bin"):
        value = raw.get(name)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SampleFormatError(f"{key}: member {name} is missing or already decoded")
        members[name] = value
    region_bytes = raw.get(REGION_FIELD)
    if region_bytes is not None and not isinstance(region_bytes, (bytes, bytearray, memoryview)):
        raise SampleFormatError(f"{key}: member {REGION_FIELD} is already decoded")
    try:
        record = json.loads(members["json"])
        storage = record[STORAGE_KEY]
        ids = np.asarray([entry["id"] for entry in record["masks"]], np.int64)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SampleFormatError(f"{key}: json: not a shard-store record ({error})") from None
    if region_bytes is None and verify and REGION_FIELD in storage.get("crc32", {}):
        raise SampleFormatError(f"{key}: missing member {key}.{REGION_FIELD} (the record lists it)")
    if region_bytes is not None:
        members[REGION_FIELD] = region_bytes
    if verify:
        crcs = storage.get("crc32", {})
        for name in ("png", "masks.bin", "pyramid.bin") + ((REGION_FIELD,) if region_bytes is not None else ()):
            if crcs.get(name) != zlib.crc32(members[name]):
                raise SampleFormatError(f"{key}: {name}: crc32 mismatch (member altered)")
    try:
        image = decode_image(members["png"])
        decoded = _decode_layers_into(members["masks.bin"], layers_out) if layers_out is not None else None
        layers, layer_of_mask = decoded if decoded is not None else decode_mask_layers(members["masks.bin"])
        pyramid = decode_pyramid(members["pyramid.bin"])
        region = decode_region(region_bytes) if region_bytes is not None else None
    except SampleFormatError as error:
        raise SampleFormatError(f"{key}: {error}") from None
    if region is not None and region.shape != image.shape:
        raise SampleFormatError(f"{key}: scan region is {region.shape}, image is {image.shape}")
    if layers.shape[1:] != image.shape and len(layer_of_mask):
        raise SampleFormatError(f"{key}: masks are {layers.shape[1:]}, image is {image.shape}")
    if len(ids) != len(layer_of_mask) or (verify and storage.get("mask_count") != len(ids)):
        raise SampleFormatError(f"{key}: record lists {len(ids)} masks, masks.bin holds {len(layer_of_mask)}")
    area_grid = pyramid[max(pyramid)] if pyramid and len(ids) else None
    if area_grid is not None and area_grid.shape[0] != len(ids):
        raise SampleFormatError(f"{key}: pyramid holds {area_grid.shape[0]} masks, the record {len(ids)}")
    return TrainingSample(key=key, image=image, mask_layers=MaskLayers(layers, layer_of_mask),
                          mask_ids=ids, area_grid=area_grid, scan_region=region)


def _masks_header(data: bytes | memoryview) -> tuple[int, int, int, int, int, int] | None:
    """(codec, bytes per label, M, H, W, layers) from a ``masks.bin`` header; None when it is not
    one this version reads (``shards.sample.decode_mask_layers`` then says why)."""
    from shards.sample import _MASKS_HEADER, FORMAT_VERSION, MASKS_MAGIC

    if len(data) < _MASKS_HEADER.size:
        return None
    magic, version, codec, label_bytes, count, height, width, layers = _MASKS_HEADER.unpack_from(data)
    if magic != MASKS_MAGIC or version != FORMAT_VERSION or label_bytes not in (1, 2):
        return None
    return codec, label_bytes, count, height, width, layers


def _zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878 §3.1.1.1), None if absent:
    decompressing into a buffer must not accept a frame shorter than the buffer."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    field = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if field == 0 or len(frame) < offset + field:
        return None
    value = int.from_bytes(frame[offset:offset + field], "little")
    return value + 256 if field == 2 else value


def _decode_layers_into(data: bytes | memoryview, out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``decode_mask_layers`` decompressing into ``out`` (uint8 (L, H, W), C-contiguous); None
    (nothing written) unless the layers are zstd, 8-bit and exactly that shape."""
    from numcodecs import zstd

    from shards.sample import _MASKS_HEADER, CODEC_ZSTD, SampleFormatError

    header = _masks_header(data)
    if header is None or out.dtype != np.uint8 or not out.flags.c_contiguous:
        return None
    codec, label_bytes, count, height, width, layer_count = header
    if codec != CODEC_ZSTD or label_bytes != 1 or out.shape != (layer_count, height, width) or not out.size:
        return None
    offset = _MASKS_HEADER.size + 2 * count
    if len(data) < offset:
        return None
    payload = memoryview(data)[offset:]
    if _zstd_content_size(payload) != out.size:
        return None
    layer_of_mask = np.frombuffer(data, "<u2", count, _MASKS_HEADER.size).astype(np.int64)
    if count and layer_of_mask.max() >= layer_count:
        raise SampleFormatError("masks: a mask names a layer that does not exist")
    try:
        zstd.decompress(payload, dest=out.reshape(-1))
    except Exception as exc:  # the compressor's own error types vary
        raise SampleFormatError(f"masks: cannot decompress ({exc})") from None
    return out, layer_of_mask


def peek_training_shape(raw: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(H, W, label layers, bytes per label) of a raw sample from its PNG and ``masks.bin``
    headers, nothing decoded; None when the headers are not the expected ones (the caller then
    decodes first). Lets a batch be allocated before its samples are decoded into it."""
    import struct

    png, masks = raw.get("png"), raw.get("masks.bin")
    if not isinstance(png, (bytes, bytearray, memoryview)) or not isinstance(masks, (bytes, bytearray, memoryview)):
        return None
    if len(png) < 24 or bytes(png[:8]) != b"\x89PNG\r\n\x1a\n" or bytes(png[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", png, 16)
    header = _masks_header(masks)
    if header is None:
        return None
    _, label_bytes, _, mask_h, mask_w, layers = header
    if layers and (mask_h, mask_w) != (height, width):
        return None  # the decode reports the mismatch
    return int(height), int(width), int(layers), int(label_bytes)
