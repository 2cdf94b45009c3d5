"""Figures for FairNet evaluations, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* :func:`plot_group_accuracies`: per-cell accuracy bars, one bar per model in each cell, from
  :func:`fairnet_peft.metrics.group_accuracies` results (or flat ``acc_y1_s0`` metric dicts).
* :func:`plot_threshold_sweep`: ACC and WGA against the detector threshold τ (top) and the
  detector's TPR and FPR against τ (bottom).

Both save a PNG and return its path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .report import class_name

__all__ = ["plot_group_accuracies", "plot_threshold_sweep"]

_FLAT_CELL = re.compile(r"(?:[a-z]+_)?acc_y(.+)_s(.+)")
_CELL_KEY = re.compile(r"^y=([^,]+),")


def _cell_accuracies(result: Mapping[str, Any]) -> dict[str, tuple[float, int | None]]:
    """``{"y=1,s=0": (accuracy, count or None)}`` from a group_accuracies dict or a flat metrics dict."""
    out: dict[str, tuple[float, int | None]] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            out[key] = (float(value["accuracy"]), value.get("count"))
            continue
        m = _FLAT_CELL.fullmatch(key)
        if m:
            out[f"y={m.group(1)},s={m.group(2)}"] = (float(value), None)
    return out


def _cell_labels(cells: Sequence[str], per_model: Mapping[str, Mapping[str, tuple]],
                 class_names: Sequence[str] | None) -> list[str]:
    """The x tick labels: each cell with its class named ("y=praise,s=1") and the first count found ("n=40")."""
    labels = []
    for c in cells:
        count = next((acc[c][1] for acc in per_model.values() if c in acc and acc[c][1] is not None), None)
        named = _CELL_KEY.sub(lambda m: f"y={class_name(m.group(1), class_names)},", c)
        labels.append(named if count is None else f"{named}\nn={count}")
    return labels


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def plot_group_accuracies(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "Accuracy per (label × group) cell",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Grouped bars of per-cell accuracy, one colour per model; returns the PNG path.

    ``results`` maps a model name to :func:`~fairnet_peft.metrics.group_accuracies` output
    (``{"y=1,s=0": {"accuracy": .., "count": ..}}``) or to a flat metrics dict with
    ``acc_y1_s0`` / ``eval_acc_y1_s0`` keys. Cells are the union over models; a dashed line marks
    each model's worst cell (WGA). Cell counts of the first model that has them go under the labels;
    ``class_names`` (class id → name) names the classes in them.
    """
    if not results:
        raise ValueError("results is empty")
    per_model = {name: _cell_accuracies(r) for name, r in results.items()}
    cells = sorted({c for acc in per_model.values() for c in acc})
    if not cells:
        raise ValueError("no per-cell accuracies found in results")

    fig = Figure(figsize=(min(20.0, max(6.0, 0.6 * len(cells) * len(per_model) + 2)), 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(per_model)
    colours = [f"C{i}" for i in range(len(per_model))]
    for i, (name, acc) in enumerate(per_model.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(cells))]
        ys = [acc.get(c, (math.nan, None))[0] for c in cells]
        bars = ax.bar(xs, [0 if math.isnan(y) else y for y in ys], width, label=name, color=colours[i])
        for bar, y in zip(bars, ys):
            text = "n/a" if math.isnan(y) else f"{y:.3f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        finite = [y for y in ys if not math.isnan(y)]
        if finite:
            ax.axhline(min(finite), color=colours[i], linestyle="--", linewidth=1, alpha=0.8)

    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(_cell_labels(cells, per_model, class_names), fontsize=8)
    ax.set_ylim(-0.03, 1.22)  # a worst cell at 0 keeps its dashed line visible above the axis
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    ax.set_title(title + " (dashed: worst cell)")
    ax.legend(loc="upper center", ncol=min(len(per_model), 4), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_threshold_sweep(
    sweep: Sequence[Mapping[str, float]],
    path: str | Path,
    *,
    chosen_threshold: float | None = None,
    title: str = "Detector threshold sweep",
) -> Path:
    """ACC and WGA vs τ (top panel), detector TPR and FPR vs τ (bottom); returns the PNG path.

    ``sweep`` is a list of dicts with keys ``threshold``, ``accuracy``, ``worst_group_accuracy``,
    ``tpr``, ``fpr`` (any order of thresholds; they are sorted). ``chosen_threshold`` draws a
    vertical marker at the selected τ.
    """
    if not sweep:
        raise ValueError("sweep is empty")
    needed = ("threshold", "accuracy", "worst_group_accuracy", "tpr", "fpr")
    missing = [k for k in needed if any(k not in row for row in sweep)]
    if missing:
        raise ValueError(f"sweep rows lack keys {missing}")
    rows = sorted(sweep, key=lambda r: float(r["threshold"]))
    tau = [float(r["threshold"]) for r in rows]

    fig = Figure(figsize=(6.5, 6.0), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(tau, [float(r["accuracy"]) for r in rows], "o-", color="C0", label="ACC")
    top.plot(tau, [float(r["worst_group_accuracy"]) for r in rows], "s-", color="C3", label="WGA")
    top.set_ylabel("accuracy")
    top.set_title(title)
    bottom.plot(tau, [float(r["tpr"]) for r in rows], "o-", color="C2", label="TPR, P(gate | s=1)")
    bottom.plot(tau, [float(r["fpr"]) for r in rows], "s-", color="C1", label="FPR, P(gate | s=0)")
    bottom.set_ylabel("rate")
    bottom.set_xlabel("detector threshold τ (gate on when risk > τ)")
    bottom.set_ylim(-0.03, 1.03)
    for ax in (top, bottom):
        if chosen_threshold is not None:
            ax.axvline(chosen_threshold, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)
