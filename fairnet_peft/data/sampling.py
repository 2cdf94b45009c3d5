"""Group-aware sampling and label-setting helpers shared by the loaders, the examples and the benchmarks.

A dataset here has a ``labels`` column and a ``sensitive`` column coded 1 (minority) / 0 (majority) / -1 (unknown).
``encode_sensitive`` turns a raw group column into that code; ``stratified_subsample`` draws seeded row indices that
keep every (label, group) cell, and ``stratified_split`` carves a held-out part that keeps them;
``partial_group_labels`` / ``hide_group_labels`` hide group labels to simulate the partial and unlabeled settings
(docs/label-settings.md). Arrays in, arrays (or a new ``DatasetDict``) out.
"""

from __future__ import annotations

import numbers
import re
from decimal import Decimal
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from ..evaluation.counting import MISSING_TEXTS, is_missing  # noqa: F401  (the loaders' names for them)

__all__ = ["LABEL_SETTINGS", "encode_sensitive", "group_strata", "hide_group_labels", "partial_group_labels",
           "stratified_split", "stratified_subsample"]

#: Which group labels FairNet sees in training: all, a fraction, or none.
LABEL_SETTINGS = ("full", "partial", "unlabeled")


# ----------------------------------------------------------------------------- raw values
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def normalize_value(value: Any) -> str:
    """Value as a comparable string. Numbers and number-looking strings become the same text: 1, 1.0, True, '1',
    ' 1 ', '1.0', '1e0' and 'true' (any case, as a CSV writes a bool) all become '1', and 0.5 and '0.50' become
    '0.5'. Other strings are only stripped."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return str(int(text.lower() == "true"))
    if _NUMBER.fullmatch(text):
        number = Decimal(text)
        return str(int(number)) if number == number.to_integral_value() else str(float(number))
    return text


def encode_sensitive(values: Sequence[Any], minority_value: Optional[Any] = None) -> list[int]:
    """Map a raw group column to 1 (minority) / 0 (majority) / -1 (unknown: missing values).

    With ``minority_value`` the rows equal to it (compared by ``normalize_value``, so 1 == '1' == 1.0 == '1.0') are
    the minority and every other present value the majority; missing values (``is_missing``: None, NaN, '', 'NA',
    'unknown', ...) and -1, this package's own "unknown" code, are -1. Without it the column must already be coded
    1 / 0 / -1 (numbers or number-looking strings).
    """
    if minority_value is not None:
        target = normalize_value(minority_value)
        if target == "-1":
            raise ValueError(
                "minority_value=-1: -1 is the code for an unknown group here; recode the minority to another value "
                "(or code the column 1 / 0 / -1 yourself and pass no minority_value).")
        return [-1 if is_missing(v) or normalize_value(v) == "-1" else int(normalize_value(v) == target)
                for v in values]
    out = []
    for v in values:
        key = "-1" if is_missing(v) else normalize_value(v)
        if key not in ("-1", "0", "1"):
            raise ValueError(
                f"The sensitive column has the value {v!r}; pass minority_value (--minority-value in the examples) to "
                "say which value is the minority (the others become the majority), or code the column as 1 / 0 / -1.")
        out.append(int(key))
    return out


# ----------------------------------------------------------------------------- subsampling
def group_strata(labels: Sequence[int], sensitive: Sequence[int]) -> np.ndarray:
    """One stratum id per (label, group) cell: ``labels * 3 + sensitive + 1``, so unknown groups (-1) get ids of their
    own (ordered as (label, group) pairs: a split stratified on these ids draws as on the pairs)."""
    return np.asarray(labels, dtype=np.int64) * 3 + np.asarray(sensitive, dtype=np.int64) + 1


def _restore_empty_cells(keep: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap one row of every cell the draw missed in for a row of the currently largest drawn cell (same size)."""
    keep = keep.copy()
    for cell in np.unique(strata):
        if (strata[keep] == cell).any():
            continue
        drawn, counts = np.unique(strata[keep], return_counts=True)
        donor = drawn[np.argmax(counts)]
        out = rng.choice(np.flatnonzero(strata[keep] == donor))
        keep[out] = rng.choice(np.flatnonzero(strata == cell))
    return keep


