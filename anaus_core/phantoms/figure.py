"""A contact sheet of phantoms (B-mode row above, coloured label row below) for docs and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from anaus_core.phantoms.geometry import fan_mask
from anaus_core.phantoms.phantom import Phantom

#: Label colours per structure kind (RGB).
KIND_COLOURS = {"cyst": (60, 140, 255), "hypo": (80, 200, 120), "hyper": (255, 170, 40), "layer": (240, 60, 60)}

_GRAY_LEVELS = 200  # palette 0..199: gray ramp, then kind colours, then two background shades


def contact_sheet(phantoms: Sequence[Phantom]) -> Image.Image:
    """A palette PNG-ready image: the phantoms' B-mode images side by side above their label
    maps (structures coloured by kind, the field of view in dark gray). All phantoms must have
    the same size. A palette image keeps the file small (speckle barely compresses)."""
    kinds = list(KIND_COLOURS)
    palette: list[int] = []
    for level in range(_GRAY_LEVELS):
        value = round(level * 255 / (_GRAY_LEVELS - 1))
        palette += [value, value, value]
    for kind in kinds:
        palette += list(KIND_COLOURS[kind])
    outside, inside = _GRAY_LEVELS + len(kinds), _GRAY_LEVELS + len(kinds) + 1
    palette += [15, 15, 15, 55, 55, 55]
    palette += [0, 0, 0] * (256 - len(palette) // 3)

    images, labels = [], []
    for phantom in phantoms:
        size = phantom.image.shape[0]
        images.append(np.rint(phantom.image.astype(np.float32) * ((_GRAY_LEVELS - 1) / 255.0)).astype(np.uint8))
        tile = np.where(fan_mask(size, phantom.fan), inside, outside).astype(np.uint8)
        for structure in phantom.structures:
            tile[phantom.label == structure["label"]] = _GRAY_LEVELS + kinds.index(structure["kind"])
        labels.append(tile)
    sheet = np.concatenate([np.concatenate(images, axis=1), np.concatenate(labels, axis=1)], axis=0)
    image = Image.fromarray(sheet, mode="P")
    image.putpalette(palette)
    return image


def save_contact_sheet(phantoms: Sequence[Phantom], path) -> Path:
    """Write :func:`contact_sheet` as an optimised PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(phantoms).save(path, optimize=True)
    return path
