"""Loading weight files that may come from anyone: ``weights_only=True`` and a safe message.

Every torch file the toolkit reads (checkpoints, SAM/LP-SAM weights, encoders) is loaded with
``weights_only=True``. When that fails, torch's own message advises re-running with
``weights_only=False`` — i.e. unpickling a file that may execute code. ``describe_load_error``
turns the failure into a short reason that never carries that advice.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from anaus_core.errors import UserInputError


def describe_load_error(exc: BaseException) -> str:
    """Why a ``torch.load(..., weights_only=True)`` failed, in a few safe words."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "it holds Python objects besides tensors; only plain weight files are loaded (refused, nothing executed)"
    if isinstance(exc, (EOFError, RuntimeError)) and ("zip" in text.lower() or "archive" in text.lower() or isinstance(exc, EOFError)):
        return "truncated or not a torch file"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def torch_load_weights_only(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` without torch's pickle-protocol warning.

    Torch warns about the pickle protocol of a foreign file before refusing it; every caller
    turns the refusal into one line that says what is wrong, so the warning only adds noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_weights(path: str | Path, *, what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a missing or unreadable file is a one-line
    ``UserInputError`` naming ``path`` and ``what`` it should have been."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: {what} not found")
    try:
        return torch_load_weights_only(path, map_location=map_location, mmap=mmap)
    except Exception as exc:  # torch raises many unrelated types for corrupt or foreign files
        raise UserInputError(f"{path}: cannot be read as a {what} ({describe_load_error(exc)})") from None
