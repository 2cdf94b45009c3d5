"""Model selection on validation, never on test: the candidates a method offers and the rule that keeps one.

`Selector` keeps the best (epoch[, grid point, τ]) candidate under the validation ACC floor (ERM's val ACC − 0.5
points) and snapshots only that candidate's trainable parameters (`snapshot` / `restore`); `floor_selector` is the
rule of the baselines' "ACC floor" rows (val WGA among the candidates that meet the floor; none does: the most
accurate). `tau_candidates` gives FairNet's τ candidates from the validation risks (label-free); `setting_grid` gives
the FairNet hyper-parameter points one label setting trains.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .config import ACC_TOLERANCE, FAIR_GRID_KEYS, GATE_RATE_GRID, TAU_GRID


def tau_candidates(val_risk: np.ndarray) -> tuple:
    """τ candidates: the fixed grid plus the τ that gate 5 %, 10 %, …, 95 % of the validation rows (label-free).

    A detector trained for one epoch often puts most risks in a narrow band (e.g. 0.45-0.55), where a 0.1-spaced grid
    only offers "almost all rows" or "almost none"; quantiles of the validation risk cover the gate rates between."""
    from fairnet_peft.evaluation.sweep import gate_rate_thresholds

    qs = gate_rate_thresholds(val_risk, GATE_RATE_GRID)
    return tuple(sorted(set(TAU_GRID) | {round(q, 4) for q in qs if 0.0 < q < 1.0}))


def setting_grid(grid: list, setting: str) -> list:
    """The grid points that differ for `setting`: 'pseudo_labeler' only acts without train group labels."""
    out: list = []
    for point in grid:
        bad = [k for k in point if k not in FAIR_GRID_KEYS]
        if bad:
            raise ValueError(f"fair_grid keys {bad} not in {FAIR_GRID_KEYS}")
        if setting != "unlabeled":
            point = {k: v for k, v in point.items() if k != "pseudo_labeler"}
        if point not in out:
            out.append(point)
    return out


def snapshot(model: nn.Module) -> dict:
    """CPU copies of the trainable parameters (what changes during a stage)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


class Selector:
    """Keeps the best candidate by (meets the val-ACC floor, `metric`, val ACC); the floor is `reference_acc` (ERM's
    val ACC) − ACC_TOLERANCE (0.5 points). No reference: no floor. Among candidates that all miss the floor the
    `fallback` decides: "metric" (the best `metric`, then ACC) or "accuracy" (the most accurate, then `metric`).
    Ties keep the earlier candidate."""

    def __init__(self, metric: str, reference_acc: Optional[float] = None, fallback: str = "metric"):
        if fallback not in ("metric", "accuracy"):
            raise ValueError(f"Selector fallback must be 'metric' or 'accuracy', got {fallback!r}")
        self.metric, self.fallback = metric, fallback
        self.floor = None if reference_acc is None else reference_acc - ACC_TOLERANCE
        self.best: Optional[dict] = None
        self.state = None
        self.history: list[dict] = []

    def meets_floor(self, c: dict) -> bool:
        return True if self.floor is None else c["accuracy"] >= self.floor - 1e-9

    def key(self, c: dict) -> tuple:
        ok = self.meets_floor(c)
        if not ok and self.fallback == "accuracy":
            return (ok, c["accuracy"], c[self.metric])
        return (ok, c[self.metric], c["accuracy"])

    def offer(self, cand: dict, state_fn: Callable[[], Any]) -> None:
        self.history.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in cand.items()})
        if self.best is None or self.key(cand) > self.key(self.best):
            self.best, self.state = cand, state_fn()

    @property
    def floor_met(self) -> Optional[bool]:
        return None if self.best is None else self.meets_floor(self.best)


def floor_selector(reference_acc: Optional[float]) -> Selector:
    """The rule of a baseline's "ACC floor" row: the best validation WGA among the candidates whose validation ACC is
    at least `reference_acc` (ERM's) − 0.5 points; when none is, the most accurate candidate (`floor_met` False)."""
    return Selector("worst_group_accuracy", reference_acc, fallback="accuracy")


def pick_under_floor(candidates: list[dict], reference_acc: Optional[float]) -> int:
    """Index of the candidate `floor_selector(reference_acc)` keeps (for candidates scored all at once)."""
    sel = floor_selector(reference_acc)
    for i, cand in enumerate(candidates):
        sel.offer(cand, lambda i=i: i)
    if sel.state is None:
        raise ValueError("pick_under_floor: no candidates")
    return int(sel.state)


def selector_ranks(val_scores, val_pseudo_groups: np.ndarray, test_scores) -> dict:
    """Across the τ candidates of `tau_candidates` (label-free), Spearman's ρ between each label-free
    selector on validation and the true validation WGA, and the test WGA of the τ each selector picks.

    Selectors: `pseudo` = worst accuracy over (class × pseudo-group) cells, the pseudo-groups of the validation rows
    coming from the labeler fitted on training (`FairTrainer.eval_pseudo_groups`); `worst_class` = worst per-class
    accuracy. `val_scores` / `test_scores` are `SweepScores` whose `sensitive` holds the true groups (report only).
    Ties go to the τ closest to 0.5."""
    from fairnet_peft import metrics as M
    from fairnet_peft.evaluation.sweep import sweep_predictions
    from fairnet_peft.training.pseudo_labels import pseudo_group_worst_accuracy, rank_correlation

    y, s = val_scores.labels, val_scores.sensitive
    rows = []
    for tau in tau_candidates(val_scores.risk):
        pred = sweep_predictions(val_scores, tau)
        rows.append(dict(tau=tau, true=M.worst_group_accuracy(y, pred, sensitive_features=s),
                         pseudo=pseudo_group_worst_accuracy(pred, y, val_pseudo_groups),
                         worst_class=min(float((pred[y == k] == k).mean()) for k in np.unique(y))))
    out = {"candidates": len(rows), "oracle_val_tau": max(rows, key=lambda r: r["true"])["tau"]}
    for name in ("pseudo", "worst_class"):
        best = max(rows, key=lambda r: (r[name], -abs(r["tau"] - 0.5)))
        pred = sweep_predictions(test_scores, best["tau"])
        out[name] = dict(rho=rank_correlation([r[name] for r in rows], [r["true"] for r in rows]), tau=best["tau"],
                         test_wga=M.worst_group_accuracy(test_scores.labels, pred,
                                                         sensitive_features=test_scores.sensitive))
    return out
