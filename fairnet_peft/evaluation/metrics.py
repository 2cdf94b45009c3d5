"""Fairness metrics for FairNet in fairlearn's style: ``f(y_true, y_pred, *, sensitive_features, ...)``.

Every metric is a thin layer over :func:`_confusion_by_group`, which counts one (group × true label ×
prediction) tensor; its docstring holds all conventions: (label × group) cells keyed ``"y=1,s=0"``,
unknown group -1 dropped, empty cells NaN + :class:`EmptyGroupWarning`, max − min gaps over groups,
macro one-vs-rest for multiclass. Inputs: numpy, lists or torch tensors; outputs: floats or small dicts.
On top: :func:`fairness_summary` (flat dict), :func:`make_compute_metrics` (``transformers.Trainer``),
:func:`render_fairness_table` (Markdown) and :func:`load_evaluate_metric` (the ``evaluate`` module).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

__all__ = [
    "EmptyGroupWarning",
    "cell_key",
    "group_key",
    "accuracy",
    "worst_class_accuracy",
    "group_accuracies",
    "worst_group_accuracy",
    "average_accuracy",
    "cell_proportions",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "demographic_parity_difference",
    "gate_rates",
    "detector_rates",
    "bootstrap_ci",
    "fairness_summary",
    "make_compute_metrics",
    "render_fairness_table",
    "load_evaluate_metric",
    "EVALUATE_METRIC_PATH",
]

#: Local path of the ``evaluate`` metric script shipped with the package.
EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "metric" / "fairnet_metric.py"


class EmptyGroupWarning(UserWarning):
    """A (label × group) cell or a group has no rows, so its metric is NaN and it is skipped."""


# --------------------------------------------------------------------------------------------
# Input conversion and the one helper that holds the conventions
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors go through ``.detach().cpu().numpy()``.

    torch is never imported here: tensors are recognised by their ``detach`` method.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    return arr


def _unknown_mask(s: np.ndarray) -> np.ndarray:
    """True where the sensitive value is unknown: -1, None or NaN."""
    if s.dtype.kind in "iu":
        return s == -1
    if s.dtype.kind == "f":
        return (s == -1) | np.isnan(s)
    if s.dtype.kind == "O":
        return np.array(
            [v is None or (isinstance(v, (int, float, np.number)) and (v == -1 or v != v)) for v in s],
            dtype=bool,
        )
    return np.zeros(s.shape, dtype=bool)


def _fmt(v: Any) -> str:
    """Value as it appears in keys: numpy scalars unwrapped, integral floats printed as ints."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def cell_key(y: Any, s: Any) -> str:
    """Key of the (label ``y``, group ``s``) cell, e.g. ``"y=1,s=0"``."""
    return f"y={_fmt(y)},s={_fmt(s)}"


def group_key(s: Any) -> str:
    """Key of sensitive group ``s``, e.g. ``"s=0"``."""
    return f"s={_fmt(s)}"


def _nan_warn(message: str) -> float:
    warnings.warn(message, EmptyGroupWarning, stacklevel=3)
    return float("nan")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True)
