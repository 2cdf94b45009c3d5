"""After training: choose τ on the eval set, without group labels, and never hand back an adapter that costs more
eval accuracy than the user allows.

Why: in the unlabeled setting nothing checks that the pseudo-groups are the group ERM fails. When they are not
(MiniLM on Adult and BUG: pseudo-label precision 52 % and 16 %), the gate fires on a fifth of every group and the
adapter costs 5-6 accuracy points while lowering the true worst-group accuracy (docs/benchmarks.md). Two things the
setting can measure: accuracy on the user's eval rows (class labels only), and the worst accuracy over (class ×
pseudo-group) cells of those rows (the labeler fitted on training marks them; issue 11 item 2). Across τ candidates
the latter tracks the true validation WGA where the pseudo-groups find the group (Spearman ρ 0.56-1.00 per seed on
the synthetic and Waterbirds-style tasks, where τ = 0.5 was far from the best τ); where they do not (MiniLM text)
it does not, and the floor bounds what it can cost.

Flow (end of `FairTrainer.train()`): two `predict` passes over `eval_dataset`, gate forced off and on (the risk
comes with them) → `select_threshold`:
- the accuracy floor (`max_accuracy_drop`): a τ is admissible when the adapter at τ loses at most that much accuracy
  against the adapter off; τ = 1 (adapter off) always is;
- `threshold_selection="pseudo_group"` (default in the unlabeled setting): among the admissible candidates (a 0.1
  grid, the τ gating 5 … 95 % of the eval rows, the configured τ, and 1), the one with the best pseudo-group WGA,
  ties to the τ nearest the configured one;
- `"none"`: keep the configured τ if admissible, else the smallest admissible τ above it (fewer rows gated, the
  riskiest kept: as much correction as the floor allows).
The trainer writes the result into the adapter's `FairLoraConfig.threshold`, so the saved adapter carries it, and
reports `train_guard_*` metrics. Who owns what: this module decides τ from arrays; the trainer runs the passes.
Defaults (`"auto"`): floor 0.005 and pseudo-group selection in the unlabeled setting; neither where group labels
exist (there the user sees the WGA an accuracy cost buys, and chooses).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from ..metrics import accuracy
from ..evaluation.sweep import SweepScores, gate_rate_thresholds, sweep_predictions
from .pseudo_labels import pseudo_group_worst_accuracy

#: max_accuracy_drop="auto": this drop (fraction) in the unlabeled setting; no guard in the others.
AUTO_MAX_DROP = {"unlabeled": 0.005}
NEVER = 1.0  # risk ≤ 1 always, and the gate is `risk > τ`: τ = 1 turns the adapter off
#: threshold_selection="auto": pseudo-group selection in the unlabeled setting, none elsewhere
AUTO_SELECTION = {"unlabeled": "pseudo_group"}
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))
GATE_RATES = tuple(round(0.05 * i, 2) for i in range(1, 20))


def resolve_max_drop(value: Union[float, str, None], setting: Optional[str]) -> Optional[float]:
    """The drop the guard allows in `setting`, or None when the guard is off."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return AUTO_MAX_DROP.get(setting or "full")
    return float(value)


def resolve_selection(value: str, setting: Optional[str]) -> str:
    """'pseudo_group' or 'none' for `setting`."""
    return AUTO_SELECTION.get(setting or "full", "none") if value == "auto" else value


def tau_candidates(risk, threshold: float) -> list:
    """The 0.1 grid, the τ gating 5 … 95 % of the rows (`gate_rate_thresholds`), the configured τ and 1 (off)."""
    qs = [q for q in gate_rate_thresholds(risk, GATE_RATES) if 0.0 < q < NEVER]
    return sorted(set(TAU_GRID) | set(qs) | {float(threshold), NEVER})


def select_threshold(scores: SweepScores, threshold: float, max_drop: Optional[float],
                     pseudo_groups: Optional[np.ndarray] = None) -> dict:
    """τ by the pseudo-group WGA among the τ the accuracy floor admits (module docstring); without `pseudo_groups`,
    `guard_threshold`. Returns `guard_threshold`'s keys plus "pseudo_group_wga" (at the chosen τ) and "selected"
    (τ differs from the configured one)."""
    if pseudo_groups is None:
        out = guard_threshold(scores, threshold, 1.0 if max_drop is None else max_drop)
        out["selected"] = out["threshold"] != threshold
        return out
    labels = np.asarray(scores.labels)
    acc_off = accuracy(labels, scores.pred_off)
    floor = -np.inf if max_drop is None else acc_off - max_drop - 1e-12
    rows = []
    for tau in tau_candidates(scores.risk, threshold):
        pred = sweep_predictions(scores, tau)
        rows.append((tau, accuracy(labels, pred), pseudo_group_worst_accuracy(pred, labels, pseudo_groups)))
    at_tau = next(r for r in rows if r[0] == float(threshold))
    tau, acc, pwga = max((r for r in rows if r[1] >= floor), key=lambda r: (r[2], -abs(r[0] - threshold)))
    return {"accuracy_off": acc_off, "accuracy_adapter": at_tau[1], "raised": bool(at_tau[1] < floor), "threshold": tau,
            "accuracy_guarded": acc, "gate_rate": float(scores.gate(tau).mean()), "pseudo_group_wga": pwga,
            "selected": tau != threshold}


