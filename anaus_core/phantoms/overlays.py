"""Burned-in annotations on a phantom, as a scanner's screen shows them.

Real exports carry, besides the echo data: text (patient, preset, frame rate, depth), a depth
ruler beside the field of view, caliper crosses on the image, a colour (or gray) bar and a
logo. ``add_annotations`` draws them on a rendered phantom so that the scan-region stage and
the demo meet them; the phantom's metadata keeps the true field of view and the annotation
pixels so that tests can measure the region (``docs/phantoms.md``).

A linear phantom fills its whole square with echo data; a real linear scan sits in a black
screen, so with annotations its field of view is shrunk to a rectangle with black margins on
the left, at the top and on the right (where the text, the bar and the ruler go) and the labels
outside it are cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anaus_core.phantoms.geometry import fan_mask

CALIPER_COLOUR = (255, 230, 0)  # yellow, as most scanners draw them
RULER_GRAY = 210
TEXT_GRAY = 235


@dataclass
class AnnotatedPhantom:
    """``rgb``: uint8 (H, W, 3) screen image; ``field_of_view``: bool (H, W), the true echo
    area; ``overlay``: bool (H, W), the annotation pixels; ``label``: the label map with the
    pixels outside the field of view cleared; ``items``: what was drawn (JSON-able)."""

    rgb: np.ndarray
    field_of_view: np.ndarray
    overlay: np.ndarray
    label: np.ndarray
    items: list[dict]


def _font(size: int):
    try:
        return ImageFont.load_default(size=max(8, size))
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def add_annotations(image: np.ndarray, label: np.ndarray, fan: dict | None, rng: np.random.Generator) -> AnnotatedPhantom:
    """Draw text, a depth ruler, two caliper crosses, a colour bar and a logo on ``image``.

    ``image``: uint8 (S, S) B-mode (0 outside a sector's fan); ``fan``: the phantom's fan
    (None for linear). Deterministic for a given ``rng`` state.
    """
    size = int(image.shape[0])
    image = image.copy()
    label = label.copy()
    if fan is None:
        # a linear probe's rectangle inside a black screen: margins left and top
        left, top, right = int(round(0.12 * size)), int(round(0.1 * size)), size - int(round(0.06 * size))
        fov = np.zeros((size, size), bool)
        fov[top:, left:right] = True
    else:
        fov = fan_mask(size, fan)
    image[~fov] = 0
    label[~fov] = 0
    screen = Image.fromarray(np.repeat(image[..., None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(screen)
    items: list[dict] = []
    rows = np.flatnonzero(fov.any(axis=1))
    cols = np.flatnonzero(fov.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    font_px = max(8, size // 24)
    font = _font(font_px)

    # Text sits in the black screen (never on the echo data, except the one letter a linear
    # scan carries on the image): each line goes to the first free candidate position.
    from scipy import ndimage

    forbidden = ndimage.binary_dilation(fov, iterations=max(4, size // 32))
    used = np.zeros((size, size), bool)

    def place(text: str, candidates: list[tuple[int, int]], fill) -> None:
        for x, y in candidates:
            layer = Image.new("L", (size, size), 0)
            stamp = ImageDraw.Draw(layer)
            stamp.fontmode = "1"  # crisp glyphs, as burned-in screen text is
            stamp.text((x, y), text, fill=255, font=font)
            pixels = np.asarray(layer) > 0
            if pixels.any() and not (pixels & (forbidden | used)).any():
                draw.fontmode = "1"
                draw.text((x, y), text, fill=fill, font=font)
                used[ndimage.binary_dilation(pixels, iterations=2)] = True
                items.append({"kind": "text", "text": text, "at": [int(y), int(x)]})
                return

    corners = [(1, 0), (size - 4 * font_px, 0), (1, size - font_px - 2), (size - 4 * font_px, size - font_px - 2)]
    place(f"ANAUS {int(rng.integers(2, 9))}C", corners, (TEXT_GRAY,) * 3)
    place(f"{int(rng.integers(10, 60))}Hz", corners[1:] + corners[:1], (TEXT_GRAY,) * 3)
    if fan is not None:
        # a bottom corner of the fan's bounding box lies outside the fan
        place("L", [(left + 1, bottom - font_px - 1), (right - font_px, bottom - font_px - 1)], (TEXT_GRAY,) * 3)
    else:
        # a letter written on the image itself, as on the DDTI fixture
        x, y = right - 2 * font_px, top + font_px
        draw.fontmode = "1"
        draw.text((x, y), "T", fill=(255, 255, 255), font=font)
        items.append({"kind": "text", "text": "T", "at": [y, x]})

    # depth ruler: a vertical line just right of the field of view with ticks towards it
    ruler_x = min(size - 2, right + max(4, size // 32))
    draw.line([(ruler_x, top), (ruler_x, bottom)], fill=(RULER_GRAY,) * 3, width=1)
    for tick in np.linspace(top, bottom, 6):
        draw.line([(ruler_x - 2, int(tick)), (ruler_x, int(tick))], fill=(RULER_GRAY,) * 3, width=1)
    items.append({"kind": "ruler", "x": ruler_x})

    # two caliper crosses inside the field of view
    inside = np.argwhere(fov)
    arm = max(2, size // 64)
    for _ in range(2):
        y, x = inside[int(rng.integers(len(inside)))]
        y = int(np.clip(y, top + arm + 2, bottom - arm - 2))
        x = int(np.clip(x, left + arm + 2, right - arm - 2))
        draw.line([(x - arm, y), (x + arm, y)], fill=CALIPER_COLOUR, width=1)
        draw.line([(x, y - arm), (x, y + arm)], fill=CALIPER_COLOUR, width=1)
        items.append({"kind": "caliper", "at": [y, x]})

    # a colour bar on the left edge of the screen (a hue ramp beside a gray ramp), in the black
    # screen beside the field of view, as scanners place it
    bar_width = max(2, size // 64)
    clear = np.flatnonzero(~(forbidden | used)[:, : 2 * bar_width + 2].any(axis=1))
    clear = clear[clear > top] if fan is not None else clear
    bar_top = int(clear[0]) if len(clear) else int(0.3 * size)
    run_end = bar_top
    while run_end + 1 < size and run_end + 1 in set(clear.tolist()):
        run_end += 1
    bar_bottom = min(run_end, bar_top + int(0.4 * size), size - 4 * bar_width)
    ramp = np.linspace(0.0, 1.0, bar_bottom - bar_top)
    for offset, row in enumerate(range(bar_top, bar_bottom)):
        t = ramp[offset]
        colour = (int(255 * min(1, 2 * t)), int(255 * (1 - abs(2 * t - 1))), int(255 * min(1, 2 - 2 * t)))
        draw.line([(1, row), (bar_width, row)], fill=colour)
        draw.line([(bar_width + 1, row), (2 * bar_width, row)], fill=(int(255 * t),) * 3)
    items.append({"kind": "colour_bar", "rows": [bar_top, bar_bottom], "cols": [1, 2 * bar_width + 1]})

    # a logo: a small filled ring in the bottom-left corner
    radius = max(3, size // 40)
    cx, cy = radius + 2, size - radius - 3
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=(200, 200, 255), width=max(1, radius // 3))
    items.append({"kind": "logo", "at": [cy, cx]})

    rgb = np.asarray(screen).copy()
    overlay = np.any(rgb != np.repeat(image[..., None], 3, axis=2), axis=2)
    return AnnotatedPhantom(rgb=rgb, field_of_view=fov, overlay=overlay, label=label, items=items)
