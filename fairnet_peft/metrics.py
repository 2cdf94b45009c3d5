"""Fairness metrics for FairNet in fairlearn's style: ``f(y_true, y_pred, *, sensitive_features, ...)``.

Every metric is a thin layer over ``counting._confusion_by_group``, which counts one (group × true label ×
prediction) tensor; its docstring holds the conventions: (label × group) cells keyed ``"y=1,s=0"``, unknown group -1
dropped, empty cells NaN + :class:`EmptyGroupWarning`, max − min gaps over groups, macro one-vs-rest for multiclass.
Inputs: numpy, lists or torch tensors; outputs: floats or small dicts. On top, the one evaluation path:
:func:`evaluate_predictions` (logits, labels, groups, gates → flat dict), used by :func:`make_compute_metrics`
(``transformers.Trainer``), the τ sweep and the benchmarks. Markdown tables live in ``report``
(:func:`render_fairness_table` is re-exported here); :func:`load_evaluate_metric` gives the ``evaluate`` module.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from .evaluation.bootstrap import bootstrap_ci
from .evaluation.counting import (
    EmptyGroupWarning,
    as_1d,
    check_inputs,
    confusion_by_group,
    format_value,
    gate_on,
    GroupStats,
    logits_to_labels,
    macro_average,
    nan_warn,
    spread,
    to_numpy,
    unknown_mask,
    cell_key,
    gated_logits,
    group_key,
    predicted_labels,
)
from .evaluation.report import render_fairness_table

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
    "predicted_labels",
    "gated_logits",
    "evaluate_predictions",
    "make_compute_metrics",
    "render_fairness_table",
    "load_evaluate_metric",
    "EVALUATE_METRIC_PATH",
]

#: Local path of the ``evaluate`` metric script shipped with the package.
EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "evaluation" / "metric" / "fairnet_metric.py"


# --------------------------------------------------------------------------------------------
# Accuracy family
# --------------------------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    """Plain accuracy over all rows: ``mean(y_pred == y_true)``. 1 is perfect; NaN when empty."""
    stats = confusion_by_group(y_true, y_pred, None, warn=False)
    n = stats.group_count.sum()
    return float(np.trace(stats.confusion.sum(axis=0)) / n) if n else nan_warn("accuracy of no rows")


def worst_class_accuracy(y_true, y_pred) -> float:
    """``min_y P(ŷ = y | Y = y)`` over classes present in ``y_true``: needs no group labels.

    This is SubpopBench's ``ValWorstAccAttributeNo`` selector (worst per-class recall).
    """
    stats = confusion_by_group(y_true, y_pred, None, warn=False)
    acc = stats.cell_accuracy[0][stats.cell_classes]
    return float(np.nanmin(acc)) if len(acc) else nan_warn("worst-class accuracy of no rows")


def group_accuracies(
    y_true, y_pred, *, sensitive_features, by: Literal["cell", "group"] = "cell"
) -> dict[str, dict[str, float | int]]:
    """Accuracy and row count per cell (``by="cell"``) or per sensitive group (``by="group"``).

    ``acc(y, s) = P(ŷ = y | Y = y, S = s)`` and ``acc(s) = P(ŷ = Y | S = s)``.
    Returns ``{"y=1,s=0": {"accuracy": 0.93, "count": 412}, ...}`` ordered by label then group
    (or ``{"s=0": {...}, ...}``). Empty cells have accuracy NaN and count 0 (with a warning);
    rows whose sensitive value is unknown (-1) are excluded.
    """
    check_inputs("by", by, ("cell", "group"))
    stats = confusion_by_group(y_true, y_pred, sensitive_features)
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


def _worst(stats: GroupStats, by: str) -> float:
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
    check_inputs("by", by, ("cell", "group"))
    return _worst(confusion_by_group(y_true, y_pred, sensitive_features), by)


def cell_proportions(y_true, *, sensitive_features) -> dict[str, float]:
    """Share of rows per cell, ``n(y, s) / n``: pass the training split's to :func:`average_accuracy`."""
    stats = confusion_by_group(y_true, y_true, sensitive_features, warn=False)
    n = stats.group_count.sum()
    return {cell_key(stats.classes[k], stats.groups[g]): float(stats.cell_count[g, k] / n) for g, k in stats.cells()}