def guard_threshold(scores: SweepScores, threshold: float, max_drop: float) -> dict:
    """{"threshold": τ to use, "accuracy_off", "accuracy_adapter" (at the given τ), "accuracy_guarded" (at the
    returned τ), "gate_rate" (validation rows gated at the returned τ), "raised": bool}.

    Candidates above `threshold` are the validation risks themselves (each one ungates the rows at or below it) and
    finally `NEVER`; the first that keeps accuracy within `max_drop` of the adapter off wins."""
    labels = np.asarray(scores.labels)

    def acc(tau: float) -> float:
        return accuracy(labels, sweep_predictions(scores, tau))

    floor = accuracy(labels, scores.pred_off) - max_drop
    out = {"accuracy_off": floor + max_drop, "accuracy_adapter": acc(threshold), "raised": False}
    chosen = threshold
    if out["accuracy_adapter"] < floor - 1e-12:
        risk = np.asarray(scores.risk, dtype=np.float64)
        candidates = [float(t) for t in np.unique(risk[risk > threshold]) if t < NEVER] + [NEVER]
        chosen = next(t for t in candidates if t == NEVER or acc(t) >= floor - 1e-12)
        out["raised"] = True
    out.update(threshold=chosen, accuracy_guarded=acc(chosen), gate_rate=float(scores.gate(chosen).mean()))
    return out


def apply_accuracy_guard(trainer) -> dict:
    """Choose τ for a trained `FairTrainer` (module docstring) and return the `train_guard_*` metrics; {} when neither
    the floor nor the selection is on, when the user fixed τ (`gate_threshold`), or without an eval set with labels."""
    import warnings

    from ..tuner.gate import force_gate

    args = trainer.args
    max_drop = resolve_max_drop(args.max_accuracy_drop, trainer.label_setting)
    selection = resolve_selection(args.threshold_selection, trainer.label_setting)
    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if (max_drop is None and selection == "none") or args.gate_threshold is not None:
        return {}
    if dataset is None:
        warnings.warn(
            f"No eval_dataset: the choice of τ after training (max_accuracy_drop={args.max_accuracy_drop!r}, "
            f"threshold_selection={args.threshold_selection!r}, on in the {trainer.label_setting} setting) cannot run "
            "and τ stays as configured. Pass eval_dataset (class labels suffice), or set max_accuracy_drop='none' and "
            "threshold_selection='none' to silence this.", UserWarning, stacklevel=3)
        return {}
    outputs = {}
    for on in (False, True):
        with force_gate(trainer.model, on, adapter_names=[trainer.adapter_name]):
            outputs[on] = trainer.predict(dataset, metric_key_prefix="guard")
    labels = outputs[False].label_ids
    labels = labels[0] if isinstance(labels, tuple) else labels
    if labels is None:
        return {}
    (logits_off, risk), logits_on = outputs[False].predictions[:2], outputs[True].predictions[0]
    risk = np.asarray(risk, dtype=np.float32).reshape(len(labels), -1)[:, 0]
    scores = SweepScores(np.asarray(logits_off), np.asarray(logits_on), risk, np.asarray(labels),
                         np.full(len(labels), -1))
    use_groups = selection == "pseudo_group" and trainer.pseudo_labels is not None
    groups = trainer.eval_pseudo_groups(dataset) if use_groups else None
    config = trainer.model.peft_config[trainer.adapter_name]
    info = select_threshold(scores, float(config.threshold), max_drop, groups)
    if info["raised"]:
        warnings.warn(
            f"The adapter cost {100 * (info['accuracy_off'] - info['accuracy_adapter']):.1f} accuracy points on the "
            f"eval set at τ={config.threshold:g} (more than max_accuracy_drop={max_drop:g}), so τ was set to "
            f"{info['threshold']:.4g} ({100 * info['gate_rate']:.1f} % of eval rows gated"
            + (", i.e. the adapter is off" if info["threshold"] >= NEVER else "") + "). In the unlabeled setting this "
            "means the pseudo-groups are probably not the group the model fails. Give a few group labels (partial "
            "setting), try another pseudo_labeler, or set max_accuracy_drop='none' to keep τ.",
            UserWarning, stacklevel=3)
    config.threshold = info["threshold"]
    return {f"train_guard_{k}": float(v) for k, v in info.items()}
