"""Check a shard source before training on it: missing, truncated or damaged shards.

``open_vetted_shards`` = ``resolve_shards`` + checks made once, in the main process, before any
DataLoader worker starts:

* every shard the store's ``manifest.json`` names exists (a deleted shard is not silently left
  out of training);
* every local shard's size matches the manifest (a stat per shard); with ``skip_bad`` (or
  without a manifest) its tar headers are also read and must give the number of samples the
  index lists. Damage the cheap check misses (same size, altered bytes) stops the run with one
  line naming the shard when it is read.

A bad shard is a one-line ``UserInputError`` naming it by default. With ``skip_bad=True``
(``--skip-bad-shards``) bad shards are dropped from the source (their index rows with them), one
warning line says how many and names the first, and training runs on the rest; if nothing is
left it is still an error.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from anaus_core.errors import UserInputError
from anaus_core.shard_urls import ShardUrlPolicy, url_kind
from shards.source import ShardSource, _sample_key, resolve_shards


class BadShardsError(UserInputError):
    """One or more shards are missing or unreadable (and skipping was not asked for)."""


def _manifest_entries(directory: Path) -> dict[str, dict] | None:
    if not (directory / "manifest.json").is_file():
        return None
    from shards.index import read_manifest

    return {Path(str(entry["name"])).name: entry for entry in read_manifest(directory)["shards"]}


def probe_shard(url: str, *, expected_samples: int | None, expected_bytes: int | None, deep: bool = True) -> str | None:
    """Why the local shard ``url`` is bad, or None when it looks whole: it exists, its size is the
    manifest's, and (``deep``) its tar headers parse to ``expected_samples`` samples (member
    contents are not decoded). Non-local URLs are not probed (None)."""
    if url_kind(url) != "local":
        return None
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if not path.is_file():
        return "missing (listed in the manifest, not on disk)" if path.parent.is_dir() else "missing"
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return f"{size} bytes, the manifest lists {expected_bytes} (truncated or rewritten)"
    if not deep:
        return None
    try:
        count, last = 0, None
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.offset_data + member.size > size:
                    return "truncated (a member runs past the end of the file)"
                key = _sample_key(member.name)
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, ValueError) as exc:
        return f"not a readable tar ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
    if expected_samples is not None and count != expected_samples:
        return f"holds {count} samples, the index lists {expected_samples}"
    return None


def _drop_shards(source: ShardSource, bad: set[int]) -> ShardSource:
    keep = [i for i in range(len(source.urls)) if i not in bad]
    offsets = nbytes = None
    if source.indexed:
        starts = np.concatenate([[0], np.cumsum(source.sizes)]).astype(np.int64)
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep]) if keep else np.zeros(0, np.int64)
        offsets, nbytes = source.offsets[rows], source.nbytes[rows]
    return replace(source, urls=tuple(source.urls[i] for i in keep), sizes=tuple(source.sizes[i] for i in keep),
                   offsets=offsets, nbytes=nbytes)


def open_vetted_shards(source: str | os.PathLike | Sequence[str], *, policy: ShardUrlPolicy = ShardUrlPolicy(),
                       skip_bad: bool = False, warn: Callable[[str], None] = print) -> ShardSource:
    """``resolve_shards(source)`` after checking every shard (module docstring)."""
    problems: list[str] = []
    missing: list[str] = []
    manifest = None
    if not isinstance(source, (list, tuple)) and url_kind(os.fspath(source)) == "local":
        directory = Path(os.fspath(source))
        if directory.is_file() and directory.suffix != ".tar":
            raise UserInputError(f"{directory}: --shards must be a shard folder (or a .tar shard), not a file")
        if directory.is_dir():
            manifest = _manifest_entries(directory)
            if manifest is not None:
                missing = [name for name in manifest if not (directory / name).is_file()]
                problems += [f"{directory / name}: missing (listed in the manifest, not on disk)" for name in missing]
    resolved = resolve_shards(source, policy=policy)
    bad: set[int] = set()
    for number, (url, samples) in enumerate(zip(resolved.urls, resolved.sizes)):
        entry = manifest.get(Path(url).name) if manifest is not None else None
        # Without --skip-bad-shards a store with a manifest gets the stat-only check (a header
        # damaged in place still stops the run with one line when it is read); skipping needs
        # every bad shard found up front, so then every tar's headers are read.
        reason = probe_shard(url, expected_samples=samples if manifest is not None else None,
                             expected_bytes=int(entry["size"]) if entry is not None else None,
                             deep=skip_bad or manifest is None)
        if reason is not None:
            bad.add(number)
            problems.append(f"{url}: {reason}")
    if not problems:
        return resolved
    total = len(resolved.urls) + len(missing)
    if not skip_bad:
        more = f" (and {len(problems) - 1} more bad shard(s))" if len(problems) > 1 else ""
        raise BadShardsError(f"{problems[0]}{more}; re-run precompute-masks, or pass --skip-bad-shards to train on the rest")
    kept = _drop_shards(resolved, bad)
    if not kept.urls:
        raise BadShardsError(f"{resolved.origin}: all {total} shards are bad (first: {problems[0]})")
    warn(f"warning: --skip-bad-shards: skipped {len(problems)} of {total} shards "
         f"({kept.num_samples} samples left; first: {problems[0]})")
    return kept


def first_image_size(source: ShardSource) -> int | None:
    """Short side in pixels of the first stored image of ``source`` (from its PNG header, nothing
    decoded), or None when it cannot be told cheaply (non-local shards, unreadable first sample)."""
    from anaus_core.image_limits import png_declared_size
    from shards.stream import ShardReadError, read_shard

    if not source.urls or url_kind(source.urls[0]) != "local":
        return None
    try:
        for raw in read_shard(source.urls[0]):
            png = raw.get("png")
            declared = png_declared_size(bytes(png)) if png is not None else None
            return min(declared) if declared else None
    except (ShardReadError, OSError):
        return None
    return None
