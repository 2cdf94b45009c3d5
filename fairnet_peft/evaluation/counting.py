"""Inputs and the counting core behind every metric: one (group × true label × prediction) tensor per call.

Input conversion comes first: array-likes (numpy, lists, torch tensors, without importing torch), hard gates,
and logits → predicted labels (`predicted_labels`, `gated_logits`: the model's logits under per-row gates).
`confusion_by_group` then drops rows of unknown group and counts the tensor; `GroupStats` derives per-cell and
per-group accuracies and one-vs-rest rates from it. Cells and groups are keyed ``"y=1,s=0"`` and ``"s=0"``.
`metrics` builds every public metric on these, so all of them share one set of conventions. Only numpy is imported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["EmptyGroupWarning", "cell_key", "gated_logits", "group_key", "predicted_labels"]


class EmptyGroupWarning(UserWarning):
    """A (label × group) cell or a group has no rows, so its metric is NaN and it is skipped."""


# --------------------------------------------------------------------------------------------
# Input conversion, keys, and the one helper that holds the conventions
# --------------------------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors go through ``.detach().cpu().numpy()``.

    torch is never imported here: tensors are recognised by their ``detach`` method.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_1d(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    return arr


#: Cell texts that mean "no value" (compared case-insensitively, after stripping spaces): pandas' usual NA spellings
#: plus '?' (UCI files) and 'unknown'. The data loaders read them as a missing group, and the metrics as unknown.
MISSING_TEXTS = frozenset({"", "?", "nan", "none", "null", "na", "n/a", "<na>", "unknown"})


def is_missing(value: Any) -> bool:
    """True for None, NaN and the usual spellings of an empty cell ('', '?', 'nan', 'None', 'NA', 'unknown', ...)."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXTS


def unknown_mask(s: np.ndarray) -> np.ndarray:
    """True where the sensitive value is unknown: -1, None, NaN, or a text that spells an empty cell ('', '?',
    'NA', 'unknown', ...: `MISSING_TEXTS`), as the data loaders read a missing group."""
    if s.dtype.kind in "iu":
        return s == -1
    if s.dtype.kind == "f":
        return (s == -1) | np.isnan(s)
    if s.dtype.kind in "OUS":
        return np.array([is_missing(v.decode(errors="replace") if isinstance(v, bytes) else v)
                         or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and v == -1)
                         for v in s.tolist()], dtype=bool).reshape(s.shape)
    return np.zeros(s.shape, dtype=bool)


def gate_on(gates: Any) -> np.ndarray:
    """(N,) bool of hard gates: values > 0.5 are on; an ``(N, n_adapters)`` array uses column 0."""
    g = to_numpy(gates)
    if g.ndim == 2:
        g = g[:, 0]
    return g.astype(float) > 0.5


def logits_to_labels(logits: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Predictions and the class set the logits' width implies: ``range(K)``, or ``[0, 1]`` for one logit."""
    if logits.ndim == 2 and logits.shape[1] >= 2:
        return logits.argmax(axis=1), list(range(logits.shape[1]))
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"logits must be (N,), (N, 1) or (N, K); got shape {logits.shape}")
    return (logits > 0).astype(np.int64), [0, 1]


def predicted_labels(logits) -> np.ndarray:
    """Class ids: argmax for ``(N, K)`` logits, K ≥ 2; ``logit > 0`` (sigmoid > 0.5) for ``(N,)`` or ``(N, 1)``."""
    return logits_to_labels(to_numpy(logits))[0]


