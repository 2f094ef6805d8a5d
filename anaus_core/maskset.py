"""The mask set of one image: the contract between every mask source, the shard store and the trainer.

A mask set is a stack of full-size binary masks that may overlap, each carrying an integer id
(unique within the image, >= 1), the name of the source that produced it, a score in [0, 1] and
its area in pixels. Every masker (labels, k-means, Felzenszwalb, SAM, LP-SAM) returns this
structure, the shard store serialises it losslessly, and the trainer samples ids from it.

The residual region (pixels of the scan region covered by no other mask) is an ordinary mask
with ``source == "residual"``; it is what makes coverage of the echo data explicit when masks
do not tile it. ``finalize(region=...)`` clips every mask to the scan region (the fan or
rectangle that holds echo data, ``anaus_core.scan_region``), whatever source made it, so no
mask ever covers the black screen or burned-in annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

RESIDUAL_SOURCE = "residual"


@dataclass(frozen=True)
class MaskInfo:
    """Metadata of one mask (what the JSON record of a shard sample stores per mask)."""

    id: int
    source: str
    score: float
    area: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": int(self.id), "source": self.source, "score": float(self.score), "area": int(self.area)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskInfo":
        return cls(id=int(data["id"]), source=str(data["source"]), score=float(data["score"]), area=int(data["area"]))


@dataclass
class MaskSet:
    """Overlapping binary masks of one image with per-mask metadata.

    Attributes:
        masks: bool array (M, H, W); masks may overlap, M may be 0.
        ids: int32 array (M,), unique, each >= 1 (0 is reserved for "no mask").
        sources: M strings naming the producer of each mask ("labels", "kmeans", "felzenszwalb",
            "sam", "lpsam:<class>", "residual", ...).
        scores: float32 array (M,) in [0, 1]; 1.0 where the source has no notion of confidence.
    """

    masks: np.ndarray
    ids: np.ndarray
    sources: list[str]
    scores: np.ndarray
    _areas: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        masks = np.asarray(self.masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
        self.masks = masks.astype(bool, copy=False)
        self.ids = np.asarray(self.ids, dtype=np.int32).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.sources = [str(s) for s in self.sources]
        m = self.masks.shape[0]
        if not (len(self.ids) == len(self.sources) == len(self.scores) == m):
            raise ValueError(
                f"mask set is inconsistent: {m} masks, {len(self.ids)} ids, "
                f"{len(self.sources)} sources, {len(self.scores)} scores"
            )
        if m and (self.ids.min() < 1 or len(np.unique(self.ids)) != m):
            raise ValueError(f"mask ids must be unique and >= 1, got {self.ids.tolist()}")
        self._areas = None

    # -- basic properties -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def areas(self) -> np.ndarray:
        """int64 (M,) pixel counts, computed once."""
        if self._areas is None:
            self._areas = self.masks.sum(axis=(1, 2), dtype=np.int64)  # reshape(M, -1) fails for M == 0
        return self._areas

    def infos(self) -> list[MaskInfo]:
        return [
            MaskInfo(id=int(i), source=s, score=float(sc), area=int(a))
            for i, s, sc, a in zip(self.ids, self.sources, self.scores, self.areas)
        ]

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int) -> "MaskSet":
        return cls(masks=np.zeros((0, height, width), bool), ids=np.zeros(0, np.int32), sources=[], scores=np.zeros(0, np.float32))

    @classmethod
    def from_label_map(cls, label_map: np.ndarray, *, source: str = "labels", background: int | None = 0) -> "MaskSet":
        """One mask per distinct value of an integer label map (the value becomes the id).

        ``background`` (default 0) is not turned into a mask; pass ``None`` to keep every value.
        A value of 0 that is kept gets the id ``max + 1`` because id 0 is reserved.
        """
        label_map = np.asarray(label_map)
        if label_map.ndim != 2:
            raise ValueError(f"label map must be (H, W), got shape {label_map.shape}")
        values = [int(v) for v in np.unique(label_map) if background is None or v != background]
        masks = np.stack([label_map == v for v in values]) if values else np.zeros((0, *label_map.shape), bool)
        next_id = max(values, default=0) + 1
        ids = [v if v >= 1 else next_id for v in values]
        return cls(masks=masks, ids=np.asarray(ids), sources=[source] * len(values), scores=np.ones(len(values)))

    @classmethod
    def concatenate(cls, parts: Iterable["MaskSet"], *, height: int, width: int) -> "MaskSet":
        """Stack several mask sets, renumbering ids 1..M in order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(height, width)
        masks = np.concatenate([p.masks for p in parts])
        sources = [s for p in parts for s in p.sources]
        scores = np.concatenate([p.scores for p in parts])
        return cls(masks=masks, ids=np.arange(1, len(masks) + 1), sources=sources, scores=scores)

    # -- the common post-processing every masker shares ---------------------------------------
    def finalize(self, *, min_area: int = 16, max_masks: int = 32, add_residual: bool = True, residual_min_area: int | None = None,
                 region: np.ndarray | None = None) -> "MaskSet":
        """Clip to ``region``, drop masks below ``min_area``, keep at most ``max_masks`` by
        (score, area), add the residual.

        ``region``: bool (H, W) scan region, or None for the whole image. Every mask is
        intersected with it before the area test (a mask mostly outside it shrinks and may
        drop out), and the residual is the region minus the kept masks.
        The residual (pixels covered by no kept mask) is added when ``add_residual`` and it is at
        least ``residual_min_area`` pixels (default ``min_area``); it counts towards
        ``max_masks`` so the result never exceeds the cap. Ids are renumbered 1..M in the kept
        order, so the output is deterministic for a given input.
        """
        if max_masks < 1:
            raise ValueError("max_masks must be >= 1")
        height, width = self.shape
        source = self
        if region is not None:
            region = np.asarray(region, bool)
            if region.shape != (height, width):
                raise ValueError(f"scan region is {region.shape}, the masks are {(height, width)}")
            source = MaskSet(masks=self.masks & region[None], ids=self.ids, sources=self.sources, scores=self.scores)
        return source._finalize(min_area=min_area, max_masks=max_masks, add_residual=add_residual,
                                residual_min_area=residual_min_area, region=region)

    def _finalize(self, *, min_area: int, max_masks: int, add_residual: bool, residual_min_area: int | None,
                  region: np.ndarray | None) -> "MaskSet":
        height, width = self.shape
        areas = self.areas
        keep = np.flatnonzero((areas >= min_area) & (np.asarray(self.sources) != RESIDUAL_SOURCE)) if len(self) else np.zeros(0, int)
        # Higher score first, then larger area, then original order (stable, deterministic).
        order = sorted(keep.tolist(), key=lambda i: (-float(self.scores[i]), -int(areas[i]), i))
        budget = max_masks - 1 if add_residual else max_masks
        order = order[:budget]
        masks = self.masks[order] if order else np.zeros((0, height, width), bool)
        sources = [self.sources[i] for i in order]
        scores = self.scores[order] if order else np.zeros(0, np.float32)
        if add_residual:
            residual = ~masks.any(axis=0) if len(order) else np.ones((height, width), bool)
            if region is not None:
                residual &= region
            if residual.sum() >= (min_area if residual_min_area is None else residual_min_area):
                masks = np.concatenate([masks, residual[None]])
                sources = sources + [RESIDUAL_SOURCE]
                scores = np.concatenate([scores, np.ones(1, np.float32)])
        return MaskSet(masks=masks, ids=np.arange(1, len(masks) + 1), sources=sources, scores=scores)

    # -- serialisation helpers (the shard store owns the byte format) ---------------------------
    def records(self) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self.infos()]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskSet):
            return NotImplemented
        return (
            self.masks.shape == other.masks.shape
            and bool(np.array_equal(self.masks, other.masks))
            and bool(np.array_equal(self.ids, other.ids))
            and self.sources == other.sources
            and bool(np.array_equal(self.scores, other.scores))
        )
