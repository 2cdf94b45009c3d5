"""Accuracy guard: never hand back an adapter that costs more validation accuracy than the user allows.

Why: in the unlabeled setting nothing checks that the pseudo-groups are the group ERM fails. When they are not
(MiniLM on Adult and BUG: pseudo-label precision 52 % and 16 %), the gate fires on a fifth of every group and the
adapter costs 5-6 accuracy points while lowering the true worst-group accuracy (docs/benchmarks.md). The one
quantity the setting can verify is accuracy on the user's validation rows (class labels only, no group label).

Flow (after the LoRA stage, `FairTrainer.train()`): two `predict` passes over `eval_dataset`, gate forced off and
on (the risk comes with them) → `guard_threshold` keeps τ when the adapter at τ loses at most `max_drop` accuracy
against the adapter off; otherwise it raises τ to the smallest value that does (fewer rows gated, the riskiest
kept), up to "never" (τ = 1). The trainer writes the result into the adapter's `FairLoraConfig.threshold`, so the
saved adapter carries it. Who owns what: this module decides τ from arrays; the trainer runs the passes, writes
the config and reports `train_guard_*` metrics. Default (`max_accuracy_drop="auto"`): 0.005 in the unlabeled
setting, off where group labels exist (there the user sees the WGA the cost buys and chooses).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from ..evaluation.metrics import accuracy
from ..evaluation.sweep import SweepScores, sweep_predictions

#: max_accuracy_drop="auto": this drop (fraction) in the unlabeled setting; no guard in the others.
AUTO_MAX_DROP = {"unlabeled": 0.005}
NEVER = 1.0  # risk ≤ 1 always, and the gate is `risk > τ`: τ = 1 turns the adapter off


def resolve_max_drop(value: Union[float, str, None], setting: Optional[str]) -> Optional[float]:
    """The drop the guard allows in `setting`, or None when the guard is off."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return AUTO_MAX_DROP.get(setting or "full")
    return float(value)


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
    """Run the guard for a trained `FairTrainer` (see the module docstring) and return its `train_guard_*` metrics;
    {} when it is off, when the user fixed τ (`gate_threshold`), or without an eval set with labels."""
    import warnings

    from ..tuner.gate import force_gate

    args = trainer.args
    max_drop = resolve_max_drop(args.max_accuracy_drop, trainer.label_setting)
    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if max_drop is None or args.gate_threshold is not None:
        return {}
    if dataset is None:
        warnings.warn(
            f"No eval_dataset: the accuracy guard (max_accuracy_drop={max_drop:g}, on in the {trainer.label_setting} "
            "setting) cannot check that the adapter keeps accuracy. Pass eval_dataset (class labels suffice), or set "
            "max_accuracy_drop='none' to silence this.", UserWarning, stacklevel=3)
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
    config = trainer.model.peft_config[trainer.adapter_name]
    info = guard_threshold(scores, float(config.threshold), max_drop)
    if info["raised"]:
        warnings.warn(
            f"The adapter cost {100 * (info['accuracy_off'] - info['accuracy_adapter']):.1f} accuracy points on the "
            f"eval set at τ={config.threshold:g} (more than max_accuracy_drop={max_drop:g}), so τ was raised to "
            f"{info['threshold']:.4g} ({100 * info['gate_rate']:.1f} % of eval rows gated"
            + (", i.e. the adapter is off" if info["threshold"] >= NEVER else "") + "). In the unlabeled setting this "
            "means the pseudo-groups are probably not the group the model fails. Give a few group labels (partial "
            "setting), try another pseudo_labeler, or set max_accuracy_drop='none' to keep τ.",
            UserWarning, stacklevel=3)
        config.threshold = info["threshold"]
    return {f"train_guard_{k}": float(v) for k, v in info.items()}
