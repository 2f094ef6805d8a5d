"""One stored sample: the in-memory form (`ShardSample`) and its byte format inside a shard.

A sample is four tar members that share one key (``<key>.<field>``; stock webdataset splits
the member name at the first dot, so keys never contain dots):

``png``          the image, 8-bit grayscale PNG at the stored size.
``masks.bin``    the full-size mask set, lossless, overlaps allowed ("label layers", below).
``pyramid.bin``  per mask, the area fraction of every cell at each scale, ``round(255 f)``.
``region.png``   optional: the scan region (1-bit PNG, same size as the image), the pixels that
                 hold echo data; every mask lies inside it. Not one of the masks.
``json``         the record (source, hashes, sizes, per-mask metadata, stage fingerprints)
                 plus a ``storage`` entry with the format version, shapes and a crc32 of
                 every other member, so a single sample can be checked without the manifest.

Why label layers rather than one bit-plane per mask: masks from one source rarely overlap,
so greedily packing non-overlapping masks into the same uint8 label map stores every shared
boundary once instead of twice. On blob-like masks this is 40–50% smaller than compressed
bit-planes (see docs/benchmarks.md (shards)) and decodes to bit-identical masks. The exact
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
from anaus_core.errors import UserInputError
from anaus_core.image_limits import check_declared_size, png_declared_size

FORMAT_VERSION = 1
DEFAULT_SCALES: tuple[int, ...] = (7, 14, 28, 56)
#: zstd level of masks.bin and pyramid.bin. 7 keeps 16 fragmented masks under 16 KB (level 3
#: does not) at a fifth of the encode time of level 12 (docs/benchmarks.md (shards)).
DEFAULT_COMPRESSION_LEVEL = 7
#: zlib level of the stored PNG; 0 stores the pixels uncompressed. With the "sub" filter any
#: level from 1 to 9 gives the same bytes (Huffman-only deflate has no level).
DEFAULT_PNG_COMPRESS_LEVEL = 6
#: How the stored PNG's rows are filtered: "sub" (every row Sub-filtered, Huffman-only deflate;
#: encode_image explains why) or "adaptive" (Pillow's encoder, per-row filter choice).
DEFAULT_PNG_FILTER = "sub"
PNG_FILTERS: tuple[str, ...] = ("sub", "adaptive")
#: What decode_sample checks: "none", "crc" (member crc32s + record-vs-header counts, the
#: default; cheap) or "full" (also areas recounted and the pyramid recomputed from the masks).
VERIFY_LEVELS: tuple[str, ...] = ("none", "crc", "full")

#: Member fields of one sample, in the order they are written to the tar.
FIELDS: tuple[str, ...] = ("png", "masks.bin", "pyramid.bin", "json")
#: Members a sample may have besides ``FIELDS`` (written before ``json``).
OPTIONAL_FIELDS: tuple[str, ...] = ("region.png",)
REGION_FIELD = "region.png"
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


MAX_STORED_PNG_PIXELS = 16 * 1024 * 1024  # as pipeline.ingest.MAX_STORED_PIXELS: no stored image is larger


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
    #: True when ``mask_pyramid`` was computed from ``mask_set.masks`` by this module (``build``),
    #: so ``encode_sample`` need not recompute it to check it. Not part of equality. Set it to
    #: False (or build a new sample) after changing the masks in place.
    pyramid_from_masks: bool = field(default=False, repr=False)
    #: bool (H, W) scan region (``anaus_core.scan_region``), or None (a store written without).
    scan_region: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        *,
        key: str,
        image: np.ndarray,
        mask_set: MaskSet,
        record: Mapping[str, Any] | None = None,
        scales: Sequence[int] = DEFAULT_SCALES,
        scan_region: np.ndarray | None = None,
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
            pyramid_from_masks=True,
            scan_region=None if scan_region is None else np.asarray(scan_region, bool),
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
            and (self.scan_region is None) == (other.scan_region is None)
            and (self.scan_region is None or np.array_equal(self.scan_region, other.scan_region))
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
    # Prefix sums only ever run along the contiguous last axis (a cumsum along a strided axis, or
    # into a strided ``out``, is several times slower in numpy): columns of every scale are
    # binned in one pass over the full-size masks, then the small (M, sum(s), H) result is
    # transposed so the rows are binned along its last axis too.
    masks_u8 = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8)
    col_edges = [adaptive_bin_edges(width, s) for s in scales]
    row_edges = [adaptive_bin_edges(height, s) for s in scales]
    col_sums = _bin_sums_last_axis(masks_u8, np.concatenate([e[0] for e in col_edges]), np.concatenate([e[1] for e in col_edges]))
    col_sums_by_column = np.ascontiguousarray(col_sums.transpose(0, 2, 1))  # (M, sum(s), H)
    pyramid: dict[int, np.ndarray] = {}
    offset = 0
    for s, (col_start, col_end), (row_start, row_end) in zip(scales, col_edges, row_edges):
        area = _bin_sums_last_axis(col_sums_by_column[:, offset : offset + s], row_start, row_end).transpose(0, 2, 1)
        offset += s
        cells = ((row_end - row_start)[:, None] * (col_end - col_start)[None, :]).astype(np.int64)
        pyramid[s] = ((510 * area.astype(np.int64) + cells) // (2 * cells)).astype(np.uint8)
    return pyramid


def _bin_sums_last_axis(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int32 ``values[..., start:end].sum(-1)`` for each (start, end) bin, from one prefix sum."""
    prefix = np.cumsum(values, axis=-1, dtype=np.int32)
    upper = np.take(prefix, ends - 1, axis=-1)
    lower = np.take(prefix, np.maximum(starts - 1, 0), axis=-1)
    lower[..., starts == 0] = 0
    return upper - lower


