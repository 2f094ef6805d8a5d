"""Vanilla SAM automatic masks (the ``sam`` mask source: the paper's "w/o LPE" ablation).

The masks come from segment_anything's own ``SamAutomaticMaskGenerator`` (point grid prompts,
predicted-IoU and stability filtering, box NMS). What this module adds is batching: the image
encoder, which is almost all of SAM's cost, runs once on a whole batch of images (under bf16
autocast on CUDA); each image's embedding is then handed to the generator through a
``SamPredictor`` whose ``set_image`` installs the precomputed features instead of encoding
again. Everything after the encoder is segment_anything's code path; its attention layers (encoder
and decoder) run through ``scaled_dot_product_attention`` (``anaus_core.sam.fast``, the default
of ``build_sam``), and the batch goes to the device with one pinned, non-blocking copy.

Grayscale images are replicated to three channels (SAM's input is RGB).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from anaus_core.errors import UserInputError
from anaus_core.maskers.base import ImageMeta, SampleError
from anaus_core.maskset import MaskSet
from anaus_core.sam.fast import upload_uint8

CODE_VERSION = "sam-1"


class CachedFeaturePredictor(SamPredictor):
    """A ``SamPredictor`` whose ``set_image`` installs features computed beforehand.

    ``queue(features, original_size, input_size)`` stores one image's embedding (1, C, g, g);
    the next ``set_image`` call (made by ``SamAutomaticMaskGenerator``) uses it, checking that
    the image it is given has the queued size, and leaves the predictor in the same state as
    ``SamPredictor.set_torch_image`` would.
    """

    def __init__(self, sam_model: Sam) -> None:
        super().__init__(sam_model)
        self._queued: tuple[torch.Tensor, tuple[int, int], tuple[int, int]] | None = None

    def queue(self, features: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        self._queued = (features, tuple(original_size), tuple(input_size))

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if self._queued is None:
            raise RuntimeError("CachedFeaturePredictor.set_image called without queued features")
        features, original_size, input_size = self._queued
        if tuple(image.shape[:2]) != original_size:
            # The generator only calls set_image on crops when crop_n_layers > 0, which needs
            # real encoding; this masker never enables crops.
            raise RuntimeError(f"queued features are for an image of {original_size}, got {image.shape[:2]}")
        self._queued = None
        self.reset_image()
        self.original_size = original_size
        self.input_size = input_size
        self.features = features
        self.is_image_set = True


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_images(
    sam: Sam, images: Sequence[np.ndarray], *, autocast: bool = True
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Run SAM's image encoder on a batch of uint8 (H, W) grayscale images at once.

    Each image is resized (longest side to the encoder's input size, segment_anything's
    ``ResizeLongestSide``), normalised and padded by ``sam.preprocess``; sizes may differ.

    Returns:
        features: float32 (B, C, g, g) image embeddings on the model's device.
        input_sizes: per image, (h, w) after the resize (what ``SamPredictor.input_size`` holds).
    """
    device = sam.device
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = [transform.apply_image(np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=2)) for image in images]
    # One pinned buffer, one non-blocking copy for the batch (anaus_core.sam.fast.upload_uint8).
    batch, input_sizes = [], []
    for tensor in upload_uint8(resized, device):
        tensor = tensor.permute(2, 0, 1)
        input_sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
        batch.append(sam.preprocess(tensor[None].float()))
    with _autocast(device, autocast):
        features = sam.image_encoder(torch.cat(batch))
    return features.float(), input_sizes


def _read_spec(path: Path, model_type: str | None):
    """The architecture of the checkpoint at ``path`` without reading its weights: the state
    dict is memory-mapped (only the tensor shapes are looked at). Checkpoints that cannot be
    mapped (legacy non-zip format, wrapped dicts, foreign files) go through the full reader,
    which also gives the one-line error for a file that is not a SAM checkpoint."""
    from anaus_core.sam import read_sam_state_dict, resolve_spec, spec_from_state_dict

    if model_type:
        return resolve_spec(model_type)
    from anaus_core.safe_load import torch_load_weights_only

    try:
        state = torch_load_weights_only(path, mmap=True)
    except Exception:
        state = None
    if not (isinstance(state, dict) and "image_encoder.pos_embed" in state):
        state = read_sam_state_dict(path)
    try:
        return spec_from_state_dict(state)
    except ValueError as exc:
        raise UserInputError(f"{path}: {exc}") from None
    finally:
        del state


