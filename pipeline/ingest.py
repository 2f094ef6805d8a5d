"""Ingest stage of the precompute job: find the corpus files, decode them, normalise to 8-bit
grayscale at the stored size.

A corpus is a folder (searched recursively; hidden files and folders are skipped) or a list
file (one path per line, relative to the list file's folder or absolute, ``#`` comments). Each
file becomes one sample, except multi-frame sources (multi-frame DICOM, videos, multi-page TIFF)
where every frame (every n-th frame of a video) is a sample of its own.

Normalisation (the same for every format, see ``docs/maskers.md``):

* colour (RGB, palette, YCbCr, CMYK, DICOM YBR/PALETTE COLOR) becomes luminance with Pillow's
  ITU-R 601-2 weights;
* data that is already 8 bits deep is kept as it is; anything wider (16-bit PNG/TIFF, 12/16-bit
  DICOM, float TIFF) is scaled linearly from its actual [min, max] to [0, 255] per frame,
  because ultrasound exports often store 10-12 significant bits in 16-bit containers, which a
  fixed division by 65535 would turn nearly black. DICOM applies the modality LUT (rescale)
  and the VOI LUT / window first, and inverts MONOCHROME1;
* the short side is resized to ``stored_size`` (Lanczos, which is area-aware when reducing) with
  the aspect ratio kept; ``original_size`` records (height, width) before resizing.

Every failure that concerns one file raises ``IngestError`` whose message is a one-line reason
(the pipeline pairs it with the path in its error log and goes on).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from anaus_core.errors import UserInputError
from anaus_core.maskers.base import SampleError

CODE_VERSION = "ingest-2"  # 2: colour maps of coloured sources, source info (DICOM UIDs)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | DICOM_EXTENSIONS | VIDEO_EXTENSIONS

# Files whose header claims more than this are rejected before any pixel is decoded.
MAX_SIDE = 16384
MAX_PIXELS = 100_000_000
LABELS_MARKER = ".anaus-labels"  # a file in a folder of label images: ingest does not take them as images
MIN_SIDE = 8  # smaller images carry no structure to segment (a 1x1 image would be trained on as flat noise)
MAX_STORED_PIXELS = 16 * 1024 * 1024  # the stored (resized) image: bounds what maskers and shards hold per sample

_KEY_ALLOWED = re.compile(r"[^A-Za-z0-9_/-]")
_CANONICAL_PART = re.compile(r"^[A-Za-z0-9_-]+$")


class IngestError(SampleError):
    """One source file cannot be ingested. ``str(error)`` is the one-line reason; ``path`` is the
    file (when known)."""

    def __init__(self, reason: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus. ``relpath`` is '/'-separated and relative to the corpus root."""

    path: Path
    relpath: str


@dataclass
class IngestedImage:
    """One sample after ingest.

    Attributes:
        key: stable, dot-free sample key (``make_key(relpath, frame)``).
        relpath: the source file relative to the corpus root.
        frame: frame number inside a multi-frame source (None for single images).
        image: uint8 (H, W) grayscale at the stored size.
        original_size: (height, width) of the decoded frame before resizing.
        source_sha256: hex sha256 of the whole source file's bytes.
        colour: bool (H, W) at the stored size, True where the source pixel is coloured (an
            overlay drawn in colour on a gray scan), or None for gray sources.
        source_info: what the sample came from besides its path (``SourceInfo.to_dict``).
    """

    key: str
    relpath: str
    frame: int | None
    image: np.ndarray
    original_size: tuple[int, int]
    source_sha256: str
    colour: np.ndarray | None = None
    source_info: dict | None = None


#: DICOM attributes that say which patient, study and series a frame belongs to.
DICOM_GROUP_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass
class SourceInfo:
    """What one source file is, for grouping its samples (``docs/shard-format.md``, record
    ``origin``): ``kind`` is "image", "multipage", "video" or "dicom"; ``dicom`` holds the
    PatientID / StudyInstanceUID / SeriesInstanceUID present in the file."""

    kind: str = "image"
    dicom: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data: dict = {"kind": self.kind}
        if self.dicom:
            data["dicom"] = dict(self.dicom)
        return data