# ---------------------------------------------------------------------------------------------
# Compression helpers
# ---------------------------------------------------------------------------------------------


def _compress(data: bytes, codec: int, level: int) -> bytes:
    if len(data) == 0:
        return b""  # empty arrays (M = 0) store no payload at all, whatever the codec
    if codec == CODEC_ZSTD:
        from numcodecs import zstd

        return bytes(zstd.compress(data, level))
    if codec == CODEC_ZLIB:
        return zlib.compress(data, min(max(level, 1), 9))
    if codec == CODEC_NONE:
        return bytes(data)
    raise ValueError(f"unknown codec {codec}")


def _decompress(data: bytes | memoryview, codec: int) -> bytes:
    if len(data) == 0:
        return b""
    if codec == CODEC_ZSTD:
        from numcodecs import zstd

        return zstd.decompress(data)
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
    if count == 0:
        return masks
    layer_of_mask = np.asarray(layer_of_mask, np.int64)
    labels = np.arange(1, count + 1, dtype=layers.dtype)[:, None, None]
    # One broadcast comparison per layer instead of one per mask. The packer fills layers in
    # mask order, so a layer's masks are usually one run of indices and write straight into
    # the output; otherwise they are scattered in.
    for layer_index in np.unique(layer_of_mask):
        members = np.flatnonzero(layer_of_mask == layer_index)
        first, last = int(members[0]), int(members[-1])
        if last - first + 1 == len(members):
            np.equal(layers[layer_index], labels[first : last + 1], out=masks[first : last + 1])
        else:
            masks[members] = np.equal(layers[layer_index], labels[members])
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_image(image: np.ndarray, *, compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL, png_filter: str = DEFAULT_PNG_FILTER) -> bytes:
    """uint8 (H, W) -> 8-bit grayscale PNG bytes (any PNG reader decodes them).

    ``png_filter="sub"`` (default) writes every row with PNG filter type 1 (Sub: each byte
    minus its left neighbour, mod 256) and deflates with zlib's Huffman-only strategy. This is
    hand-written (IHDR + one IDAT + IEND, ~10 lines) because Pillow chooses filters per row
    itself, often Paeth, whose reversal is the slowest part of decoding, and offers no way to
    pick one. On ultrasound speckle LZ77 matching finds almost nothing, so Sub + Huffman is
    within 4% of Pillow level 6 in size, encodes ~8x faster and decodes ~25% faster
    (docs/benchmarks.md (shards)). ``png_filter="adaptive"`` uses Pillow at ``compress_level``.
    ``compress_level`` 0 stores the pixels uncompressed: larger, but it decodes faster still.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if png_filter == "sub":
        return _encode_png_sub(image, compress_level)
    if png_filter != "adaptive":
        raise ValueError(f"unknown png_filter {png_filter!r}; choose one of {list(PNG_FILTERS)}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _encode_png_sub(image: np.ndarray, compress_level: int) -> bytes:
    height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"image must not be empty, got {image.shape}")
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1] = image[:, 0]
    np.subtract(image[:, 1:], image[:, :-1], out=rows[:, 2:])  # uint8 arithmetic wraps mod 256, as PNG defines
    if compress_level == 0:
        idat = zlib.compress(rows, 0)
    else:
        compressor = zlib.compressobj(min(max(compress_level, 1), 9), zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
        idat = compressor.compress(rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _decode_png_sub(data: bytes) -> np.ndarray | None:
    """Decode a PNG laid out exactly as ``_encode_png_sub`` writes it (8-bit gray, one IDAT,
    every row Sub-filtered); None for any other PNG. Reversing Sub is a running sum along each
    row mod 256, done as a log2(W)-step doubling scan (vectorised row adds) instead of going
    through Pillow's per-row machinery; ~1.5x faster than Pillow on 256×256. Chunk crcs are
    not checked here (the member crc32 in the record covers the bytes; zlib checks its adler32)."""
    if len(data) < 57 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[37:41] != b"IDAT":
        return None
    width, height, depth, color, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    (idat_length,) = struct.unpack_from(">I", data, 33)
    if (depth, color, compression, filtering, interlace) != (8, 0, 0, 0, 0) or struct.unpack_from(">I", data, 8)[0] != 13:
        return None
    if data[45 + idat_length : 57 + idat_length] != b"\0\0\0\0IEND\xaeB`\x82" or len(data) != 57 + idat_length:
        return None
    # Inflate the first rows alone and look at their filter bytes, so that a PNG from another
    # encoder (which can also end in one IDAT) is handed to Pillow without a wasted full inflate.
    inflater = zlib.decompressobj()
    head_rows = min(height, 8)
    raw = inflater.decompress(memoryview(data)[41 : 41 + idat_length], head_rows * (width + 1))
    if len(raw) != head_rows * (width + 1) or raw[:: width + 1] != b"\x01" * head_rows:
        return None
    raw += inflater.decompress(inflater.unconsumed_tail) + inflater.flush()
    if len(raw) != height * (width + 1) or not inflater.eof:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
    if not np.all(rows[:, 0] == 1):
        return None
    image = rows[:, 1:].copy()
    step = 1
    while step < width:
        image[:, step:] += image[:, :-step]  # numpy buffers the overlapping operands
        step *= 2
    return image


def decode_image(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W). The store's own Sub-filtered PNGs take a direct path; any
    other 8-bit grayscale PNG goes through Pillow. The declared size is checked first: a
    crafted small PNG that claims 12000x12000 pixels is refused, not decoded."""
    declared = png_declared_size(data)
    if declared is not None:
        try:
            check_declared_size(*declared, what="png", max_pixels=MAX_STORED_PNG_PIXELS)
        except UserInputError as exc:
            raise SampleFormatError(str(exc)) from None
    try:
        image = _decode_png_sub(data)
    except zlib.error as exc:
        raise SampleFormatError(f"png: cannot decode ({exc})") from None
    if image is not None:
        return image
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
    png_filter: str = DEFAULT_PNG_FILTER,
    check_pyramid: bool | None = None,
) -> dict[str, Any]:
    """ShardSample -> webdataset dict ``{"__key__": key, "png": b, "masks.bin": b, "pyramid.bin": b, "json": b}``.

    ``record["masks"]`` (if present) must equal ``mask_set.records()``, and pyramid levels
    must have shape (M, s, s); otherwise ValueError. A missing ``record["masks"]`` is filled in.
    ``check_pyramid`` recomputes the pyramid from the masks and requires equality within ±1;
    the default (None) does so unless the sample says its pyramid was computed from its masks
    (``ShardSample.build`` sets ``pyramid_from_masks``), since recomputing costs more than the
    rest of the encode. ``validate`` always recomputes. Output bytes are deterministic.
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
    if check_pyramid is None:
        check_pyramid = not sample.pyramid_from_masks
    problems = pyramid_problems(mask_set.masks, sample.mask_pyramid) if check_pyramid else _pyramid_shape_problems(len(mask_set), sample.mask_pyramid)
    if problems:
        raise ValueError(f"{key}: {problems[0]}")

    region_bytes = None
    if sample.scan_region is not None:
        region = np.asarray(sample.scan_region, bool)
        if region.shape != image.shape:
            raise ValueError(f"{key}: scan region is {region.shape}, image is {image.shape}")
        region_bytes = encode_region(region)
    png = encode_image(image, compress_level=png_compress_level, png_filter=png_filter)
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
    encoded = {"__key__": key, "png": png, "masks.bin": masks_bytes, "pyramid.bin": pyramid_bytes}
    if region_bytes is not None:
        record[STORAGE_KEY]["crc32"][REGION_FIELD] = zlib.crc32(region_bytes)
        encoded[REGION_FIELD] = region_bytes
    encoded["json"] = _canonical_json(record)
    return encoded


def encode_region(region: np.ndarray) -> bytes:
    """bool (H, W) -> 1-bit grayscale PNG bytes (deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(region, bool)).save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def decode_region(data: bytes) -> np.ndarray:
    """``region.png`` bytes -> bool (H, W)."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            image.load()
            return np.asarray(image.convert("1"), dtype=bool).copy()
    except (OSError, ValueError) as exc:
        raise SampleFormatError(f"{REGION_FIELD}: cannot decode ({exc})") from None


def _field(raw: Mapping[str, Any], name: str, key: str) -> bytes:
    if name not in raw:
        raise SampleFormatError(f"{key}: missing member {key}.{name}")
    value = raw[name]
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SampleFormatError(f"{key}: member {name} was already decoded ({type(value).__name__}); read raw bytes (no .decode())")
    return bytes(value)


def _verify_level(verify: bool | str) -> str:
    if verify is True:
        return "crc"
    if verify is False:
        return "none"
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be True, False or one of {list(VERIFY_LEVELS)}, got {verify!r}")
    return verify


def decode_sample(raw: Mapping[str, Any], *, verify: bool | str = True) -> ShardSample:
    """webdataset dict (what ``wds.WebDataset(url)`` yields, undecoded) -> ShardSample.

    ``verify`` (a mismatch raises ``SampleFormatError`` naming the key and the field):

    - ``True`` / ``"crc"`` (default): the crc32 of each member against the record, and the
      record against the decoded headers (shape, mask count, scales, pyramid shapes). Costs
      about 1% of the decode. Areas are taken from the record (the writer checked them).
    - ``"full"``: also recounts the areas on the masks and recomputes the pyramid from them
      (±1), i.e. :func:`consistency_problems`; what ``validate()`` runs. Costs a pooling pass.
    - ``False`` / ``"none"``: no checks beyond what decoding needs.
    """
    level = _verify_level(verify)
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
    region_bytes = _field(raw, REGION_FIELD, key) if REGION_FIELD in raw else None
    if region_bytes is None and REGION_FIELD in storage.get("crc32", {}):
        raise SampleFormatError(f"{key}: missing member {key}.{REGION_FIELD} (the record lists it)")
    if level != "none":
        crcs = storage.get("crc32", {})
        members = [("png", png), ("masks.bin", masks_bytes), ("pyramid.bin", pyramid_bytes)]
        if region_bytes is not None:
            members.append((REGION_FIELD, region_bytes))
        for name, data in members:
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
        if level == "crc":
            # The writer checked record areas against the masks and the crc32s prove the bytes
            # are the ones it wrote, so the record's areas fill MaskSet's area cache (summing M
            # full-size planes would cost more than decoding the image). "full" recounts them.
            mask_set._areas = np.asarray([int(m["area"]) for m in mask_records], np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleFormatError(f"{key}: record masks are malformed ({exc})") from None
    region = None
    if region_bytes is not None:
        try:
            region = decode_region(region_bytes)
        except SampleFormatError as exc:
            raise SampleFormatError(f"{key}: {exc}") from None
        if region.shape != image.shape:
            raise SampleFormatError(f"{key}: scan region is {region.shape}, image is {image.shape}")
    sample = ShardSample(key=key, image=image, mask_set=mask_set, mask_pyramid=pyramid, record=record, scan_region=region)
    if level != "none":
        problems = header_problems(sample, storage)
        if level == "full":
            problems += consistency_problems(sample)
        if problems:
            raise SampleFormatError(f"{key}: {problems[0]}")
    return sample


def header_problems(sample: ShardSample, storage: Mapping[str, Any]) -> list[str]:
    """Cheap record-vs-arrays checks that need no pass over pixels: image shape, mask count,
    scales and pyramid level shapes against the record's ``storage`` entry."""
    height, width = sample.image.shape
    problems = [] if sample.mask_set.shape == (height, width) else [f"masks are {sample.mask_set.shape}, image is {(height, width)}"]
    problems += _pyramid_shape_problems(len(sample.mask_set), sample.mask_pyramid)
    if list(storage.get("image_shape", [])) != [height, width]:
        problems.append(f"record image_shape {storage.get('image_shape')} != stored image {[height, width]}")
    if storage.get("mask_count") != len(sample.mask_set):
        problems.append(f"record mask_count {storage.get('mask_count')} != {len(sample.mask_set)} stored masks")
    if list(storage.get("scales", [])) != list(sample.mask_pyramid):
        problems.append(f"record scales {storage.get('scales')} != stored scales {list(sample.mask_pyramid)}")
    return problems


def _pyramid_shape_problems(count: int, pyramid: Mapping[int, np.ndarray]) -> list[str]:
    return [
        f"pyramid level {s} has shape {np.shape(level)}, expected {(count, s, s)}"
        for s, level in pyramid.items()
        if np.shape(level) != (count, s, s)
    ]


def record_problems(sample: ShardSample, storage: Mapping[str, Any] | None = None, *, recompute_areas: bool = True) -> list[str]:
    """Record-vs-arrays checks: shapes, mask count, scales and (``recompute_areas``) the areas
    counted on the masks themselves rather than taken from MaskSet's cache."""
    if storage is not None:
        problems = header_problems(sample, storage)
    else:
        height, width = sample.image.shape
        problems = [] if sample.mask_set.shape == (height, width) else [f"masks are {sample.mask_set.shape}, image is {(height, width)}"]
        problems += _pyramid_shape_problems(len(sample.mask_set), sample.mask_pyramid)
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
