"""Training checkpoints: atomic writes, RNG capture/restore, resume resolution.

A checkpoint is a plain dict saved with ``torch.save`` that loads with ``weights_only=True``
(only tensors, numbers, strings, lists and dicts inside: the numpy RNG state is stored as a
tensor), so resuming never unpickles arbitrary objects::

    {"format": "anaus-pretrain-checkpoint", "version": 1,
     "step": optimiser steps done, "epoch": current epoch,
     "data_state": {"epoch": e, "batches_done": n},   # position in the data stream (global batches)
     "model": AnaUSModel state dict (online, target, heads, BN buffers),
     "optimizer": LARS state dict, "scheduler": {"total_steps", "warmup_steps", ...},
     "rng": {"python", "numpy", "torch", "cuda"}, "config": PretrainConfig as a dict}

Files: ``RUN/checkpoints/step-000123.pt`` and ``RUN/checkpoints/last.pt`` (a hard link to the
newest step file, or a copy where links are unsupported). Every file appears atomically:
written under a temporary name in the same folder, fsynced, renamed, folder fsynced.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from anaus_core.errors import UserInputError
from anaus_core.safe_load import describe_load_error, torch_load_weights_only

CHECKPOINT_FORMAT = "anaus-pretrain-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIRNAME = "checkpoints"
LAST_NAME = "last.pt"


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch-CPU and (if present) every CUDA device's generator state."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; a CUDA state is restored only where CUDA exists.

    Generator states are host data: a checkpoint loaded with ``map_location="cuda"`` carries
    them as CUDA tensors, so every tensor is brought back to the CPU first.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"][: torch.cuda.device_count()]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _fsync_directory(directory: Path) -> None:
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _atomic_torch_save(payload: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _atomic_alias(source: Path, path: Path) -> None:
    """``path`` becomes a hard link to ``source`` (a copy where links are unsupported), atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def save_checkpoint(payload: Mapping[str, Any], checkpoint_dir: str | Path, *, step: int,
                    keep_step_file: bool = True, keep_last: int | None = None) -> Path:
    """Write ``step-XXXXXX.pt`` and make ``last.pt`` the same file (hard link, else a copy), each
    atomically; with ``keep_step_file=False`` only ``last.pt`` is written. ``keep_last=N``:
    afterwards only the newest N step files remain (``prune_step_checkpoints``). Returns ``last.pt``."""
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / LAST_NAME
    if keep_step_file:
        step_path = checkpoint_dir / step_checkpoint_name(step)
        _atomic_torch_save(payload, step_path)
        _atomic_alias(step_path, last)
        if keep_last is not None:
            prune_step_checkpoints(checkpoint_dir, keep=keep_last)
    else:
        _atomic_torch_save(payload, last)
    return last


def prune_step_checkpoints(checkpoint_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``step-XXXXXX.pt`` files (by step number); ``last.pt``
    is never touched (it is its own directory entry, so a hard link to a pruned step file keeps
    its data). Returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    steps = sorted(p for p in Path(checkpoint_dir).glob("step-*.pt") if p.stem[5:].isdigit())
    doomed = steps[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    if doomed:
        _fsync_directory(Path(checkpoint_dir))
    return doomed


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a pre-training checkpoint; bad files raise ``UserInputError``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: checkpoint not found")
    try:
        payload = torch_load_weights_only(path, map_location=map_location)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise UserInputError(f"{path}: not a readable checkpoint ({describe_load_error(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path}: not an AnaUS pre-training checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise UserInputError(f"{path}: checkpoint version {payload.get('version')} is newer than this code ({CHECKPOINT_VERSION})")
    return payload


def resolve_resume_path(resume: str | Path | bool | None, run_dir: str | Path) -> Path | None:
    """``None``/``False`` -> no resume; ``True``/``"auto"``/``"last"`` -> ``RUN/checkpoints/last.pt``
    (an error if missing); anything else is a checkpoint path."""
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or str(resume) in ("auto", "last"):
        path = Path(run_dir) / CHECKPOINT_DIRNAME / LAST_NAME
        if not path.is_file():
            raise UserInputError(f"{path}: --resume given but the run has no last checkpoint")
        return path
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_DIRNAME / LAST_NAME if (path / CHECKPOINT_DIRNAME).is_dir() else path / LAST_NAME
    if not path.is_file():
        raise UserInputError(f"{path}: resume checkpoint not found")
    return path
