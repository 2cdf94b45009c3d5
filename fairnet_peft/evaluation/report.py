"""Reporting: metric dicts rendered as Markdown, for the docs, benchmarks and the adapter's model card.

`render_fairness_table(metrics, split=...)` turns an `evaluate_predictions` / `Trainer.evaluate` dict into a table
(ACC, WGA, EOD, gate rates per group, detector rates, per-cell accuracies); `render_fairness_section` wraps it in the
model card's "Fairness evaluation" section between HTML markers named after the adapter (`model_card` writes it into
README.md). Only the standard library is imported: no numpy, no torch.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Mapping, Optional, Sequence

__all__ = ["SECTION_TITLE", "clean_metrics", "render_fairness_section", "render_fairness_table", "section_markers"]

SECTION_TITLE = "Fairness evaluation"

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
    ("detector_tpr", "detector TPR at τ (share of s=1 rows gated; 0 when the adapter is off)"),
    ("detector_fpr", "detector FPR at τ (share of s=0 rows gated)"),
    ("detector_tpr_over_fpr", "detector TPR / FPR"),
]


def _cell(v: Any) -> str:
    if v is None:  # a value JSON could not carry (NaN written as null)
        return "n/a"
    v = float(v)
    return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4f}")


def _strip_prefixes(metrics: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Keys without their ``{split}_``, ``eval_`` or ``test_`` prefix (the first that matches)."""
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        for prefix in (f"{split}_", "eval_", "test_"):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        clean[key] = value
    return clean


def class_name(y: str, class_names: Optional[Sequence[str]]) -> str:
    """A cell's class as people read it: `class_names[y]` where `y` (a string from a metric key) is an index of
    it, else `y` itself."""
    if class_names is not None and y.isdigit() and int(y) < len(class_names):
        return str(class_names[int(y)])
    return y


def model_class_names(model) -> Optional[list[str]]:
    """The base model's `config.id2label` in class order, or None when it holds transformers' placeholder names
    (LABEL_0, LABEL_1, ...) or no names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    id2label = getattr(getattr(base, "config", None), "id2label", None) or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def _table_rows(clean: Mapping[str, Any], class_names: Optional[Sequence[str]] = None) -> list[tuple[str, Any]]:
    rows = [(label, clean[k]) for k, label in _TABLE_ROWS if k in clean]
    gate_groups = sorted(k for k in clean if re.fullmatch(r"gate_rate_s.+", k))
    rows += [(f"gate rate, s={k[len('gate_rate_s'):]}", clean[k]) for k in gate_groups]
    rows += [(label, clean[k]) for k, label in _TABLE_TAIL if k in clean]
    for k in sorted(k for k in clean if re.fullmatch(r"acc_y.+_s.+", k)):
        y, s = re.fullmatch(r"acc_y(.+)_s(.+)", k).groups()
        rows.append((f"accuracy of cell y={class_name(y, class_names)}, s={s}", clean[k]))
    return rows


def render_fairness_table(metrics: Mapping[str, Any], *, split: str,
                          class_names: Optional[Sequence[str]] = None) -> str:
    """Markdown table of ACC, WGA, EOD, gate rates per group (and the rest that is present).

    ``metrics`` is an ``evaluate_predictions`` / ``make_compute_metrics`` / ``Trainer.evaluate`` dict; keys may
    carry a ``eval_``, ``test_`` or ``{split}_`` prefix. ``split`` names the data split the numbers were measured on
    and is stated above the table. Values are fractions in [0, 1]; NaN prints "n/a". ``class_names`` (class id →
    name) names the classes of the per-cell rows.
    """
    if not split:
        raise ValueError("split must name the data split the metrics were measured on (e.g. split='test')")
    rows = _table_rows(_strip_prefixes(metrics, split), class_names)
    if not rows:
        raise ValueError("metrics has no known fairness metric key (e.g. 'accuracy'); pass an evaluate_predictions "
                         "or Trainer.evaluate dict")
    lines = [
        f"Fairness metrics on the **{split}** split (fractions in [0, 1]).",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {_cell(value)} |" for label, value in rows]
    return "\n".join(lines) + "\n"


def section_markers(adapter_name: str) -> tuple[str, str]:
    """The HTML comments that open and close an adapter's section, so rewriting replaces it."""
    return (f"<!-- fairnet_peft: fairness evaluation of adapter {adapter_name}: start -->",
            f"<!-- fairnet_peft: fairness evaluation of adapter {adapter_name}: end -->")


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric entries as plain floats (numpy/torch scalars included); strings, lists and the like are dropped."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def format_threshold(value: float, digits: int = 4) -> str:
    """τ in `digits` significant digits; a τ below 1 that would print as 1 (which reads as the adapter off) gets six
    digits (0.9999724 → '0.999972'), or its distance from 1 where even those round to 1 ('1 - 4e-08')."""
    value = float(value)
    text = f"{value:.{digits}g}"
    if value < 1.0 and float(text) >= 1.0:
        text = f"{value:.6g}"
        if float(text) >= 1.0:
            return f"1 - {1.0 - value:.2g}"
    return text


