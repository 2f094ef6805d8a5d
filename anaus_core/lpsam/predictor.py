"""Batched LP-SAM prediction: images -> one mask set each (the ``lpsam`` masker and CLI use it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from anaus_core.lpsam.mask_set import amg_records_to_mask_set, class_components, merge_proposals
from anaus_core.lpsam.model import LPSAM
from anaus_core.maskset import MaskSet


@dataclass
class PredictorOptions:
    threshold: float = 0.5  # probability threshold of class masks
    min_area: int = 16  # pixels, at the image's own resolution
    amg: bool = False  # add SAM automatic-mask proposals from the adapted encoder
    amg_points_per_side: int = 16
    amg_pred_iou_thresh: float = 0.88
    amg_stability_score_thresh: float = 0.92
    amg_iou_threshold: float = 0.7  # IoU suppression against class masks / kept proposals
    amg_options: dict[str, Any] = field(default_factory=dict)  # any other SamAutomaticMaskGenerator argument


class LPSAMPredictor:
    """Runs LP-SAM on batches of images.

    Args:
        model: an LP-SAM (trained prompt engine).
        device: where to run; on CUDA the forward pass runs under bf16 autocast (``amp``).
        batch_size: images per forward pass.
        options: ``PredictorOptions``.
    ``predict(images)`` takes uint8 (H, W) or (H, W, C) arrays of any size and returns a
    ``MaskSet`` at each image's size. ``finalize=True`` applies ``MaskSet.finalize`` (min area,
    ``max_masks``, residual) - the CLI does, the precompute masker leaves it to the pipeline.
    Deterministic: eval mode, no sampling.
    """

    def __init__(self, model: LPSAM, *, device: str | torch.device = "cpu", batch_size: int = 8, amp: bool = True, options: PredictorOptions | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.amp = amp and self.device.type == "cuda"
        self.options = options or PredictorOptions()
        self._amg = None

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = self.model.image_size
        in_chans = self.model.in_chans
        batch = []
        for image in images:
            array = np.asarray(image)
            if array.dtype != np.uint8:
                raise ValueError(f"expected uint8 images, got {array.dtype}")
            tensor = torch.tensor(array[None] if array.ndim == 2 else array.transpose(2, 0, 1), dtype=torch.float32)
            if tensor.shape[0] != in_chans:
                if tensor.shape[0] == 1:
                    tensor = tensor.expand(in_chans, -1, -1)
                elif in_chans == 1:
                    tensor = tensor.mean(0, keepdim=True)
                else:
                    raise ValueError(f"image has {tensor.shape[0]} channels, the model takes {in_chans}")
            batch.append(F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
        return torch.stack(batch).to(self.device)

    @torch.no_grad()
    def predict_probabilities(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: class probabilities float32 (K, H, W) at the image size and predicted IoU (K,)."""
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = self._pixels(chunk)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
                out = self.model(pixels)
            logits, iou = out["logits"].float(), out["iou"].float()
            for index, image in enumerate(chunk):
                height, width = np.asarray(image).shape[:2]
                probabilities = torch.sigmoid(F.interpolate(logits[index : index + 1], size=(height, width), mode="bilinear", align_corners=False))[0]
                results.append((probabilities.cpu().numpy(), iou[index].cpu().numpy()))
        return results

    def _amg_generator(self):
        if self._amg is None:
            from segment_anything import SamAutomaticMaskGenerator

            options = self.options
            self._amg = SamAutomaticMaskGenerator(
                self.model.sam_view(),
                points_per_side=options.amg_points_per_side,
                pred_iou_thresh=options.amg_pred_iou_thresh,
                stability_score_thresh=options.amg_stability_score_thresh,
                min_mask_region_area=0,
                output_mode="binary_mask",
                **options.amg_options,
            )
        return self._amg

    @torch.no_grad()
    def amg_proposals(self, image: np.ndarray) -> MaskSet:
        array = np.asarray(image)
        rgb = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            records = self._amg_generator().generate(np.ascontiguousarray(rgb))
        return amg_records_to_mask_set(records, array.shape[0], array.shape[1])

    def predict(self, images: Sequence[np.ndarray], *, finalize: bool = False, max_masks: int = 32) -> list[MaskSet]:
        options = self.options
        mask_sets = []
        for image, (probabilities, iou) in zip(images, self.predict_probabilities(images)):
            mask_set = class_components(probabilities, iou, self.model.class_names, threshold=options.threshold, min_area=options.min_area)
            if options.amg:
                mask_set = merge_proposals(mask_set, self.amg_proposals(image), iou_threshold=options.amg_iou_threshold)
            if finalize:
                mask_set = mask_set.finalize(min_area=options.min_area, max_masks=max_masks, add_residual=True)
            mask_sets.append(mask_set)
        return mask_sets
