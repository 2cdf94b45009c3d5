"""Percentile bootstrap confidence intervals of any metric of `metrics` (rows resampled with replacement).

`bootstrap_ci(metric_fn, y_true, y_pred, sensitive_features=...)` calls `metric_fn` on the full data (the point
estimate) and on `n_resamples` resamples drawn with one seeded numpy generator; empty-cell warnings inside resamples
are silenced. Re-exported as `fairnet_peft.metrics.bootstrap_ci`. Only numpy is imported.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from .counting import EmptyGroupWarning, as_1d

__all__ = ["bootstrap_ci"]


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
    yt, yp = as_1d(y_true, "y_true"), as_1d(y_pred, "y_pred")
    sf = None if sensitive_features is None else as_1d(sensitive_features, "sensitive_features")

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
