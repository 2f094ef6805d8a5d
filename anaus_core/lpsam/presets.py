"""Named training schedules for the two LP-SAM stages (``--preset`` of ``anaus lpsam adapt``
and ``anaus lpsam train-prompter``).

``paper``: the schedules of the LP-SAM paper - stage 1 (adapters) 200 epochs, batch 16, Adam
at 5e-4; stage 2 (latent prompt engine) 100 epochs. The project's defaults (stage 1: 20 epochs,
batch 4, AdamW 1e-4 without weight decay; stage 2: 20 epochs, batch 8, 1e-4) are much shorter
so that a first run finishes quickly; ``docs/lpsam.md`` lists both side by side. AdamW with
``weight_decay=0`` is Adam, so the preset sets the weight decay to 0 explicitly.
"""

from __future__ import annotations

from typing import Any

from anaus_core.errors import UserInputError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "adapt": {"epochs": 200, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.0},
        "train-prompter": {"epochs": 100, "weight_decay": 0.0},
    },
}


def preset_overrides(name: str | None, stage: str) -> dict[str, Any]:
    """The config values preset ``name`` sets for ``stage`` ("adapt" or "train-prompter");
    ``{}`` for None. Unknown names raise ``UserInputError``."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserInputError(f"--preset {name}: unknown preset (choose one of: {', '.join(PRESETS)})")
    return dict(PRESETS[name][stage])
