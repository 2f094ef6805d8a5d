"""The A-ViT loader's decode: a stored sample's image and anatomy category, checked.

``anaus_core.avit.multicrop.MultiCropTransform`` needs only the image and the category, not the
masks; this reads the record, checks the PNG's crc32 against it (as
``shards.training_sample.decode_training_sample`` does for every member) and decodes the PNG.
The category is ``record["anatomy"]`` (``precompute-masks --anatomy``), None when the store
was written without it.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Mapping

import numpy as np


def decode_image_and_anatomy(raw: Mapping[str, Any], *, verify: bool = True) -> tuple[np.ndarray, str | None]:
    """Raw webdataset sample -> (uint8 (H, W) image, anatomy category or None)."""
    from shards.sample import STORAGE_KEY, SampleFormatError, decode_image

    key = str(raw.get("__key__", "?"))
    png, record_bytes = raw.get("png"), raw.get("json")
    for name, value in (("png", png), ("json", record_bytes)):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SampleFormatError(f"{key}: member {name} is missing or already decoded")
    try:
        record = json.loads(record_bytes)
        storage = record[STORAGE_KEY]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SampleFormatError(f"{key}: json: not a shard-store record ({error})") from None
    if verify and storage.get("crc32", {}).get("png") != zlib.crc32(png):
        raise SampleFormatError(f"{key}: png: crc32 mismatch (member altered)")
    try:
        image = decode_image(png)
    except SampleFormatError as error:
        raise SampleFormatError(f"{key}: {error}") from None
    category = record.get("anatomy")
    return image, (str(category) if category is not None else None)
