"""Compact group-robustness baselines for the quality suite (`benchmarks/quality.py`): GroupDRO, JTT, DFR and AFR.

Own, small re-implementations (no code copied from the reference repositories), each stating its label budget:

* :class:`GroupDROTrainer`: online GroupDRO (Sagawa et al., ICLR 2020) as a `transformers.Trainer` subclass. Uses
  **train group labels**: one weight q_g per (label × group) cell, ``q_g ← q_g · exp(η · (loss_g + C / √n_g))``
  after every batch, loss = Σ_g q_g · loss_g.
* :func:`jtt_error_set` + :class:`WeightedTrainer`: Just Train Twice (Liu et al., ICML 2021). Uses **no group
  labels**: ERM for T epochs → the error set E (train rows it misclassifies) → train again with the rows of E
  up-weighted by λ_up. The up-weighting is a per-row loss weight (normalised by the batch's weight sum), the
  expected equivalent of JTT's up-sampling at the cost of one ERM run.
* :class:`DFRHead` / :func:`dfr_fit`: Deep Feature Reweighting (Kirichenko et al., ICLR 2023). Last-layer
  retraining: an L1 logistic regression (scikit-learn) on the frozen ERM features of **group-balanced subsets of the
  validation split**, so DFR needs **validation group labels by definition** (they train the head, not only select
  it). C is tuned on validation halves (fit on one half, scored on the other), then the head is refit on all of
  validation, averaging the weights over several balanced draws, as in the DFR paper's `DFR^Val_Tr` protocol.
* :func:`afr_weights` + :func:`afr_fit`: Automatic Feature Reweighting (Qiu et al., ICML 2023). Uses **no group
  labels**: ERM is trained on part of the train rows; its last layer is retrained on the held-out rest with
  per-row weights ``w_i ∝ exp(-γ · p_i)`` (p_i = ERM's softmax probability of the true class, weights summing to 1)
  plus an ℓ2 pull ``λ · ||θ − θ_ERM||²`` toward ERM's head (weight and bias); a convex problem, solved with L-BFGS.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

__all__ = ["cell_index", "GroupDROTrainer", "WeightedTrainer", "jtt_error_set", "jtt_weights", "DFRHead", "dfr_fit",
           "DFR_C_GRID", "LinearHead", "afr_weights", "afr_fit"]

#: Inverse L1 strengths tried by DFR (the grid of the DFR reference code).
DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def cell_index(labels, sensitive, n_groups: int = 2):
    """(label × group) cell id ``y · n_groups + s`` (torch or numpy)."""
    return labels * n_groups + sensitive


class _ExtraColumnsTrainer(Trainer):
    """A Trainer whose batches carry extra per-row columns that must not reach ``model(**inputs)``."""

    extra_columns: tuple = ()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for extra in self.extra_columns:
            if extra not in self._signature_columns:
                self._signature_columns.append(extra)

    def _pop_extras(self, inputs: dict) -> dict:
        return {k: inputs.pop(k) for k in self.extra_columns if k in inputs}

    def _per_row_loss(self, model, inputs: dict):
        """Forward without the extra columns: (extras, labels, outputs, per-row cross-entropy)."""
        extras = self._pop_extras(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        return extras, labels, outputs, F.cross_entropy(outputs.logits.float(), labels, reduction="none")


class GroupDROTrainer(_ExtraColumnsTrainer):
    """Online GroupDRO over (label × group) cells; needs the train split's group labels (column `sensitive_column`).

    Args (besides `Trainer`'s):
        n_classes, n_groups: the cells are ``y · n_groups + s``.
        eta: step size η of the exponentiated-gradient update of q (paper: 0.01).
        adjustment: generalisation adjustment C (paper's C/√n_g term; 0 = off).
        cell_counts: training rows per cell, needed when ``adjustment > 0``.
    Rows with an unknown group (-1) are not allowed: GroupDRO is a full-label method.
    """

    def __init__(self, *args, n_classes: int = 2, n_groups: int = 2, eta: float = 0.01, adjustment: float = 0.0,
                 cell_counts: Optional[Sequence[int]] = None, sensitive_column: str = "sensitive", **kwargs):
        self.extra_columns = (sensitive_column,)
        self.sensitive_column = sensitive_column
        self.n_groups, self.n_cells, self.eta = n_groups, n_classes * n_groups, float(eta)
        self.q = torch.full((self.n_cells,), 1.0 / self.n_cells)
        if adjustment and cell_counts is None:
            raise ValueError("GroupDROTrainer: adjustment > 0 needs cell_counts")
        counts = torch.as_tensor(cell_counts if cell_counts is not None else [1] * self.n_cells, dtype=torch.float32)
        self.adj = float(adjustment) / counts.clamp(min=1).sqrt()
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras, labels, outputs, per_row = self._per_row_loss(model, inputs)
        sensitive = extras.get(self.sensitive_column)
        if sensitive is None:
            raise ValueError("GroupDROTrainer: the batch has no sensitive column")
        if bool((sensitive < 0).any()):
            raise ValueError("GroupDROTrainer needs every training row's group (no -1)")
        cells = cell_index(labels, sensitive.to(labels.device), self.n_groups)
        counts = torch.bincount(cells, minlength=self.n_cells).float()
        sums = torch.zeros(self.n_cells, device=per_row.device).index_add(0, cells, per_row)
        group_loss = sums / counts.clamp(min=1)
        present = counts > 0
        q = self.q.to(per_row.device)
        if model.training:
            with torch.no_grad():
                step = self.eta * (group_loss.detach() + self.adj.to(per_row.device))
                q = q * torch.exp(torch.where(present, step, torch.zeros_like(step)))
                q = q / q.sum()
            self.q = q.detach().cpu()
        loss = (q * group_loss).sum()
        return (loss, outputs) if return_outputs else loss


class WeightedTrainer(_ExtraColumnsTrainer):
    """Cross-entropy weighted per row by the column `weight_column` (JTT's up-weighted error set)."""

    def __init__(self, *args, weight_column: str = "weight", **kwargs):
        self.extra_columns = (weight_column,)
        self.weight_column = weight_column
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras, _, outputs, per_row = self._per_row_loss(model, inputs)
        weight = extras.get(self.weight_column)
        if weight is None:
            loss = per_row.mean()
        else:
            weight = weight.to(per_row.device, per_row.dtype)
            loss = (weight * per_row).sum() / weight.sum().clamp(min=1e-12)
        return (loss, outputs) if return_outputs else loss


def jtt_error_set(logits, labels) -> np.ndarray:
    """JTT's error set: True for the rows the (early-stopped) ERM model misclassifies."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    return logits.argmax(-1) != labels


def jtt_weights(error_set: np.ndarray, lambda_up: float) -> np.ndarray:
    """Per-row loss weights: λ_up for the error set, 1 elsewhere."""
    return np.where(np.asarray(error_set, bool), float(lambda_up), 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- DFR
def _logistic_regression(C: float, seed: int):
    """L1 logistic regression; scikit-learn >= 1.8 spells L1 as ``l1_ratio=1`` (``penalty`` is deprecated)."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", random_state=seed, max_iter=1000)
        except TypeError:  # pragma: no cover - older scikit-learn
            return LogisticRegression(C=C, penalty="l1", solver="liblinear", random_state=seed, max_iter=1000)


def _balanced_draw(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a group-balanced subset: every non-empty cell subsampled to the smallest cell's size."""
    present = np.unique(cells)
    n = min(int((cells == c).sum()) for c in present)
    return np.concatenate([rng.choice(np.flatnonzero(cells == c), size=n, replace=False) for c in present])


@dataclass
class DFRHead:
    """A linear head on standardised features: ``logits = ((x - mean) / scale) @ coef.T + intercept``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (K, d); binary problems are stored as K = 2 with coef[0] = 0
    intercept: np.ndarray  # (K,)
    C: float = 1.0
    info: dict = field(default_factory=dict)

    def logits(self, features) -> np.ndarray:
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        return x @ self.coef.T + self.intercept

    def predict(self, features) -> np.ndarray:
        return self.logits(features).argmax(-1)


def _fit_head(x, y, cells, C, n_draws, seed, n_classes, mean, scale) -> DFRHead:
    rng = np.random.default_rng(seed)
    coefs, intercepts = [], []
    xs = (x - mean) / scale
    for _ in range(n_draws):
        idx = _balanced_draw(cells, rng)
        if len(np.unique(y[idx])) < 2:
            continue
        clf = _logistic_regression(C, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(xs[idx], y[idx])
        coef = np.zeros((n_classes, x.shape[1]))
        intercept = np.zeros(n_classes)
        if len(clf.classes_) == 2 and n_classes == 2:  # binary: one weight vector for the positive class
            coef[1], intercept[1] = clf.coef_[0], clf.intercept_[0]
        else:
            for row, k in enumerate(clf.classes_):
                coef[int(k)], intercept[int(k)] = clf.coef_[row], clf.intercept_[row]
            intercept[[k for k in range(n_classes) if k not in set(clf.classes_.tolist())]] = -1e9
        coefs.append(coef)
        intercepts.append(intercept)
    if not coefs:
        raise ValueError("DFR: no balanced draw had two classes")
    return DFRHead(mean, scale, np.mean(coefs, 0), np.mean(intercepts, 0), C)


def _worst_cell_accuracy(y, pred, cells) -> float:
    accs = [float((pred[cells == c] == y[cells == c]).mean()) for c in np.unique(cells)]
    return min(accs) if accs else float("nan")


def dfr_fit(features, labels, sensitive, *, n_classes: int = 2, c_grid: Sequence[float] = DFR_C_GRID,
            n_draws_tune: int = 5, n_draws_final: int = 10, seed: int = 0,
            reference_pred: Optional[np.ndarray] = None, acc_tolerance: float = 0.005) -> DFRHead:
    """DFR on validation features (needs the validation split's group labels).

    1. Split validation into two halves, stratified by (label × group) cell (seeded).
    2. For each C: fit on group-balanced draws of half 1, score worst-group accuracy and accuracy on half 2. Keep the
       best worst-group accuracy (ties: the larger C, i.e. the weaker penalty). With `reference_pred` (ERM's
       predictions for the validation rows) only the C whose half-2 accuracy is at least ERM's half-2 accuracy −
       `acc_tolerance` compete (none does: the most accurate C): the rule of the "ACC floor" row.
    3. Refit with that C on group-balanced draws of all of validation; the head averages the draws' weights.
    Features are standardised with the validation mean/std. Returns a :class:`DFRHead` (``info`` holds the scores).
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(sensitive).astype(np.int64)
    if (s < 0).any():
        raise ValueError("DFR needs every validation row's group label")
    cells = cell_index(y, s)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    rng = np.random.default_rng(seed)
    half1 = np.zeros(len(y), bool)
    for c in np.unique(cells):  # stratified halves
        idx = rng.permutation(np.flatnonzero(cells == c))
        half1[idx[: (len(idx) + 1) // 2]] = True
    half2 = ~half1
    scores, accs = {}, {}
    if half2.any() and len(np.unique(y[half1])) == 2:
        for C in c_grid:
            try:
                head = _fit_head(x[half1], y[half1], cells[half1], C, n_draws_tune, seed, n_classes, mean, scale)
            except ValueError:
                continue
            pred = head.predict(x[half2])
            scores[C] = _worst_cell_accuracy(y[half2], pred, cells[half2])
            accs[C] = float((pred == y[half2]).mean())
    info: dict = {}
    if reference_pred is not None and scores:
        floor = float((np.asarray(reference_pred)[half2] == y[half2]).mean()) - acc_tolerance
        meets = [c for c in scores if accs[c] >= floor - 1e-9]
        best_c = (max(meets, key=lambda c: (scores[c], accs[c], c)) if meets
                  else max(scores, key=lambda c: (accs[c], scores[c], c)))
        info.update(acc_floor=round(floor, 4), floor_met=bool(meets))
    else:
        best_c = max(scores, key=lambda c: (scores[c], c)) if scores else 1.0
    head = _fit_head(x, y, cells, best_c, n_draws_final, seed, n_classes, mean, scale)
    head.info = {"C": best_c, "tuning_wga_by_C": {str(c): round(v, 4) for c, v in scores.items()},
                 "tuning_acc_by_C": {str(c): round(v, 4) for c, v in accs.items()}, **info,
                 "n_val": int(len(y)), "balanced_cell_size": int(min((cells == c).sum() for c in np.unique(cells)))}
    return head


# ---------------------------------------------------------------------------------------------------- AFR
@dataclass
class LinearHead:
    """A retrained last layer: ``logits = features @ weight.T + bias`` (the ERM head's shapes)."""

    weight: np.ndarray  # (K, d)
    bias: np.ndarray  # (K,)
    info: dict = field(default_factory=dict)

    def logits(self, features) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias

    def predict(self, features) -> np.ndarray:
        return self.logits(features).argmax(-1)


def afr_weights(logits, labels, gamma: float) -> np.ndarray:
    """AFR's per-row weights: ``exp(-γ · p_i)`` normalised to sum to 1, p_i = softmax(logits_i)[labels_i] (the ERM
    model's probability of the true class). γ = 0 gives uniform weights; a larger γ puts the weight on the rows ERM
    gets least right."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if gamma < 0:
        raise ValueError(f"afr_weights: gamma must be >= 0, got {gamma}")
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p_true = prob[np.arange(len(labels)), labels]
    w = np.exp(-gamma * (p_true - p_true.min()))  # shifted for stability; the normalisation cancels the shift
    return w / w.sum()


def afr_fit(features, labels, weights, weight0, bias0, lam: float, max_iter: int = 200) -> LinearHead:
    """AFR's last-layer retraining: minimise ``Σ_i w_i · CE(x_i θ, y_i) + λ · ||θ − θ_0||²`` over the head
    θ = (weight, bias), starting at θ_0 = ERM's head (`weight0` (K, d), `bias0` (K,)). Convex; full-batch L-BFGS in
    float64 (`max_iter` iterations at most)."""
    x = torch.as_tensor(np.asarray(features, np.float64))
    y = torch.as_tensor(np.asarray(labels, np.int64))
    w = torch.as_tensor(np.asarray(weights, np.float64))
    w0 = torch.as_tensor(np.asarray(weight0, np.float64))
    b0 = torch.as_tensor(np.asarray(bias0, np.float64))
    weight, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective():
        per_row = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
        return (w * per_row).sum() + lam * (((weight - w0) ** 2).sum() + ((bias - b0) ** 2).sum())

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    return LinearHead(weight.detach().numpy(), bias.detach().numpy(), {"lambda": float(lam), "objective": final})

