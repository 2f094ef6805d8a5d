"""What a precompute run may do to a shard store that already exists.

Re-running ``precompute-masks`` into an existing output is how a store is updated, so the job
deletes shards that the current corpus no longer produces. Against a wrong or unmounted corpus
that would delete the store. The guard stops a run, before anything is written or deleted, when:

* the corpus yields no samples at all (always an error: "empty corpus");
* the store would lose more than ``max_shrink`` of its samples (default 0.5) — pass
  ``--allow-shrink`` when the corpus really got smaller;
* the masker differs from the one the store was made with (``manifest.json`` records it under
  ``fingerprints.masker``) — pass ``--allow-masker-change`` to rebuild with another masker.

A dry run reports the same refusal (it never writes anyway).
"""

from __future__ import annotations

from pathlib import Path

from anaus_core.errors import UserInputError


def existing_store(out_dir: str | Path) -> dict | None:
    """The manifest of the shard store in ``out_dir``, or None when there is none (or it is unreadable:
    then the store is rebuilt anyway)."""
    from shards.index import read_manifest

    if not (Path(out_dir) / "manifest.json").is_file():
        return None
    try:
        return read_manifest(out_dir)
    except UserInputError:
        return None


def recorded_masker(manifest: dict | None) -> str | None:
    """The masker a store was made with, as its manifest records it."""
    if not manifest:
        return None
    value = (manifest.get("fingerprints") or {}).get("masker")
    return str(value) if value else None


def check_masker(out_dir: str | Path, masker: str, *, allow_change: bool) -> None:
    """Refuse to rebuild a store made with another masker unless ``allow_change``."""
    before = recorded_masker(existing_store(out_dir))
    if before is not None and before != str(masker) and not allow_change:
        raise UserInputError(
            f"{out_dir}: was made with --masker {before}; this run uses --masker {masker}, which would replace every shard. "
            f"Pass --masker {before} to update it, or --allow-masker-change to rebuild it")


def check_sample_count(out_dir: str | Path, samples: int, *, skipped: int, corpus: str, allow_shrink: bool,
                       max_shrink: float, first_error: dict | None = None) -> None:
    """Refuse an empty result, and a shrink by more than ``max_shrink`` of the existing samples."""
    if samples <= 0:
        if skipped:
            first = f" (first: {first_error.get('path')}: {first_error.get('reason')})" if first_error else ""
            raise UserInputError(f"{corpus}: no usable input: all {skipped} input(s) were skipped{first}; nothing written")
        raise UserInputError(f"{corpus}: empty corpus: no images or videos found; nothing written")
    manifest = existing_store(out_dir)
    if manifest is None or allow_shrink:
        return
    before = sum(int(entry.get("samples", 0)) for entry in manifest.get("shards", []))
    if before > 0 and samples < before * (1.0 - float(max_shrink)):
        raise UserInputError(
            f"{out_dir}: this run would shrink the store from {before} to {samples} samples (more than "
            f"{float(max_shrink):.0%}); is {corpus} the right, fully mounted corpus? Pass --allow-shrink to proceed")