def _about(adapter_name: str, threshold: Optional[float]) -> str:
    about = f"FairLoRA adapter `{adapter_name}`"
    if threshold is not None and not (isinstance(threshold, float) and math.isnan(threshold)):
        about += (f", detector gate threshold τ = {format_threshold(threshold)} (the LoRA is on for rows with "
                  "risk > τ)")
    return about + "; metrics computed with `fairnet_peft.metrics`."


# What `render_selection` reads: the part of FairTrainer's selection that `FairLoraConfig.selection_report` keeps
_SELECTION_KEYS = ("selected", "threshold", "strength", "rows", "on", "reason", "accuracy", "accuracy_off",
                   "worst_group_accuracy", "worst_group_accuracy_off", "worst_group_loss", "worst_group_loss_off",
                   "held_back_reason")
_FRONTIER_KEYS = ("threshold", "strength", "accuracy", "worst_group_accuracy", "equalized_odds_difference",
                  "worst_group_loss", "gate_rate", "majority_gate_rate")


def _json_value(value: Any) -> Any:
    """A number as a plain int/float, None where JSON cannot carry it (NaN, ±inf); strings and bools as they are."""
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return value
    if isinstance(value, numbers.Integral):  # row counts stay counts
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def selection_report(selection: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """The JSON part of a FairTrainer selection the model card renders (`FairLoraConfig.selection_report`), or None
    when nothing was selected."""
    if not selection or not selection.get("selected"):
        return None
    report = {k: _json_value(selection[k]) for k in _SELECTION_KEYS if k in selection}
    report["frontier"] = [{k: _json_value(row[k]) for k in _FRONTIER_KEYS if k in row}
                          for row in selection.get("frontier") or []]
    return report


def current_selection_report(report: Optional[Mapping[str, Any]], threshold: Any, strength: Any) -> Optional[dict]:
    """`report` (a saved `selection_report`) if it still describes an adapter with this τ and strength, else None: a
    τ or α set by hand after the selection makes its words wrong."""
    if not isinstance(report, Mapping) or not report.get("selected"):
        return None
    try:
        same = all(math.isclose(float(report[k]), float(v), rel_tol=1e-9, abs_tol=1e-12)
                   for k, v in (("threshold", threshold), ("strength", strength)))
    except (KeyError, TypeError, ValueError):
        return None
    return dict(report) if same else None


def _number(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def _percent(row: Mapping[str, Any], key: str) -> str:
    value = _number(row, key)
    return f"{100 * value:.1f} %" if math.isfinite(value) else "n/a"


def render_selection(selection: Mapping[str, Any]) -> list[str]:
    """Markdown lines saying how τ and the strength α were chosen after training, and the searched frontier."""
    if not selection or not selection.get("selected"):
        return []
    tau, alpha = float(selection["threshold"]), float(selection.get("strength", 1.0))
    where = f"{selection.get('rows', '?')} {selection.get('on', 'held-out rows')}"
    if tau >= 1.0 and not selection.get("frontier"):  # switched off before any candidate was searched (do no harm)
        lines = [f"**The adapter is off** (τ = 1, before any candidate was searched): "
                 f"{selection.get('reason', 'the detector cannot find the group')}."]
    elif tau >= 1.0:
        lines = [f"**The adapter is off** (τ = 1; chosen on {where}): {selection.get('reason', 'no candidate beat it')}."]
    else:
        lines = [f"Correction chosen after training on {where}: τ = {format_threshold(tau)}, strength α = {alpha:g} "
                 f"(accuracy {_percent(selection, 'accuracy')} against {_percent(selection, 'accuracy_off')} with "
                 f"the adapter off; worst-group accuracy {_percent(selection, 'worst_group_accuracy')} against "
                 f"{_percent(selection, 'worst_group_accuracy_off')}{_loss_clause(selection)})."]
        if selection.get("held_back_reason"):
            lines += ["", f"Held back by the selection's limits: {selection['held_back_reason']}."]
    frontier = selection.get("frontier") or []
    if frontier:
        lines += ["", "Searched frontier (held-out rows; the candidates within the limits that no other one within them "
                  "matches or beats on both ACC and WGA):", "",
                  "| τ | α | ACC | WGA | EOD | worst-group loss | gated | majority gated |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in frontier:
            loss = _number(row, "worst_group_loss")
            lines.append(f"| {format_threshold(row['threshold'], 3)} | {row['strength']:g} | "
                         f"{_cell(row.get('accuracy'))} | "
                         f"{_cell(row.get('worst_group_accuracy'))} | {_cell(row.get('equalized_odds_difference'))} | "
                         f"{f'{loss:.3f}' if math.isfinite(loss) else 'n/a'} | "
                         f"{_cell(row.get('gate_rate'))} | {_cell(row.get('majority_gate_rate'))} |")
    return lines


def _loss_clause(selection: Mapping[str, Any]) -> str:
    """'; worst-group loss a against b' when the selection reported it (the tie-break, `selection_tie_break`)."""
    loss, off = _number(selection, "worst_group_loss"), _number(selection, "worst_group_loss_off")
    if not (math.isfinite(loss) and math.isfinite(off)):
        return ""
    return f"; worst-group loss {loss:.3f} against {off:.3f}"


def render_fairness_section(metrics: Mapping[str, Any], *, split: str, adapter_name: str = "default",
                            threshold: Optional[float] = None, selection: Optional[Mapping[str, Any]] = None,
                            class_names: Optional[Sequence[str]] = None) -> str:
    """The model card's Markdown section (with its markers): a heading, the adapter and τ, the table and, after a
    FairTrainer run, how the correction was chosen (`selection`)."""
    clean = clean_metrics(metrics)
    table = render_fairness_table(clean, split=split, class_names=class_names)
    start, end = section_markers(adapter_name)
    heading = f"## {SECTION_TITLE}" + ("" if adapter_name == "default" else f" (adapter `{adapter_name}`)")
    lines = [start, heading, "", _about(adapter_name, threshold), "", table.rstrip("\n")]
    if "train_detector_auc" in clean:
        line = (f"Bias detector on held-out training rows: ROC-AUC {clean['train_detector_auc']:.3f}, against "
                f"{clean.get('train_probe_auc', float('nan')):.3f} for a logistic-regression probe on the same frozen "
                "features (the mean-pooled detector input)")
        if "train_detector_auc_within_class" in clean:
            line += (f"; among rows of the same class {clean['train_detector_auc_within_class']:.3f} against "
                     f"{clean.get('train_probe_auc_within_class', float('nan')):.3f} (the AUC `min_detector_auc` "
                     "judges)")
        lines += ["", line + "."]
    extra = render_selection(selection or {})
    lines += [""] + extra if extra else []
    return "\n".join(lines + [end]) + "\n"