def gated_logits(logits_off, logits_on, gates) -> np.ndarray:
    """The model's logits under per-row gates: ``logits_on`` where the gate is on, ``logits_off`` elsewhere.

    A row's output depends only on its own gate, so a pass with the gate forced off and one forced on give the
    logits at any gate assignment, e.g. ``gates = risk > τ`` for every τ of a sweep. ``gates`` are hard gates
    (bool or {0, 1}; values > 0.5 are on; an ``(N, n_adapters)`` array uses column 0).
    """
    off, on = to_numpy(logits_off), to_numpy(logits_on)
    if off.shape != on.shape:
        raise ValueError(f"logits_off {off.shape} and logits_on {on.shape} must have the same shape")
    gate = gate_on(gates)
    if len(gate) != len(off):
        raise ValueError(f"gates has {len(gate)} rows, the logits have {len(off)}; pass one gate per row")
    return np.where(gate.reshape((-1,) + (1,) * (off.ndim - 1)), on, off)


def format_value(v: Any) -> str:
    """Value as it appears in keys: numpy scalars unwrapped, integral floats printed as ints."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def cell_key(y: Any, s: Any) -> str:
    """Key of the (label ``y``, group ``s``) cell, e.g. ``"y=1,s=0"``."""
    return f"y={format_value(y)},s={format_value(s)}"


def group_key(s: Any) -> str:
    """Key of sensitive group ``s``, e.g. ``"s=0"``."""
    return f"s={format_value(s)}"


def nan_warn(message: str) -> float:
    warnings.warn(message, EmptyGroupWarning, stacklevel=3)
    return float("nan")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True)
class GroupStats:
    """Counts behind every metric; built once by :func:`confusion_by_group`.

    ``confusion[g, i, j]`` = number of rows of group ``groups[g]`` with true label ``classes[i]``
    and prediction ``classes[j]``. ``cell_classes`` marks the classes present in ``y_true``.
    """

    classes: np.ndarray
    groups: np.ndarray
    confusion: np.ndarray
    cell_classes: np.ndarray

    # -- per cell / per group -------------------------------------------------------------
    @property
    def cell_count(self) -> np.ndarray:  # (G, K)
        return self.confusion.sum(axis=2)

    @property
    def cell_accuracy(self) -> np.ndarray:  # (G, K), NaN where empty
        return _safe_div(np.diagonal(self.confusion, axis1=1, axis2=2), self.cell_count)

    @property
    def group_count(self) -> np.ndarray:  # (G,)
        return self.confusion.sum(axis=(1, 2))

    @property
    def group_accuracy(self) -> np.ndarray:  # (G,)
        return _safe_div(np.trace(self.confusion, axis1=1, axis2=2), self.group_count)

    def cells(self) -> list[tuple[int, int]]:
        """(group index, class index) of the reported cells, ordered by label then group."""
        ks = np.flatnonzero(self.cell_classes)
        return [(g, k) for k in ks for g in range(len(self.groups))]

    # -- one-vs-rest rates, shape (G,) ------------------------------------------------------
    def rates(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TPR, FPR and selection rate per group with ``classes[k]`` as the positive class."""
        c = self.confusion
        tp = c[:, k, k]
        pred_pos = c[:, :, k].sum(axis=1)
        pos = c[:, k, :].sum(axis=1)
        n = self.group_count
        return _safe_div(tp, pos), _safe_div(pred_pos - tp, n - pos), _safe_div(pred_pos, n)

    def positive_classes(self) -> list[int]:
        """Binary: ``[index of the positive class]``; multiclass: every class (one-vs-rest)."""
        k = len(self.classes)
        return [k - 1] if k <= 2 else list(range(k))


