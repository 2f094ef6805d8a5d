"""Outer k folds, the inner validation split of a training fold, label fractions, split files.

Outer folds: ``StratifiedGroupKFold`` when some group holds several items, ``StratifiedKFold``
otherwise (both shuffled with the run's seed). The inner validation split is drawn from the
training folds only, grouped and stratified the same way, so nothing selected (linear-head
hyper-parameters, fine-tuning epoch) ever sees the test fold.
"""

from __future__ import annotations

import csv
import math
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from anaus_core.errors import UserInputError


@dataclass(frozen=True)
class Fold:
    """Item positions (into ``dataset.items``): ``train`` (inner training part), ``val`` (inner
    validation part, from the training folds), ``test`` (the held-out fold)."""

    index: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def _split(n_splits: int, strata: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) position pairs; stratified when every stratum can fill every split."""
    x = np.zeros(len(strata))
    grouped = len(np.unique(groups)) < len(groups)
    _, counts = np.unique(strata, return_counts=True)
    stratify = counts.min() >= n_splits
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", UserWarning)  # sklearn's "least populated class" notice
        if grouped:
            splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed) if stratify else GroupKFold(n_splits)
            if not stratify:
                # GroupKFold is deterministic and unshuffled: permute groups with the seed first
                names, codes = np.unique(groups, return_inverse=True)
                order = np.random.default_rng(seed).permutation(len(names))
                groups = order[codes]
            return [(tr, te) for tr, te in splitter.split(x, strata, groups)]
        splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed) if stratify else KFold(n_splits, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(x, strata)]


def inner_split(positions: np.ndarray, strata: np.ndarray, groups: np.ndarray, *, val_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training positions into (inner train, inner validation) with about ``val_fraction``
    of the groups in validation (at least one group)."""
    positions = np.asarray(positions)
    n_groups = len(np.unique(groups[positions]))
    if n_groups < 2:
        raise UserInputError(f"a training fold holds {n_groups} group(s); an inner validation split needs at least 2")
    n_splits = int(min(n_groups, max(2, round(1.0 / max(val_fraction, 1e-6)))))
    train, val = _split(n_splits, strata[positions], groups[positions], seed)[0]
    return positions[np.sort(train)], positions[np.sort(val)]


def make_folds(strata: np.ndarray, groups: list[str], *, k: int, seed: int, val_fraction: float,
               assignment: np.ndarray | None = None) -> list[Fold]:
    """The outer folds (from ``assignment``, a fold number per item, when given) with their inner
    validation splits. Raises ``UserInputError`` when there are fewer groups than folds."""
    strata = np.asarray(strata)
    group_array = np.asarray(groups)
    if assignment is None:
        n_groups = len(np.unique(group_array))
        if n_groups < k:
            raise UserInputError(f"{n_groups} group(s) cannot fill {k} folds; use fewer --folds")
        outer = _split(k, strata, group_array, seed)
    else:
        assignment = np.asarray(assignment)
        k = int(assignment.max()) + 1
        outer = [(np.flatnonzero(assignment != f), np.flatnonzero(assignment == f)) for f in range(k)]
        for f, (_, test) in enumerate(outer):
            if test.size == 0:
                raise UserInputError(f"split file: fold {f} is empty (folds are numbered 0..{k - 1})")
    folds = []
    for index, (train, test) in enumerate(outer):
        inner_train, val = inner_split(np.sort(train), strata, group_array, val_fraction=val_fraction, seed=seed + 1000 + index)
        folds.append(Fold(index, tuple(int(i) for i in inner_train), tuple(int(i) for i in val), tuple(int(i) for i in np.sort(test))))
    return folds


def label_fraction_subset(positions: tuple[int, ...], strata: np.ndarray, *, fraction: float, seed: int) -> tuple[int, ...]:
    """``fraction`` of ``positions`` per stratum (at least one each), drawn with ``seed``; the
    whole set for fraction >= 1."""
    if fraction >= 1.0:
        return positions
    if fraction <= 0:
        raise UserInputError(f"--label-fraction {fraction}: must be in (0, 1]")
    rng = np.random.default_rng(seed)
    positions_arr = np.asarray(positions)
    keep: list[int] = []
    for stratum in np.unique(strata[positions_arr]):
        members = positions_arr[strata[positions_arr] == stratum]
        count = max(1, int(math.ceil(fraction * len(members))))
        keep += rng.choice(members, size=count, replace=False).tolist()
    return tuple(sorted(int(i) for i in keep))


def read_splits_file(path: str | Path, ids: list[str], files: list[str]) -> np.ndarray:
    """``file,fold`` rows (``file`` an item id or a source file, which puts all its frames in that
    fold; folds numbered from 0) -> fold number per item. Unknown names and unassigned items are
    errors naming the file."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = [r for r in csv.reader(handle) if r and "".join(r).strip()]
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read split file ({exc.strerror or exc})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "fold"], ["path", "fold"]):
        rows = rows[1:]
    by_name: dict[str, int] = {}
    known = set(ids) | set(files)
    for line, row in enumerate(rows, start=2):
        try:
            name, fold = row[0].strip(), int(row[1])
        except (IndexError, ValueError):
            raise UserInputError(f"{path}: line {line}: expected 'file,fold' with an integer fold, got {','.join(row)!r}") from None
        if name not in known:
            raise UserInputError(f"{path}: line {line}: {name!r} is not an image of the dataset")
        if fold < 0:
            raise UserInputError(f"{path}: line {line}: fold must be >= 0, got {fold}")
        by_name[name] = fold
    assignment = np.array([by_name.get(item_id, by_name.get(file, -1)) for item_id, file in zip(ids, files)])
    if (assignment < 0).any():
        first = ids[int(np.flatnonzero(assignment < 0)[0])]
        raise UserInputError(f"{path}: {int((assignment < 0).sum())} image(s) have no fold (first: {first})")
    return assignment


def write_splits_file(path: str | Path, ids: list[str], folds: list[Fold]) -> None:
    """The outer folds used, as ``file,fold`` (re-usable with ``--splits``)."""
    fold_of = {}
    for fold in folds:
        for position in fold.test:
            fold_of[ids[position]] = fold.index
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "fold"])
        for item_id in ids:
            writer.writerow([item_id, fold_of[item_id]])
