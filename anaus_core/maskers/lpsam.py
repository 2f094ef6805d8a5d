"""The ``lpsam`` mask source: an adapted LP-SAM checkpoint's prompt-free class masks (+ options).

Wraps ``anaus_core.lpsam.predictor.LPSAMPredictor``; returns raw mask sets (class components and
optional AMG proposals, no residual) because the pipeline applies ``MaskSet.finalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anaus_core.maskers.base import ImageMeta, SampleError
from anaus_core.maskset import MaskSet

CODE_VERSION = "lpsam-1"


class LPSAMMasker:
    """LP-SAM masker.

    Args:
        checkpoint: a stage-2 LP-SAM checkpoint (``anaus lpsam train-prompter``).
        sam_checkpoint: the base SAM checkpoint it was trained on (sha256 checked); ``None`` only
            for checkpoints trained on a random SAM (tests).
        device: "cpu", "cuda", "cuda:1", ... (bf16 autocast on CUDA when ``amp``).
        batch_size: images per forward pass.
        threshold, min_area: class-mask probability threshold and minimum component area.
        amg: add SAM automatic-mask proposals from the adapted encoder; ``amg_points_per_side``
            and ``amg_iou_threshold`` tune them.
    """

    name = "lpsam"

    def __init__(
        self,
        *,
        checkpoint: str | Path,
        sam_checkpoint: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        threshold: float = 0.5,
        min_area: int = 16,
        amg: bool = False,
        amg_points_per_side: int = 16,
        amg_iou_threshold: float = 0.7,
        amp: bool = True,
    ) -> None:
        from anaus_core.lpsam.checkpoint import load_lpsam
        from anaus_core.lpsam.predictor import LPSAMPredictor, PredictorOptions
        from anaus_core.sam import file_sha256

        self.checkpoint = Path(checkpoint)
        self.sam_checkpoint = None if sam_checkpoint is None else Path(sam_checkpoint)
        model, data = load_lpsam(self.checkpoint, sam_checkpoint=self.sam_checkpoint)
        self._checkpoint_sha256 = file_sha256(self.checkpoint)
        self._sam_sha256 = data.get("base_sam_sha256", "")
        self.options = PredictorOptions(threshold=float(threshold), min_area=int(min_area), amg=bool(amg), amg_points_per_side=int(amg_points_per_side), amg_iou_threshold=float(amg_iou_threshold))
        self.predictor = LPSAMPredictor(model, device=device, batch_size=batch_size, amp=amp, options=self.options)
        self.class_names = list(model.class_names)
        self.amp = bool(amp)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "masker": self.name,
            "code_version": CODE_VERSION,
            "checkpoint_sha256": self._checkpoint_sha256,
            "sam_checkpoint_sha256": self._sam_sha256,
            "options": {
                "threshold": self.options.threshold,
                "min_area": self.options.min_area,
                "amg": self.options.amg,
                "amg_points_per_side": self.options.amg_points_per_side,
                "amg_iou_threshold": self.options.amg_iou_threshold,
                # bf16 changes the numbers slightly, so it is part of what determines the output.
                "bf16": self.amp and self.predictor.device.type == "cuda",
            },
        }

    def __call__(self, images: Sequence[np.ndarray], metas: Sequence[ImageMeta]) -> list[MaskSet]:
        if len(images) != len(metas):
            raise ValueError(f"{len(images)} images but {len(metas)} metas")
        try:
            return self.predictor.predict(list(images), finalize=False)
        except (ValueError, RuntimeError) as exc:
            if len(images) == 1:
                raise SampleError(f"{metas[0].relpath}: LP-SAM failed ({exc})") from exc
            raise
