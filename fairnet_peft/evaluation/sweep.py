"""Threshold sweep: ACC, WGA, EOD, detector TPR/FPR and gate rate for every τ of a grid, in two passes.

The gate of a row is `risk > τ`, and a row's output depends only on its own gate (the LoRA update is added per row),
so one pass with the gate forced off (base logits and the risk scores) and one with it forced on (corrected logits)
give the prediction of every row at every τ: ``where(risk > τ, argmax(logits_on), argmax(logits_off))``. The sweep
therefore costs two passes over the data whatever the size of the grid.

The risk is taken from the forced-off pass. In normal inference the detector also sees LoRA-off features: adapted
layers before the detector's read point run with their gate still unknown (= off) and are backtracked afterwards
(gate.py), so the scores are the ones the model uses at any τ.

Example:
    >>> sweep = threshold_sweep(model, eval_ds, [0.1 * i for i in range(11)])
    >>> fairnet_peft.evaluation.plots.plot_threshold_sweep(sweep, "sweep.png")
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..metrics import evaluate_predictions, gated_logits, predicted_labels
from ..tuner.gate import find_gate_state
from .gated import gated_pass

__all__ = ["SweepScores", "collect_sweep_scores", "gate_rate_thresholds", "sweep_predictions", "sweep_metrics",
           "threshold_sweep"]

# Inputs a model takes besides the ones named in its forward signature are not guessed: the signature decides.
_NEVER_INPUTS = ("labels", "label", "label_ids")


@dataclass
class SweepScores:
    """What the two passes collect, in dataset order. All numpy arrays.

    Attributes:
        logits_off: (N, K) logits with the adapter's gate forced off (the base model for this adapter).
        logits_on: (N, K) logits with the gate forced on for every row.
        risk: (N,) detector risk scores p_s(x), as float32.
        labels: (N,) task labels.
        sensitive: (N,) sensitive group labels (-1 = unknown).
        risk_native: (N,) the risk scores as the detector returned them (its dtype, on the CPU); the gate is
            computed from these exactly as the model does (`risk > τ`), so bf16/fp16 detectors give the same gates.
    """

    logits_off: np.ndarray
    logits_on: np.ndarray
    risk: np.ndarray
    labels: np.ndarray
    sensitive: np.ndarray
    risk_native: Optional[torch.Tensor] = None

    def gate(self, threshold: float) -> np.ndarray:
        """(N,) bool: the gate the model applies at `threshold` (strict `risk > τ`, in the detector's dtype)."""
        if self.risk_native is not None:
            return (self.risk_native > float(threshold)).cpu().numpy()
        return self.risk > float(threshold)

    def logits(self, threshold: float) -> np.ndarray:
        """(N, K) logits the model gives at `threshold`: the corrected ones where the gate is on, else the base."""
        return gated_logits(self.logits_off, self.logits_on, self.gate(threshold))

    @property
    def pred_off(self) -> np.ndarray:
        return predicted_labels(self.logits_off)

    @property
    def pred_on(self) -> np.ndarray:
        return predicted_labels(self.logits_on)


# ---------------------------------------------------------------------- data loading
def _base_forward(model: nn.Module) -> Callable:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.forward


def _input_columns(model: nn.Module, columns: Sequence[str], label_column: str, sensitive_column: str) -> list[str]:
    """Dataset columns the model's forward takes (labels excluded: the sweep needs no loss)."""
    params = inspect.signature(_base_forward(model)).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    skip = {label_column, sensitive_column, *_NEVER_INPUTS}
    cols = [c for c in columns if c not in skip and c in params]
    if not named:  # a bare forward(**inputs): every other column is an input
        cols = [c for c in columns if c not in skip]
    if not cols:
        raise ValueError(
            f"threshold_sweep: no dataset column is a model input (columns: {list(columns)}; the model's forward "
            f"takes {named[:8]}). Tokenize/preprocess the dataset first "
            "so it has e.g. input_ids/attention_mask or pixel_values."
        )
    return cols


def padding_collate(pad_values: Optional[dict] = None) -> Callable[[list[dict]], dict]:
    """`default_collate` for equal shapes; otherwise right-pads each key's tensors to the longest along every dim.

    `pad_values` maps a column to its padding value (default 0; e.g. ``{"input_ids": tokenizer.pad_token_id}``).
    """
    pad_values = dict(pad_values or {})

    def collate(rows: list[dict]) -> dict:
        out = {}
        for key in rows[0]:
            values = [torch.as_tensor(r[key]) for r in rows]
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                out[key] = torch.stack(values)
                continue
            if len({v.dim() for v in values}) != 1:
                raise ValueError(f"column {key!r} has rows of different ranks; pass a collate_fn")
            size = [max(s[d] for s in shapes) for d in range(values[0].dim())]
            batch = values[0].new_full((len(values), *size), pad_values.get(key, 0))
            for i, v in enumerate(values):
                batch[(i, *(slice(0, n) for n in v.shape))] = v
            out[key] = batch
        return out

    return collate


def _column(dataset, name: str, what: str) -> np.ndarray:
    if name not in dataset.column_names:
        raise ValueError(
            f"threshold_sweep: the dataset has no {what} column {name!r} (columns: {dataset.column_names}). "
            f"Pass {what}_column=... with the right name."
        )
    return np.asarray(dataset.with_format(None)[name])


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


# ---------------------------------------------------------------------- the two passes
def collect_sweep_scores(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    sensitive_column: str = "sensitive",
    label_column: str = "labels",
    adapter_name: Optional[str] = None,
    collate_fn: Optional[Callable[[list[dict]], dict]] = None,
) -> SweepScores:
    """Run `model` twice over `dataset` (gate forced off, then on) and return logits, risk, labels and groups.

    `dataset` is a `datasets.Dataset` holding the model inputs plus `label_column` and `sensitive_column`; columns
    that are not inputs of the model's forward are dropped before the model is called. `collate_fn` receives the
    rows (dicts of the input columns, torch format); the default stacks them and right-pads rows of unequal length
    (`input_ids` with the model's `pad_token_id`, everything else with 0). The model runs in eval mode without
    gradients and is put back in its previous mode afterwards.
    """
    state = find_gate_state(model)
    if adapter_name is None:
        active = state.active_adapters()
        if not active:
            raise ValueError("threshold_sweep: the model has no active FairLoRA adapter (are adapters disabled?)")
        adapter_name = active[0]
    elif adapter_name not in state.configs:
        raise ValueError(f"threshold_sweep: {adapter_name!r} is not a FairLoRA adapter of this model "
                         f"(FairLoRA adapters: {list(state.configs)}).")
    labels = _column(dataset, label_column, "label")
    sensitive = _column(dataset, sensitive_column, "sensitive")
    inputs = _input_columns(model, dataset.column_names, label_column, sensitive_column)
    if collate_fn is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        collate_fn = padding_collate({"input_ids": 0 if pad_id is None else int(pad_id)})
    loader = torch.utils.data.DataLoader(
        dataset.with_format("torch", columns=inputs), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
    )
    device = _model_device(model)
    batches = ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in inputs}
               for batch in loader)
    out = gated_pass(model, batches, ("off", "on"), adapter_name=adapter_name)
    if "risk" not in out:
        raise RuntimeError("threshold_sweep: the detector did not run (no risk scores); check that the detector's "
                           "read module is on the forward path of the model.")
    logits_off, logits_on, risk = out["logits_off"], out["logits_on"], out["risk_native"]
    if not len(risk) == len(logits_off) == len(labels):
        raise RuntimeError(f"threshold_sweep: got {len(logits_off)} outputs for {len(labels)} rows")
    return SweepScores(logits_off, logits_on, risk.float().numpy(), labels, sensitive, risk_native=risk)


