"""Ingest: discovery, every supported format, normalisation, keys and bad-input handling.

Every input is generated here (Pillow, pydicom, PyAV) except the real DDTI image.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.maskers.base import SampleError
from pipeline.ingest import (
    IngestError,
    SourceFile,
    decode_frames,
    discover_sources,
    file_sha256,
    ingest_source,
    make_key,
    stored_shape,
)

KEY_PATTERN = r"^[A-Za-z0-9_/-]+$"


def gradient(height: int, width: int, high: int = 255, dtype=np.uint8) -> np.ndarray:
    """A diagonal ramp from 0 to ``high`` (exact min and max present)."""
    rows, cols = np.mgrid[0:height, 0:width]
    ramp = (rows + cols) / (height + width - 2)
    return np.rint(ramp * high).astype(dtype)


def ingest_one(path: Path, root: Path, **kwargs):
    return ingest_source(SourceFile(path=path, relpath=path.relative_to(root).as_posix()), **kwargs)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height (valid CRCs) followed by IEND and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


# -- formats ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def format_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    (root / "sub" / "deeper").mkdir(parents=True)
    base = gradient(60, 90)
    Image.fromarray(base, "L").save(root / "gray8.png")
    Image.fromarray(gradient(60, 90, high=4095, dtype=np.uint16)).save(root / "gray16.png")  # 12 bits used
    rgb = np.stack([base, np.flipud(base), np.full_like(base, 77)], axis=-1)
    Image.fromarray(rgb, "RGB").save(root / "sub" / "colour.png")
    Image.fromarray(rgb, "RGB").quantize(colors=16).save(root / "sub" / "palette.png")
    Image.fromarray(base, "L").save(root / "sub" / "deeper" / "photo.jpg", quality=95)
    Image.fromarray(base, "L").save(root / "bitmap.bmp")
    Image.fromarray(gradient(60, 90, high=60000, dtype=np.uint16)).save(root / "wide16.tif")
    (root / "notes.txt").write_text("not part of the corpus")
    (root / ".hidden").mkdir()
    Image.fromarray(base, "L").save(root / ".hidden" / "skipped.png")
    return root


def test_discovery_is_recursive_sorted_and_skips_other_files(format_corpus):
    relpaths = [s.relpath for s in discover_sources(format_corpus)]
    assert relpaths == sorted(relpaths)
    assert set(relpaths) == {
        "bitmap.bmp",
        "gray16.png",
        "gray8.png",
        "sub/colour.png",
        "sub/deeper/photo.jpg",
        "sub/palette.png",
        "wide16.tif",
    }


@pytest.mark.parametrize(
    "relpath", ["gray8.png", "gray16.png", "sub/colour.png", "sub/palette.png", "sub/deeper/photo.jpg", "bitmap.bmp", "wide16.tif"]
)
def test_every_image_format_decodes_to_uint8_at_stored_size(format_corpus, relpath):
    (sample,) = ingest_one(format_corpus / relpath, format_corpus, stored_size=32)
    assert sample.image.dtype == np.uint8
    assert sample.image.shape == (32, 48)  # 60x90 -> short side 32, aspect kept
    assert sample.original_size == (60, 90)
    assert sample.frame is None
    assert sample.key == make_key(relpath, None)
    assert "." not in sample.key
    assert sample.source_sha256 == file_sha256(format_corpus / relpath)
    # Every test image spans a wide range: the normalisation must keep that contrast.
    assert int(sample.image.max()) - int(sample.image.min()) > 120


def test_sixteen_bit_is_scaled_by_its_actual_range(format_corpus):
    for relpath in ("gray16.png", "wide16.tif"):
        ((frame, gray),) = list(decode_frames(format_corpus / relpath))
        assert gray.dtype == np.uint8 and gray.shape == (60, 90)
        # Same ramp as the 8-bit file: min -> 0, max -> 255, linear in between.
        np.testing.assert_allclose(gray.astype(int), gradient(60, 90).astype(int), atol=1)


def test_palette_becomes_luminance_of_its_colours(format_corpus):
    ((_, gray),) = list(decode_frames(format_corpus / "sub" / "palette.png"))
    with Image.open(format_corpus / "sub" / "palette.png") as img:
        expected = np.asarray(img.convert("RGB").convert("L"))
        indices = np.asarray(img)
    np.testing.assert_array_equal(gray, expected)
    assert not np.array_equal(gray, indices)


def test_colour_uses_luminance_weights(format_corpus):
    ((_, gray),) = list(decode_frames(format_corpus / "sub" / "colour.png"))
    rgb = np.asarray(Image.open(format_corpus / "sub" / "colour.png")).astype(float)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray - luma).max() <= 1.0


def test_exact_stored_size_rounding_and_no_resize():
    assert stored_shape(512, 512, 256) == (256, 256)
    assert stored_shape(600, 800, 256) == (256, 341)
    assert stored_shape(801, 600, 256) == (342, 256)
    assert stored_shape(100, 150, 256) == (256, 384)  # small images are enlarged
    assert stored_shape(100, 150, None) == (100, 150)


# -- DICOM ------------------------------------------------------------------------------------
def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

    multi = pixels.ndim == 4 or (pixels.ndim == 3 and photometric.startswith("MONO"))
    sop_class = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.Modality = "US"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_single_frame_12_bit(tmp_path):
    write_dicom(tmp_path / "scan.dcm", gradient(40, 50, high=4095, dtype=np.uint16), bits_stored=12)
    (sample,) = ingest_one(tmp_path / "scan.dcm", tmp_path, stored_size=20)
    assert sample.frame is None and sample.key == "scan_dcm"
    assert sample.original_size == (40, 50) and sample.image.shape == (20, 25)
    ((_, gray),) = list(decode_frames(tmp_path / "scan.dcm"))
    np.testing.assert_allclose(gray.astype(int), gradient(40, 50).astype(int), atol=1)


def test_dicom_multi_frame_gives_one_sample_per_frame(tmp_path):
    frames = np.stack([np.full((30, 40), 20 + 50 * i, np.uint8) for i in range(4)])
    frames[:, 0, 0] = 0  # a dark pixel in every frame; 8-bit data is kept as stored
    write_dicom(tmp_path / "cine.dcm", frames)
    samples = ingest_one(tmp_path / "cine.dcm", tmp_path, stored_size=30)
    assert [s.frame for s in samples] == [0, 1, 2, 3]
    assert [s.key for s in samples] == [f"cine_dcm_f{i:05d}" for i in range(4)]
    assert len({s.source_sha256 for s in samples}) == 1
    for index, sample in enumerate(samples):
        assert sample.image.shape == (30, 40)
        assert int(np.median(sample.image)) == 20 + 50 * index


def test_compressed_multi_frame_dicom(tmp_path):
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    frames = np.stack([gradient(24, 32) // (i + 1) for i in range(3)]).astype(np.uint8)
    write_dicom(tmp_path / "plain.dcm", frames)
    ds = dcmread(tmp_path / "plain.dcm")
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    decoded = list(decode_frames(tmp_path / "rle.dcm"))
    assert [frame for frame, _ in decoded] == [0, 1, 2]
    for (_, gray), expected in zip(decoded, frames):
        np.testing.assert_array_equal(gray, expected)


def test_dicom_monochrome1_is_inverted_and_window_applied(tmp_path):
    pixels = gradient(32, 32, high=255)
    write_dicom(tmp_path / "mono1.dcm", pixels, photometric="MONOCHROME1")
    ((_, gray),) = list(decode_frames(tmp_path / "mono1.dcm"))
    np.testing.assert_array_equal(gray, 255 - pixels)

    raw = gradient(32, 32, high=1000, dtype=np.uint16)
    write_dicom(tmp_path / "window.dcm", raw, bits_stored=12, WindowCenter=250, WindowWidth=200)
    ((_, windowed),) = list(decode_frames(tmp_path / "window.dcm"))
    assert windowed[raw <= 140].max() == 0  # below the window: black
    assert windowed[raw >= 360].min() == 255  # above the window: white
    inside = (raw > 170) & (raw < 330)
    assert 0 < windowed[inside].min() and windowed[inside].max() < 255


def test_dicom_rgb_becomes_gray(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    ((_, gray),) = list(decode_frames(tmp_path / "rgb.dcm"))
    assert gray.shape == (20, 30) and abs(int(gray.mean()) - round(200 * 0.299)) <= 1


def test_extensionless_dicom_is_discovered(tmp_path):
    write_dicom(tmp_path / "IM0001", gradient(16, 16))
    (tmp_path / "README").write_text("no dicom here")
    sources = discover_sources(tmp_path)
    assert [s.relpath for s in sources] == ["IM0001"]
    (sample,) = ingest_source(sources[0], stored_size=16)
    assert "." not in sample.key and sample.key.startswith("IM0001-h")


# -- video ------------------------------------------------------------------------------------
def write_video(path: Path, levels: list[int], *, codec: str = "mpeg4", size=(48, 64)) -> None:
    import av

    height, width = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for level in levels:
            rgb = np.full((height, width, 3), level, np.uint8)
            rgb[: height // 4, : width // 4] = 255 - level  # a little structure
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("name,codec", [("clip.mp4", "mpeg4"), ("clip.avi", "ffv1")])
def test_video_every_nth_frame(tmp_path, name, codec):
    levels = [30, 60, 90, 120, 150, 180, 210]
    write_video(tmp_path / name, levels, codec=codec)
    every = ingest_one(tmp_path / name, tmp_path, stored_size=24)
    assert [s.frame for s in every] == list(range(7))
    stem = name.replace(".", "_")
    assert [s.key for s in every] == [f"{stem}_f{i:05d}" for i in range(7)]
    for sample, level in zip(every, levels):
        assert sample.image.shape == (24, 32) and sample.original_size == (48, 64)
        assert abs(int(np.median(sample.image)) - level) <= 6  # lossy codec, limited-range YUV
    third = ingest_one(tmp_path / name, tmp_path, stored_size=24, every_nth_frame=3)
    assert [s.frame for s in third] == [0, 3, 6]
    # Frame numbers (and so keys and pixels) do not depend on n.
    for sample in third:
        assert sample.key == every[sample.frame].key
        np.testing.assert_array_equal(sample.image, every[sample.frame].image)


# -- keys ---------------------------------------------------------------------------------------
def test_keys_are_dot_free_unique_and_stable():
    paths = [
        "a.png", "a.jpg", "a_png.png", "x.y.png", "x_y.png", "a b.png", "a_b.png", "dir/a.png",
        "dir.v2/a.png", "dir_v2/a.png", "noext", "n\u00e9.png", "IMG.PNG", "img.png", "cine.mp4",
    ]
    keys = [make_key(p) for p in paths] + [make_key("cine.mp4", f) for f in range(3)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert "." not in key
        assert __import__("re").match(KEY_PATTERN, key), key
    assert make_key("scans/p01/img_3.png") == "scans/p01/img_3_png"
    assert make_key("cine.mp4", 12) == "cine_mp4_f00012"
    assert make_key("./scans//img.png") == make_key("scans/img.png")
    assert make_key("x.y.png") == make_key("x.y.png")  # hashing is deterministic


# -- list files -----------------------------------------------------------------------------------
def test_list_file_relative_absolute_comments_and_duplicates(tmp_path, format_corpus):
    lists = tmp_path / "lists"
    lists.mkdir()
    local = lists / "images" / "local.png"
    local.parent.mkdir()
    Image.fromarray(gradient(8, 8)).save(local)
    absolute = format_corpus / "gray8.png"
    (lists / "corpus.txt").write_text(
        f"# training images\nimages/local.png\n\n{absolute}   # an absolute path\nimages/local.png\nmissing.png\n"
    )
    sources = discover_sources(lists / "corpus.txt")
    assert [s.relpath for s in sources] == ["images/local.png", absolute.as_posix().lstrip("/"), "missing.png"]
    assert ingest_source(sources[0], stored_size=8)[0].key == "images/local_png"
    with pytest.raises(IngestError, match="not found"):
        ingest_source(sources[2])


def test_symlink_cycle_is_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(gradient(8, 8)).save(tmp_path / "a" / "img.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    assert [s.relpath for s in discover_sources(tmp_path)] == ["a/img.png"]


def test_missing_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        discover_sources(tmp_path / "nope")


# -- bad input ------------------------------------------------------------------------------------
def bad_file(tmp_path: Path, name: str, kind: str) -> Path:
    path = tmp_path / name
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n" * 10)
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":
        png_header_only(path, 100_000, 100_000)
    elif kind == "wide":
        png_header_only(path, 20_000, 10)
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 100)
    return path


@pytest.mark.parametrize(
    "name,kind,reason",
    [
        ("empty.png", "empty", "empty file"),
        ("text.png", "text", "not an image"),
        ("truncated.png", "truncated", "truncated"),
        ("bomb.png", "bomb", "too large"),
        ("wide.png", "wide", "above the limit"),
        ("text.dcm", "text", "not a DICOM"),
        ("garbage.mp4", "garbage", "video"),
        ("text.tif", "text", "not an image"),
    ],
)
def test_bad_files_raise_ingest_error_with_reason(tmp_path, name, kind, reason):
    path = bad_file(tmp_path, name, kind)
    with pytest.raises(IngestError) as caught:
        ingest_one(path, tmp_path)
    assert isinstance(caught.value, SampleError)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.path == str(path)


def test_truncated_jpeg_and_corrupt_png_crc(tmp_path):
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])
    with pytest.raises(IngestError, match="truncated"):
        ingest_one(jpeg, tmp_path)

    png = tmp_path / "crc.png"
    Image.fromarray(gradient(32, 32)).save(png)
    data = bytearray(png.read_bytes())
    data[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    png.write_bytes(bytes(data))
    with pytest.raises(IngestError, match="corrupt"):
        ingest_one(png, tmp_path)


# -- the real image -----------------------------------------------------------------------------------
def test_ddti_image_ingests_to_256(ddti_dir):
    sources = discover_sources(ddti_dir / "20436_img.png")
    (sample,) = ingest_source(sources[0])
    assert sample.key == "20436_img_png"
    assert sample.original_size == (512, 512)
    assert sample.image.shape == (256, 256) and sample.image.dtype == np.uint8
    original = np.asarray(Image.open(ddti_dir / "20436_img.png").convert("L"), dtype=float)
    # A faithful downscale: the mean brightness survives and the image is not blank.
    assert abs(sample.image.mean() - original.mean()) < 1.0
    assert sample.image.std() > 20