def _average(stats: GroupStats, weighting: str, train_proportions: Mapping | None) -> float:
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
    check_inputs("weighting", weighting, ("plain", "train"))
    if weighting == "train" and train_proportions is None:
        raise ValueError('weighting="train" needs train_proportions (see cell_proportions)')
    return _average(confusion_by_group(y_true, y_pred, sensitive_features), weighting, train_proportions)


# --------------------------------------------------------------------------------------------
# Group-fairness differences (binary, or macro one-vs-rest for multiclass)
# --------------------------------------------------------------------------------------------


def _eod(stats: GroupStats, agg: str) -> float:
    per_class = []
    for k in stats.positive_classes():
        tpr, fpr, _ = stats.rates(k)
        d_tpr, d_fpr = spread(tpr), spread(fpr)
        per_class.append(0.5 * (d_tpr + d_fpr) if agg == "mean" else max(d_tpr, d_fpr))
    return macro_average(per_class)


def _eopp(stats: GroupStats) -> float:
    return macro_average([spread(stats.rates(k)[0]) for k in stats.positive_classes()])


def _dp(stats: GroupStats) -> float:
    return macro_average([spread(stats.rates(k)[2]) for k in stats.positive_classes()])


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
    check_inputs("agg", agg, ("mean", "worst_case"))
    return _eod(confusion_by_group(y_true, y_pred, sensitive_features, labels=labels), agg)


def equal_opportunity_difference(
    y_true, y_pred, *, sensitive_features, labels: Sequence | None = None
) -> float:
    """Equal-opportunity difference ``|ΔTPR| = max_s TPR_s − min_s TPR_s``; 0 = equal recall.

    Multiclass: macro one-vs-rest average of ``|ΔTPR|`` over classes.
    """
    return _eopp(confusion_by_group(y_true, y_pred, sensitive_features, labels=labels))


def demographic_parity_difference(
    y_true, y_pred, *, sensitive_features, labels: Sequence | None = None
) -> float:
    """Demographic-parity difference ``max_s P(ŷ=1 | S=s) − min_s P(ŷ=1 | S=s)``; 0 = parity.

    ``y_true`` is used only for the class set. Multiclass: macro one-vs-rest average of the
    selection-rate spread of each class.
    """
    return _dp(confusion_by_group(y_true, y_pred, sensitive_features, labels=labels))


# --------------------------------------------------------------------------------------------
# Gate and detector audit
# --------------------------------------------------------------------------------------------


def gate_rates(gates, *, sensitive_features) -> dict[str, float]:
    """Fraction of rows with the gate on per sensitive group: ``P(gate = 1 | S = s)``.

    ``gates`` are hard gates (``{0, 1}`` or bool; values > 0.5 count as on; for an
    ``(N, n_adapters)`` array column 0 is used). Returns ``{"s=0": 0.04, "s=1": 0.81}``; rows
    with unknown group (-1) are excluded. Overall rate: ``gates.mean()``.
    """
    on = gate_on(gates).astype(np.int64)
    stats = confusion_by_group(on, on, sensitive_features, labels=[0, 1], warn=False)
    return {group_key(s): float(r) for s, r in zip(stats.groups, stats.rates(1)[2])}


def detector_rates(risk_or_gate, *, sensitive_features, threshold: float = 0.5) -> dict[str, float]:
    """Detector quality against the true sensitive labels (1 = minority = positive).

    ``gate = 1[risk > threshold]`` (strict, so ``threshold=1`` never fires; a hard gate in
    ``{0, 1}`` passes through at 0.5). ``tpr = P(gate=1 | S=1)``, ``fpr = P(gate=1 | S=0)``,
    ``tpr_over_fpr = tpr / fpr`` (inf if only fpr is 0, NaN if both are). Unknown rows (-1) are
    excluded; other sensitive values than 0/1 raise ``ValueError``.
    """
    risk = to_numpy(risk_or_gate)
    if risk.ndim == 2:
        risk = risk[:, 0]
    gate = (risk.reshape(-1).astype(float) > threshold).astype(np.int64)
    s = as_1d(sensitive_features, "sensitive_features")
    if len(s) != len(gate):
        raise ValueError(f"sensitive_features has {len(s)} rows, risk_or_gate has {len(gate)}")
    known = ~unknown_mask(s)
    s, gate = s[known], gate[known]
    if not set(np.unique(s).tolist()) <= {0, 1}:
        raise ValueError(f"detector_rates needs sensitive values in {{0, 1, -1}}, got {np.unique(s).tolist()}")
    stats = confusion_by_group(s.astype(np.int64), gate, None, labels=[0, 1], warn=False)
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
# Everything at once: the flat dict of every metric
# --------------------------------------------------------------------------------------------


