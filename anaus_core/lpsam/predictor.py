"""Batched LP-SAM prediction: images -> one mask set each (the ``lpsam`` masker and CLI use it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from anaus_core.lpsam.mask_set import amg_records_to_mask_set, class_components, merge_proposals
from anaus_core.lpsam.model import LPSAM
from anaus_core.maskset import MaskSet
from anaus_core.sam.fast import upload_uint8


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


PRECISIONS = ("fp32", "bf16", "bf16-autocast")


def resolve_precision(precision: str | None, *, amp: bool, device: torch.device, amg: bool = False) -> str:
    """``None`` -> ``"bf16"`` on CUDA when ``amp``, else ``"fp32"``; an explicit value is checked.
    With ``amg`` a bf16 request becomes ``"bf16-autocast"``: segment_anything's automatic-mask
    generator needs fp32 weights (it runs in fp32; only the class-mask forward autocasts)."""
    if precision is None:
        precision = "bf16" if (amp and device.type == "cuda") else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "bf16-autocast" if (amg and precision == "bf16") else precision


class LPSAMPredictor:
    """Runs LP-SAM on batches of images.

    Args:
        model: an LP-SAM (trained prompt engine). It is moved to ``device`` (and, for ``"bf16"``,
            cast) in place.
        device: where to run.
        batch_size: images per forward pass.
        amp: default precision on CUDA: bf16 (``precision=None`` resolves to ``"bf16"`` on CUDA
            when ``amp``, ``"fp32"`` otherwise).
        precision: ``"fp32"``; ``"bf16"``: weights and activations in bf16 (no per-op fp32
            upcasts; the pixel normaliser, SAM's positional encodings and the output logits stay
            fp32); ``"bf16-autocast"``: fp32 weights under ``torch.autocast`` (the earlier path).
        compile: wrap the model's forward in ``torch.compile`` (CUDA; batches are padded to
            ``batch_size`` so one graph serves all of them).
        postprocess_workers: threads for the CPU part of the mask-set post-processing (connected
            components); 0 runs it inline. The resize to each image's size, the sigmoid and the
            threshold run on the device; the results come back through pinned memory with
            non-blocking copies, and the threads wait for them while the next batch is on the
            device.
        options: ``PredictorOptions``.
    ``predict(images)`` takes uint8 (H, W) or (H, W, C) arrays of any size and returns a
    ``MaskSet`` at each image's size. ``finalize=True`` applies ``MaskSet.finalize`` (min area,
    ``max_masks``, residual) - the CLI does, the precompute masker leaves it to the pipeline.
    Deterministic: eval mode, no sampling; the same results whatever ``postprocess_workers``.
    """

    def __init__(
        self,
        model: LPSAM,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        amp: bool = True,
        precision: str | None = None,
        compile: bool = False,
        postprocess_workers: int = 2,
        options: PredictorOptions | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.options = options or PredictorOptions()
        self.precision = resolve_precision(precision, amp=amp, device=self.device, amg=self.options.amg)
        self.model = model.to(self.device).eval()
        if self.precision == "bf16":
            self.model.to(torch.bfloat16)
            # fp32 where bf16 would lose information cheaply kept: 0..255 pixel normalisation and
            # the random-Fourier positional encodings (sin/cos of large arguments).
            self.model.image_encoder.normalizer.float()
            self.model.prompt_encoder.float()
        self.batch_size = max(1, int(batch_size))
        self.amp = self.precision != "fp32"
        self.compile = bool(compile)
        self._forward = torch.compile(self.model) if self.compile else self.model
        self._pool = ThreadPoolExecutor(max_workers=int(postprocess_workers), thread_name_prefix="lpsam-post") if postprocess_workers > 0 else None
        self._amg = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- host -> device ------------------------------------------------------------------------
    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images -> float32 (B, C, S, S) on the device. The raw bytes of the whole batch go
        in ONE pinned buffer and one non-blocking copy (4x fewer bytes than float32); channel
        handling and the antialiased resize to S x S run on the device."""
        size = self.model.image_size
        in_chans = self.model.in_chans
        arrays = [np.asarray(image) for image in images]
        for array in arrays:
            if array.dtype != np.uint8:
                raise ValueError(f"expected uint8 images, got {array.dtype}")
            if array.ndim not in (2, 3):
                raise ValueError(f"expected (H, W) or (H, W, C) images, got shape {array.shape}")
        batch = []
        for array, raw in zip(arrays, upload_uint8(arrays, self.device)):
            tensor = (raw[None] if array.ndim == 2 else raw.permute(2, 0, 1)).float()
            if tensor.shape[0] != in_chans:
                if tensor.shape[0] == 1:
                    tensor = tensor.expand(in_chans, -1, -1)
                elif in_chans == 1:
                    tensor = tensor.mean(0, keepdim=True)
                else:
                    raise ValueError(f"image has {tensor.shape[0]} channels, the model takes {in_chans}")
            batch.append(F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
        return torch.stack(batch)

    def _model_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = pixels.shape[0]
        if self.compile and count < self.batch_size:  # one static shape for the compiled graph
            pixels = torch.cat([pixels, pixels.new_zeros((self.batch_size - count, *pixels.shape[1:]))])
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-autocast"):
            out = self._forward(pixels)
        return out["logits"][:count].float(), out["iou"][:count].float()

    # -- device -> host ------------------------------------------------------------------------
    def _launch_chunk(self, chunk: Sequence[np.ndarray], threshold: float | None):
        """Forward + on-device resize/sigmoid(/threshold) of one chunk; returns a callable that
        yields per image (probabilities (K, H, W) float32, iou (K,), foreground or None) once the
        non-blocking copies have landed."""
        pixels = self._pixels(chunk)
        logits, iou = self._model_outputs(pixels)
        shapes = [np.asarray(image).shape[:2] for image in chunk]
        probabilities = [
            torch.sigmoid(F.interpolate(logits[index : index + 1], size=shape, mode="bilinear", align_corners=False))[0]
            for index, shape in enumerate(shapes)
        ]
        flat_probabilities = torch.cat([p.reshape(-1) for p in probabilities])
        flat_foreground = None if threshold is None else flat_probabilities > threshold
        cuda = self.device.type == "cuda"
        copies = [t.to("cpu", non_blocking=True) if (cuda and t is not None) else t for t in (flat_probabilities, flat_foreground, iou)]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        num_classes = logits.shape[1]

        def unpack() -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
            if event is not None:
                event.synchronize()
            host_probabilities, host_foreground, host_iou = (None if t is None else t.numpy() for t in copies)
            out, offset = [], 0
            for index, (height, width) in enumerate(shapes):
                n = num_classes * height * width
                foreground = None if host_foreground is None else host_foreground[offset : offset + n].reshape(num_classes, height, width)
                out.append((host_probabilities[offset : offset + n].reshape(num_classes, height, width), host_iou[index], foreground))
                offset += n
            return out

        return unpack

    @torch.no_grad()
    def predict_probabilities(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: class probabilities float32 (K, H, W) at the image size and predicted IoU (K,)."""
        results = []
        for start in range(0, len(images), self.batch_size):
            unpack = self._launch_chunk(images[start : start + self.batch_size], threshold=None)
            results.extend((probabilities, iou) for probabilities, iou, _ in unpack())
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
        # fp32: segment_anything's generator converts its tensors to numpy, which has no bf16
        # (so a "bf16" predictor with amg keeps fp32 weights: resolve_precision).
        records = self._amg_generator().generate(np.ascontiguousarray(rgb))
        return amg_records_to_mask_set(records, array.shape[0], array.shape[1])

    def _components(self, unpack, index: int, finalize: bool, max_masks: int) -> MaskSet:
        options = self.options
        probabilities, iou, foreground = unpack()[index]
        mask_set = class_components(probabilities, iou, self.model.class_names, threshold=options.threshold, min_area=options.min_area, foreground=foreground)
        if finalize and not options.amg:
            mask_set = mask_set.finalize(min_area=options.min_area, max_masks=max_masks, add_residual=True)
        return mask_set

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], *, finalize: bool = False, max_masks: int = 32) -> list[MaskSet]:
        options = self.options
        images = list(images)
        pending = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            unpack = _once(self._launch_chunk(chunk, threshold=options.threshold))
            for index in range(len(chunk)):
                # Connected components run in the worker threads while the next chunk is on the
                # device; the results are collected in input order.
                if self._pool is None:
                    pending.append(_Done(self._components(unpack, index, finalize, max_masks)))
                else:
                    pending.append(self._pool.submit(self._components, unpack, index, finalize, max_masks))
        mask_sets = [item.result() for item in pending]
        if options.amg:
            for position, image in enumerate(images):
                mask_set = merge_proposals(mask_sets[position], self.amg_proposals(image), iou_threshold=options.amg_iou_threshold)
                if finalize:
                    mask_set = mask_set.finalize(min_area=options.min_area, max_masks=max_masks, add_residual=True)
                mask_sets[position] = mask_set
        return mask_sets


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def _once(fn):
    """``fn`` called at most once (thread-safe); later calls return the first result."""
    lock = threading.Lock()
    box: list = []

    def wrapper():
        with lock:
            if not box:
                box.append(fn())
            return box[0]

    return wrapper