def _stratified_draw(strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of ``n`` of the rows (0 < n < len), drawn stratified on ``strata`` where scikit-learn can (every
    cell has two rows, and both the draw and the rest have room for a row of each cell), else plain seeded sampling;
    then, when ``n`` is at least the number of cells, a row of every cell the draw missed (`_restore_empty_cells`)."""
    positions = np.arange(len(strata))
    cells, counts = np.unique(strata, return_counts=True)
    if counts.min() >= 2 and min(n, len(strata) - n) >= len(cells):
        keep, _ = train_test_split(positions, train_size=n, stratify=strata, random_state=seed)
    else:
        keep = np.random.default_rng(seed).choice(positions, size=n, replace=False)
    if n >= len(cells):
        keep = _restore_empty_cells(np.asarray(keep), strata, np.random.default_rng([seed, 1]))
    return np.asarray(keep)


def stratified_subsample(labels: Sequence[int], sensitive: Sequence[int], n: Optional[int], seed: int) -> np.ndarray:
    """Sorted positions of a seeded subsample of ``n`` rows, stratified on the (label, group) cells.

    ``n`` rows exactly (all rows when ``n`` is None or at least the length). The cells keep their proportions
    (scikit-learn's stratified split) and, when ``n`` is at least the number of cells, none is left empty: a cell
    that rounding dropped gets one row in exchange for a row of the largest cell. Cells with a single row cannot be
    stratified on; then the draw is plain seeded sampling with the same no-empty-cell repair.
    """
    strata = group_strata(labels, sensitive)
    if n is None or n >= len(strata):
        return np.arange(len(strata))
    if n <= 0:
        raise ValueError(f"stratified_subsample: n must be positive, got {n}; pass None to keep every row.")
    return np.sort(_stratified_draw(strata, n, seed))


def stratified_split(strata: Sequence[Any], test_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train positions, test positions), sorted, with exactly ``test_rows`` test rows, stratified on
    ``strata`` (any hashable cell ids, e.g. (label, group) pairs).

    Each cell keeps its share on both sides, and a cell of two rows or more has a row in the test part when
    ``test_rows`` allows (`_stratified_draw`). A cell of a single row stays on the train side: a class or group the
    model never trains on cannot be learned, and one held-out row measures nothing. Where the cells of two rows or
    more cannot fill the test part, the split is plain seeded sampling.
    """
    keys = {}
    strata = np.array([keys.setdefault(cell, len(keys)) for cell in strata], dtype=np.int64)
    if not 0 < test_rows < len(strata):
        raise ValueError(f"stratified_split: test_rows must be between 1 and {len(strata) - 1}, got {test_rows}.")
    positions = np.arange(len(strata))
    cells, counts = np.unique(strata, return_counts=True)
    pool = positions[np.isin(strata, cells[counts >= 2])]
    if test_rows < len(pool):
        test = pool[_stratified_draw(strata[pool], test_rows, seed)]
    else:
        test = np.random.default_rng(seed).choice(positions, size=test_rows, replace=False)
    return np.setdiff1d(positions, test), np.sort(test)


# ----------------------------------------------------------------------------- label settings
def partial_group_labels(sensitive: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Keep a seeded random ``fraction`` of the group labels and set the others to -1.

    Each group present keeps at least one labelled row (the detector needs both groups). Rows already unknown (-1)
    stay unknown.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1] (share of rows that keep their group label), got {fraction}")
    sensitive = np.asarray(sensitive, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = rng.random(len(sensitive)) < fraction
    for group in (1, 0):  # the minority first: its kept row is what the detector cannot do without
        rows = np.flatnonzero(sensitive == group)
        if rows.size and not keep[rows].any():
            keep[rng.choice(rows)] = True
    return np.where(keep, sensitive, -1)


def _with_sensitive(ds, values, column: str = "sensitive") -> Any:
    return ds.remove_columns(column).add_column(column, [int(v) for v in values])


def _group_column(ds, column: str, where: str) -> np.ndarray:
    if column not in ds.column_names:
        raise ValueError(f"hide_group_labels: {where} has no {column!r} column (its columns: {ds.column_names[:10]}). "
                         "Name the group column with column=..., or add it (1 minority, 0 majority).")
    return np.asarray(ds[column], dtype=np.int64)


def hide_group_labels(ds, setting: str, fraction: float = 0.1, seed: int = 0, column: str = "sensitive"):
    """What a label ``setting`` sees: the group labels (``column``) of the training rows and validation rows hidden.

    ``ds`` is a ``DatasetDict`` with a ``train`` split (its ``validation`` split, if any, hidden wholly; ``test`` and
    other splits untouched, they are only used for reporting) or one ``Dataset`` (treated as training rows). full:
    unchanged. partial: ``partial_group_labels(train, fraction, seed)``. unlabeled: every label -1 (unknown).
    """
    from datasets import Dataset, DatasetDict

    if setting not in LABEL_SETTINGS:
        raise ValueError(f"setting must be one of {LABEL_SETTINGS}, got {setting!r}")
    single = isinstance(ds, Dataset)
    if not single and not (hasattr(ds, "keys") and "train" in ds.keys()):
        raise ValueError("hide_group_labels takes a datasets.DatasetDict with a 'train' split, or one "
                         f"datasets.Dataset; got {type(ds).__name__}"
                         + (f" with splits {list(ds.keys())}" if hasattr(ds, "keys") else "") + ".")
    train = ds if single else ds["train"]
    train_s = _group_column(train, column, "the dataset" if single else "the 'train' split")
    if setting == "full":
        return ds
    hidden = (partial_group_labels(train_s, fraction, seed) if setting == "partial"
              else np.full_like(train_s, -1))
    if single:
        return _with_sensitive(ds, hidden, column)
    out = dict(ds)
    out["train"] = _with_sensitive(ds["train"], hidden, column)
    if "validation" in out:
        _group_column(ds["validation"], column, "the 'validation' split")
        out["validation"] = _with_sensitive(ds["validation"], [-1] * len(ds["validation"]), column)
    return DatasetDict(out)
