"""One stored sample: the in-memory form (`ShardSample`) and its byte format inside a shard.

A sample is four tar members that share one key (``<key>.<field>``; stock webdataset splits
the member name at the first dot, so keys never contain dots):

``png``          the image, 8-bit grayscale PNG at the stored size.
``masks.bin``    the full-size mask set, lossless, overlaps allowed ("label layers", below).
``pyramid.bin``  per mask, the area fraction of every cell at each scale, ``round(255 f)``.
``json``         the record (source, hashes, sizes, per-mask metadata, stage fingerprints)
                 plus a ``storage`` entry with the format version, shapes and a crc32 of
                 every other member, so a single sample can be checked without the manifest.

Why label layers rather than one bit-plane per mask: masks from one source rarely overlap,
so greedily packing non-overlapping masks into the same uint8 label map stores every shared
boundary once instead of twice. On blob-like masks this is 40–50% smaller than compressed
bit-planes (see docs/benchmarks/shards.md) and decodes to bit-identical masks. The exact
byte layout is in docs/shard-format.md; numpy plus a zstd (or zlib) decompressor decodes it.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from anaus_core.maskset import MaskSet

FORMAT_VERSION = 1
DEFAULT_SCALES: tuple[int, ...] = (7, 14, 28, 56)
DEFAULT_COMPRESSION_LEVEL = 12
#: zlib level of the stored PNG (see encode_image and docs/benchmarks/shards.md for the trade-off).
DEFAULT_PNG_COMPRESS_LEVEL = 6

#: Member fields of one sample, in the order they are written to the tar.
FIELDS: tuple[str, ...] = ("png", "masks.bin", "pyramid.bin", "json")
STORAGE_KEY = "storage"

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_/-]+$")

CODEC_NONE, CODEC_ZSTD, CODEC_ZLIB = 0, 1, 2
_CODEC_NAMES = {CODEC_NONE: "none", CODEC_ZSTD: "zstd", CODEC_ZLIB: "zlib"}

MASKS_MAGIC = b"ANMK"
PYRAMID_MAGIC = b"ANPY"
# magic, version, codec, bytes per label, reserved, M, H, W, number of layers
_MASKS_HEADER = struct.Struct("<4sBBBxIIII")
# magic, version, codec, number of scales, M
_PYRAMID_HEADER = struct.Struct("<4sBBHI")


class SampleFormatError(ValueError):
    """A sample's bytes cannot be decoded, or its record disagrees with its arrays."""


@dataclass
class ShardSample:
    """One training sample as the shard store holds it.

    Attributes:
        key: unique id, ``[A-Za-z0-9_/-]+`` (never a dot).
        image: uint8 (H, W) grayscale at the stored size.
        mask_set: full-size masks (M, H, W), may overlap, M may be 0.
        mask_pyramid: scale -> uint8 (M, s, s), area fraction of each cell times 255, rounded.
        record: JSON-able dict: source path, source sha256, original size, frame, ``masks``
            (``MaskSet.records()``), ``fingerprints`` {stage: hex}.
    """

    key: str
    image: np.ndarray
    mask_set: MaskSet
    mask_pyramid: dict[int, np.ndarray]
    record: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        key: str,
        image: np.ndarray,
        mask_set: MaskSet,
        record: Mapping[str, Any] | None = None,
        scales: Sequence[int] = DEFAULT_SCALES,
    ) -> "ShardSample":
        """Make a sample, computing the pyramid and filling ``record["masks"]`` from the mask set."""
        full_record = dict(record or {})
        full_record["masks"] = mask_set.records()
        return cls(
            key=key,
            image=np.asarray(image),
            mask_set=mask_set,
            mask_pyramid=compute_mask_pyramid(mask_set.masks, scales),
            record=full_record,
        )

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.mask_pyramid)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardSample):
            return NotImplemented
        return (
            self.key == other.key
            and self.image.dtype == other.image.dtype
            and np.array_equal(self.image, other.image)
            and self.mask_set == other.mask_set
            and list(self.mask_pyramid) == list(other.mask_pyramid)
            and all(
                self.mask_pyramid[s].dtype == other.mask_pyramid[s].dtype
                and np.array_equal(self.mask_pyramid[s], other.mask_pyramid[s])
                for s in self.mask_pyramid
            )
            and self.record == other.record
        )


