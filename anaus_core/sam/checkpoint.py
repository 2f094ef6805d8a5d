"""Reading official-format SAM checkpoints and hashing files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from anaus_core.errors import UserInputError
from anaus_core.safe_load import describe_load_error


def file_sha256(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed; checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an official SAM checkpoint (a plain ``state_dict``) on the CPU with ``weights_only``.

    A dict wrapping the state under ``"model"`` or ``"state_dict"`` is unwrapped too.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: SAM checkpoint not found")
    from anaus_core.safe_load import torch_load_weights_only

    try:
        data = torch_load_weights_only(path)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise UserInputError(f"{path}: cannot be read as a torch checkpoint ({describe_load_error(exc)})") from None
    if isinstance(data, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in data and isinstance(data[wrapper], dict) and "image_encoder.pos_embed" not in data:
                data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserInputError(f"{path}: not a SAM state_dict (expected a mapping of tensor names to tensors)")
    if "image_encoder.pos_embed" not in data:
        raise UserInputError(f"{path}: not a SAM state_dict (no 'image_encoder.pos_embed' key)")
    return data