def confusion_by_group(
    y_true: Any,
    y_pred: Any,
    sensitive_features: Any = None,
    *,
    labels: Sequence | None = None,
    warn: bool = True,
) -> GroupStats:
    """Drop unknown-group rows, count the (group, label, prediction) tensor, warn on empty cells.

    ``sensitive_features=None`` means one group (all rows), used for label-only metrics.

    Conventions, shared by every metric in this module:

    * **Cells** are (true label × sensitive group) pairs, keyed ``"y=1,s=0"`` (flat metric keys use
      ``acc_y1_s0``); **groups** are sensitive values alone, keyed ``"s=0"``. Labels of a cell are the
      classes present in ``y_true``; groups are the sensitive values present.
    * **Unknown sensitive values** (``-1``, ``None`` or NaN) are dropped before any group metric.
    * **Empty cell** (a label and a group both occur, but never together): accuracy NaN, an
      :class:`EmptyGroupWarning`, and the cell is left out of minima and averages. A rate whose
      denominator is empty in some group (e.g. TPR of a group without positives) is NaN and left out
      of the max − min spread. fairlearn instead scores such rates 0 (sklearn's ``nan_to_num``).
      No known row at all: every group metric is NaN, with a warning.
    * **Differences** are ``max_g − min_g`` over groups ("between_groups", as fairlearn); a single
      group (or a single group where the rate is defined) gives 0, and a single known group warns.
    * **Classes** are ``labels`` if given, else the values of ``y_true`` ∪ ``y_pred``. **Binary**:
      ``{0, 1}`` (positive = 1) or any two values (positive = the larger one, as fairlearn).
      **Multiclass** (> 2 classes, e.g. ``labels=range(3)``): the binary metric is computed with each
      class in turn as the positive class (one-vs-rest) and averaged over classes (macro; classes where
      it is undefined are skipped).
    """
    yt = as_1d(y_true, "y_true")
    yp = as_1d(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_true and y_pred differ in length ({len(yt)} vs {len(yp)})")
    if sensitive_features is None:
        s = np.zeros(len(yt), dtype=np.int64)
    else:
        s = as_1d(sensitive_features, "sensitive_features")
        if len(s) != len(yt):
            raise ValueError(f"sensitive_features has {len(s)} rows, y_true has {len(yt)}")
        known = ~unknown_mask(s)
        yt, yp, s = yt[known], yp[known], s[known]
        if s.dtype.kind == "O" and len(s):
            s = np.array(s.tolist())

    if labels is not None:
        classes = np.asarray(list(labels))
        missing = np.setdiff1d(np.union1d(yt, yp), classes)
        if len(missing):
            raise ValueError(f"labels {classes.tolist()} do not contain {missing.tolist()}")
    else:
        classes = np.unique(np.concatenate([yt, yp]))
        if set(classes.tolist()) <= {0, 1}:
            classes = np.array([0, 1], dtype=classes.dtype if len(classes) else np.int64)
    groups = np.unique(s)
    K, G = len(classes), len(groups)
    flat = np.searchsorted(groups, s) * K * K + np.searchsorted(classes, yt) * K + np.searchsorted(classes, yp)
    confusion = np.bincount(flat, minlength=G * K * K).reshape(G, K, K)
    stats = GroupStats(classes, groups, confusion, np.isin(classes, yt))

    if warn:
        if len(yt) == 0:
            warnings.warn("no rows with a known sensitive value", EmptyGroupWarning, stacklevel=3)
        elif sensitive_features is not None and G == 1:
            warnings.warn(
                f"one sensitive group among the known rows ({group_key(groups[0])}): every difference between groups "
                "(EOD, equal opportunity, demographic parity) is 0 and worst-group accuracy is that group's worst "
                "cell; pass rows of both groups to compare them",
                EmptyGroupWarning,
                stacklevel=3,
            )
        empty = [cell_key(classes[k], groups[g]) for g, k in stats.cells() if stats.cell_count[g, k] == 0]
        if empty:
            warnings.warn(
                f"empty (label x group) cells {empty}: accuracy NaN, left out of minima and averages",
                EmptyGroupWarning,
                stacklevel=3,
            )
    return stats


def spread(values: np.ndarray) -> float:
    """max − min over the groups where ``values`` is defined; 0 for one group, NaN for none."""
    v = values[~np.isnan(values)]
    return float(v.max() - v.min()) if len(v) else float("nan")


def macro_average(per_class: list[float]) -> float:
    """Mean over classes where the binary metric is defined (one-vs-rest macro rule)."""
    v = np.array(per_class, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def check_inputs(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