def _flat(v: Any) -> str:
    """Value as it appears in flat metric keys (``acc_y1_s0``): unsafe characters become ``_``."""
    return re.sub(r"[^0-9A-Za-z.-]", "_", format_value(v))


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
    s = as_1d(sensitive_features, "sensitive_features")
    if unknown_mask(s).all():
        return out
    stats = confusion_by_group(y_true, y_pred, s, labels=labels)
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


# --------------------------------------------------------------------------------------------
# Logits in, metric dict out: the one evaluation path (Trainer hook, τ sweep, benchmarks)
# --------------------------------------------------------------------------------------------


def _column0(x: Any, name: str, n: int) -> np.ndarray | None:
    """``x`` as (N,): column 0 of an ``(N, n_adapters)`` array; None stays None."""
    if x is None:
        return None
    arr = to_numpy(x)
    arr = arr[:, 0] if arr.ndim == 2 else arr.reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} rows, labels has {n}; pass one value per row")
    return arr


def _known_groups(sensitive_features: Any, keep: np.ndarray) -> np.ndarray | None:
    """Sensitive values of the kept rows; None when there are none or every one is unknown."""
    if sensitive_features is None:
        return None
    s = as_1d(sensitive_features, "sensitive_features")
    if len(s) != len(keep):
        raise ValueError(f"sensitive_features has {len(s)} rows, labels has {len(keep)}")
    s = s[keep]
    return None if unknown_mask(s).all() else s


def _gate_metrics(gate: np.ndarray | None, risk: np.ndarray | None, s: np.ndarray | None,
                  threshold: float) -> dict[str, float]:
    """gate_rate (all rows), gate_rate_s{g} and detector_* of the kept rows (see evaluate_predictions)."""
    if gate is None and risk is None:
        return {}
    gated = gate_on(gate if gate is not None else risk > threshold).astype(np.int64)
    out = {"gate_rate": float(gated.mean()) if len(gated) else float("nan")}
    if s is None:
        return out
    out.update({f"gate_rate_s{key[2:]}": rate for key, rate in gate_rates(gated, sensitive_features=s).items()})
    if set(np.unique(s[~unknown_mask(s)]).tolist()) <= {0, 1}:
        # risk > τ when there is a risk; else the hard gate, which passes through at 0.5
        det, tau = (risk, threshold) if risk is not None else (gated, 0.5)
        rates = detector_rates(det, sensitive_features=s, threshold=tau)
        out.update({f"detector_{k}": v for k, v in rates.items()})
    return out


