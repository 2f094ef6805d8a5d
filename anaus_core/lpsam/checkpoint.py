"""LP-SAM checkpoints: only what was trained + the base SAM's sha256; loadable with weights_only.

Content (a dict of tensors, strings, numbers, lists and dicts only)::

    format: "anaus-lpsam", version: 1, stage: "adapt" | "prompter", epoch: int
    model_config: LPSAMModelConfig as a dict, spec: SamSpec as a dict, class_names: [str]
    base_sam_sha256: hex of the base SAM checkpoint file ("" for a random SAM)
    trained: {"adapters": {...}} (stage 1) or {"prompt_engine": {...}[, "mask_decoder": {...}]} (stage 2)
    adapters: {...}                (stage 2: the frozen stage-1 adapter tensors, so that prediction
                                    needs only the base SAM + this file)
    adapter_checkpoint_sha256: str (stage 2: sha256 of the stage-1 checkpoint file)
    optimizer: optimiser state, history: [per-epoch metrics], train_config: the command's config
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from anaus_core.errors import UserInputError
from anaus_core.safe_load import describe_load_error, torch_load_weights_only
from anaus_core.lpsam.build import LPSAMModelConfig, build_lpsam, load_partial_state
from anaus_core.lpsam.model import LPSAM
from anaus_core.sam import SamSpec, file_sha256

FORMAT = "anaus-lpsam"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temporary name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: LP-SAM checkpoint not found")
    try:
        data = torch_load_weights_only(path)
    except Exception as exc:
        raise UserInputError(f"{path}: cannot be read as an LP-SAM checkpoint ({describe_load_error(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserInputError(f"{path}: not an LP-SAM checkpoint (no format={FORMAT!r}; a SAM checkpoint goes to --sam-checkpoint)")
    if data.get("version") != VERSION:
        raise UserInputError(f"{path}: LP-SAM checkpoint version {data.get('version')} is not supported (expected {VERSION})")
    return data


def check_base_sam(data: dict[str, Any], sam_checkpoint: str | Path | None, *, source: str | Path) -> str:
    """Raise a one-line error when ``sam_checkpoint`` is not the base SAM the checkpoint was
    trained on. Returns the base SAM's sha256 ("" when no SAM checkpoint is used)."""
    expected = data.get("base_sam_sha256", "")
    actual = file_sha256(sam_checkpoint) if sam_checkpoint is not None else ""
    if expected != actual:
        got = f"{sam_checkpoint} has sha256 {actual[:12]}…" if actual else "no --sam-checkpoint was given"
        want = f"sha256 {expected[:12]}…" if expected else "a random (no-checkpoint) SAM"
        raise UserInputError(f"{source}: was trained on base SAM {want}, but {got}")
    return actual


def load_lpsam(checkpoint: str | Path, *, sam_checkpoint: str | Path | None, require_stage: str | None = "prompter") -> tuple[LPSAM, dict[str, Any]]:
    """Rebuild LP-SAM from a base SAM checkpoint and an LP-SAM checkpoint (CPU, eval mode).

    ``require_stage="prompter"`` (prediction) refuses a stage-1 checkpoint, whose prompt engine
    was never trained. Returns (model, checkpoint dict).
    """
    data = read_checkpoint(checkpoint)
    if require_stage is not None and data.get("stage") != require_stage:
        raise UserInputError(f"{checkpoint}: is a stage {data.get('stage')!r} checkpoint; this needs a {require_stage!r} checkpoint (anaus lpsam train-prompter)")
    check_base_sam(data, sam_checkpoint, source=checkpoint)
    model = build_lpsam(
        LPSAMModelConfig.from_dict(data["model_config"]),
        class_names=list(data["class_names"]),
        sam_checkpoint=sam_checkpoint,
        spec=SamSpec.from_dict(data["spec"]),
    )
    apply_checkpoint_tensors(model, data, source=str(checkpoint))
    return model.eval(), data


def apply_checkpoint_tensors(model: LPSAM, data: dict[str, Any], *, source: str) -> None:
    trained = data.get("trained", {})
    if "adapters" in data:
        load_partial_state(model, data["adapters"], source=source, what="adapter")
    for group, tensors in trained.items():
        load_partial_state(model, tensors, source=source, what=group.replace("_", " "))