# -- keys -----------------------------------------------------------------------------------
def make_key(relpath: str, frame: int | None = None) -> str:
    """A stable sample key from the relative path (and frame number); never contains a dot.

    The common case stays readable: ``scans/p01/img_3.png`` -> ``scans/p01/img_3_png`` (the
    extension dot becomes ``_``), frame 12 of ``cine.mp4`` -> ``cine_mp4_f00012``. A path is
    "canonical" when every folder and the file stem use only ``[A-Za-z0-9_-]`` and it has one
    media extension; canonical paths map one-to-one onto keys (the last ``_`` of the file part
    is the dot). Any other path (spaces, extra dots, unicode, no extension) gets a short hash of
    the exact path appended (``-h`` + 10 hex digits), which keeps keys unique without depending
    on which other files exist (so adding a file never renames another sample).
    """
    relpath = str(PurePosixPath(str(relpath).replace("\\", "/")))
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cannot make a key from an empty path {relpath!r}")
    name = parts[-1]
    stem, dot, ext = name.rpartition(".")
    canonical = (
        bool(dot)
        and ("." + ext.lower()) in MEDIA_EXTENSIONS
        and bool(_CANONICAL_PART.match(stem))
        and all(_CANONICAL_PART.match(p) for p in parts[:-1])
    )
    key = _KEY_ALLOWED.sub("_", "/".join(parts))
    if not canonical:
        digest = hashlib.sha1("/".join(parts).encode("utf-8")).hexdigest()[:10]
        key = f"{key}-h{digest}"
    if frame is not None:
        key = f"{key}_f{int(frame):05d}"
    return key


# -- discovery -------------------------------------------------------------------------------
def _is_dicom_by_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_media(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in MEDIA_EXTENSIONS:
        return True
    # DICOM series are often written without an extension; recognise them by their preamble.
    return suffix == "" and _is_dicom_by_magic(path)


class SourceList(Sequence[SourceFile]):
    """The sources of a corpus, compactly: a base folder and one relpath string per file
    (~70 bytes each instead of a ~0.5 KiB ``SourceFile`` with its ``Path``); ``SourceFile``
    objects are made on access. What :func:`discover_sources` returns as a list."""

    def __init__(self, root: Path, relpaths: list[str], outside: dict[int, str] | None = None) -> None:
        self.root = root
        self.relpaths = relpaths
        self._outside = outside or {}  # row -> absolute path, for list entries outside root

    def __len__(self) -> int:
        return len(self.relpaths)

    def _source(self, row: int) -> SourceFile:
        relpath = self.relpaths[row]
        return SourceFile(path=Path(self._outside[row]) if row in self._outside else self.root / relpath, relpath=relpath)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._source(row) for row in range(len(self))[index]]
        return self._source(range(len(self))[index])

    def __iter__(self) -> Iterator[SourceFile]:
        for row in range(len(self)):
            yield self._source(row)

    def drain(self) -> Iterator[SourceFile]:
        """Yield the sources front to back, dropping each relpath as it is handed out."""
        self.relpaths.reverse()
        count = len(self.relpaths)
        while self.relpaths:
            relpath = self.relpaths.pop()
            row = count - 1 - len(self.relpaths)
            yield SourceFile(path=Path(self._outside.pop(row)) if row in self._outside else self.root / relpath, relpath=relpath)


