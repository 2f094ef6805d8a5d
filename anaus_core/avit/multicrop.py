"""DINO multi-crop views (2 global + n local) of a batch, made in the DataLoader workers.

The geometry is the AnaUS views' (``anaus_core.augment``): crop boxes drawn for the whole batch
at once with ``draws.sample_resized_crops`` (torchvision's ``RandomResizedCrop`` distribution),
each crop resampled with ``geometry.warp_image`` (torchvision's antialiased bilinear
``resized_crop``) and flipped with probability ``flip_p``. The photometric ops run later on the
device (``method.prepare_batch``), as for AnaUS.

``MultiCropTransform`` has the call signature of ``shards.stream.PretrainBatchTransform``:
``(raw samples, sample numbers, epoch, batch number) -> batch dict``, seeded from (seed, epoch,
batch number) so a batch is the same in any worker and after a resume. It is picklable (plain
attributes; ``decode`` must be a module-level function).

Batch fields: ``global`` uint8 (B, 2, 1, G, G), ``local`` uint8 (B, n, 1, L, L) (n may be 0),
``anatomy`` int64 (B,) (embedding row, 0 = unknown), ``index`` int64 (B,), ``global_crops`` /
``local_crops`` float32 (B, V, 4) boxes (top, left, height, width) in stored pixels.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from anaus_core.augment.draws import sample_resized_crops
from anaus_core.augment.geometry import CropBox, warp_image
from anaus_core.avit.anatomy import category_indices
from anaus_core.avit.config import MultiCropConfig

_MULTICROP_SALT = 0xA717  # keeps these draws apart from the AnaUS views' stream for the same seed

#: the shard record key holding a sample's anatomy category (written by ``precompute-masks --anatomy``)
ANATOMY_RECORD_KEY = "anatomy"


def decode_image_and_anatomy(raw: Mapping[str, Any]) -> tuple[np.ndarray, str | None]:
    """Default decode of a raw webdataset sample: the ``png`` member as uint8 (H, W) and the
    ``anatomy`` entry of the ``json`` record (None when absent). The CLI passes the store's own
    verifying decoder instead (``shards`` is not imported by the library)."""
    from PIL import Image

    key = raw.get("__key__", "?")
    png = raw.get("png")
    if not isinstance(png, (bytes, bytearray, memoryview)):
        raise ValueError(f"{key}: member png is missing")
    image = np.asarray(Image.open(io.BytesIO(bytes(png))).convert("L"))
    record = raw.get("json")
    category = None
    if isinstance(record, (bytes, bytearray, memoryview, str)):
        category = json.loads(record).get(ANATOMY_RECORD_KEY)
    return image, category


class MultiCropTransform:
    """Raw samples of one batch -> multi-crop batch.

    Args:
        config: crop sizes, counts and scale ranges.
        categories: the anatomy vocabulary (``AViTConfig.categories``).
        seed: run seed.
        decode: raw sample -> (uint8 (H, W) image, category name or None).
    """

    def __init__(self, config: MultiCropConfig, *, categories: Sequence[str] = (), seed: int = 0,
                 decode: Callable[[Mapping[str, Any]], tuple[np.ndarray, str | None]] | None = None) -> None:
        self.config = config
        self.categories = list(categories)
        self.seed = int(seed)
        self.decode = decode or decode_image_and_anatomy

    def generator(self, epoch: int, batch_number: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), _MULTICROP_SALT, int(batch_number)])

    def __call__(self, raws: Sequence[Mapping[str, Any]], numbers: Sequence[int], epoch: int,
                 batch_number: int) -> dict[str, torch.Tensor]:
        decoded = [self.decode(raw) for raw in raws]
        images = [image for image, _ in decoded]
        anatomy = category_indices([name for _, name in decoded], self.categories)
        return self.build(images, anatomy, numbers, self.generator(epoch, batch_number))

    def build(self, images: Sequence[np.ndarray], anatomy: Sequence[int], numbers: Sequence[int],
              rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The batch of decoded uint8 (H, W) ``images`` with every draw from ``rng``."""
        config = self.config
        batch = len(images)
        heights = np.array([image.shape[0] for image in images], np.int64)
        widths = np.array([image.shape[1] for image in images], np.int64)
        out = {
            "global": torch.empty((batch, 2, 1, config.global_size, config.global_size), dtype=torch.uint8),
            "local": torch.empty((batch, config.num_local, 1, config.local_size, config.local_size), dtype=torch.uint8),
            "anatomy": torch.as_tensor(np.asarray(anatomy, np.int64)).reshape(batch),
            "index": torch.as_tensor(np.asarray(numbers, np.int64)).reshape(batch),
        }
        for name, count, size, scale in (("global", 2, config.global_size, config.global_scale),
                                         ("local", config.num_local, config.local_size, config.local_scale)):
            crops = sample_resized_crops(rng, np.repeat(heights, count), np.repeat(widths, count),
                                         scale=tuple(scale), ratio=tuple(config.ratio)).reshape(batch, count, 4)
            flips = rng.random((batch, count)) < config.flip_p
            target = out[name].numpy()
            for row, image in enumerate(images):
                for view in range(count):
                    box = CropBox(*(int(v) for v in crops[row, view]))
                    target[row, view, 0] = warp_image(image, box, bool(flips[row, view]), size)
            out[f"{name}_crops"] = torch.from_numpy(crops.astype(np.float32))
        return out
