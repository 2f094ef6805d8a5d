"""Shard sources: resolve a directory / brace pattern / URL into shard URLs and per-shard sample
counts (from the store's index when present); open shard URLs.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from anaus_core.errors import UserInputError
from anaus_core.shard_urls import ShardUrlPolicy, check_shard_source

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")



class ShardReadError(UserInputError):
    """A shard could not be read, or held a different number of samples than the plan expects."""


# ------------------------------------------------------------------------------------------------
# shard lists
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSource:
    """The shards of one data set, in a fixed canonical order, and the samples in each."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    origin: str = ""
    # Per-sample byte ranges from the index (canonical order), when the source has one: enables
    # the globally shuffled random-access mode. None for brace patterns / URLs without an index.
    offsets: np.ndarray | None = field(default=None, repr=False, compare=False)
    nbytes: np.ndarray | None = field(default=None, repr=False, compare=False)
    # What the URLs may be besides local files (anaus_core/shard_urls.py): checked on construction,
    # so no ShardSource, however built, opens a pipe: or remote URL the caller did not allow.
    policy: ShardUrlPolicy = field(default=ShardUrlPolicy(), repr=False, compare=False)

    def __post_init__(self) -> None:
        check_shard_source(list(self.urls), policy=self.policy, origin=self.origin or "shards")

    @property
    def num_samples(self) -> int:
        return int(sum(self.sizes))

    @property
    def indexed(self) -> bool:
        return self.offsets is not None and self.nbytes is not None

    @functools.cached_property
    def first_sample(self) -> np.ndarray:
        """Canonical number of the first sample of each shard (shards in canonical order);
        cached: ``locate`` runs once per sample read."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64))[:-1]]).astype(np.int64)

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard number, sample number inside it) of a canonical sample number."""
        shard = int(np.searchsorted(self.first_sample, sample, side="right") - 1)
        return shard, int(sample - self.first_sample[shard])


def open_url(url: str, *, random_access: bool = False):
    """A binary read stream for a local path, ``file://``/fsspec URL or ``pipe:`` command.

    ``random_access``: the caller seeks to each sample and reads exactly its bytes, so a local
    file is opened unbuffered (a 1 MiB read-ahead buffer would be refilled, mostly in vain,
    after every seek)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if _SCHEME.match(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=0 if random_access else 1 << 20)


def _sample_key(name: str) -> str | None:
    from webdataset.tariterators import base_plus_ext

    if re.match(r"__[^/]*__($|/)", name):  # webdataset's skip_meta
        return None
    return base_plus_ext(name)[0]


def count_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in one tar, reading headers only where possible."""
    count, last = 0, None
    try:
        if not url.startswith("pipe:") and not _SCHEME.match(url):
            with tarfile.open(url, mode="r:") as archive:  # seekable: skips member data
                members = archive.getmembers()
        else:
            with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
                members = list(archive)
    except (OSError, tarfile.TarError) as error:
        raise ShardReadError(f"{url}: cannot read shard ({error})") from error
    for member in members:
        if not member.isreg():
            continue
        key = _sample_key(member.name)
        if key is not None and key != last:
            count, last = count + 1, key
    return count


def _read_store_index(directory: Path, names: Sequence[str]) -> tuple[list[int], np.ndarray | None, np.ndarray | None] | None:
    """(per-shard counts, per-sample offsets, per-sample sizes) from the shard store's index
    (``shards.index``); None when the directory has no manifest."""
    if not (directory / "manifest.json").exists():
        return None
    from shards.index import read_index, read_manifest

    counts = {Path(str(entry["name"])).name: int(entry["samples"]) for entry in read_manifest(directory)["shards"]}
    unindexed = [name for name in names if name not in counts]
    if unindexed:
        raise UserInputError(f"{directory}: shard {unindexed[0]} is not in manifest.json (an interrupted write?); "
                             "re-run precompute-masks or remove it")
    sizes = [counts[name] for name in names]
    if not (directory / "index.zarr").exists():
        return sizes, None, None
    index = read_index(directory)
    index_names = [Path(entry.name).name for entry in index.shards]
    offsets, nbytes = [], []
    for name in names:
        rows = index.rows_of_shard(index_names.index(name))
        order = np.argsort(index.offset[rows], kind="stable")
        offsets.append(index.offset[rows][order])
        nbytes.append(index.size[rows][order])
    offsets_all, nbytes_all = np.concatenate(offsets).astype(np.int64), np.concatenate(nbytes).astype(np.int64)
    if len(offsets_all) != sum(sizes):
        raise UserInputError(f"{directory}: index.zarr lists {len(offsets_all)} samples, manifest.json {sum(sizes)}")
    return sizes, offsets_all, nbytes_all


def resolve_shards(source: str | os.PathLike | Sequence[str], *, shard_sizes: Sequence[int] | None = None,
                   policy: ShardUrlPolicy = ShardUrlPolicy()) -> ShardSource:
    """The shard URLs of ``source`` (directory, brace pattern, fsspec URL or list) and their sample counts.

    Counts come from ``shard_sizes`` when given, else from the index beside a shard directory,
    else from one header scan of every shard (done once, in the main process).
    """
    origin = str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} shard URLs"
    check_shard_source(source, policy=policy, origin=origin)  # before anything is expanded or opened
    urls: list[str]
    sizes: list[int] | None = None
    offsets = nbytes = None
    if isinstance(source, (list, tuple)):
        urls = [str(u) for u in source]
    else:
        text = os.fspath(source)
        local = Path(text)
        if not _SCHEME.match(text) and not text.startswith("pipe:") and local.is_dir():
            names = sorted(p.name for p in local.glob("*.tar"))
            if not names:
                raise UserInputError(f"{local}: no *.tar shards in this directory")
            urls = [str(local / name) for name in names]
            stored = _read_store_index(local, names)
            if stored is not None:
                sizes, offsets, nbytes = stored
        elif "{" in text or text.startswith("pipe:"):
            import webdataset as wds

            urls = wds.shardlists.expand_urls(text)
        elif _SCHEME.match(text):
            import fsspec

            filesystem, path = fsspec.core.url_to_fs(text)
            protocol = text.split("://", 1)[0]
            if filesystem.isdir(path):
                found = sorted(p for p in filesystem.find(path, maxdepth=1) if p.endswith(".tar"))
                if not found:
                    raise UserInputError(f"{text}: no *.tar shards at this URL")
                urls = [f"{protocol}://{p}" if not p.startswith(f"{protocol}://") else p for p in found]
            else:
                urls = [text]
        elif local.is_file():
            urls = [str(local)]
        else:
            raise UserInputError(f"{text}: not a shard directory, shard file, brace pattern or URL")
    if not urls:
        raise UserInputError(f"{origin}: no shards")
    if shard_sizes is not None:
        sizes = [int(s) for s in shard_sizes]
        offsets = nbytes = None
        if len(sizes) != len(urls):
            raise UserInputError(f"{origin}: {len(urls)} shards but {len(sizes)} shard sizes given")
    if sizes is None:
        sizes = [count_samples(url) for url in urls]
    return ShardSource(urls=tuple(urls), sizes=tuple(sizes), origin=origin, offsets=offsets, nbytes=nbytes, policy=policy)
