"""The ``lpsam`` mask source: an adapted LP-SAM checkpoint's prompt-free class masks (+ options).

Wraps ``anaus_core.lpsam.predictor.LPSAMPredictor``; returns raw mask sets (class components and
optional AMG proposals, no residual) because the pipeline applies ``MaskSet.finalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anaus_core.errors import UserInputError
from anaus_core.maskers.base import ImageMeta, SampleError
from anaus_core.maskset import MaskSet

CODE_VERSION = "lpsam-1"


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    """stage, base_sam_sha256 and class_names of an LP-SAM checkpoint, read with the tensors
    memory-mapped (not loaded); files that cannot be mapped go through the full reader, which
    also gives the one-line error for a missing or foreign file."""
    import torch

    from anaus_core.lpsam.checkpoint import FORMAT, VERSION, read_checkpoint

    from anaus_core.safe_load import torch_load_weights_only

    try:
        data = torch_load_weights_only(path, mmap=True)
    except Exception:
        data = None
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION):
        data = read_checkpoint(path)
    return {key: data[key] for key in ("stage", "base_sam_sha256", "class_names") if key in data}


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
        amp: bf16 on CUDA (``precision`` unset).
        precision: ``fp32``, ``bf16`` (bf16 weights; the CUDA default) or ``bf16-autocast``
            (see ``LPSAMPredictor``); part of the fingerprint when not fp32.
        compile: ``torch.compile`` the model (worth it on CUDA for long runs; off by default).
        postprocess_workers: threads for the connected components (0: inline).
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
        precision: str | None = None,
        compile: bool = False,
        postprocess_workers: int = 2,
    ) -> None:
        import torch

        from anaus_core.lpsam.checkpoint import check_base_sam
        from anaus_core.lpsam.predictor import PredictorOptions, resolve_precision
        from anaus_core.sam import file_sha256

        self.checkpoint = Path(checkpoint)
        self.sam_checkpoint = None if sam_checkpoint is None else Path(sam_checkpoint)
        # Checked here (one-line errors before any work), but the model - the base SAM plus
        # the LP-SAM tensors - is only built on the first call: fingerprint() needs just the
        # two files' sha256, and a planning driver must not load a large SAM.
        metadata = _checkpoint_metadata(self.checkpoint)
        if metadata.get("stage") != "prompter":
            raise UserInputError(f"{self.checkpoint}: is a stage {metadata.get('stage')!r} checkpoint; this needs a 'prompter' checkpoint (anaus lpsam train-prompter)")
        self._sam_sha256 = check_base_sam(metadata, self.sam_checkpoint, source=self.checkpoint)
        self._checkpoint_sha256 = file_sha256(self.checkpoint)
        self.class_names = [str(name) for name in metadata.get("class_names", [])]
        self.options = PredictorOptions(threshold=float(threshold), min_area=int(min_area), amg=bool(amg), amg_points_per_side=int(amg_points_per_side), amg_iou_threshold=float(amg_iou_threshold))
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"bad device {device!r} ({exc})") from None
        self.batch_size = int(batch_size)
        self.amp = bool(amp)
        self.precision = resolve_precision(precision, amp=self.amp, device=self.device, amg=self.options.amg)
        self.compile = bool(compile)
        self.postprocess_workers = int(postprocess_workers)
        self._predictor = None

    @property
    def model_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self):
        """The ``LPSAMPredictor`` (model built from both checkpoints on first use)."""
        if self._predictor is None:
            from anaus_core.lpsam import checkpoint as lpsam_checkpoint
            from anaus_core.lpsam.predictor import LPSAMPredictor

            model, _ = lpsam_checkpoint.load_lpsam(self.checkpoint, sam_checkpoint=self.sam_checkpoint)
            self._predictor = LPSAMPredictor(
                model, device=self.device, batch_size=self.batch_size, precision=self.precision, compile=self.compile,
                postprocess_workers=self.postprocess_workers, options=self.options,
            )
        return self._predictor

    def fingerprint(self) -> dict[str, Any]:
        return {
            "masker": self.name,
            "code_version": CODE_VERSION,
            "checkpoint_sha256": self._checkpoint_sha256,
            "sam_checkpoint_sha256": self._sam_sha256,  # "" for a random base SAM (tests)
            "options": {
                "threshold": self.options.threshold,
                "min_area": self.options.min_area,
                "amg": self.options.amg,
                "amg_points_per_side": self.options.amg_points_per_side,
                "amg_iou_threshold": self.options.amg_iou_threshold,
                # bf16 changes the numbers slightly, so it is part of what determines the output
                # (the key "bf16" kept as it was so that existing fp32 caches stay valid).
                "bf16": self.precision != "fp32",
                **({"precision": self.precision} if self.precision != "fp32" else {}),
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