class SamMasker:
    """Vanilla SAM automatic-mask-generator proposals, batched on the device.

    The model is built on the first call (or first access to ``sam``/``generator``/
    ``predictor``); construction only hashes the checkpoint and reads its architecture, so
    ``fingerprint()`` never loads weights.

    Args:
        checkpoint: official-format SAM checkpoint (e.g. ``sam_vit_b_01ec64.pth``).
        model_type: spec name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``); inferred from the
            checkpoint when None.
        image_size: encoder input side (default: the checkpoint's, 1024 for official ones);
            smaller sizes interpolate the position embeddings and run much faster.
        points_per_side: point grid per side (points_per_side**2 prompts per image).
        points_per_batch: prompts decoded at once.
        pred_iou_thresh, stability_score_thresh, stability_score_offset, box_nms_thresh:
            segment_anything's filters (same meaning and defaults).
        device: torch device string ("cpu", "cuda", "cuda:1").
        batch_size: images encoded together.
        autocast: bf16 autocast of the encoder on CUDA.
    """

    name = "sam"

    def __init__(
        self,
        *,
        checkpoint: str | Path,
        model_type: str | None = None,
        image_size: int | None = None,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        device: str = "cpu",
        batch_size: int = 4,
        autocast: bool = True,
    ) -> None:
        from anaus_core.sam import file_sha256

        path = Path(checkpoint)
        if not path.is_file():
            raise UserInputError(f"{path}: SAM checkpoint not found")
        if points_per_side < 1 or points_per_batch < 1 or batch_size < 1:
            raise ValueError("points_per_side, points_per_batch and batch_size must be >= 1")
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"bad device {device!r} ({exc})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: CUDA is not available on this machine")
        # Only the architecture is read here (tensor shapes, memory-mapped); the weights are
        # loaded on the first call, so that fingerprint() - all a planning driver needs - is
        # cheap (see _load_model).
        self._spec = _read_spec(path, model_type)
        self.checkpoint = path
        self.checkpoint_sha256 = file_sha256(path)
        self.model_type = self._spec.name
        self.image_size = int(image_size) if image_size else self._spec.image_size
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.batch_size = int(batch_size)
        self.autocast = bool(autocast)
        self._sam: Sam | None = None
        self._generator: SamAutomaticMaskGenerator | None = None
        self._predictor: CachedFeaturePredictor | None = None

    def _load_model(self) -> None:
        from anaus_core.sam import build_sam, read_sam_state_dict

        state_dict = read_sam_state_dict(self.checkpoint)
        sam = build_sam(self._spec, checkpoint=state_dict, image_size=self.image_size).to(self.device).eval()
        del state_dict
        generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=self.points_per_side,
            points_per_batch=self.points_per_batch,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            stability_score_offset=self.stability_score_offset,
            box_nms_thresh=self.box_nms_thresh,
            crop_n_layers=0,
            output_mode="binary_mask",
        )
        predictor = CachedFeaturePredictor(sam)
        generator.predictor = predictor
        self._sam, self._generator, self._predictor = sam, generator, predictor

    @property
    def model_loaded(self) -> bool:
        return self._sam is not None

    @property
    def sam(self) -> Sam:
        """The SAM model (built from the checkpoint on first use)."""
        if self._sam is None:
            self._load_model()
        return self._sam

    @property
    def generator(self) -> SamAutomaticMaskGenerator:
        if self._generator is None:
            self._load_model()
        return self._generator

    @property
    def predictor(self) -> CachedFeaturePredictor:
        if self._predictor is None:
            self._load_model()
        return self._predictor

    def options(self) -> dict[str, Any]:
        """Options that change the masks (device, batch size and autocast on CPU do not)."""
        return {
            "model_type": self.model_type,
            "image_size": self.image_size,
            "points_per_side": self.points_per_side,
            "points_per_batch": self.points_per_batch,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "stability_score_offset": self.stability_score_offset,
            "box_nms_thresh": self.box_nms_thresh,
            # bf16 encoding changes the numbers, so it is part of what produced the masks.
            "precision": "bf16" if (self.autocast and self.device.type == "cuda") else "fp32",
        }

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "code_version": CODE_VERSION, "checkpoint_sha256": self.checkpoint_sha256, "options": self.options()}

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        results: list[MaskSet] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [np.asarray(image) for image in images[start : start + self.batch_size]]
            for image in chunk:
                if image.ndim != 2 or image.dtype != np.uint8:
                    raise SampleError(f"SAM masker expects uint8 (H, W) images, got {image.dtype} {image.shape}")
            features, input_sizes = encode_images(self.sam, chunk, autocast=self.autocast)
            for index, image in enumerate(chunk):
                results.append(self._decode(image, features[index : index + 1], input_sizes[index]))
        return results

    def _decode(self, image: np.ndarray, features: torch.Tensor, input_size: tuple[int, int]) -> MaskSet:
        height, width = image.shape
        self.predictor.queue(features, (height, width), input_size)
        # generate() only looks at the image's size once the features are queued; a
        # zero-copy broadcast view gives it the (H, W, 3) shape it expects.
        annotations = self.generator.generate(np.broadcast_to(image[..., None], (height, width, 3)))
        self.predictor.reset_image()
        if not annotations:
            return MaskSet.empty(height, width)
        masks = np.stack([np.asarray(a["segmentation"], dtype=bool) for a in annotations])
        scores = np.clip([float(a["predicted_iou"]) for a in annotations], 0.0, 1.0)
        return MaskSet(masks=masks, ids=np.arange(1, len(masks) + 1), sources=[self.name] * len(masks), scores=scores)