def sweep_predictions(scores: SweepScores, threshold: float) -> np.ndarray:
    """Predictions the model makes at `threshold`: the corrected prediction where risk > τ, else the base one."""
    return predicted_labels(scores.logits(threshold))


def gate_rate_thresholds(risk, rates: Sequence[float]) -> list[float]:
    """The τ that switch the gate on for (at most) each fraction `rates` of the rows: the (1 − rate) quantile of `risk`.

    `risk` is a `SweepScores` (its risk scores) or an array of risk scores, e.g. of the validation split. Needs no
    labels, so it suits every label setting. Use it when the detector's scores sit in a narrow band (a briefly trained
    detector often puts most of them within a few hundredths of 0.5), where an evenly spaced τ grid jumps from
    "almost every row" to "almost none". Because the gate is strict (`risk > τ`), tied scores can make the gated
    share smaller than the rate asked for.

        >>> val_scores = collect_sweep_scores(model, val_ds)
        >>> sweep = sweep_metrics(val_scores, gate_rate_thresholds(val_scores, [0.05, 0.1, 0.2, 0.5]))
    """
    values = risk.risk if isinstance(risk, SweepScores) else risk
    values = np.asarray(values.float().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("gate_rate_thresholds: `risk` must be a non-empty array of finite risk scores.")
    rates = [float(r) for r in rates]
    bad = [r for r in rates if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"gate_rate_thresholds: rates must be fractions in [0, 1], got {bad}.")
    return [float(q) for q in np.quantile(values, [1.0 - r for r in rates])]


# keys every sweep row has, NaN when undefined (no known group, or sensitive values other than 0/1)
_ROW_KEYS = ("accuracy", "worst_group_accuracy", "equalized_odds_difference", "gate_rate")
_DETECTOR_KEYS = ("tpr", "fpr", "tpr_over_fpr")


def sweep_metrics(scores: SweepScores, thresholds: Sequence[float]) -> list[dict]:
    """One row per τ (in the given order), from already collected scores; see `threshold_sweep` for the keys.

    Each row is `metrics.evaluate_predictions` of the model's logits and gates at τ, so it has the same keys and
    numbers as `make_compute_metrics(threshold=τ)` on a normal run of the model at τ, plus `threshold` and the
    detector rates again under their short names `tpr`, `fpr`, `tpr_over_fpr`.
    """
    rows = []
    for tau in thresholds:
        tau = float(tau)
        gate = scores.gate(tau)
        out = evaluate_predictions(scores.logits(tau), scores.labels, sensitive_features=scores.sensitive,
                                   gates=gate, threshold=tau)
        row = {"threshold": tau, **{key: math.nan for key in _ROW_KEYS}, **out}
        row.update({key: out.get(f"detector_{key}", math.nan) for key in _DETECTOR_KEYS})
        rows.append(row)
    return rows


def threshold_sweep(
    model: nn.Module,
    dataset,
    thresholds: Sequence[float],
    *,
    batch_size: int = 64,
    sensitive_column: str = "sensitive",
    label_column: str = "labels",
    adapter_name: Optional[str] = None,
    collate_fn: Optional[Callable[[list[dict]], dict]] = None,
) -> list[dict]:
    """Fairness/accuracy trade-off of the gate threshold τ, for every τ in `thresholds`, from two passes.

    Returns one dict per τ (in the given order) with ``threshold``, ``accuracy`` (ACC), ``worst_group_accuracy``
    (WGA over label × group cells), ``equalized_odds_difference`` (EOD, mean), ``tpr``/``fpr``/``tpr_over_fpr``
    (detector rates against the sensitive labels, NaN unless they are binary), ``gate_rate`` (all rows) and
    ``gate_rate_s{g}`` per group: the input of `fairnet_peft.evaluation.plots.plot_threshold_sweep`. The rest of
    `metrics.evaluate_predictions`' keys at τ (``worst_class_accuracy``, ``acc_y1_s0``, ``detector_tpr`` ...) are
    there too. Rows labelled -100 are
    dropped; sensitive value -1 means unknown. The predictions are exactly those of the model run with its
    threshold set to τ (see `collect_sweep_scores` for the data handling). The model's threshold is not changed.
    """
    scores = collect_sweep_scores(model, dataset, batch_size=batch_size, sensitive_column=sensitive_column,
                                  label_column=label_column, adapter_name=adapter_name, collate_fn=collate_fn)
    return sweep_metrics(scores, thresholds)
