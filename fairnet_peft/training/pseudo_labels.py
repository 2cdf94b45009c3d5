"""Pseudo-labelers for the unlabeled setting: mark the presumed minority ŝ ∈ {0, 1} of every training row.

Arrays in, arrays out. `pseudo_label(method, features=, labels=, logits=)` fits one labeler on the training rows'
frozen features (and the frozen ERM model's logits) and returns `PseudoLabels`: the 0/1 marks, the method used,
diagnostics, and the fitted labeler whose `.predict(features, labels, logits)` marks new rows (validation) the same
way. Labelers: `error_set` (ERM's mistakes, JTT), `lof` (LocalOutlierFactor within each class), `gmm` / `kmeans`
(GEORGE-style clustering within each class, the smaller cluster is the minority) and `auto` (the labeler whose
pseudo-groups best explain ERM's errors). `pseudo_group_worst_accuracy` is the label-free selector for τ and epoch;
`rank_correlation` measures how well a selector tracks the true WGA. scikit-learn does the math.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

METHODS = ("error_set", "lof", "gmm", "kmeans", "auto")
FEATURE_LABELERS = ("lof", "gmm", "kmeans")
MAX_MINORITY_SHARE = 0.5  # a pseudo-labeler marking more than this share of rows is not marking a minority

_LOF_KNOBS = ("n_neighbors", "contamination", "pca_dims")
_CLUSTER_KNOBS = ("n_clusters", "pca_dims", "max_cluster_share", "covariance_type")
_AUTO_KNOBS = ("candidates", "min_score", "tie")


@dataclass
class PseudoLabels:
    """Result of `pseudo_label`: `labels` (np.int64, 1 = presumed minority), the `method` that made them (the chosen
    one under `auto`), `details` (diagnostics, e.g. per-labeler scores) and the fitted `labeler` for new rows."""

    labels: np.ndarray
    method: str
    details: dict = field(default_factory=dict)
    labeler: Optional[object] = None


# ---------------------------------------------------------------------------------------------------- input checks
def _as_features(features, n: Optional[int] = None) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (rows × dims); got shape {x.shape}. Reshape it.")
    if n is not None and len(x) != n:
        raise ValueError(f"features has {len(x)} rows but labels has {n}; pass one feature row per label.")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"features has NaN/inf in rows {np.flatnonzero(bad)[:10].tolist()}; fix or drop those rows.")
    return x


def _as_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class ids; got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError("labels must be integer class ids (0, 1, ...); got non-integer values.")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise ValueError("labels must be class ids >= 0; got negative values.")
    return y


def _as_logits(logits, n: int, y: np.ndarray) -> np.ndarray:
    if logits is None:
        raise ValueError("logits is required for this labeler: pass the frozen ERM model's logits (rows × classes).")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) != n:
        raise ValueError(f"logits must have shape (rows={n}, classes); got {z.shape}. Pass one logit row per label.")
    if not np.isfinite(z).all():
        raise ValueError("logits has NaN/inf values; check the ERM model's outputs.")
    if y.max() >= z.shape[1]:
        raise ValueError(f"labels has class {int(y.max())} but logits has only {z.shape[1]} columns.")
    return z


def _check_share(marks: np.ndarray, method: str, knob: str) -> None:
    """A labeler that marks no rows or more than half of them did not find a minority: stop and name the knob."""
    share = float(marks.mean())
    if share == 0.0:
        raise ValueError(f"pseudo_labeler={method!r} marked no rows as minority; change {knob} "
                         "(or use another pseudo_labeler).")
    if share > MAX_MINORITY_SHARE:
        raise ValueError(f"pseudo_labeler={method!r} marked {share:.0%} of rows (more than half) as minority; "
                         f"change {knob} (or use another pseudo_labeler).")


def _without(minority: dict) -> list:
    """The classes a per-class labeler gave no minority (too few rows, or no clear smaller cluster)."""
    return [k for k, m in minority.items() if m is None]


def _check_too_small(tiny: list, y: np.ndarray, method: str, needs: str) -> None:
    """Every class too small for a per-class labeler (`tiny`): nothing can be marked; say so and what to do."""
    classes = np.unique(y).tolist()
    if classes and len(tiny) == len(classes):
        counts = {k: int((y == k).sum()) for k in classes}
        raise ValueError(f"pseudo_labeler={method!r}: every class is too small to split (rows per class {counts}; "
                         f"each needs {needs}). Use pseudo_labeler='error_set', give some group labels (the partial "
                         "setting), or add rows.")


def _projector(x: np.ndarray, pca_dims: Optional[int], seed: int):
    """StandardScaler, then PCA to at most `pca_dims` dims when there are more; fitted on one class's rows."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if pca_dims is not None and x.shape[1] > pca_dims:
        steps.append(PCA(n_components=min(pca_dims, len(x)), random_state=seed))
    return make_pipeline(*steps).fit(x)