def discover_sources(corpus: str | os.PathLike) -> list[SourceFile]:
    """The source files of a corpus, sorted by relative path (folder) or in list order.

    ``corpus`` is a folder (recursive; files with an image, DICOM or video extension, and
    extension-less files with a DICOM preamble), a single media file, or a list file (text,
    one path per line, relative to the list file's folder or absolute, ``#`` starts a comment).
    Every path named in a list is returned even if it does not exist or is not an image: the
    per-file check happens in ``ingest_source`` so that a bad entry is skipped, not fatal.
    Raises ``UserInputError`` when the corpus itself does not exist or is unreadable.
    :func:`discover_source_list` gives the same sources as a compact :class:`SourceList`.
    """
    return list(discover_source_list(corpus))


def discover_source_list(corpus: str | os.PathLike) -> SourceList:
    """:func:`discover_sources` as a compact :class:`SourceList` (what the precompute driver
    uses: one relpath string per file, no ``Path`` objects until a source is planned)."""
    corpus = Path(corpus)
    if not corpus.exists():
        raise UserInputError(f"{corpus}: corpus not found (give a folder or a list file)")
    if corpus.is_dir():
        found = [relpath for _, relpath in _walk_folder(os.fspath(corpus))]
        found.sort()
        return SourceList(corpus, found)
    if corpus.suffix.lower() in MEDIA_EXTENSIONS:
        return SourceList(corpus.parent, [corpus.name])
    return _read_list_file(corpus)


def _read_list_file(list_file: Path) -> SourceList:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{list_file}: not a folder, a media file or a text list of paths") from None
    except OSError as exc:
        raise UserInputError(f"{list_file}: cannot read list file ({exc.strerror or exc})") from None
    root = list_file.resolve().parent
    relpaths: list[str] = []
    outside: dict[int, str] = {}
    seen: set[str] = set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        given = Path(entry).expanduser()
        path = given if given.is_absolute() else root / given
        path = Path(os.path.normpath(path))
        try:
            relpath = path.relative_to(root).as_posix()
        except ValueError:
            # Outside the list's folder: the absolute path (without its root) is the relpath, so
            # keys stay unique and stable.
            relpath = path.as_posix().lstrip("/")
        if relpath in seen:
            continue
        seen.add(relpath)
        if not path.is_relative_to(root):
            outside[len(relpaths)] = str(path)
        relpaths.append(relpath)
    del seen
    return SourceList(root, relpaths, outside)


def iter_source_files(corpus: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """The sources of :func:`discover_sources` as ``(path, relpath)`` strings, streamed: nothing
    per file is held, so the precompute driver's memory does not grow with the corpus.

    Same files as :func:`discover_sources`, but a folder is yielded in walk order (folders and
    file names sorted, each folder's files before its subfolders) rather than globally sorted,
    and a list file's entries may repeat (the caller drops repeated relpaths). Errors about the
    corpus itself (missing, unreadable or not UTF-8 list file) are raised here, before the
    first item, as ``UserInputError``.
    """
    corpus_path = Path(corpus)
    if not corpus_path.exists():
        raise UserInputError(f"{corpus_path}: corpus not found (give a folder or a list file)")
    if corpus_path.is_dir():
        return _walk_folder(os.fspath(corpus_path))
    if corpus_path.suffix.lower() in MEDIA_EXTENSIONS:
        return iter([(os.fspath(corpus_path), corpus_path.name)])
    _check_list_file(corpus_path)
    return _list_entries(corpus_path)


def _is_media_path(path: str) -> bool:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in MEDIA_EXTENSIONS:
        return True
    return suffix in ("", ".") and _is_dicom_by_magic(Path(path))


def _walk_folder(root: str) -> Iterator[tuple[str, str]]:
    visited: set[str] = set()  # real folders seen (symlink cycles); grows with folders, not files
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        # a folder that declares itself a label folder (LABELS_MARKER, e.g. a phantom corpus's
        # label/) holds masks, not images: not ingested when its parent is the corpus
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not os.path.exists(os.path.join(dirpath, d, LABELS_MARKER)))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = os.path.join(dirpath, filename)
            if os.path.isfile(path) and _is_media_path(path):
                yield path, os.path.relpath(path, root).replace(os.sep, "/")