# ---------------------------------------------------------------------------------------------
# Pyramid
# ---------------------------------------------------------------------------------------------


def adaptive_bin_edges(length: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/end (exclusive) of each bin, exactly as ``torch.nn.functional.adaptive_avg_pool2d``:
    bin i covers ``[floor(i * L / s), ceil((i + 1) * L / s))``; bins overlap when s does not
    divide L and repeat pixels when s > L."""
    index = np.arange(bins, dtype=np.int64)
    start = (index * length) // bins
    end = -((-(index + 1) * length) // bins)
    return start, end


def compute_mask_pyramid(masks: np.ndarray, scales: Iterable[int] = DEFAULT_SCALES) -> dict[int, np.ndarray]:
    """Area fraction of each mask in every cell of an s×s grid, for each scale s.

    Args:
        masks: bool (M, H, W).
        scales: grid sizes, e.g. (7, 14, 28, 56).

    Returns:
        scale -> uint8 (M, s, s) holding ``round(255 * fraction)`` (halves round up), with
        adaptive-average-pooling bins. Computed with integer prefix sums, so the result is
        exact and independent of float rounding.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    count, height, width = masks.shape
    scales = [int(s) for s in scales]
    if any(s < 1 for s in scales):
        raise ValueError(f"scales must be >= 1, got {scales}")
    if count == 0:
        return {s: np.zeros((0, s, s), np.uint8) for s in scales}
    # Prefix sum along the contiguous last axis once, shared by every scale (a cumsum along a
    # strided axis is ~7x slower in numpy); rows are then summed on the small (M, H, s) arrays.
    col_prefix = np.zeros((count, height, width + 1), np.int32)
    np.cumsum(masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8), axis=2, dtype=np.int32, out=col_prefix[:, :, 1:])
    pyramid: dict[int, np.ndarray] = {}
    for s in scales:
        row_start, row_end = adaptive_bin_edges(height, s)
        col_start, col_end = adaptive_bin_edges(width, s)
        col_sums = col_prefix[:, :, col_end] - col_prefix[:, :, col_start]  # (M, H, s)
        row_prefix = np.zeros((count, height + 1, s), np.int64)
        np.cumsum(col_sums, axis=1, out=row_prefix[:, 1:])
        area = row_prefix[:, row_end] - row_prefix[:, row_start]  # (M, s, s)
        cells = ((row_end - row_start)[:, None] * (col_end - col_start)[None, :]).astype(np.int64)
        pyramid[s] = ((510 * area + cells) // (2 * cells)).astype(np.uint8)
    return pyramid


# ---------------------------------------------------------------------------------------------
# Compression helpers
# ---------------------------------------------------------------------------------------------


def _compress(data: bytes, codec: int, level: int) -> bytes:
    if len(data) == 0:
        return b""  # empty arrays (M = 0) store no payload at all, whatever the codec
    if codec == CODEC_ZSTD:
        from numcodecs import Zstd

        return bytes(Zstd(level=level).encode(data))
    if codec == CODEC_ZLIB:
        return zlib.compress(data, min(max(level, 1), 9))
    if codec == CODEC_NONE:
        return bytes(data)
    raise ValueError(f"unknown codec {codec}")


def _decompress(data: bytes | memoryview, codec: int) -> bytes:
    if len(data) == 0:
        return b""
    if codec == CODEC_ZSTD:
        from numcodecs import Zstd

        return bytes(Zstd().decode(data))
    if codec == CODEC_ZLIB:
        return zlib.decompress(data)
    if codec == CODEC_NONE:
        return bytes(data)
    raise SampleFormatError(f"unknown codec id {codec}")


def codec_id(name: str) -> int:
    for cid, cname in _CODEC_NAMES.items():
        if cname == name:
            return cid
    raise ValueError(f"unknown codec {name!r}; choose one of {sorted(_CODEC_NAMES.values())}")


# ---------------------------------------------------------------------------------------------
# Masks: label layers
# ---------------------------------------------------------------------------------------------


def pack_mask_layers(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedily pack masks into label maps in which no two masks overlap.

    Returns ``(layers, layer_of_mask)``: layers (L, H, W) uint8 (uint16 when M > 255) where
    mask i is stored as value i + 1 in layer ``layer_of_mask[i]``; 0 means no mask.
    Deterministic: masks are placed in order, each in the first layer where it fits.
    """
    count, height, width = masks.shape
    dtype = np.uint8 if count <= 255 else np.uint16
    layers: list[np.ndarray] = []
    layer_of_mask = np.zeros(count, np.uint16)
    for i in range(count):
        mask = masks[i]
        for index, layer in enumerate(layers):
            if not layer[mask].any():
                layer[mask] = i + 1
                layer_of_mask[i] = index
                break
        else:
            layer = np.zeros((height, width), dtype)
            layer[mask] = i + 1
            layer_of_mask[i] = len(layers)
            layers.append(layer)
    stacked = np.stack(layers) if layers else np.zeros((0, height, width), dtype)
    return stacked, layer_of_mask


def unpack_mask_layers(layers: np.ndarray, layer_of_mask: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_mask_layers`: bool (M, H, W)."""
    count = len(layer_of_mask)
    _, height, width = layers.shape
    masks = np.empty((count, height, width), bool)
    for index in range(count):
        np.equal(layers[layer_of_mask[index]], index + 1, out=masks[index])
    return masks


def encode_masks(masks: np.ndarray, *, codec: int = CODEC_ZSTD, level: int = DEFAULT_COMPRESSION_LEVEL) -> bytes:
    """bool (M, H, W) -> ``masks.bin`` bytes (header, layer index per mask, compressed layers)."""
    masks = np.asarray(masks, dtype=bool)
    count, height, width = masks.shape
    layers, layer_of_mask = pack_mask_layers(masks)
    header = _MASKS_HEADER.pack(MASKS_MAGIC, FORMAT_VERSION, codec, layers.dtype.itemsize, count, height, width, len(layers))
    payload = _compress(np.ascontiguousarray(layers).astype(layers.dtype.newbyteorder("<")).tobytes(), codec, level)
    return header + layer_of_mask.astype("<u2").tobytes() + payload


def decode_mask_layers(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``masks.bin`` bytes -> (layers (L, H, W), layer_of_mask (M,)). Cheaper than full masks
    when a consumer only needs label maps (e.g. to crop/resize them with nearest sampling)."""
    if len(data) < _MASKS_HEADER.size:
        raise SampleFormatError(f"masks: {len(data)} bytes is shorter than the header")
    magic, version, codec, label_bytes, count, height, width, layer_count = _MASKS_HEADER.unpack_from(data)
    if magic != MASKS_MAGIC:
        raise SampleFormatError(f"masks: bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise SampleFormatError(f"masks: unsupported format version {version}")
    if label_bytes not in (1, 2):
        raise SampleFormatError(f"masks: bad label size {label_bytes}")
    offset = _MASKS_HEADER.size
    if len(data) < offset + 2 * count:
        raise SampleFormatError(f"masks: {len(data)} bytes cannot hold the layer table of {count} masks")
    layer_of_mask = np.frombuffer(data, "<u2", count, offset).astype(np.int64)
    offset += 2 * count
    dtype = np.dtype("<u1" if label_bytes == 1 else "<u2")
    try:
        raw = _decompress(memoryview(data)[offset:], codec)
    except SampleFormatError:
        raise
    except Exception as exc:  # the compressor's own error types vary
        raise SampleFormatError(f"masks: cannot decompress ({exc})") from None
    expected = layer_count * height * width * dtype.itemsize
    if len(raw) != expected:
        raise SampleFormatError(f"masks: {len(raw)} bytes after decompression, expected {expected}")
    if count and (layer_of_mask.max() >= layer_count):
        raise SampleFormatError("masks: a mask names a layer that does not exist")
    layers = np.frombuffer(raw, dtype).reshape(layer_count, height, width)
    return layers, layer_of_mask


def decode_masks(data: bytes) -> np.ndarray:
    """``masks.bin`` bytes -> bool (M, H, W)."""
    layers, layer_of_mask = decode_mask_layers(data)
    return unpack_mask_layers(layers, layer_of_mask)


# ---------------------------------------------------------------------------------------------
# Pyramid bytes
# ---------------------------------------------------------------------------------------------


def encode_pyramid(pyramid: Mapping[int, np.ndarray], *, codec: int = CODEC_ZSTD, level: int = DEFAULT_COMPRESSION_LEVEL) -> bytes:
    """scale -> uint8 (M, s, s) -> ``pyramid.bin`` bytes (header, scales, compressed levels)."""
    scales = [int(s) for s in pyramid]
    counts = {int(np.asarray(p).shape[0]) for p in pyramid.values()}
    if len(counts) > 1:
        raise ValueError(f"pyramid levels disagree on the mask count: {sorted(counts)}")
    count = counts.pop() if counts else 0
    for s in scales:
        level_array = np.asarray(pyramid[s])
        if level_array.dtype != np.uint8 or level_array.shape != (count, s, s):
            raise ValueError(f"pyramid level {s} must be uint8 ({count}, {s}, {s}), got {level_array.dtype} {level_array.shape}")
    header = _PYRAMID_HEADER.pack(PYRAMID_MAGIC, FORMAT_VERSION, codec, len(scales), count)
    body = b"".join(np.ascontiguousarray(pyramid[s]).tobytes() for s in scales)
    return header + np.asarray(scales, "<u2").tobytes() + _compress(body, codec, level)


def decode_pyramid(data: bytes) -> dict[int, np.ndarray]:
    """``pyramid.bin`` bytes -> scale -> uint8 (M, s, s)."""
    if len(data) < _PYRAMID_HEADER.size:
        raise SampleFormatError(f"pyramid: {len(data)} bytes is shorter than the header")
    magic, version, codec, scale_count, count = _PYRAMID_HEADER.unpack_from(data)
    if magic != PYRAMID_MAGIC:
        raise SampleFormatError(f"pyramid: bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise SampleFormatError(f"pyramid: unsupported format version {version}")
    offset = _PYRAMID_HEADER.size
    if len(data) < offset + 2 * scale_count:
        raise SampleFormatError(f"pyramid: {len(data)} bytes cannot hold {scale_count} scales")
    scales = [int(s) for s in np.frombuffer(data, "<u2", scale_count, offset)]
    offset += 2 * scale_count
    try:
        raw = _decompress(memoryview(data)[offset:], codec)
    except SampleFormatError:
        raise
    except Exception as exc:
        raise SampleFormatError(f"pyramid: cannot decompress ({exc})") from None
    expected = sum(count * s * s for s in scales)
    if len(raw) != expected:
        raise SampleFormatError(f"pyramid: {len(raw)} bytes after decompression, expected {expected}")
    flat = np.frombuffer(raw, np.uint8)
    pyramid: dict[int, np.ndarray] = {}
    start = 0
    for s in scales:
        pyramid[s] = flat[start : start + count * s * s].reshape(count, s, s)
        start += count * s * s
    return pyramid


# ---------------------------------------------------------------------------------------------
# Image bytes
# ---------------------------------------------------------------------------------------------


def encode_image(image: np.ndarray, *, compress_level: int = 6) -> bytes:
    """uint8 (H, W) -> PNG bytes. ``compress_level`` 0 stores the pixels uncompressed inside
    the PNG: larger, but it decodes about twice as fast (no inflate, no filters)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode != "L":
                raise SampleFormatError(f"png: expected 8-bit grayscale (mode L), got mode {img.mode}")
            return np.asarray(img)
    except SampleFormatError:
        raise
    except Exception as exc:
        raise SampleFormatError(f"png: cannot decode ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Whole sample
# ---------------------------------------------------------------------------------------------


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key) or key.startswith("/") or "//" in key:
        raise ValueError(f"invalid sample key {key!r}: use [A-Za-z0-9_/-]+ (no dots, no leading '/')")
    return key


def _canonical_json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("utf-8")


def encode_sample(
    sample: ShardSample,
    *,
    codec: str = "zstd",
    level: int = DEFAULT_COMPRESSION_LEVEL,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
) -> dict[str, Any]:
    """ShardSample -> webdataset dict ``{"__key__": key, "png": b, "masks.bin": b, "pyramid.bin": b, "json": b}``.

    The pyramid must equal ``compute_mask_pyramid(masks, scales)`` within ±1 and
    ``record["masks"]`` (if present) must equal ``mask_set.records()``; otherwise ValueError.
    A missing ``record["masks"]`` is filled in. Output bytes are deterministic.
    """
    key = check_key(sample.key)
    if STORAGE_KEY in sample.record:
        raise ValueError(f"{key}: record key {STORAGE_KEY!r} is reserved for the shard store")
    codec_number = codec_id(codec)
    image = np.asarray(sample.image)
    mask_set = sample.mask_set
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"{key}: image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if mask_set.shape != image.shape:
        raise ValueError(f"{key}: masks are {mask_set.shape}, image is {image.shape}")
    record = dict(sample.record)
    mask_records = mask_set.records()
    if "masks" in record and record["masks"] != mask_records:
        raise ValueError(f"{key}: record['masks'] disagrees with the mask set")
    record["masks"] = mask_records
    problems = pyramid_problems(mask_set.masks, sample.mask_pyramid)
    if problems:
        raise ValueError(f"{key}: {problems[0]}")

    png = encode_image(image, compress_level=png_compress_level)
    masks_bytes = encode_masks(mask_set.masks, codec=codec_number, level=level)
    pyramid_bytes = encode_pyramid(sample.mask_pyramid, codec=codec_number, level=level)
    record[STORAGE_KEY] = {
        "format_version": FORMAT_VERSION,
        "image_shape": [int(image.shape[0]), int(image.shape[1])],
        "mask_count": len(mask_set),
        "scales": [int(s) for s in sample.mask_pyramid],
        "crc32": {
            "png": zlib.crc32(png),
            "masks.bin": zlib.crc32(masks_bytes),
            "pyramid.bin": zlib.crc32(pyramid_bytes),
        },
    }
    return {"__key__": key, "png": png, "masks.bin": masks_bytes, "pyramid.bin": pyramid_bytes, "json": _canonical_json(record)}


def _field(raw: Mapping[str, Any], name: str, key: str) -> bytes:
    if name not in raw:
        raise SampleFormatError(f"{key}: missing member {key}.{name}")
    value = raw[name]
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SampleFormatError(f"{key}: member {name} was already decoded ({type(value).__name__}); read raw bytes (no .decode())")
    return bytes(value)


def decode_sample(raw: Mapping[str, Any], *, verify: bool = True) -> ShardSample:
    """webdataset dict (what ``wds.WebDataset(url)`` yields, undecoded) -> ShardSample.

    With ``verify`` (default) the crc32 of each member is checked against the record and the
    record is checked against the arrays (shape, mask count, areas); a mismatch raises
    ``SampleFormatError`` naming the key and the field. The pyramid-vs-masks check is
    :func:`consistency_problems` (validation runs it; it costs a pooling pass).
    """
    key = str(raw.get("__key__", "?"))
    record_bytes = _field(raw, "json", key)
    try:
        record = json.loads(record_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleFormatError(f"{key}: json: cannot parse ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get(STORAGE_KEY), dict):
        raise SampleFormatError(f"{key}: json: no '{STORAGE_KEY}' entry (not written by this store)")
    storage = record.pop(STORAGE_KEY)
    png = _field(raw, "png", key)
    masks_bytes = _field(raw, "masks.bin", key)
    pyramid_bytes = _field(raw, "pyramid.bin", key)
    if verify:
        crcs = storage.get("crc32", {})
        for name, data in (("png", png), ("masks.bin", masks_bytes), ("pyramid.bin", pyramid_bytes)):
            if crcs.get(name) != zlib.crc32(data):
                raise SampleFormatError(f"{key}: {name}: crc32 mismatch (member altered)")
    try:
        image = decode_image(png)
        layers, layer_of_mask = decode_mask_layers(masks_bytes)
        masks = unpack_mask_layers(layers, layer_of_mask)
        pyramid = decode_pyramid(pyramid_bytes)
    except SampleFormatError as exc:
        raise SampleFormatError(f"{key}: {exc}") from None
    mask_records = record.get("masks")
    if not isinstance(mask_records, list) or len(mask_records) != len(masks):
        count = len(mask_records) if isinstance(mask_records, list) else "no"
        raise SampleFormatError(f"{key}: record lists {count} masks, masks.bin holds {len(masks)}")
    try:
        mask_set = MaskSet(
            masks=masks,
            ids=np.asarray([m["id"] for m in mask_records], np.int32),
            sources=[m["source"] for m in mask_records],
            scores=np.asarray([m["score"] for m in mask_records], np.float32),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleFormatError(f"{key}: record masks are malformed ({exc})") from None
    if verify:
        # The writer checked record areas against the masks and the crc32s prove the bytes are the
        # ones it wrote, so the record's areas can fill MaskSet's area cache (summing M full-size
        # planes would cost more than decoding the image). validate() recomputes them.
        mask_set._areas = np.asarray([int(m["area"]) for m in mask_records], np.int64)
    sample = ShardSample(key=key, image=image, mask_set=mask_set, mask_pyramid=pyramid, record=record)
    if verify:
        problems = record_problems(sample, storage, recompute_areas=False)
        if problems:
            raise SampleFormatError(f"{key}: {problems[0]}")
    return sample


def record_problems(sample: ShardSample, storage: Mapping[str, Any] | None = None, *, recompute_areas: bool = True) -> list[str]:
    """Record-vs-arrays checks: shapes, mask count, scales and (``recompute_areas``) the areas
    counted on the masks themselves rather than taken from MaskSet's cache."""
    problems: list[str] = []
    height, width = sample.image.shape
    if sample.mask_set.shape != (height, width):
        problems.append(f"masks are {sample.mask_set.shape}, image is {(height, width)}")
    mask_records = sample.record.get("masks", [])
    masks = sample.mask_set.masks
    areas = np.count_nonzero(masks.reshape(masks.shape[0], -1), axis=1) if recompute_areas and masks.size else sample.mask_set.areas
    if len(mask_records) != len(areas):
        problems.append(f"record lists {len(mask_records)} masks, arrays hold {len(areas)}")
    else:
        for index, (entry, area) in enumerate(zip(mask_records, areas)):
            if int(entry.get("area", -1)) != int(area):
                problems.append(f"mask {index} (id {entry.get('id')}): record area {entry.get('area')} != {int(area)} pixels")
                break
    for s, level in sample.mask_pyramid.items():
        if level.shape != (len(sample.mask_set), s, s):
            problems.append(f"pyramid level {s} has shape {level.shape}, expected {(len(sample.mask_set), s, s)}")
    if storage is not None:
        if list(storage.get("image_shape", [])) != [height, width]:
            problems.append(f"record image_shape {storage.get('image_shape')} != stored image {[height, width]}")
        if storage.get("mask_count") != len(sample.mask_set):
            problems.append(f"record mask_count {storage.get('mask_count')} != {len(sample.mask_set)} stored masks")
        if list(storage.get("scales", [])) != list(sample.mask_pyramid):
            problems.append(f"record scales {storage.get('scales')} != stored scales {list(sample.mask_pyramid)}")
    return problems


def pyramid_problems(masks: np.ndarray, pyramid: Mapping[int, np.ndarray], tolerance: int = 1) -> list[str]:
    """Differences between a stored pyramid and the one recomputed from the masks (> tolerance)."""
    problems = []
    expected = compute_mask_pyramid(masks, list(pyramid))
    for s, level in pyramid.items():
        level = np.asarray(level)
        if level.shape != expected[s].shape:
            problems.append(f"pyramid level {s} has shape {level.shape}, expected {expected[s].shape}")
            continue
        difference = np.abs(level.astype(np.int16) - expected[s].astype(np.int16))
        if difference.size and difference.max() > tolerance:
            mask_index = int(np.argwhere(difference > tolerance)[0][0])
            problems.append(f"pyramid level {s} mask {mask_index} differs from the masks by up to {int(difference.max())}/255")
    return problems


def consistency_problems(sample: ShardSample) -> list[str]:
    """Every record-vs-arrays check, including the pyramid recomputed from the masks (±1)."""
    return record_problems(sample) + pyramid_problems(sample.mask_set.masks, sample.mask_pyramid)
