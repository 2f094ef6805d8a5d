"""Evaluation layouts from a phantom corpus (``img/<id>.png``, ``label/<id>.png``,
``label/<id>.json``, see ``docs/phantoms.md``):

* classification: ``OUT/classification/<kind>/<id>.png``, the class being the phantom's dominant
  structure kind (the kind covering most pixels in its label map);
* segmentation: ``OUT/segmentation/{img,label}/<id>.png`` + ``dataset.yaml``, the label being
  every structure of one kind (value 1);
* regions (the online evaluation's ``task: regions``): ``OUT/regions/{img,label}/<id>.png`` +
  ``dataset.yaml``, every structure labelled with its kind (``REGION_CLASSES``) and the rest of
  the field of view as ``tissue``; pixels outside the field of view (around a sector) are 0, and
  so are structures of a kind fewer than ``min_per_class`` phantoms hold.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from anaus_core.errors import UserInputError
from anaus_core.phantoms.geometry import fan_mask
from anaus_core.phantoms.structures import KINDS

REGION_CLASSES = {**{kind: value for value, kind in enumerate(KINDS, start=1)}, "tissue": len(KINDS) + 1}


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def dominant_kind(label: np.ndarray, sidecar: dict) -> str:
    """The structure kind with the largest pixel count in ``label`` (ties: alphabetical)."""
    areas: Counter[str] = Counter()
    counts = np.bincount(label.ravel(), minlength=256)
    for structure in sidecar["structures"]:
        areas[structure["kind"]] += int(counts[int(structure["label"])])
    if not areas:
        raise UserInputError(f"phantom {sidecar.get('id')}: no structures in its sidecar")
    return sorted(areas.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def region_label(label: np.ndarray, sidecar: dict, *, kinds: dict[str, int] = REGION_CLASSES) -> np.ndarray:
    """uint8 map of ``kinds`` values: each structure's kind, ``tissue`` elsewhere in the field of
    view, 0 outside it and for structures whose kind is not in ``kinds``."""
    out = np.where(fan_mask(label.shape[0], sidecar.get("fan")), kinds.get("tissue", 0), 0).astype(np.uint8)
    for structure in sidecar["structures"]:
        out[label == int(structure["label"])] = kinds.get(structure["kind"], 0)
    return out


def write_phantom_tasks(corpus: str | Path, out: str | Path, *, segment_kind: str = "cyst",
                        min_per_class: int = 1) -> dict:
    """Write the three layouts for every phantom in ``corpus``; classes with fewer than
    ``min_per_class`` images are left out of the classification layout (listed in the result).
    Returns ``{"classification": dir, "segmentation": dir, "regions": dir, "classes": {kind: n},
    "left_out": {kind: n}}``."""
    corpus, out = Path(corpus), Path(out)
    sidecars = sorted((corpus / "label").glob("*.json"))
    if not sidecars:
        raise UserInputError(f"{corpus}: no phantom sidecars (label/*.json); generate with `anaus make-phantoms`")
    kinds: dict[str, str] = {}
    # region classes need min_per_class images holding them (folds are drawn over images)
    holding: Counter[str] = Counter()
    for sidecar_path in sidecars:
        holding.update({s["kind"] for s in json.loads(sidecar_path.read_text())["structures"]} | {"tissue"})
    region_classes = {kind: value for kind, value in REGION_CLASSES.items() if holding[kind] >= min_per_class}
    seg_dir, cls_dir, region_dir = out / "segmentation", out / "classification", out / "regions"
    for folder in (seg_dir, region_dir):
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "label").mkdir(parents=True, exist_ok=True)
    for sidecar_path in sidecars:
        sidecar = json.loads(sidecar_path.read_text())
        phantom = sidecar_path.stem
        label = np.asarray(Image.open(corpus / "label" / f"{phantom}.png"))
        kinds[phantom] = dominant_kind(label, sidecar)
        wanted = [int(s["label"]) for s in sidecar["structures"] if s["kind"] == segment_kind]
        binary = np.isin(label, wanted).astype(np.uint8)
        _link_or_copy(corpus / "img" / f"{phantom}.png", seg_dir / "img" / f"{phantom}.png")
        Image.fromarray(binary, "L").save(seg_dir / "label" / f"{phantom}.png")
        _link_or_copy(corpus / "img" / f"{phantom}.png", region_dir / "img" / f"{phantom}.png")
        Image.fromarray(region_label(label, sidecar, kinds=region_classes), "L").save(region_dir / "label" / f"{phantom}.png")
    (seg_dir / "dataset.yaml").write_text(yaml.safe_dump({"name": f"phantoms-{segment_kind}", "classes": {segment_kind: 1}}))
    (region_dir / "dataset.yaml").write_text(yaml.safe_dump({"name": "phantom-regions", "classes": region_classes},
                                                            sort_keys=False))
    counts = Counter(kinds.values())
    kept = {k: n for k, n in counts.items() if n >= min_per_class}
    if len(kept) < 2:
        raise UserInputError(f"{corpus}: fewer than two dominant-structure classes with {min_per_class}+ phantoms "
                             f"({dict(counts)}); generate more phantoms")
    if cls_dir.exists():
        shutil.rmtree(cls_dir)
    for phantom, kind in kinds.items():
        if kind in kept:
            (cls_dir / kind).mkdir(parents=True, exist_ok=True)
            _link_or_copy(corpus / "img" / f"{phantom}.png", cls_dir / kind / f"{phantom}.png")
    return {"classification": cls_dir, "segmentation": seg_dir, "regions": region_dir, "classes": dict(sorted(kept.items())),
            "left_out": {k: n for k, n in counts.items() if k not in kept}}