def _check_pca_dims(pca_dims) -> None:
    if pca_dims is not None and (not isinstance(pca_dims, (int, np.integer)) or pca_dims < 1):
        raise ValueError(f"pca_dims={pca_dims!r}: must be a positive int, or None to keep every dimension.")


# ---------------------------------------------------------------------------------------------------- labelers
class ErrorSetLabeler:
    """JTT-style: a row is minority when the frozen ERM model misclassifies it. Nothing to fit."""

    method = "error_set"

    def predict(self, features=None, labels=None, logits=None) -> np.ndarray:
        y = _as_labels(labels)
        return (_as_logits(logits, len(y), y).argmax(-1) != y).astype(np.int64)


class PerClassLabeler:
    """One scaler/PCA + estimator per class; `minority[k]` says which estimator output marks class k's minority
    (-1 for LOF outliers, a cluster id for GMM/KMeans, None when class k has no minority). Classes not seen in fit
    get 0."""

    def __init__(self, method: str, models: dict, minority: dict):
        self.method, self.models, self.minority = method, models, minority

    def predict(self, features, labels, logits=None) -> np.ndarray:
        y = _as_labels(labels)
        x = _as_features(features, len(y))
        out = np.zeros(len(y), dtype=np.int64)
        for k, (proj, est) in self.models.items():
            rows = y == k
            if rows.any() and self.minority[k] is not None:
                out[rows] = est.predict(proj.transform(x[rows])) == self.minority[k]
        return out


def error_set(logits, labels) -> PseudoLabels:
    """Rows the frozen ERM model misclassifies (Just Train Twice). Raises if ERM makes no errors or errs on most
    rows, since then the error set is not a minority."""
    labeler = ErrorSetLabeler()
    marks = labeler.predict(labels=labels, logits=logits)
    _check_share(marks, "error_set", "the ERM model (train it so that it errs on some but not most rows)")
    return PseudoLabels(marks, "error_set", {"share": float(marks.mean())}, labeler)


def lof_per_class(features, labels, *, n_neighbors="auto", contamination=0.1, pca_dims: Optional[int] = 32,
                  seed: int = 0) -> PseudoLabels:
    """LocalOutlierFactor fitted within each class (after StandardScaler, PCA to ≤ `pca_dims`); its outliers are
    the minority, i.e. rows in sparse regions *relative to their own class*. `contamination` (share marked per class,
    in (0, 0.5], or "auto") and `n_neighbors` (< rows of every class) are LOF's. Fitted with novelty=True so that
    `.labeler.predict` marks new rows; training rows are marked as `fit_predict` would.

    `n_neighbors="auto"` (default) uses, per class, 3 × contamination × class rows (0.1 for contamination="auto"),
    below the class size but at least 20. A minority of m rows is a *dense cluster* to LOF when n_neighbors < m, and
    LOF marks only its edges; the neighbourhood must reach past the group. On the synthetic text task's frozen
    features, n_neighbors=20 found 20-34 % of the minority, 3 × c × n_k found 49-97 %."""
    from sklearn.neighbors import LocalOutlierFactor

    y = _as_labels(labels)
    x = _as_features(features, len(y))
    if n_neighbors != "auto" and (not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1):
        raise ValueError(f"n_neighbors={n_neighbors!r}: must be a positive int or 'auto' (LOF neighbourhood size).")
    if not (contamination == "auto" or (isinstance(contamination, (int, float)) and 0 < contamination <= 0.5)):
        raise ValueError(f"contamination={contamination!r}: must be in (0, 0.5] or 'auto' (share of rows marked).")
    _check_pca_dims(pca_dims)
    models, minority, marks, shares, used, tiny = {}, {}, np.zeros(len(y), dtype=np.int64), {}, {}, []
    for k in np.unique(y).tolist():
        rows = y == k
        n_k, k_nn = int(rows.sum()), n_neighbors
        if n_neighbors == "auto":
            share = 0.1 if contamination == "auto" else contamination
            k_nn = max(20, min(int(np.ceil(3 * share * n_k)), n_k - 1))
            if n_k <= k_nn:  # too few rows to tell outliers: the class gets no minority (as a class in no cluster)
                minority[k], shares[k] = None, 0.0
                tiny.append(k)
                continue
        if n_k <= k_nn or k_nn < 1:
            raise ValueError(f"class {k} has {n_k} rows, not more than n_neighbors={k_nn}; "
                             "lower n_neighbors or use more rows.")
        proj = _projector(x[rows], pca_dims, seed)
        lof = LocalOutlierFactor(n_neighbors=int(k_nn), contamination=contamination, novelty=True)
        lof.fit(proj.transform(x[rows]))
        marks[rows] = lof.negative_outlier_factor_ < lof.offset_
        models[k], minority[k], shares[k], used[k] = (proj, lof), -1, float(marks[rows].mean()), int(k_nn)
    _check_too_small(tiny, y, "lof", "more than 20 rows (n_neighbors='auto')")
    _check_share(marks, "lof", f"contamination (now {contamination!r})")
    return PseudoLabels(marks, "lof", {"share": float(marks.mean()), "class_share": shares, "n_neighbors": used,
                                       "classes_without_minority": _without(minority)},
                        PerClassLabeler("lof", models, minority))


