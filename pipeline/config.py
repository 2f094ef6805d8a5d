"""``PrecomputeConfig``: every setting of ``anaus precompute-masks`` (YAML-loadable, CLI overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_SCALES = [7, 14, 28, 56]


@dataclass
class PrecomputeConfig:
    """Settings of one precompute job.

    Which settings feed which stage fingerprint (so what a change re-runs) is listed in
    docs/precompute.md: ``stored_size``/``every_nth_frame`` -> ingest and everything after;
    ``scan_region``/``region_options`` -> scan region, mask and onwards (never ingest);
    ``groups`` (the file's contents) -> pack only;
    masker, its options and checkpoint(s) (sha256 of ``checkpoint`` and ``sam_checkpoint``), ``min_area``/``max_masks``/``add_residual`` -> mask
    onwards; ``scales`` -> pyramid onwards; ``samples_per_shard`` -> pack only. Execution
    settings (workers, scheduler, batch size, device, progress) change no output.
    """

    corpus: str = ""
    out: str = ""
    # -- mask source -----------------------------------------------------------------------
    masker: str = "felzenszwalb"
    labels: Optional[str] = None  # label folder for --masker labels (default: beside the images)
    checkpoint: Optional[str] = None  # the masker's own checkpoint: SAM for sam, LP-SAM for lpsam
    sam_checkpoint: Optional[str] = None  # base SAM of an LP-SAM checkpoint (for sam: same as checkpoint)
    masker_options: dict[str, Any] = field(default_factory=dict)
    # -- ingest ----------------------------------------------------------------------------
    stored_size: int = 256
    every_nth_frame: int = 1
    # -- scan region (one per source; every mask is clipped to it) ------------------------------
    scan_region: bool = True  # False: the whole image is the region (as before scan regions)
    region_options: dict[str, Any] = field(default_factory=dict)  # anaus_core.scan_region.ScanRegionConfig fields
    # -- groups --------------------------------------------------------------------------------
    groups: Optional[str] = None  # groups.csv (path,group); default: CORPUS/groups.csv when it exists
    # -- mask finalisation -------------------------------------------------------------------
    min_area: int = 16
    max_masks: int = 32
    add_residual: bool = True
    # -- pyramid and packing -----------------------------------------------------------------
    scales: list[int] = field(default_factory=lambda: list(DEFAULT_SCALES))
    samples_per_shard: int = 1000
    anatomy: Optional[str] = None  # --anatomy: csv:FILE | folder | dicom | lpsam (pipeline/anatomy.py); pack stage only
    # -- execution (changes no output) ---------------------------------------------------------
    workers: int = 0  # 0: in this process; N >= 1: N local worker processes
    scheduler: Optional[str] = None  # dask.distributed scheduler address, e.g. tcp://host:8786
    scheduler_timeout: float = 30.0  # seconds to wait for --scheduler before a one-line error
    batch_size: int = 8  # samples per task (and per masker call)
    device: str = "cpu"
    # in-process runs: source batches ingested ahead in threads while the masker runs
    # (pipeline/prefetch.py); None = auto (2 for sam/lpsam, else 0), 0 = off
    prefetch: Optional[int] = None
    # -- behaviour -----------------------------------------------------------------------------
    strict: bool = False
    dry_run: bool = False
    gc: bool = False
    progress: bool = True
    # -- guards of an existing output (pipeline/output_guard.py) -------------------------------
    allow_shrink: bool = False  # let a run remove more than max_shrink of the store's samples
    max_shrink: float = 0.5  # largest fraction of samples a run may remove without allow_shrink
    allow_masker_change: bool = False  # let a run rebuild a store made with another masker
