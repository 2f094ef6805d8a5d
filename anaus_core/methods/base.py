"""The pre-training method interface: one self-supervised method is one class behind it.

The trainer (``anaus_core.train.trainer``) owns everything methods share — the streaming input,
DDP, AMP, gradient accumulation, checkpoint/resume, metrics, plots and the progress bar — and
calls a method only through these hooks, once per optimiser step::

    method.begin_step(prepared_micro_batches, generators=..., step=...)   # optional, default no-op
    for each micro-batch:  out = method(prepared, generator=g, step=step);  out["loss"].backward()
    optimizer.step();  method.after_optimizer_step(step=..., total_steps=...)

``forward`` returns 0-d tensors only; the trainer accumulates them on the device and reads them
back only at log steps (no host-device synchronisation inside a step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor


class PretrainMethod(torch.nn.Module):
    """One self-supervised method; the trainer knows nothing else about it."""

    name: ClassVar[str]

    def optimizer_param_groups(self) -> list[dict]:
        """torch param groups of the trainable parameters; a group may carry ``"lars_exclude":
        True`` (biases, norm parameters: no LARS adaptation, no decay) and ``"weight_decay"``."""
        raise NotImplementedError

    def prepare_batch(self, batch: Mapping[str, Tensor], *, device: torch.device,
                      generator: torch.Generator) -> dict[str, Tensor]:
        """Collated CPU batch -> the device tensors ``forward`` takes (views, masks, ...)."""
        raise NotImplementedError

    def begin_step(self, prepared: Sequence[Mapping[str, Tensor]], *,
                   generators: Sequence[torch.Generator], step: int = 0) -> None:
        """Called once per optimiser step with every micro-batch of the step, before the first
        ``forward`` (e.g. to compute all target projections first, so that each micro-batch
        contrasts against the whole global batch). Default: nothing."""

    def forward(self, prepared: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                step: int = 0) -> dict[str, Tensor]:
        """Losses of one micro-batch: MUST contain ``"loss"``; other 0-d tensors are logged."""
        raise NotImplementedError

    def before_optimizer_step(self, *, step: int) -> None:
        """Called once per optimiser step after the gradients are complete (accumulated, all-reduced,
        clipped) and before ``optimizer.step()`` (e.g. to drop the gradients of a layer kept
        frozen early in training). Default: nothing."""

    def after_optimizer_step(self, *, step: int, total_steps: int) -> dict[str, float]:
        """Teacher/target EMA etc., once per optimiser step; returns values to log."""
        return {}

    def export(self, out_dir: Path) -> list[Path]:
        """Write the downstream artefacts (e.g. ``encoder.pt``) into ``out_dir``; returns the paths."""
        raise NotImplementedError

    def eval_encoder(self) -> torch.nn.Module:
        """The encoder as ``anaus evaluate`` would see its export: a module mapping normalised
        (B, 3, H, W) images to (B, D) features, sharing this method's live weights (no copy).
        Used by the online evaluation; a method without one cannot be evaluated online."""
        raise NotImplementedError(f"method {getattr(self, 'name', type(self).__name__)!r} has no eval_encoder()")

    def health(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Optional collapse/health monitors (0-d tensors) from the last forward; default none."""
        return {}

    def compile_for_training(self, **kwargs: Any) -> None:
        """Compile the step's hot modules in place (``torch.compile``); default: nothing."""

    @staticmethod
    def batch_transform(seed: int):
        """The picklable batch transform of the data loader; None = the default AnaUS views."""
        return None

    def has_unused_parameters(self) -> bool:
        """True when some trainable parameter gets no gradient in a step (DDP must search)."""
        return False