def evaluate_predictions(
    logits,
    labels,
    *,
    sensitive_features=None,
    gates=None,
    risk=None,
    threshold: float = 0.5,
    per_cell: bool = True,
    prefix: str = "",
) -> dict[str, float]:
    """Every metric of a model's outputs on one split, as a flat dict of floats: the one evaluation path.

    :func:`make_compute_metrics`, ``sweep.sweep_metrics`` and the benchmarks call it; the conventions live here:

    * ``logits`` ``(N, K)``, K ≥ 2 → argmax, class set ``range(K)`` (multiclass: macro one-vs-rest);
      ``(N,)`` or ``(N, 1)`` → ``logit > 0``, class set {0, 1}. Labels outside that set: classes from the data.
    * ``labels`` ``(N,)``: rows labelled -100 (ignore index) are dropped from everything; integral floats → ints.
    * ``sensitive_features`` ``(N,)``: -1/None/NaN or an empty-cell text ("", "?", "NA", "unknown", ...) = unknown,
      left out of group metrics. None (or all unknown):
      only the label-only keys (``accuracy``, ``worst_class_accuracy``) and ``gate_rate``.
    * ``gates`` (hard, {0, 1}) and/or ``risk`` ([0, 1]), ``(N,)`` or ``(N, n_adapters)`` (column 0): add
      ``gate_rate`` and per group ``gate_rate_s{g}`` from ``gates`` (else ``risk > threshold``); with sensitive
      values in {0, 1} also ``detector_tpr``/``detector_fpr``/``detector_tpr_over_fpr`` from
      ``risk > threshold`` (else ``gates``). ``threshold`` is the detector's τ.

    Keys: :func:`fairness_summary`'s (``acc_y*_s*`` unless ``per_cell=False``) plus the gate keys, each with
    ``prefix`` in front (e.g. ``"test_"``). Undefined values are NaN, never an error.
    """
    y_pred, classes = logits_to_labels(to_numpy(logits))
    y_true = as_1d(labels, "labels")
    if len(y_true) != len(y_pred):
        raise ValueError(f"labels has {len(y_true)} rows, logits has {len(y_pred)}; pass one label per row")
    if y_true.dtype.kind == "f" and np.all(np.mod(y_true, 1) == 0):
        y_true = y_true.astype(np.int64)
    keep = y_true != -100
    s = _known_groups(sensitive_features, keep)
    gate, risk = _column0(gates, "gates", len(keep)), _column0(risk, "risk", len(keep))
    y_true, y_pred = y_true[keep], y_pred[keep]
    class_set = classes if set(np.unique(y_true).tolist()) <= set(classes) else None
    out = fairness_summary(y_true, y_pred, sensitive_features=s, labels=class_set, per_cell=per_cell)
    out.update(_gate_metrics(None if gate is None else gate[keep], None if risk is None else risk[keep], s,
                             threshold))
    return {f"{prefix}{key}": value for key, value in out.items()}


def _split_eval_prediction(eval_pred: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(logits, risk, gate, labels, sensitive) of an ``EvalPrediction`` or a ``(predictions, label_ids)`` pair.

    ``predictions``: logits or ``(logits, risk, gate)``; ``label_ids``: labels or ``(labels, sensitive)``.
    Missing trailing items and None items are allowed.
    """
    predictions = getattr(eval_pred, "predictions", None)
    label_ids = getattr(eval_pred, "label_ids", None)
    if predictions is None and label_ids is None:
        predictions, label_ids = eval_pred[0], eval_pred[1]
    preds = list(predictions) if isinstance(predictions, (tuple, list)) else [predictions]
    labels = list(label_ids) if isinstance(label_ids, (tuple, list)) else [label_ids]
    preds, labels = preds + [None, None], labels + [None]
    return preds[0], preds[1], preds[2], labels[0], labels[1]


def make_compute_metrics(
    *,
    threshold: float = 0.5,
    use_sensitive: bool = True,
    per_cell: bool = True,
) -> Callable[[Any], dict[str, float]]:
    """Build ``compute_metrics`` for ``transformers.Trainer`` (Trainer adds the ``eval_`` prefix).

    The returned function takes an ``EvalPrediction`` whose ``predictions`` is the logits array or a tuple
    ``(logits, risk, gate)`` (FairTrainer; it marks itself with ``fairnet_inputs = True``, which is how FairTrainer
    knows to pass the tuples), and whose ``label_ids`` is the labels array or ``(labels, sensitive)``, and returns :func:`evaluate_predictions` of them (see there for keys and conventions).
    ``threshold`` is the detector's τ; ``use_sensitive=False`` ignores sensitive labels (label-free model
    selection); ``per_cell=False`` drops the ``acc_y*_s*`` keys.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, risk, gate, labels, sensitive = _split_eval_prediction(eval_pred)
        return evaluate_predictions(logits, labels, sensitive_features=sensitive if use_sensitive else None,
                                    gates=gate, risk=risk, threshold=threshold, per_cell=per_cell)

    compute_metrics.fairnet_inputs = True  # FairTrainer passes it the tuples (its other functions get plain arrays)
    return compute_metrics


def load_evaluate_metric(**kwargs):
    """``evaluate.load`` of the metric script shipped in ``fairnet_peft/evaluation/metric/`` (no Hub access).

    Keyword arguments go to ``evaluate.load`` (e.g. ``cache_dir``, ``keep_in_memory=True``).
    """
    import evaluate

    return evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)