class _GroupStats:
    """Counts behind every metric; built once by :func:`_confusion_by_group`.

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


def _confusion_by_group(
    y_true: Any,
    y_pred: Any,
    sensitive_features: Any = None,
    *,
    labels: Sequence | None = None,
    warn: bool = True,
) -> _GroupStats:
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
      group (or a single group where the rate is defined) gives 0.
    * **Classes** are ``labels`` if given, else the values of ``y_true`` ∪ ``y_pred``. **Binary**:
      ``{0, 1}`` (positive = 1) or any two values (positive = the larger one, as fairlearn).
      **Multiclass** (> 2 classes, e.g. ``labels=range(3)``): the binary metric is computed with each
      class in turn as the positive class (one-vs-rest) and averaged over classes (macro; classes where
      it is undefined are skipped).
    """
    yt = _as_1d(y_true, "y_true")
    yp = _as_1d(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_true and y_pred differ in length ({len(yt)} vs {len(yp)})")
    if sensitive_features is None:
        s = np.zeros(len(yt), dtype=np.int64)
    else:
        s = _as_1d(sensitive_features, "sensitive_features")
        if len(s) != len(yt):
            raise ValueError(f"sensitive_features has {len(s)} rows, y_true has {len(yt)}")
        known = ~_unknown_mask(s)
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
    stats = _GroupStats(classes, groups, confusion, np.isin(classes, yt))

    if warn:
        if len(yt) == 0:
            warnings.warn("no rows with a known sensitive value", EmptyGroupWarning, stacklevel=3)
        empty = [cell_key(classes[k], groups[g]) for g, k in stats.cells() if stats.cell_count[g, k] == 0]
        if empty:
            warnings.warn(
                f"empty (label x group) cells {empty}: accuracy NaN, left out of minima and averages",
                EmptyGroupWarning,
                stacklevel=3,
            )
    return stats


def _spread(values: np.ndarray) -> float:
    """max − min over the groups where ``values`` is defined; 0 for one group, NaN for none."""
    v = values[~np.isnan(values)]
    return float(v.max() - v.min()) if len(v) else float("nan")


def _macro(per_class: list[float]) -> float:
    """Mean over classes where the binary metric is defined (one-vs-rest macro rule)."""
    v = np.array(per_class, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Accuracy family
# --------------------------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    """Plain accuracy over all rows: ``mean(y_pred == y_true)``. 1 is perfect; NaN when empty."""
    stats = _confusion_by_group(y_true, y_pred, None, warn=False)
    n = stats.group_count.sum()
    return float(np.trace(stats.confusion.sum(axis=0)) / n) if n else _nan_warn("accuracy of no rows")


def worst_class_accuracy(y_true, y_pred) -> float:
    """``min_y P(ŷ = y | Y = y)`` over classes present in ``y_true``: needs no group labels.

    This is SubpopBench's ``ValWorstAccAttributeNo`` selector (worst per-class recall).
    """
    stats = _confusion_by_group(y_true, y_pred, None, warn=False)
    acc = stats.cell_accuracy[0][stats.cell_classes]
    return float(np.nanmin(acc)) if len(acc) else _nan_warn("worst-class accuracy of no rows")


def group_accuracies(
    y_true, y_pred, *, sensitive_features, by: Literal["cell", "group"] = "cell"
) -> dict[str, dict[str, float | int]]:
    """Accuracy and row count per cell (``by="cell"``) or per sensitive group (``by="group"``).

    ``acc(y, s) = P(ŷ = y | Y = y, S = s)`` and ``acc(s) = P(ŷ = Y | S = s)``.
    Returns ``{"y=1,s=0": {"accuracy": 0.93, "count": 412}, ...}`` ordered by label then group
    (or ``{"s=0": {...}, ...}``). Empty cells have accuracy NaN and count 0 (with a warning);
    rows whose sensitive value is unknown (-1) are excluded.
    """
    _check("by", by, ("cell", "group"))
    stats = _confusion_by_group(y_true, y_pred, sensitive_features)
    if by == "group":
        return {
            group_key(s): {"accuracy": float(a), "count": int(n)}
            for s, a, n in zip(stats.groups, stats.group_accuracy, stats.group_count)
        }
    acc, count = stats.cell_accuracy, stats.cell_count
    return {
        cell_key(stats.classes[k], stats.groups[g]): {"accuracy": float(acc[g, k]), "count": int(count[g, k])}
        for g, k in stats.cells()
    }


def _worst(stats: _GroupStats, by: str) -> float:
    if by == "group":
        acc = stats.group_accuracy
    else:
        acc = np.array([stats.cell_accuracy[g, k] for g, k in stats.cells()])
    acc = acc[~np.isnan(acc)]
    return float(acc.min()) if len(acc) else float("nan")


def worst_group_accuracy(
    y_true, y_pred, *, sensitive_features, by: Literal["cell", "group"] = "cell"
) -> float:
    """Worst-group accuracy (WGA).

    ``by="cell"`` (default; paper, GroupDRO, JTT): ``min_{y,s} P(ŷ = y | Y = y, S = s)`` over
    (label × group) cells. ``by="group"``: ``min_s P(ŷ = Y | S = s)`` over sensitive groups.
    Empty cells are skipped (with a warning); unknown (-1) rows are excluded. 1 is perfect.
    """
    _check("by", by, ("cell", "group"))
    return _worst(_confusion_by_group(y_true, y_pred, sensitive_features), by)


def cell_proportions(y_true, *, sensitive_features) -> dict[str, float]:
    """Share of rows per cell, ``n(y, s) / n``: pass the training split's to :func:`average_accuracy`."""
    stats = _confusion_by_group(y_true, y_true, sensitive_features, warn=False)
    n = stats.group_count.sum()
    return {cell_key(stats.classes[k], stats.groups[g]): float(stats.cell_count[g, k] / n) for g, k in stats.cells()}


def _average(stats: _GroupStats, weighting: str, train_proportions: Mapping | None) -> float:
    keys, accs, weights = [], [], []
    for g, k in stats.cells():
        y, s = stats.classes[k], stats.groups[g]
        keys.append(cell_key(y, s))
        accs.append(stats.cell_accuracy[g, k])
        if weighting == "train":
            props = train_proportions or {}
            for key in (cell_key(y, s), (_to_py(y), _to_py(s))):
                if key in props:
                    weights.append(float(props[key]))
                    break
            else:
                raise ValueError(f"train_proportions has no entry for cell {cell_key(y, s)}")
        else:
            weights.append(1.0)
    acc, w = np.array(accs, dtype=float), np.array(weights)
    ok = ~np.isnan(acc)
    if not ok.any() or w[ok].sum() <= 0:
        return float("nan")
    return float((w[ok] * acc[ok]).sum() / w[ok].sum())


def _to_py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def average_accuracy(
    y_true,
    y_pred,
    *,
    sensitive_features,
    weighting: Literal["plain", "train"] = "plain",
    train_proportions: Mapping | None = None,
) -> float:
    """Mean of cell accuracies: ``Σ_c w_c · acc_c / Σ_c w_c`` over non-empty (label × group) cells.

    ``weighting="plain"``: ``w_c = 1`` (group-balanced accuracy). ``weighting="train"``: ``w_c`` =
    training share of cell ``c`` (the Waterbirds convention of GroupDRO/JTT/DFR and WILDS
    ``adj_acc_avg``); ``train_proportions`` maps ``"y=1,s=0"`` or ``(1, 0)`` to a share or count
    (see :func:`cell_proportions`). This is *not* plain accuracy over rows: use :func:`accuracy`.
    """
    _check("weighting", weighting, ("plain", "train"))
    if weighting == "train" and train_proportions is None:
        raise ValueError('weighting="train" needs train_proportions (see cell_proportions)')
    return _average(_confusion_by_group(y_true, y_pred, sensitive_features), weighting, train_proportions)


# --------------------------------------------------------------------------------------------
# Group-fairness differences (binary, or macro one-vs-rest for multiclass)
# --------------------------------------------------------------------------------------------


def _eod(stats: _GroupStats, agg: str) -> float:
    per_class = []
    for k in stats.positive_classes():
        tpr, fpr, _ = stats.rates(k)
        d_tpr, d_fpr = _spread(tpr), _spread(fpr)
        per_class.append(0.5 * (d_tpr + d_fpr) if agg == "mean" else max(d_tpr, d_fpr))
    return _macro(per_class)


def _eopp(stats: _GroupStats) -> float:
    return _macro([_spread(stats.rates(k)[0]) for k in stats.positive_classes()])


def _dp(stats: _GroupStats) -> float:
    return _macro([_spread(stats.rates(k)[2]) for k in stats.positive_classes()])


def equalized_odds_difference(
    y_true,
    y_pred,
    *,
    sensitive_features,
    agg: Literal["mean", "worst_case"] = "mean",
    labels: Sequence | None = None,
) -> float:
    """Equalized-odds difference, 0 when every group has the same TPR and FPR.

    With ``ΔTPR = max_s TPR_s − min_s TPR_s`` (``TPR_s = P(ŷ=1 | Y=1, S=s)``) and ΔFPR alike:

    * ``agg="mean"`` (default, the paper's EOD): ``½(|ΔTPR| + |ΔFPR|)``; for two groups this is
      AIF360 ``average_odds_error`` and fairlearn ``equalized_odds_difference(agg="mean")``.
    * ``agg="worst_case"``: ``max(|ΔTPR|, |ΔFPR|)``, fairlearn's default.

    Multiclass: macro one-vs-rest average (module notes). ``labels`` fixes the class set.
    """
    _check("agg", agg, ("mean", "worst_case"))
    return _eod(_confusion_by_group(y_true, y_pred, sensitive_features, labels=labels), agg)


def equal_opportunity_difference(
    y_true, y_pred, *, sensitive_features, labels: Sequence | None = None
) -> float:
    """Equal-opportunity difference ``|ΔTPR| = max_s TPR_s − min_s TPR_s``; 0 = equal recall.

    Multiclass: macro one-vs-rest average of ``|ΔTPR|`` over classes.
    """
    return _eopp(_confusion_by_group(y_true, y_pred, sensitive_features, labels=labels))


def demographic_parity_difference(
    y_true, y_pred, *, sensitive_features, labels: Sequence | None = None
) -> float:
    """Demographic-parity difference ``max_s P(ŷ=1 | S=s) − min_s P(ŷ=1 | S=s)``; 0 = parity.

    ``y_true`` is used only for the class set. Multiclass: macro one-vs-rest average of the
    selection-rate spread of each class.
    """
    return _dp(_confusion_by_group(y_true, y_pred, sensitive_features, labels=labels))


# --------------------------------------------------------------------------------------------
# Gate and detector audit
# --------------------------------------------------------------------------------------------


def _gate_on(gates: Any) -> np.ndarray:
    g = _to_numpy(gates)
    if g.ndim == 2:
        g = g[:, 0]
    return g.astype(float) > 0.5


def gate_rates(gates, *, sensitive_features) -> dict[str, float]:
    """Fraction of rows with the gate on per sensitive group: ``P(gate = 1 | S = s)``.

    ``gates`` are hard gates (``{0, 1}`` or bool; values > 0.5 count as on; for an
    ``(N, n_adapters)`` array column 0 is used). Returns ``{"s=0": 0.04, "s=1": 0.81}``; rows
    with unknown group (-1) are excluded. Overall rate: ``gates.mean()``.
    """
    on = _gate_on(gates).astype(np.int64)
    stats = _confusion_by_group(on, on, sensitive_features, labels=[0, 1], warn=False)
    return {group_key(s): float(r) for s, r in zip(stats.groups, stats.rates(1)[2])}


def detector_rates(risk_or_gate, *, sensitive_features, threshold: float = 0.5) -> dict[str, float]:
    """Detector quality against the true sensitive labels (1 = minority = positive).

    ``gate = 1[risk > threshold]`` (strict, so ``threshold=1`` never fires; a hard gate in
    ``{0, 1}`` passes through at 0.5). ``tpr = P(gate=1 | S=1)``, ``fpr = P(gate=1 | S=0)``,
    ``tpr_over_fpr = tpr / fpr`` (inf if only fpr is 0, NaN if both are). Unknown rows (-1) are
    excluded; other sensitive values than 0/1 raise ``ValueError``.
    """
    risk = _to_numpy(risk_or_gate)
    if risk.ndim == 2:
        risk = risk[:, 0]
    gate = (risk.reshape(-1).astype(float) > threshold).astype(np.int64)
    s = _as_1d(sensitive_features, "sensitive_features")
    if len(s) != len(gate):
        raise ValueError(f"sensitive_features has {len(s)} rows, risk_or_gate has {len(gate)}")
    known = ~_unknown_mask(s)
    s, gate = s[known], gate[known]
    if not set(np.unique(s).tolist()) <= {0, 1}:
        raise ValueError(f"detector_rates needs sensitive values in {{0, 1, -1}}, got {np.unique(s).tolist()}")
    stats = _confusion_by_group(s.astype(np.int64), gate, None, labels=[0, 1], warn=False)
    tpr, fpr, _ = (float(r[0]) for r in stats.rates(1))
    if math.isnan(tpr) or math.isnan(fpr):
        warnings.warn("detector_rates: no rows with s=1 or no rows with s=0", EmptyGroupWarning, stacklevel=2)
    if fpr > 0:
        ratio = tpr / fpr
    elif tpr > 0:
        ratio = float("inf")
    else:
        ratio = float("nan")
    return {"tpr": tpr, "fpr": fpr, "tpr_over_fpr": ratio}


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


def bootstrap_ci(
    metric_fn: Callable[..., float],
    y_true,
    y_pred,
    *,
    sensitive_features=None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    **kw,
) -> dict[str, float]:
    """Percentile bootstrap confidence interval of ``metric_fn`` over rows.

    Rows are drawn with replacement ``n_resamples`` times (``numpy.random.default_rng(seed)``);
    ``low``/``high`` are the ``(1 ∓ confidence)/2`` quantiles of the finite resampled values.
    ``metric_fn(y_true, y_pred, sensitive_features=..., **kw)`` is called (without
    ``sensitive_features`` when it is None, e.g. for :func:`accuracy`). Empty-cell warnings inside
    resamples are silenced. Returns ``{"point", "low", "high", "confidence", "n_resamples"}``, where
    ``n_resamples`` counts the resamples with a finite value.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    yt, yp = _as_1d(y_true, "y_true"), _as_1d(y_pred, "y_pred")
    sf = None if sensitive_features is None else _as_1d(sensitive_features, "sensitive_features")

    def call(idx):
        if sf is None:
            return metric_fn(yt[idx], yp[idx], **kw)
        return metric_fn(yt[idx], yp[idx], sensitive_features=sf[idx], **kw)

    point = float(call(slice(None)))
    rng = np.random.default_rng(seed)
    n = len(yt)
    values = np.empty(n_resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyGroupWarning)
        for i in range(n_resamples):
            values[i] = call(rng.integers(0, n, size=n))
    values = values[np.isfinite(values)]
    alpha = 1.0 - confidence
    if len(values):
        low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    else:
        low = high = float("nan")
    return {"point": point, "low": float(low), "high": float(high), "confidence": confidence,
            "n_resamples": int(len(values))}


# --------------------------------------------------------------------------------------------
# Everything at once: flat dict, Trainer hook, Markdown table, evaluate module
# --------------------------------------------------------------------------------------------


def _flat(v: Any) -> str:
    """Value as it appears in flat metric keys (``acc_y1_s0``): unsafe characters become ``_``."""
    return re.sub(r"[^0-9A-Za-z.-]", "_", _fmt(v))


def fairness_summary(
    y_true,
    y_pred,
    *,
    sensitive_features=None,
    labels: Sequence | None = None,
    per_cell: bool = True,
) -> dict[str, float]:
    """Every metric in one flat dict of floats (the keys :func:`make_compute_metrics` returns).

    Always: ``accuracy``, ``worst_class_accuracy`` (all rows). When some sensitive value is known:
    ``worst_group_accuracy`` (cells), ``worst_sensitive_group_accuracy`` (groups),
    ``average_group_accuracy`` (plain mean over cells), ``equalized_odds_difference`` (mean, the
    paper's), ``equalized_odds_difference_worst_case``, ``equal_opportunity_difference``,
    ``demographic_parity_difference`` and, if ``per_cell``, ``acc_y{y}_s{s}`` for every cell.
    """
    out = {"accuracy": accuracy(y_true, y_pred), "worst_class_accuracy": worst_class_accuracy(y_true, y_pred)}
    if sensitive_features is None:
        return out
    s = _as_1d(sensitive_features, "sensitive_features")
    if _unknown_mask(s).all():
        return out
    stats = _confusion_by_group(y_true, y_pred, s, labels=labels)
    out.update(
        worst_group_accuracy=_worst(stats, "cell"),
        worst_sensitive_group_accuracy=_worst(stats, "group"),
        average_group_accuracy=_average(stats, "plain", None),
        equalized_odds_difference=_eod(stats, "mean"),
        equalized_odds_difference_worst_case=_eod(stats, "worst_case"),
        equal_opportunity_difference=_eopp(stats),
        demographic_parity_difference=_dp(stats),
    )
    if per_cell:
        for g, k in stats.cells():
            key = f"acc_y{_flat(stats.classes[k])}_s{_flat(stats.groups[g])}"
            out[key] = float(stats.cell_accuracy[g, k])
    return out


def _split_predictions(predictions: Any) -> tuple[np.ndarray, Any, Any]:
    """``logits`` or ``(logits, risk, gate)`` (missing trailing items allowed, None allowed)."""
    if isinstance(predictions, (tuple, list)):
        items = list(predictions) + [None, None]
        return _to_numpy(items[0]), items[1], items[2]
    return _to_numpy(predictions), None, None


def _logits_to_labels(logits: np.ndarray) -> tuple[np.ndarray, list[int] | None]:
    """argmax for ``(N, K)``, K ≥ 2; ``logit > 0`` (sigmoid > 0.5) for ``(N,)`` or ``(N, 1)``."""
    if logits.ndim == 2 and logits.shape[1] >= 2:
        return logits.argmax(axis=1), list(range(logits.shape[1]))
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"logits must be (N,), (N, 1) or (N, K); got shape {logits.shape}")
    return (logits > 0).astype(np.int64), [0, 1]


def _column0(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    arr = _to_numpy(x)
    return arr[:, 0] if arr.ndim == 2 else arr.reshape(-1)


def make_compute_metrics(
    *,
    threshold: float = 0.5,
    use_sensitive: bool = True,
    per_cell: bool = True,
) -> Callable[[Any], dict[str, float]]:
    """Build ``compute_metrics`` for ``transformers.Trainer`` (Trainer adds the ``eval_`` prefix).

    The returned function takes an ``EvalPrediction`` whose

    * ``predictions`` is the logits array, or a tuple ``(logits, risk, gate)`` (FairTrainer):
      ``risk`` (N,) in [0, 1], ``gate`` (N,) in {0, 1}; ``(N, n_adapters)`` arrays use column 0.
      Logits ``(N, K)`` with K ≥ 2 → argmax; ``(N,)`` or ``(N, 1)`` → ``logit > 0``.
    * ``label_ids`` is the labels array, or ``(labels, sensitive)`` with sensitive in {-1, 0, 1}.
      Rows labelled -100 (ignore index) are dropped.

    Returned keys: :func:`fairness_summary`'s (``accuracy``, ``worst_class_accuracy``, and with
    known sensitive values ``worst_group_accuracy``, ``equalized_odds_difference``, ...,
    ``acc_y1_s0``), plus, when a gate or risk is given, ``gate_rate`` (all rows) and with known
    sensitive values ``gate_rate_s0``/``gate_rate_s1`` and ``detector_tpr``/``detector_fpr``/
    ``detector_tpr_over_fpr``. The gate rates use ``gate`` (else ``risk > threshold``); the
    detector rates use ``risk > threshold`` (else ``gate``). ``threshold`` is the detector's τ.
    ``use_sensitive=False`` ignores sensitive labels (label-free model selection);
    ``per_cell=False`` drops the ``acc_y*_s*`` keys. Undefined values are NaN, never an error.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions = getattr(eval_pred, "predictions", None)
        label_ids = getattr(eval_pred, "label_ids", None)
        if predictions is None and label_ids is None:
            predictions, label_ids = eval_pred[0], eval_pred[1]
        logits, risk, gate = _split_predictions(predictions)
        if isinstance(label_ids, (tuple, list)):
            labels, sensitive = label_ids[0], (label_ids[1] if len(label_ids) > 1 else None)
        else:
            labels, sensitive = label_ids, None
        y_pred, classes = _logits_to_labels(logits)
        y_true = _as_1d(labels, "labels")
        if y_true.dtype.kind == "f" and np.all(np.mod(y_true, 1) == 0):
            y_true = y_true.astype(np.int64)
        keep = y_true != -100
        s = None if (sensitive is None or not use_sensitive) else _as_1d(sensitive, "sensitive")[keep]
        y_true, y_pred = y_true[keep], y_pred[keep]
        labels_for_metrics = classes if set(np.unique(y_true).tolist()) <= set(classes) else None
        if s is not None and _unknown_mask(s).all():
            s = None
        out = fairness_summary(y_true, y_pred, sensitive_features=s, labels=labels_for_metrics, per_cell=per_cell)

        risk, gate = _column0(risk), _column0(gate)
        gate_on = gate if gate is not None else (None if risk is None else (risk > threshold).astype(np.int64))
        if gate_on is not None:
            gate_on = _gate_on(gate_on)[keep].astype(np.int64)
            out["gate_rate"] = float(gate_on.mean()) if len(gate_on) else float("nan")
            if s is not None:
                for key, rate in gate_rates(gate_on, sensitive_features=s).items():
                    out[f"gate_rate_s{key[2:]}"] = rate
                det = risk[keep] if risk is not None else gate_on
                if set(np.unique(s[~_unknown_mask(s)]).tolist()) <= {0, 1}:
                    rates = detector_rates(det, sensitive_features=s, threshold=threshold)
                    out.update({f"detector_{k}": v for k, v in rates.items()})
        return out

    return compute_metrics


_TABLE_ROWS = [
    ("accuracy", "ACC (accuracy over all rows)"),
    ("worst_group_accuracy", "WGA (min over label × group cells)"),
    ("worst_sensitive_group_accuracy", "WGA by group (min over s)"),
    ("worst_class_accuracy", "worst-class accuracy (min over y)"),
    ("average_group_accuracy", "mean cell accuracy"),
    ("equalized_odds_difference", "EOD, mean: ½(ΔTPR + ΔFPR)"),
    ("equalized_odds_difference_worst_case", "EOD, worst case: max(ΔTPR, ΔFPR)"),
    ("equal_opportunity_difference", "EOpp: ΔTPR"),
    ("demographic_parity_difference", "DP: Δ selection rate"),
    ("gate_rate", "gate rate, all rows"),
]
_TABLE_TAIL = [
    ("detector_tpr", "detector TPR (gate on, s=1)"),
    ("detector_fpr", "detector FPR (gate on, s=0)"),
    ("detector_tpr_over_fpr", "detector TPR / FPR"),
]


def _cell(v: Any) -> str:
    v = float(v)
    return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4f}")


def render_fairness_table(metrics: Mapping[str, Any], *, split: str) -> str:
    """Markdown table of ACC, WGA, EOD, gate rates per group (and the rest that is present).

    ``metrics`` is a :func:`make_compute_metrics` / ``Trainer.evaluate`` dict; keys may carry a
    ``eval_``, ``test_`` or ``{split}_`` prefix. ``split`` names the data split the numbers were
    measured on and is stated above the table. Values are fractions in [0, 1]; NaN prints "n/a".
    """
    if not split:
        raise ValueError("split must name the data split the metrics were measured on")
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        for prefix in (f"{split}_", "eval_", "test_"):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        clean[key] = value
    rows = [(label, clean[k]) for k, label in _TABLE_ROWS if k in clean]
    gate_groups = sorted(k for k in clean if re.fullmatch(r"gate_rate_s.+", k))
    rows += [(f"gate rate, s={k[len('gate_rate_s'):]}", clean[k]) for k in gate_groups]
    rows += [(label, clean[k]) for k, label in _TABLE_TAIL if k in clean]
    for k in sorted(k for k in clean if re.fullmatch(r"acc_y.+_s.+", k)):
        y, s = re.fullmatch(r"acc_y(.+)_s(.+)", k).groups()
        rows.append((f"accuracy of cell y={y}, s={s}", clean[k]))
    if not rows:
        raise ValueError("no known fairness metric keys in metrics")
    lines = [
        f"Fairness metrics on the **{split}** split (fractions in [0, 1]).",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {_cell(value)} |" for label, value in rows]
    return "\n".join(lines) + "\n"


def load_evaluate_metric(**kwargs):
    """``evaluate.load`` of the metric script shipped in ``fairnet_peft/evaluation/metric/`` (no Hub access).

    Keyword arguments go to ``evaluate.load`` (e.g. ``cache_dir``, ``keep_in_memory=True``).
    """
    import evaluate

    return evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)