def _check_list_file(list_file: Path) -> None:
    """Read the list once, in blocks, to fail early (one line) on a file that is not text."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(list_file, "rb") as handle:
            while block := handle.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserInputError(f"{list_file}: not a folder, a media file or a text list of paths") from None
    except OSError as exc:
        raise UserInputError(f"{list_file}: cannot read list file ({exc.strerror or exc})") from None


def _list_entries(list_file: Path) -> Iterator[tuple[str, str]]:
    root = os.fspath(list_file.resolve().parent)
    with open(list_file, encoding="utf-8") as handle:
        for line in handle:
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            given = os.path.expanduser(entry)
            path = os.path.normpath(given if os.path.isabs(given) else os.path.join(root, given))
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                yield path, os.path.relpath(path, root).replace(os.sep, "/")
            else:
                # Outside the list's folder: the absolute path (without its root) is the relpath.
                yield path, path.replace(os.sep, "/").lstrip("/")


# -- hashing ---------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- normalisation ----------------------------------------------------------------------------
def _check_dimensions(height: int, width: int, what: str = "image") -> None:
    if height <= 0 or width <= 0:
        raise IngestError(f"{what} has no pixels ({width}x{height})")
    if height < MIN_SIDE or width < MIN_SIDE:
        raise IngestError(f"{what} is {width}x{height} pixels, below the minimum ({MIN_SIDE} px per side)")
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise IngestError(
            f"{what} is {width}x{height} pixels, above the limit "
            f"({MAX_SIDE} px per side, {MAX_PIXELS // 1_000_000} megapixels)"
        )


def to_uint8_gray(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) array of any numeric type -> uint8 (H, W).

    uint8 data is kept; wider data is scaled from its [min, max] to [0, 255]; colour (3 or 4
    channels, alpha ignored) becomes ITU-R 601-2 luminance (Pillow's weights).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 2:  # gray + alpha
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise IngestError(f"unsupported pixel layout {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = _scale_to_uint8(array)
    if array.ndim == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB").convert("L"))
    return np.ascontiguousarray(array)


#: A pixel is coloured when its channels differ by more than this (0..255): gray scans stored as
#: RGB (and their JPEG noise) stay below it, overlays drawn in colour are far above it.
COLOUR_CHROMA = 48


def colour_mask(array: np.ndarray) -> np.ndarray | None:
    """bool (H, W), True where an RGB(A) uint8 pixel is coloured (max - min channel above
    ``COLOUR_CHROMA``); None for anything that is not 8-bit colour."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        return None
    rgb = array[..., :3]
    return (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)) > COLOUR_CHROMA


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            return np.zeros(array.shape, np.uint8)
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def stored_shape(height: int, width: int, stored_size: int | None) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``stored_size`` with the aspect kept."""
    if not stored_size:
        return height, width
    if height <= width:
        return int(stored_size), max(1, int(round(width * stored_size / height)))
    return max(1, int(round(height * stored_size / width))), int(stored_size)


def resize_gray(image: np.ndarray, stored_size: int | None) -> np.ndarray:
    """Resize a uint8 (H, W) image so that its short side is ``stored_size`` (Lanczos)."""
    height, width = image.shape
    new_h, new_w = stored_shape(height, width, stored_size)
    if new_h > MAX_SIDE or new_w > MAX_SIDE or new_h * new_w > MAX_STORED_PIXELS:
        # checked before resizing: an extreme aspect ratio (16000x20 at --stored-size 256 would be
        # 204800x256) must not reach the resize or the masker
        raise IngestError(f"image is {width}x{height} pixels; stored at {new_w}x{new_h} it would exceed the stored-image limit "
                          f"({MAX_SIDE} px per side, {MAX_STORED_PIXELS // (1024 * 1024)} Mpx; extreme aspect ratio?)")
    if (new_h, new_w) == (height, width):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image, "L").resize((new_w, new_h), Image.Resampling.LANCZOS))


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool (H, W) mask resized to ``shape`` (nearest neighbour)."""
    if mask.shape == tuple(shape):
        return np.ascontiguousarray(mask, dtype=bool)
    image = Image.fromarray(np.asarray(mask, np.uint8) * 255, "L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


# -- decoders (each yields (frame or None, uint8 (H, W) at original size, colour mask or None)) --
def _pil_mode_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode == "P":
        # Palette images: look the indices up, then take luminance (never use raw indices).
        return np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB").convert("L"))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return to_uint8_gray(np.asarray(img))
    if mode in ("RGB", "RGBA", "RGBX", "LA", "La", "PA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode in ("LA", "La"):
            return np.asarray(img.getchannel(0))
        return np.asarray(img.convert("RGB").convert("L"))
    # Anything else Pillow can decode: go through numpy so wide modes keep their range.
    return to_uint8_gray(np.asarray(img))


_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


def _pil_colour(img: Image.Image) -> np.ndarray | None:
    if img.mode not in _COLOUR_MODES:
        return None
    return colour_mask(np.asarray(img.convert("RGB")))


def _decode_pillow(path: Path, info: SourceInfo | None = None) -> list[tuple[int | None, np.ndarray, np.ndarray | None]]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Somebody relaxed Pillow's global default; truncated files would load half-grey.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; ingest needs it False")
    frames: list[tuple[int | None, np.ndarray]] = []
    with warnings.catch_warnings():
        # Our own header limits replace Pillow's warning (they are stricter); Pillow's hard
        # DecompressionBombError for very large claims is still caught below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as probe:
                width, height = probe.size
                _check_dimensions(height, width)
                probe.verify()
            with Image.open(path) as img:
                n_frames = int(getattr(img, "n_frames", 1) or 1)
                multi = n_frames > 1 and img.format == "TIFF"
                for index in range(n_frames if multi else 1):
                    if multi:
                        img.seek(index)
                        _check_dimensions(img.size[1], img.size[0], f"page {index}")
                    img.load()
                    frame_img = img if multi else ImageOps.exif_transpose(img)
                    frames.append(((index if multi else None), _pil_mode_to_array(frame_img), _pil_colour(frame_img)))
                if multi and info is not None:
                    info.kind = "multipage"
        except Image.DecompressionBombError as exc:
            raise IngestError(f"image is too large to decode safely ({_one_line(exc)})") from None
        except UnidentifiedImageError:
            raise IngestError("not an image Pillow can read (unrecognised or corrupt header)") from None
        except IngestError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise IngestError(f"corrupt or truncated image ({_one_line(exc)})") from None
    return frames


def _decode_tifffile(path: Path) -> Iterator[tuple[int | None, np.ndarray, np.ndarray | None]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = tif.pages
            if len(pages) == 0:
                raise IngestError("TIFF file has no pages")
            multi = len(pages) > 1
            for index, page in enumerate(pages):
                shape = page.shape
                samples_last = len(shape) == 3 and shape[-1] in (1, 2, 3, 4)
                height, width = (shape[0], shape[1]) if samples_last or len(shape) == 2 else (shape[-2], shape[-1])
                _check_dimensions(height, width, f"page {index}" if multi else "image")
                array = page.asarray()
                if array.ndim == 3 and not samples_last and array.shape[0] in (1, 3, 4):
                    array = np.moveaxis(array, 0, -1)
                yield (index if multi else None), to_uint8_gray(array), colour_mask(array)
    except IngestError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise IngestError(f"corrupt or unsupported TIFF ({_one_line(exc)})") from None


def _decode_dicom(path: Path, info: SourceInfo | None = None) -> Iterator[tuple[int | None, np.ndarray, np.ndarray | None]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, iter_pixels

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise IngestError("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:
        raise IngestError(f"corrupt DICOM file ({_one_line(exc)})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise IngestError("DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise IngestError(f"DICOM header lacks a valid image size ({_one_line(exc)})") from None
    _check_dimensions(rows, cols)
    if info is not None:
        info.kind = "dicom"
        info.dicom = {tag: str(ds.get(tag)).strip() for tag in DICOM_GROUP_TAGS if ds.get(tag) not in (None, "")}
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    multi = n_frames > 1
    try:
        for index, array in enumerate(iter_pixels(ds)):
            if photometric == "PALETTE COLOR":
                array = apply_color_lut(array, ds)
            elif photometric.startswith("MONOCHROME"):
                array = _dicom_monochrome(array, ds, apply_modality_lut, apply_voi_lut)
            gray = to_uint8_gray(array)
            if photometric == "MONOCHROME1":
                gray = 255 - gray
            yield (index if multi else None), gray, colour_mask(array)
    except IngestError:
        raise
    except Exception as exc:  # decoders raise many types for truncated or unsupported data
        raise IngestError(f"cannot decode DICOM pixel data ({_one_line(exc)})") from None


def _dicom_monochrome(array: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    has_modality = "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if not has_modality and not has_voi:
        return array  # uint8 stays as it is, wider data is min-max scaled by to_uint8_gray
    values = apply_modality_lut(array, ds) if has_modality else array
    if has_voi:
        values = apply_voi_lut(values, ds)
    return np.asarray(values, dtype=np.float64)  # always rescaled to its range: the window's output


def _decode_video(path: Path, every_nth_frame: int, info: SourceInfo | None = None) -> Iterator[tuple[int | None, np.ndarray, np.ndarray | None]]:
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise IngestError(f"not a readable video ({_one_line(exc)})") from None
    produced = 0
    try:
        if not container.streams.video:
            raise IngestError("file has no video stream")
        stream = container.streams.video[0]
        if info is not None:
            info.kind = "video"
        _check_dimensions(int(stream.codec_context.height or 1), int(stream.codec_context.width or 1), "video frame")
        first_size = None
        for index, frame in enumerate(container.decode(stream)):
            if index % every_nth_frame:
                continue
            _check_dimensions(frame.height, frame.width, "video frame")
            if first_size is None:
                first_size = (frame.width, frame.height)
            elif (frame.width, frame.height) != first_size:
                raise IngestError(
                    f"frame {index} is {frame.width}x{frame.height}, the clip started at {first_size[0]}x{first_size[1]}: "
                    "the geometry changes mid-clip (split the clip where it changes)"
                )
            produced += 1
            gray = np.ascontiguousarray(frame.to_ndarray(format="gray"))
            colour = colour_mask(frame.to_ndarray(format="rgb24")) if frame.format.name not in ("gray", "gray8", "gray16le") else None
            yield index, gray, colour
    except IngestError:
        raise
    except Exception as exc:
        if produced == 0:
            raise IngestError(f"corrupt video ({_one_line(exc)})") from None
        # A truncated tail after good frames is common in recorded clips: keep what decoded.
    finally:
        container.close()
    if produced == 0:
        raise IngestError("video has no decodable frames")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in DICOM_EXTENSIONS or _is_dicom_by_magic(path):
        return "dicom"
    return "image"


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_frames(path: str | os.PathLike, *, every_nth_frame: int = 1) -> Iterator[tuple[int | None, np.ndarray]]:
    """Decode a source file into (frame, uint8 (H, W) at original size) pairs.

    ``frame`` is None for single-frame sources. Raises ``IngestError`` (with a one-line reason)
    for missing, empty, non-image, corrupt, truncated or oversized files.
    """
    for frame, gray, _ in decode_frames_with_colour(path, every_nth_frame=every_nth_frame):
        yield frame, gray


def decode_frames_with_colour(
    path: str | os.PathLike, *, every_nth_frame: int = 1, info: SourceInfo | None = None
) -> Iterator[tuple[int | None, np.ndarray, np.ndarray | None]]:
    """:func:`decode_frames` plus each frame's colour mask (:func:`colour_mask`, None for gray
    sources); fills ``info`` (kind, DICOM UIDs) as it decodes."""
    path = Path(path)
    if every_nth_frame < 1:
        raise ValueError("every_nth_frame must be >= 1")
    if not path.exists():
        raise IngestError("file not found", path=path)
    if not path.is_file():
        raise IngestError("not a regular file", path=path)
    if path.stat().st_size == 0:
        raise IngestError("empty file (0 bytes)", path=path)
    kind = _kind(path)
    try:
        if kind == "video":
            yield from _decode_video(path, every_nth_frame, info)
        elif kind == "dicom":
            yield from _decode_dicom(path, info)
        else:
            try:
                yield from _decode_pillow(path, info)
            except IngestError as pil_error:
                # Pillow lacks some TIFF flavours (float, planar, exotic compression): tifffile.
                if not _is_tiff(path) or "too large" in pil_error.reason or "limit" in pil_error.reason:
                    raise
                yield from _decode_tifffile(path)
    except IngestError as exc:
        if exc.path is None:
            exc.path = str(path)
        raise


def iter_ingest_source(
    source: SourceFile, *, stored_size: int | None = 256, every_nth_frame: int = 1, source_sha256: str | None = None
) -> Iterator[IngestedImage]:
    """Like ``ingest_source`` but yields samples one by one (long videos need not fit in memory).

    A file that fails part-way through (a truncated multi-frame DICOM) raises ``IngestError``
    after the good frames; callers that need all-or-nothing use ``ingest_source``.
    """
    try:
        digest = source_sha256 or file_sha256(source.path)
    except FileNotFoundError:
        raise IngestError("file not found", path=source.path) from None
    except OSError as exc:
        raise IngestError(f"cannot read file ({exc.strerror or exc})", path=source.path) from None
    info = SourceInfo()
    first_shape = None
    for frame, gray, colour in decode_frames_with_colour(source.path, every_nth_frame=every_nth_frame, info=info):
        if first_shape is None:
            first_shape = gray.shape
        elif gray.shape != first_shape:
            raise IngestError(
                f"frame {frame} is {gray.shape[1]}x{gray.shape[0]}, the first frame {first_shape[1]}x{first_shape[0]}: "
                "the geometry changes mid-clip (split the file where it changes)",
                path=source.path,
            )
        image = resize_gray(gray, stored_size)
        yield IngestedImage(
            key=make_key(source.relpath, frame),
            relpath=source.relpath,
            frame=frame,
            image=image,
            original_size=(int(gray.shape[0]), int(gray.shape[1])),
            source_sha256=digest,
            colour=None if colour is None or not colour.any() else resize_mask(colour, image.shape),
            source_info=info.to_dict(),
        )


def ingest_source(source: SourceFile, *, stored_size: int | None = 256, every_nth_frame: int = 1) -> list[IngestedImage]:
    """Decode one source file into its samples (one, or one per kept frame).

    Args:
        source: from ``discover_sources``.
        stored_size: short side of the stored image in pixels (None or 0 keeps the size).
        every_nth_frame: for videos, keep frames 0, n, 2n, ... (frame numbers stay the
            original ones, so keys do not change with n).
    Returns:
        ``IngestedImage`` list, each image uint8 (H, W) with min(H, W) == stored_size.
    Raises:
        IngestError: the file is missing, empty, not an image, corrupt, truncated or too large.
    """
    return list(iter_ingest_source(source, stored_size=stored_size, every_nth_frame=every_nth_frame))


# -- groups ------------------------------------------------------------------------------------
GROUPS_FILE = "groups.csv"


def read_groups_csv(path: str | os.PathLike) -> dict[str, str]:
    """``groups.csv`` -> {relpath: group}. The file has a header with the columns ``path`` (a
    source path relative to the corpus root, '/'-separated) and ``group`` (any text, e.g. a
    patient id); other columns are ignored. Raises ``UserInputError`` naming the file and line."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames or "group" not in reader.fieldnames:
                raise UserInputError(f"{path}: needs a header with the columns 'path' and 'group' (got {reader.fieldnames})")
            groups: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                relpath = str(PurePosixPath(str(row.get("path") or "").strip().replace("\\", "/")))
                group = str(row.get("group") or "").strip()
                if relpath in ("", ".") or not group:
                    raise UserInputError(f"{path}: line {line}: empty path or group")
                if groups.get(relpath, group) != group:
                    raise UserInputError(f"{path}: line {line}: {relpath} is given two groups ({groups[relpath]!r}, {group!r})")
                groups[relpath] = group
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise UserInputError(f"{path}: not a CSV file ({exc})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return groups


def sample_group(relpath: str, info: dict | None, groups: dict[str, str] | None = None) -> tuple[str, str]:
    """(group, where it came from) of a sample of ``relpath``: the ``groups.csv`` entry when
    there is one ("groups.csv"), else the DICOM PatientID, StudyInstanceUID or
    SeriesInstanceUID, the first present ("dicom:<tag>"), else the file itself ("file": every
    frame of a video or multi-frame file stays in its file's group)."""
    if groups and relpath in groups:
        return groups[relpath], GROUPS_FILE
    dicom = (info or {}).get("dicom") or {}
    for tag in DICOM_GROUP_TAGS:
        if dicom.get(tag):
            return f"{tag}:{dicom[tag]}", f"dicom:{tag}"
    return relpath, "file"


@dataclass
class DecodedSource:
    """One source file decoded: its samples, what it is and which group it belongs to."""

    relpath: str
    frames: list[IngestedImage]
    info: dict
    group: str
    group_source: str


def decode_source(
    path: str | os.PathLike, *, relpath: str | None = None, stored_size: int | None = None, every_nth_frame: int = 1,
    groups: dict[str, str] | None = None,
) -> DecodedSource:
    """Decode one file exactly as the precompute ingest does: its frames (uint8, short side
    ``stored_size``; None keeps the size) with their colour maps, the source info (kind, DICOM
    PatientID / StudyInstanceUID / SeriesInstanceUID) and its group (:func:`sample_group`).

    ``relpath`` (default: the file name) names the file in keys and in ``groups``. Raises
    ``IngestError`` (one-line reason, ``path`` set) for a file that cannot be ingested.
    """
    path = Path(path)
    relpath = relpath or path.name
    frames = ingest_source(SourceFile(path=path, relpath=relpath), stored_size=stored_size, every_nth_frame=every_nth_frame)
    info = frames[0].source_info or {"kind": "image"}
    group, group_source = sample_group(relpath, info, groups)
    return DecodedSource(relpath=relpath, frames=frames, info=info, group=group, group_source=group_source)


def ingest_fingerprint(*, stored_size: int | None, every_nth_frame: int) -> dict:
    """Everything besides the source bytes that determines the ingest output."""
    return {"stage": "ingest", "code_version": CODE_VERSION, "stored_size": stored_size, "every_nth_frame": every_nth_frame}


__all__ = [
    "CODE_VERSION",
    "DecodedSource",
    "GROUPS_FILE",
    "SourceInfo",
    "colour_mask",
    "decode_frames_with_colour",
    "decode_source",
    "read_groups_csv",
    "sample_group",
    "IngestError",
    "IngestedImage",
    "SourceFile",
    "decode_frames",
    "discover_sources",
    "file_sha256",
    "ingest_fingerprint",
    "ingest_source",
    "iter_ingest_source",
    "make_key",
    "resize_gray",
    "stored_shape",
    "to_uint8_gray",
]
