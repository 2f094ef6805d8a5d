"""Parameter counts of LP-SAM's parts (works on the ``meta`` device: no memory needed)."""

from __future__ import annotations

from anaus_core.lpsam.model import LPSAM, is_adapter_key


def count_parameters(model: LPSAM) -> dict[str, int]:
    """Counts of: ``sam`` (base SAM, frozen in both stages), ``adapters`` (stage 1),
    ``prompt_engine`` (stage 2), ``mask_decoder`` (stage 2 only with ``--train-decoder``), ``total``."""
    counts = {"sam": 0, "adapters": 0, "prompt_engine": 0, "mask_decoder": 0, "total": 0}
    for name, parameter in model.named_parameters():
        size = parameter.numel()
        counts["total"] += size
        if name.startswith("prompt_engine."):
            counts["prompt_engine"] += size
        elif is_adapter_key(name):
            counts["adapters"] += size
        else:
            counts["sam"] += size
            if name.startswith("mask_decoder."):
                counts["mask_decoder"] += size
    return counts