def cluster_per_class(features, labels, *, method: str = "gmm", n_clusters: int = 2, pca_dims: Optional[int] = 32,
                      max_cluster_share: float = 0.4, covariance_type: str = "full", seed: int = 0) -> PseudoLabels:
    """GEORGE-style: within each class, StandardScaler, PCA to ≤ `pca_dims`, then GaussianMixture (`method="gmm"`)
    or KMeans (`"kmeans"`) with `n_clusters`; the smallest cluster of each class is its minority.

    Robust smaller-cluster rule: a class whose smallest cluster holds more than `max_cluster_share` of its rows
    (near-equal clusters: no clear minority there) gets no minority rather than a coin-flip half. Ties go to the
    lower cluster id, so results are deterministic for a given `seed`."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    if method not in ("gmm", "kmeans"):
        raise ValueError(f"method={method!r}: use 'gmm' or 'kmeans'.")
    if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 2:
        raise ValueError(f"n_clusters={n_clusters!r}: must be an int >= 2 (one cluster cannot mark a minority).")
    if not 0 < max_cluster_share <= 0.5:
        raise ValueError(f"max_cluster_share={max_cluster_share!r}: must be in (0, 0.5].")
    _check_pca_dims(pca_dims)
    y = _as_labels(labels)
    x = _as_features(features, len(y))
    models, minority, marks, shares, tiny = {}, {}, np.zeros(len(y), dtype=np.int64), {}, []
    for k in np.unique(y).tolist():
        rows = y == k
        if rows.sum() < 2 * n_clusters:  # too few rows to cluster: the class gets no minority
            minority[k], shares[k] = None, 0.0
            tiny.append(k)
            continue
        proj = _projector(x[rows], pca_dims, seed)
        xk = proj.transform(x[rows])
        if method == "gmm":
            est = GaussianMixture(n_components=int(n_clusters), covariance_type=covariance_type, n_init=3,
                                  reg_covar=1e-4, random_state=seed)
        else:
            est = KMeans(n_clusters=int(n_clusters), n_init=10, random_state=seed)
        assigned = est.fit(xk).predict(xk)
        counts = np.bincount(assigned, minlength=int(n_clusters))
        small = int(np.argmin(counts))
        share = counts[small] / rows.sum()
        minority[k] = small if 0 < share <= max_cluster_share else None
        marks[rows] = assigned == small if minority[k] is not None else 0
        models[k], shares[k] = (proj, est), float(marks[rows].mean())
    _check_too_small(tiny, y, method, f"at least 2 × pseudo_clusters = {2 * n_clusters} rows")
    _check_share(marks, method, f"n_clusters (now {n_clusters}) or max_cluster_share (now {max_cluster_share}; "
                                "every class's clusters were near equal in size)")
    return PseudoLabels(marks, method, {"share": float(marks.mean()), "class_share": shares,
                                        "classes_without_minority": _without(minority)},
                        PerClassLabeler(method, models, minority))


# ---------------------------------------------------------------------------------------------------- auto
def error_explanation_score(pseudo, labels, pred) -> float:
    """How well pseudo-groups explain the ERM model's errors: Matthews correlation between "pseudo-minority" and
    "ERM is wrong" within each class, averaged with class-size weights. 1 = the pseudo-minority is exactly the
    error set; 0 = unrelated. Needs ERM predictions only, no group label."""
    from sklearn.metrics import matthews_corrcoef

    y, g, p = _as_labels(labels), np.asarray(pseudo), np.asarray(pred)
    if g.shape != y.shape or p.shape != y.shape:
        raise ValueError(f"pseudo {g.shape}, labels {y.shape} and pred {p.shape} must be 1-D of equal length.")
    wrong = p != y
    score = 0.0
    for k in np.unique(y).tolist():
        rows = y == k
        if len(np.unique(wrong[rows])) > 1 and len(np.unique(g[rows])) > 1:  # else undefined: no information, 0
            score += rows.mean() * matthews_corrcoef(wrong[rows], g[rows])
    return float(score)


def auto(features, labels, logits, *, candidates: Sequence[str] = FEATURE_LABELERS, min_score: float = 0.1,
         tie: float = 0.02, seed: int = 0, **knobs) -> PseudoLabels:
    """Pick the feature-space labeler whose pseudo-groups best explain ERM's training errors.

    Criterion (label-free): `error_explanation_score`, the within-class Matthews correlation between a candidate's
    pseudo-minority and ERM's mistakes. The premise of the unlabeled setting is that the minority is where ERM fails
    (that is the gap FairNet closes); a feature-space group that contains most of the errors *and* is mostly made of
    them scores high, while random outliers score ≈ 0. Unlike the raw accuracy gap, the correlation does not reward a
    tiny group of a few hard rows, nor a large group that merely contains the errors. The error set itself scores 1 by
    construction, so it is not a candidate; it is the fallback when no candidate reaches `min_score`, i.e. when no
    feature structure explains the errors better than the errors themselves, unless it marks every row of a class
    (a model that never predicts that class): then the best candidate is kept. Candidates that fail (e.g. mark no row)
    are skipped and their error recorded in `details["errors"]`.

    Near-ties (scores within `tie`) go to the candidate marking the fewest rows: the score cannot see a class where
    ERM makes no errors, and there a tighter group puts fewer majority rows among the anchors. (On the synthetic
    text task ERM errs on one class's minority only, and GMM and KMeans tie at 0.5.)"""
    unknown = set(candidates) - set(FEATURE_LABELERS)
    if unknown or not candidates:
        raise ValueError(f"candidates={tuple(candidates)!r}: choose among {FEATURE_LABELERS}.")
    if not (0 <= tie < 1 and -1 <= min_score <= 1):
        raise ValueError(f"tie={tie!r} must be in [0, 1) and min_score={min_score!r} in [-1, 1] (Matthews scale).")
    y = _as_labels(labels)
    x = _as_features(features, len(y))
    pred = _as_logits(logits, len(y), y).argmax(-1)
    scores, errors, results = {}, {}, {}
    for name in candidates:
        try:
            results[name] = _fit_one(name, x, y, logits, seed, knobs)
        except ValueError as err:
            errors[name] = str(err)
            continue
        scores[name] = error_explanation_score(results[name].labels, y, pred)
    best = None
    if scores:  # near-ties (within `tie`) go to the candidate that marks the fewest rows
        top = max(scores.values())
        best = min((n for n in scores if scores[n] >= top - tie), key=lambda n: (results[n].labels.mean(), n))
    chosen = results[best] if best is not None else None
    if best is None or scores[best] < min_score:
        try:
            fallback = error_set(logits, y)
        except ValueError as err:  # ERM errs on no row (or on most): no error set; the best candidate, if any
            errors["error_set"] = str(err)
            if chosen is None:
                raise ValueError(
                    "pseudo_labeler='auto' found no pseudo-minority: every feature-space labeler failed "
                    f"({'; '.join(f'{n}: {e}' for n, e in errors.items())}). Give some group labels (the partial "
                    "setting), or pick a pseudo_labeler and its knobs (docs/label-settings.md).") from err
            fallback = chosen
        # an error set that is a whole class (a model that never predicts it) leaves that class without a majority:
        # then the best candidate, however weak, is the better fallback
        whole_class = any(bool(fallback.labels[y == k].all()) for k in np.unique(y))
        chosen = fallback if (chosen is None or not whole_class) else chosen
    chosen.details.update({"scores": scores, "shares": {n: float(r.labels.mean()) for n, r in results.items()},
                           "errors": errors, "min_score": min_score, "tie": tie, "auto": True})
    return chosen


# ---------------------------------------------------------------------------------------------------- entry point
def _fit_one(method: str, x, y, logits, seed: int, knobs: dict) -> PseudoLabels:
    if method == "error_set":
        return error_set(logits, y)
    if method == "lof":
        return lof_per_class(x, y, seed=seed, **{k: v for k, v in knobs.items() if k in _LOF_KNOBS})
    return cluster_per_class(x, y, method=method, seed=seed,
                             **{k: v for k, v in knobs.items() if k in _CLUSTER_KNOBS})


def pseudo_label(method: str, *, features=None, labels, logits=None, seed: int = 0, **knobs) -> PseudoLabels:
    """Fit the pseudo-labeler `method` on training rows and mark their presumed minority.

    `method`: one of `METHODS`. `features`: frozen representations (rows × dims; needed by lof/gmm/kmeans/auto).
    `labels`: class ids. `logits`: the frozen ERM model's logits (needed by error_set and auto). Knobs: lof takes
    n_neighbors, contamination, pca_dims; gmm/kmeans take n_clusters, pca_dims, max_cluster_share, covariance_type;
    auto takes candidates, min_score, tie and forwards the rest. Returns `PseudoLabels`; `.labeler.predict(features,
    labels, logits)` marks new rows (e.g. validation) with the same fitted labeler."""
    if method not in METHODS:
        raise ValueError(f"pseudo_labeler={method!r}: choose one of {METHODS}.")
    allowed = {"error_set": (), "lof": _LOF_KNOBS, "gmm": _CLUSTER_KNOBS, "kmeans": _CLUSTER_KNOBS,
               "auto": _LOF_KNOBS + _CLUSTER_KNOBS + _AUTO_KNOBS}[method]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise TypeError(f"pseudo_label({method!r}) got unknown knobs {unknown}; it takes {sorted(set(allowed))}.")
    y = _as_labels(labels)
    if method == "error_set":
        return error_set(logits, y)
    if features is None:
        raise ValueError(f"features is required for pseudo_labeler={method!r}: pass the frozen representations.")
    x = _as_features(features, len(y))
    if method == "auto":
        return auto(x, y, logits, seed=seed, **knobs)
    return _fit_one(method, x, y, logits, seed, knobs)


# ---------------------------------------------------------------------------------------------------- selection
def pseudo_group_worst_accuracy(pred, labels, pseudo_groups) -> float:
    """min over (class × pseudo-group) cells of accuracy, skipping empty cells: worst-group accuracy with
    pseudo-groups in place of the sensitive attribute, a selector for τ and epoch that needs no group label."""
    y = _as_labels(labels)
    p, g = np.asarray(pred), np.asarray(pseudo_groups)
    if p.shape != y.shape or g.shape != y.shape:
        raise ValueError(f"pred {p.shape}, labels {y.shape} and pseudo_groups {g.shape} must be 1-D of equal length.")
    worst = 1.0
    for k in np.unique(y).tolist():
        for s in np.unique(g).tolist():
            cell = (y == k) & (g == s)
            if cell.any():
                worst = min(worst, float((p[cell] == k).mean()))
    return worst


def rank_correlation(selector_values, true_values) -> float:
    """Spearman rank correlation between a selector's values and the true validation WGA across candidates
    (scipy.stats.spearmanr); nan when either side is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(selector_values, dtype=np.float64), np.asarray(true_values, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"selector_values {a.shape} and true_values {b.shape} must be 1-D, equal length, >= 2.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
