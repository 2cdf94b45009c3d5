"""The detector stage's pure parts: which labelled rows are held out, the reference probe, early stopping, and the
statistics the prototype pass reports.

Arrays in, arrays out (numpy), except `DetectorEarlyStopping`, a `TrainerCallback` that asks its trainer for the
held-out loss (`trainer.holdout_loss()`) and snapshots/restores the detector's weights. scikit-learn does the
statistics (ROC-AUC, the logistic probe), imported lazily.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from transformers import TrainerCallback

MIN_HOLDOUT_PER_GROUP = 5


def holdout_rows(target: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the (pseudo-)labelled rows held out from the detector stage, stratified by group.

    Each group gives max(fraction × its rows, MIN_HOLDOUT_PER_GROUP) rows, so a small labelled minority (partial
    setting) still has a usable held-out slice. Empty when `fraction` is 0 or a group has fewer than
    3 × MIN_HOLDOUT_PER_GROUP rows (then the detector stage runs its whole budget)."""
    mask = np.zeros(len(target), dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng(seed)
    picks = []
    for group in (0, 1):
        rows = np.flatnonzero(target == group)
        if len(rows) < 3 * MIN_HOLDOUT_PER_GROUP:
            return mask
        n = max(int(round(fraction * len(rows))), MIN_HOLDOUT_PER_GROUP)
        picks.append(rng.choice(rows, size=n, replace=False))
    mask[np.concatenate(picks)] = True
    return mask


def roc_auc(target: np.ndarray, score: np.ndarray, strata: Optional[np.ndarray] = None) -> float:
    """scikit-learn's ROC-AUC, NaN when only one group is present.

    With `strata` (one value per row, the class): the AUC over pairs of rows from the same stratum only, i.e. each
    stratum's AUC weighted by its (minority × majority) pairs. A score that follows the class and not the group then
    earns 0.5 even when the group is correlated with the class; NaN when no stratum holds both groups."""
    from sklearn.metrics import roc_auc_score

    known = target >= 0
    if strata is None:
        if len(np.unique(target[known])) < 2:
            return float("nan")
        return float(roc_auc_score(target[known], score[known]))
    total = weight = 0.0
    for value in np.unique(strata[known]):
        rows = known & (strata == value)
        pairs = float((target[rows] == 1).sum()) * float((target[rows] == 0).sum())
        if pairs > 0:
            total += pairs * roc_auc_score(target[rows], score[rows])
            weight += pairs
    return total / weight if weight else float("nan")


def balanced_probe():
    """The logistic probe both the detector's reference AUC and partial-setting label propagation use."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))


def probe_scores(features: np.ndarray, target: np.ndarray, fit_rows: np.ndarray, test_rows: np.ndarray,
                 seed: int, max_rows: int = 20000) -> Optional[np.ndarray]:
    """The reference for the detector: a class-balanced `LogisticRegression` on the same frozen features (the
    mean-pooled detector input), fitted on `fit_rows`; its minority probability on `test_rows` (None when the fit rows
    hold one group only or there are no test rows)."""
    fit = np.flatnonzero(fit_rows)
    if len(fit) > max_rows:
        fit = np.random.default_rng(seed).choice(fit, size=max_rows, replace=False)
    if len(np.unique(target[fit])) < 2 or not test_rows.any():
        return None
    return balanced_probe().fit(features[fit], target[fit]).predict_proba(features[test_rows])[:, 1]


def cross_validated_probe_scores(features: np.ndarray, target: np.ndarray, seed: int, folds: int = 3,
                                 max_rows: int = 20000) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(rows, scores): `balanced_probe`'s out-of-fold minority probability on the (pseudo-)labelled rows, for when no
    rows could be held out from the detector; None with fewer than `folds` rows in a group."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rows = np.flatnonzero(target >= 0)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    y = target[rows]
    if min(int((y == 0).sum()), int((y == 1).sum())) < folds:
        return None
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return rows, cross_val_predict(balanced_probe(), features[rows], y, cv=cv, method="predict_proba")[:, 1]


class DetectorEarlyStopping(TrainerCallback):
    """Every `every` updates: the held-out class-balanced BCE; keeps the best detector, stops after `patience`
    evaluations without improvement, but not before `min_updates` (a fresh detector can sit on a plateau near 0.5 for
    a few hundred updates before it finds the group). Every process computes the same gathered loss, so all stop
    together. The counters live in `state` (an `EarlyStoppingState` of the run state, saved with every checkpoint);
    the best weights are saved beside it (`save_snapshot` / `restore_snapshot`), so a resumed stage stops where the
    uninterrupted one does."""

    def __init__(self, trainer, state, every: int, patience: int, min_updates: int):
        self.trainer, self.state = trainer, state
        self.every, self.patience, self.min_updates = max(int(every), 1), patience, min_updates
        self.best_state: Optional[dict] = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return control
        loss, stopping = self.trainer.holdout_loss(), self.state
        stopping.evaluations += 1
        if not stopping.has_best or loss < stopping.best_loss - max(1e-3, 0.01 * stopping.best_loss):  # not noise
            stopping.best_loss, stopping.bad, stopping.has_best = loss, 0, True
            net = self.trainer.detector_network()
            self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stopping.bad += 1
            if stopping.bad >= self.patience and state.global_step >= self.min_updates:
                stopping.stopped = True
                control.should_training_stop = True
        return control

    def save_snapshot(self, path: str) -> None:
        if self.best_state is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in self.best_state.items()}, path)

    def restore_snapshot(self, path: str) -> None:
        """The best weights saved with the checkpoint being resumed (none when no evaluation had run)."""
        import os

        if self.state.has_best:
            if not os.path.exists(path):
                raise FileNotFoundError(f"The checkpoint has early-stopping state but no {os.path.basename(path)}.")
            from safetensors.torch import load_file

            self.best_state = load_file(path)

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.trainer.detector_network().load_state_dict(self.best_state)


def propagated_labels(features: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Partial setting: `balanced_probe`, fitted on the labelled `fit_rows`, labels the unlabelled rows (-1), so the
    detector also learns from them. Known labels are kept; unchanged when the fit rows hold one group only."""
    fit_rows = fit_rows & (labels >= 0)
    if len(np.unique(labels[fit_rows])) < 2:
        return labels
    probe = balanced_probe().fit(features[fit_rows], labels[fit_rows])
    unknown = labels < 0
    out = labels.copy()
    out[unknown] = probe.predict(features[unknown]).astype(np.int64)
    return out


def detector_statistics(risk: np.ndarray, feat: np.ndarray, labelled: np.ndarray, gated: np.ndarray,
                        group: np.ndarray, holdout: np.ndarray, seed: int,
                        classes: Optional[np.ndarray] = None) -> dict[str, float]:
    """What the prototype pass reports about the detector, against the labels the setting has (-1 unknown): gate
    rates (TPR/FPR at τ), anchors, held-out ROC-AUC of the risk and of the logistic probe on the same features, across
    the held-out rows and (with `classes`) among rows of the same class (`roc_auc`'s strata). With no held-out rows,
    the probe's AUC cross-validated on the labelled rows instead (`probe_auc_cross_validated[_within_class]`)."""
    known = labelled >= 0
    pos, neg = known & (labelled == 1), known & (labelled == 0)
    tpr = float(gated[pos].mean()) if pos.any() else float("nan")
    fpr = float(gated[neg].mean()) if neg.any() else float("nan")
    probe = probe_scores(feat, labelled, known & ~holdout, holdout, seed)
    target = labelled[holdout]
    stats = {"detector_tpr": tpr, "detector_fpr": fpr, "detector_tpr_over_fpr": tpr / fpr if fpr > 0 else float("inf"),
             "gate_rate_s0": fpr, "gate_rate_s1": tpr, "anchors": int((group == 1).sum()),
             "detector_auc": roc_auc(target, risk[holdout]),
             "probe_auc": float("nan") if probe is None else roc_auc(target, probe),
             "detector_holdout_rows": int(holdout.sum())}
    if classes is not None:
        strata = np.asarray(classes)[holdout]
        stats["detector_auc_within_class"] = roc_auc(target, risk[holdout], strata)
        stats["probe_auc_within_class"] = float("nan") if probe is None else roc_auc(target, probe, strata)
    cross = None if holdout.any() else cross_validated_probe_scores(feat, labelled, seed)
    if cross is not None:  # no held-out rows (too few labelled rows in a group): whether the group is visible at all
        rows, scores = cross
        stats["probe_auc_cross_validated"] = roc_auc(labelled[rows], scores)
        if classes is not None:
            stats["probe_auc_cross_validated_within_class"] = roc_auc(labelled[rows], scores,
                                                                      np.asarray(classes)[rows])
        stats["probe_cross_validated_rows"] = int(len(rows))
    return stats


def warn_if_detector_failed(stats: dict, risk: np.ndarray, labelled: np.ndarray) -> None:
    """One warning when the detector did not find the minority (AUC < 0.6 on held-out rows, else on all known rows)."""
    auc = stats.get("detector_auc", float("nan"))
    if not np.isfinite(auc):
        auc = roc_auc(labelled, risk)
    if np.isfinite(auc) and auc < 0.6:
        warnings.warn(
            f"The bias detector could not learn to find the minority (AUC {auc:.2f}; probe AUC "
            f"{stats.get('probe_auc', float('nan')):.2f}): its risk stays near the class-balanced base "
            "rate 0.5, so the gate is close to random. Check the sensitive column, FairLoraConfig.detector_layer "
            "(--detector-layer in the examples: features the group is visible in) or, without labels, "
            "FairTrainingArguments.pseudo_labeler.",
            UserWarning, stacklevel=4)
