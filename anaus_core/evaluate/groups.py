"""Which items must stay in the same fold: a ``groups.csv`` (``file,group``) or a rule.

Rules (``--group-by``):

* ``auto`` (default): frames of one multi-frame source (video, multi-frame DICOM) form a group,
  every single-frame file is its own group;
* ``video``: the same (named for what users have: frames extracted from a video);
* ``patient``: the DICOM PatientID (a file without one is its own group, with a warning);
* ``folder``: the file's parent folder inside its class / image folder (frames exported one per
  file into a folder per video or patient);
* ``none``: every item is its own group. With multi-frame sources this splits frames of one
  video across folds, a leak that is refused unless ``allow_frame_leak`` is set.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from anaus_core.errors import UserInputError
from anaus_core.evaluate.datasets import EvalDataset


def read_groups_file(path: str | Path, dataset: EvalDataset) -> tuple[dict[str, str], list[str]]:
    """``file,group`` rows -> ({file: group}, warnings). A row naming a file that is not in the
    dataset is an error (a typo would otherwise silently ungroup it); a dataset file without a
    row becomes its own group with a warning."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read groups file ({exc.strerror or exc})") from None
    # header "file,group" (or "path,group", the precompute job's groups.csv)
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "group"], ["path", "group"]):
        rows = rows[1:]
    known = {item.file for item in dataset.items}
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise UserInputError(f"{path}: line {line}: expected 'file,group', got {','.join(row)!r}")
        name, group = PurePosixPath(row[0].strip()).as_posix(), row[1].strip()
        if name not in known:
            raise UserInputError(f"{path}: line {line}: {name!r} is not a file of the dataset {dataset.root}")
        mapping[name] = group
    warnings = []
    missing = sorted(known - set(mapping))
    if missing:
        warnings.append(f"{path}: {len(missing)} file(s) have no group and form groups of their own (first: {missing[0]})")
    return mapping, warnings


def assign_groups(dataset: EvalDataset, *, rule: str = "auto", groups_file: str | Path | None = None,
                  allow_frame_leak: bool = False) -> list[str]:
    """Set ``item.group`` for every item; return warnings. Raises ``UserInputError`` for a
    frame-level split of multi-frame sources without ``allow_frame_leak``."""
    warnings: list[str] = []
    if groups_file is not None:
        mapping, warnings = read_groups_file(groups_file, dataset)
        for item in dataset.items:
            item.group = "csv:" + mapping[item.file] if item.file in mapping else "file:" + item.file
        return warnings
    if rule == "none":
        multi = dataset.multi_frame_files
        if multi and not allow_frame_leak:
            raise UserInputError(f"{dataset.root}: --group-by none would split frames of {len(multi)} multi-frame "
                                 f"source(s) across folds (e.g. {sorted(multi)[0]}); pass --allow-frame-leak to do it anyway")
        for item in dataset.items:
            item.group = "item:" + item.id
        return warnings
    if rule in ("auto", "video"):
        for item in dataset.items:
            item.group = "file:" + item.file
        return warnings
    if rule == "patient":
        without = 0
        for item in dataset.items:
            if item.patient_id:
                item.group = "patient:" + item.patient_id
            else:
                item.group, without = "file:" + item.file, without + 1
        if without:
            warnings.append(f"{dataset.root}: {without} item(s) carry no DICOM PatientID and form groups of their own")
        return warnings
    if rule == "folder":
        for item in dataset.items:
            parts = PurePosixPath(item.file).parts
            # drop the class folder (classification) / image folder (segmentation) and the file name
            inner = parts[1:-1]
            item.group = "folder:" + ("/".join(inner) if inner else item.file)
        return warnings
    raise UserInputError(f"--group-by {rule!r}: choose from auto, video, patient, folder, none")
