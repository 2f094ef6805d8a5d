"""Defaults that fit the machine and the data, and device names checked before use.

The paper-sized defaults of ``anaus pretrain`` (batch 192, 4 workers, 224 px views) are right for
a GPU node and a large corpus; on a laptop with a small corpus they fail or warn repeatedly.
``fit_pretrain_to_machine`` adjusts what does not change the result's meaning and says so, one
line each:

* DataLoader workers are capped at the CPU cores this process may use (more only thrash);
* a global batch larger than the corpus is lowered to the largest valid batch that fits
  (divisible by world size × accumulation steps), with a warning: the learning rate follows
  (``base_lr × batch / 256``);
* views larger than the stored images are kept (the user may want upsampling) but warned about.

A resumed run is never adjusted (its data plan depends on workers and batch size).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from anaus_core.errors import UserInputError

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def usable_cpu_count() -> int:
    """CPU cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_device(name: str | None, *, option: str = "--device", allowed: tuple[str, ...] = ("auto", "cpu", "cuda")) -> str | None:
    """``name`` if it is a device this machine has, else a one-line ``UserInputError``.

    ``allowed`` lists the accepted kinds (``cuda`` covers ``cuda:N``); ``None`` passes through."""
    if name is None:
        return None
    text = str(name).strip().lower()
    kind = text.split(":", 1)[0]
    if not _DEVICE.match(text) or kind not in allowed or (":" in text and "cuda" not in allowed):
        raise UserInputError(f"{option} {name!r}: expected one of {', '.join(allowed)}" + (" or cuda:N" if "cuda" in allowed else ""))
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserInputError(f"{option} {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if ":" in text and int(text.split(":", 1)[1]) >= torch.cuda.device_count():
            raise UserInputError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserInputError(f"{option} {name}: MPS is not available on this machine")
    return text


def largest_valid_batch(limit: int, multiple: int) -> int:
    """The largest batch <= ``limit`` divisible by ``multiple`` (0 when none)."""
    return (limit // multiple) * multiple


def fit_pretrain_to_machine(config: Any, *, corpus_samples: int, stored_size: int | None, world_size: int = 1,
                            cpu_count: int | None = None) -> tuple[Any, list[str]]:
    """(adjusted ``PretrainConfig``, warning lines); see the module docstring."""
    notes: list[str] = []
    data, views, optim = config.data, config.views, config.optim
    cores = usable_cpu_count() if cpu_count is None else cpu_count
    if data.num_workers > cores:
        notes.append(f"note: data.num_workers {data.num_workers} > {cores} CPU core(s) here; using {cores}")
        data = dataclasses.replace(data, num_workers=cores)
    multiple = world_size * optim.accumulation_steps
    if data.batch_size > corpus_samples:
        fitted = largest_valid_batch(corpus_samples, multiple)
        if fitted < 1:
            raise UserInputError(
                f"--shards: the corpus holds {corpus_samples} sample(s), fewer than world size × accumulation steps = {multiple}")
        notes.append(f"warning: --batch-size {data.batch_size} exceeds the {corpus_samples} samples in the shards; "
                     f"using {fitted} (lr scales with the batch)")
        data = dataclasses.replace(data, batch_size=fitted)
    if getattr(config, "method", "anaus") == "avit":
        # A-ViT draws its own multi-crop views; --crop-size (views.size) is AnaUS-only
        crop, option = config.avit.crops.global_size, "avit.crops.global_size"
    else:
        crop, option = views.size, "--crop-size"
    if stored_size is not None and crop > stored_size:
        notes.append(f"warning: {option} {crop} is larger than the stored images ({stored_size} px); "
                     f"views are upsampled (pass a smaller {option}, or precompute with a larger --stored-size)")
    return dataclasses.replace(config, data=data), notes
