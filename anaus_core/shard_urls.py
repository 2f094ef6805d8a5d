"""Which shard sources may be opened: the policy that keeps files from running commands.

webdataset reads a ``pipe:CMD`` URL by running ``CMD`` in a shell. A shard source can come from
places the user did not write: a shared YAML ``--config``, or the config stored inside a
colleague's checkpoint (``--resume-from``). So a source is accepted by default only when it is
a local path (folder, shard file, brace pattern of local files) or a ``file://`` URL:

* ``pipe:`` sources are refused unless the caller passes ``allow_pipe=True``; the CLI does that
  only for a source typed on its own command line together with ``--allow-pipe-shards`` (a
  flag that is not a config field, so it is never saved into config.yaml or a checkpoint);
* other URL schemes (``s3://``, ``http://``, ``memory://`` …, read through fsspec) are refused
  unless ``allow_remote=True`` (``--allow-remote-shards``): they run no command, but they fetch
  data from somewhere the user may not have meant.

``check_shard_source`` is called with the raw source before anything is expanded or opened, and
``shards.stream.resolve_shards`` applies it again to every expanded URL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

from anaus_core.errors import UserInputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class ShardUrlPolicy:
    """What a shard source may be besides local files. Both default to refusing."""

    allow_pipe: bool = False
    allow_remote: bool = False


def url_kind(url: str) -> str:
    """``"pipe"``, ``"local"`` (a path or ``file://``) or ``"remote"`` (any other scheme)."""
    text = str(url).strip()
    if text.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter
        return "local"
    if match.group(1).lower() == "file":
        return "local"
    return "remote"


def check_shard_source(source: str | os.PathLike | Sequence[str], *, policy: ShardUrlPolicy = ShardUrlPolicy(),
                       origin: str = "data.shards") -> None:
    """Raise a one-line ``UserInputError`` if ``source`` (or any URL in a list) is not allowed by
    ``policy``; ``origin`` names where the source came from (an option, a config key)."""
    urls = [os.fspath(u) for u in source] if isinstance(source, (list, tuple)) else [os.fspath(source)]
    for url in urls:
        kind = url_kind(url)
        if kind == "pipe" and not policy.allow_pipe:
            raise UserInputError(
                f"{origin}: {url[:80]!r} is a pipe: command; shard sources never run commands unless typed on the "
                "command line as --shards with --allow-pipe-shards")
        if kind == "remote" and not policy.allow_remote:
            raise UserInputError(
                f"{origin}: {url[:80]!r} is a remote URL; give a local shard folder, or pass --allow-remote-shards")
