"""After training: how strongly, and for whom, the adapter acts. Arrays in, a decision out.

`select_correction` searches the gate threshold τ and the adapter strength α (the LoRA update scaled by α on gated
rows; α = 0 or τ = 1 is the adapter off) on held-out rows, from one pass with the gate off and one pass with the
gate forced on per strength (a row's output depends only on its own gate, so every τ follows from those passes):

    maximise   WGA(τ, α)           worst accuracy over (class × group) cells with a known group, τ ≥ min_threshold
    subject to ACC(τ, α) − z·SE ≥ ACC(off) − max_accuracy_drop   (SE: of the paired change, `paired_change`;
                                                                   no margin where no row goes right → wrong)
               EOD(τ, α) ≤ EOD(off) + max_eod_increase     (no overshoot past the majority)
               gate rate on group 0 ≤ max_majority_gate_rate  (a correction of marked rows, not a global change)

The floor's margin is for the harm a correction may do beyond what the held-out rows show. A candidate that flips no
held-out prediction has a paired change of 0 with a standard error of 0 and passes (it can then win only through the
tie-break, which has a margin of its own). One or two flips that all turn a wrong prediction right fail the margin in
under 200 rows (one flip: a change of 1/n with a standard error of about 1/n); `floor_admits_harmless=True` (not
FairTrainer's default) lets them pass. The default keeps the margin because such a candidate wins on held-out
accuracy, so among many candidates the luckiest few fixes would be picked (docs/method.md §7).

Ties go to the higher accuracy, then the lower worst-group loss. An accuracy gain over the adapter off counts only
beyond the tie-break's margin (`accuracy_gain_beyond_noise`): one fix more than breaks in 300 rows is a change of
0.33 ± 0.33 points, which the floor passes, and of ~100 candidates some always show it by luck; within the margin
it is a tie with off. Then the lower worst-group loss: the largest mean cross-entropy over the same cells,
GroupDRO's objective, read from the same logits. Held-out cells are small (Adult's women > 50K: 5 rows in 150), so
the WGA and ACC of many candidates tie with the adapter off even where the correction moves those rows toward their
class; the loss sees that. A candidate's loss counts only where it is a real gain over the adapter off: its
worst-group loss, each cell's loss raised by z_tie standard errors of that cell's paired per-row change, is below the
adapter-off worst-group loss; else it ties with off. A candidate that ties with off on WGA and ACC has no other
evidence than that loss, so its loss counts only where its gate fires on at most `tie_break_max_majority_gate_rate`
of the majority rows (a correction of the rows the detector marks, not a change of the model for many rows). Among
real gains, tie_break "worst_group_loss_bound" (FairTrainer's default) ranks by that raised worst-group loss, the
gain a candidate shows at worst, so that the luckiest of many noisy estimates does not win; "worst_group_loss" ranks
by the estimate. Then the weaker correction (smaller α, then larger τ). So "off" wins whenever nothing beats it on
WGA, on ACC, or by a loss gain beyond the noise; with tie_break "weakest" (the rule before) ties go straight to the
weaker correction. When off wins although candidates beat it, the result says which limits refused the best of
them ("refused") and, for a fairer candidate that fails the floor alone, how many held-out rows would let it pass
("rows_needed"); `off_explanation` words that for the warning, the metrics and the model card. The groups are the
setting's (trainer.py decides): the true groups (full), known labels else the detector's estimate (partial),
the pseudo-groups (unlabeled). `detector_blind` is the do-no-harm check that runs before it: a detector whose
held-out AUC among rows of the same class is below `min_detector_auc` cannot tell who to correct, so the adapter
goes off whatever few held-out rows would say.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..metrics import accuracy, equalized_odds_difference, group_accuracies, worst_group_accuracy
from ..evaluation.counting import to_numpy
from ..evaluation.report import format_threshold
from ..evaluation.sweep import gate_rate_thresholds
from .detector_stage import MIN_HOLDOUT_PER_GROUP

OFF = 1.0  # risk ≤ 1 and the gate is `risk > τ`: τ = 1 is the adapter off
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(0, 10))
GATE_RATES = tuple(round(0.05 * i, 2) for i in range(1, 20))
STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def tau_candidates(risk, configured: float, lowest: float = 0.0) -> list[float]:
    """The 0.1 grid, the τ gating 5 … 95 % of the rows, from `lowest` on; the configured τ and 1 (off)."""
    qs = [q for q in gate_rate_thresholds(to_numpy(risk).astype(np.float64), GATE_RATES) if 0.0 <= q < OFF]
    return sorted({t for t in set(TAU_GRID) | set(qs) if t >= lowest} | {float(configured), OFF})


def _gate(risk, tau: float) -> np.ndarray:
    """`risk > τ` as the model computes it: in the detector's own dtype when `risk` is a tensor."""
    if isinstance(risk, torch.Tensor):
        return (risk > float(tau)).cpu().numpy()
    return np.asarray(risk) > float(tau)


TIE_BREAKS = ("worst_group_loss", "worst_group_loss_bound", "weakest")


def _log_likelihood(logits, labels: np.ndarray) -> np.ndarray:
    """log p(true class) per row from (N, K) logits, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1))


class CellLoss(NamedTuple):
    loss: float  # the worst-group loss: the largest mean cross-entropy over the cells
    gain: bool  # whether it is a real gain over the reference (`_worst_cell_loss`)
    bound: float  # the largest of the cells' losses each raised by z standard errors of its paired change


def _worst_cell_loss(log_likelihood: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                     reference: Optional[np.ndarray] = None, z: float = 0.0) -> CellLoss:
    """The worst-group loss of these rows over the (class × group) cells with a known group, whether it is a real
    gain, and its pessimistic value (`CellLoss`).

    nan with fewer than two groups (as WGA). With `reference` (the adapter-off log-likelihoods of the same rows), the
    gain is real when the worst-group loss stays below the adapter-off one with every cell's loss raised by `z`
    standard errors of its paired per-row change (a cell the correction does not touch has none): every cell that
    was above the new worst-group loss came down beyond the noise. The off model's worst cell may fall below another
    cell, the usual sign of a correction that worked; the new worst cell, untouched, then bounds the loss exactly.
    A changed cell of one row has no standard error: it never counts as a gain. The pessimistic value is the largest
    of those raised cell losses: the worst-group loss the correction is shown to reach at worst. Without a
    reference, True and the loss itself."""
    known = groups >= 0
    if not known.any() or len(np.unique(groups[known])) < 2:
        return CellLoss(math.nan, False, math.nan)
    cells = np.where(known, labels * (int(groups[known].max()) + 1) + groups, -1)
    present = np.unique(cells[known])
    loss = max(-log_likelihood[cells == c].mean() for c in present)
    if reference is None:
        return CellLoss(float(loss), True, float(loss))
    bounds = []
    for c in present:
        change = log_likelihood[cells == c] - reference[cells == c]
        if not change.any():
            spread = 0.0
        else:
            spread = z * change.std(ddof=1) / math.sqrt(len(change)) if len(change) > 1 else math.inf
        bounds.append(-log_likelihood[cells == c].mean() + spread)
    loss_off = max(-reference[cells == c].mean() for c in present)
    # strictly below, beyond rounding: one changed row of four has t = 1 exactly, a tie at z = 1, not a gain
    return CellLoss(float(loss), bool(max(bounds) < loss_off - 1e-9 * max(1.0, loss_off)), float(max(bounds)))


def _scores(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray,
            weights: Optional[np.ndarray] = None) -> tuple[float, float, float]:
    known = groups >= 0
    acc = accuracy(labels, pred) if weights is None else float(np.average(pred == labels, weights=weights))
    if not known.any() or len(np.unique(groups[known])) < 2:
        return acc, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty cells are skipped; that is expected on small held-out sets
        wga = worst_group_accuracy(labels[known], pred[known], sensitive_features=groups[known])
        eod = equalized_odds_difference(labels[known], pred[known], sensitive_features=groups[known])
    return acc, wga, eod


def select_correction(logits_off: np.ndarray, logits_on: dict, risk, labels, groups, *, configured_tau: float,
                      max_accuracy_drop: Optional[float], max_eod_increase: Optional[float],
                      strengths: Optional[Sequence[float]] = None, taus: Optional[Sequence[float]] = None,
                      keep_if_admissible: bool = False, floor_standard_errors: float = 0.0,
                      min_threshold: float = 0.0, max_majority_gate_rate: Optional[float] = None,
                      tie_break: str = "worst_group_loss", weights: Optional[np.ndarray] = None,
                      tie_break_standard_errors: Optional[float] = None,
                      tie_break_max_majority_gate_rate: Optional[float] = None,
                      floor_admits_harmless: bool = False, accuracy_gain_beyond_noise: bool = False) -> dict:
    """Choose (τ, α) as the module docstring says.

    `logits_on` maps each strength α to the (N, K) logits with the gate forced on at α; `strengths` restricts the
    search (default: every key), `taus` the thresholds (default: `tau_candidates` from `min_threshold` on).
    `keep_if_admissible`: no search, the one candidate (τ, α) is kept when admissible, else the adapter goes off.
    `floor_standard_errors` (z): the floor holds for the accuracy change minus z standard errors of the paired
    difference (`paired_change`), and with `floor_admits_harmless` not where no held-out row goes from right to
    wrong; `tie_break_standard_errors` the loss tie-break's margin (None: the same z), and
    `tie_break_max_majority_gate_rate` the most of the group-0 rows a candidate may gate and still win it (None: no
    bound; a candidate above it ties with off). `accuracy_gain_beyond_noise`: a candidate ranks above the adapter off
    on accuracy only where its paired accuracy change exceeds the tie-break's margin (`tie_break_standard_errors`);
    a smaller gain is a tie with off on accuracy, which the loss tie-break (and its majority bound) then decides
    (False: the estimate ranks, so one lucky held-out row among ~100 candidates wins).
    `max_majority_gate_rate`: the most of the group-0 rows the gate may fire on (None:
    no bound; no group-0 row: nothing to bound). `tie_break`: see the module docstring. `weights` (per row, e.g.
    `mixture_weights`): ACC, its paired change and the gate rate are weighted means; WGA, EOD, the loss and the
    majority gate rate are read per cell or group and need none. Returns {"threshold",
    "strength", "accuracy", "worst_group_accuracy", "equalized_odds_difference", "worst_group_loss", "gate_rate",
    "majority_gate_rate", "accuracy_off", "worst_group_accuracy_off", "equalized_odds_difference_off",
    "worst_group_loss_off", "candidates", "admissible", "frontier"}; "frontier" lists, best accuracy first, the
    admissible candidates no other admissible one beats on both ACC and WGA."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break={tie_break!r}: use one of {TIE_BREAKS}")
    labels = np.asarray(labels)
    groups = np.asarray(groups) if groups is not None else np.full(len(labels), -1)
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    pred_off = np.asarray(logits_off).argmax(-1)
    acc_off, wga_off, eod_off = _scores(pred_off, labels, groups, weights)
    ll_off = _log_likelihood(logits_off, labels)
    loss_off = _worst_cell_loss(ll_off, labels, groups).loss
    floor = -math.inf if max_accuracy_drop is None else acc_off - max_accuracy_drop - 1e-12
    ceiling = math.inf if max_eod_increase is None or not math.isfinite(eod_off) else eod_off + max_eod_increase + 1e-12
    majority = groups == 0
    widest = math.inf if max_majority_gate_rate is None or not majority.any() else max_majority_gate_rate + 1e-12
    widest_tie = (math.inf if tie_break_max_majority_gate_rate is None or not majority.any()
                  else tie_break_max_majority_gate_rate + 1e-12)
    off = {"threshold": OFF, "strength": 0.0, "accuracy": acc_off, "worst_group_accuracy": wga_off,
           "equalized_odds_difference": eod_off, "worst_group_loss": loss_off, "gate_rate": 0.0,
           "majority_gate_rate": 0.0}
    rows = [off]
    z = float(floor_standard_errors)
    z_tie = z if tie_break_standard_errors is None else float(tie_break_standard_errors)
    if taus is None:
        taus = tau_candidates(risk, configured_tau, min_threshold)
    for alpha in sorted(strengths if strengths is not None else logits_on):
        pred_on = np.asarray(logits_on[alpha]).argmax(-1)
        ll_on = _log_likelihood(logits_on[alpha], labels)
        for tau in taus:
            if tau >= OFF:
                continue
            gate = _gate(risk, tau)
            pred = np.where(gate, pred_on, pred_off)
            acc, wga, eod = _scores(pred, labels, groups, weights)
            change, se = paired_change(pred, pred_off, labels, weights)
            # every flip a fix: no harm to allow for (module docstring)
            harmless = floor_admits_harmless and not np.any((pred != labels) & (pred_off == labels))
            cell_loss = _worst_cell_loss(np.where(gate, ll_on, ll_off), labels, groups, ll_off, z_tie)
            majority_rate = float(gate[majority].mean()) if majority.any() else math.nan
            # an accuracy gain within the tie-break's margin ties with off on accuracy (accuracy_gain_beyond_noise)
            acc_rank = acc_off if accuracy_gain_beyond_noise and acc > acc_off and change - z_tie * se <= 0 else acc
            # a tie with off whose gate takes more of the majority than the bound: its loss gain does not count
            wide = majority_rate > widest_tie and acc_rank == acc_off and _finite(wga) == _finite(wga_off)
            rows.append({"threshold": float(tau), "strength": float(alpha), "accuracy": acc, "accuracy_rank": acc_rank,
                         "worst_group_accuracy": wga, "equalized_odds_difference": eod,
                         "worst_group_loss": cell_loss.loss, "loss_bound": cell_loss.bound,
                         "loss_gain": cell_loss.gain and not wide, "wide_gain": cell_loss.gain and wide,
                         "gate_rate": float(np.average(gate, weights=weights)),
                         "majority_gate_rate": majority_rate,
                         "accuracy_change": change, "accuracy_standard_error": se,
                         "accuracy_bound": acc_off + change - (0.0 if harmless else z * se)})
    def refused_by(r) -> list:
        """The limits candidate `r` fails (module docstring), in the order the reason names them."""
        return [name for name, fails in (
            ("accuracy floor", r["accuracy_bound"] < floor),
            ("EOD ceiling", math.isfinite(r["equalized_odds_difference"]) and r["equalized_odds_difference"] > ceiling),
            ("majority gate bound", r["majority_gate_rate"] > widest)) if fails]

    admissible = [r for r in rows if r is off or not refused_by(r)]

    def key(r):
        # lower worst-group loss first, where the gain over the adapter off is real (module docstring): the raised
        # loss ("worst_group_loss_bound", the gain shown at worst) or the estimate ("worst_group_loss")
        if tie_break == "weakest":
            fit = 0.0
        else:
            gained = r.get("loss_bound" if tie_break == "worst_group_loss_bound" else "worst_group_loss")
            fit = _finite(-(gained if r.get("loss_gain") else loss_off))
        return (_finite(r["worst_group_accuracy"]), r.get("accuracy_rank", r["accuracy"]), fit, -r["strength"],
                r["threshold"])

    best = max(admissible, key=key)
    if keep_if_admissible:
        best = admissible[-1] if len(admissible) > 1 and len(rows) == 2 else off
    chosen = {k: v for k, v in best.items() if k not in ("loss_gain", "loss_bound", "wide_gain", "accuracy_rank")}
    out = {**chosen, "accuracy_off": acc_off, "worst_group_accuracy_off": wga_off,
           "equalized_odds_difference_off": eod_off, "worst_group_loss_off": loss_off, "candidates": len(rows),
           "admissible": len(admissible), "frontier": pareto_frontier(admissible, rank=key)}
    if best is off:  # what the limits stopped: candidates better than off (with keep_if_admissible: the one)
        beaten = [r for r in rows if r is not off and (refused_by(r) if keep_if_admissible else key(r) > key(off))]
        out["worst_cell_rows"] = _worst_cell_rows(pred_off, labels, groups)
        out["minority_rows"] = int((groups == 1).sum())
        # the corrections a user of a fairness tool asks about: a higher worst-group accuracy, or at the same one a
        # worst-group loss lower beyond the noise (not an accuracy gain alone)
        fairer = [r for r in beaten if _finite(r["worst_group_accuracy"]) > _finite(wga_off) or (
            r["worst_group_accuracy"] == wga_off and r.get("loss_gain"))]
        wide = [r for r in admissible if r.get("wide_gain")]
        if wide:  # a loss gain the tie-break's majority bound set aside: the narrowest such gate
            out["tie_break_bounded"] = min(r["majority_gate_rate"] for r in wide)
        if beaten:
            out["refused"] = _refusal(max(fairer or beaten, key=key), fairer, refused_by, rows=len(labels), z=z,
                                      max_accuracy_drop=max_accuracy_drop)
    elif not keep_if_admissible:  # on, but a fairer correction may have been refused: say which, and what it needs
        fairer = [r for r in rows if r is not off and refused_by(r)
                  and _finite(r["worst_group_accuracy"]) > _finite(best["worst_group_accuracy"])]
        if fairer:
            out["held_back"] = _refusal(max(fairer, key=key), fairer, refused_by, rows=len(labels), z=z,
                                        max_accuracy_drop=max_accuracy_drop)
    return out


def _worst_cell_rows(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> int:
    """Rows in the (class × group) cell with the lowest accuracy (`metrics.group_accuracies`; 0 without two known
    groups)."""
    known = groups >= 0
    if not known.any() or len(np.unique(groups[known])) < 2:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty cells are skipped, as in _scores
        cells = [c for c in group_accuracies(labels[known], pred[known], sensitive_features=groups[known]).values()
                 if c["count"] > 0]
    return int(min(cells, key=lambda c: c["accuracy"])["count"])


MAX_ROWS_FACTOR = 100  # `_refusal` offers a held-out size only up to this many times the rows the selection had


def _refusal(best: dict, fairer: list, refused_by, *, rows: int, z: float, max_accuracy_drop: Optional[float]) -> dict:
    """Why the adapter stayed off although candidates beat it: the one the selection would have taken without its
    limits (a fairer one where there is one) and the limits it fails; `rows_needed`: the fewest held-out rows at
    which one of the `fairer` candidates that fails the floor alone (`closest`, with its τ, strength, WGA and
    accuracy change) would pass it, its accuracy change and flip rate unchanged (the standard error shrinks as
    1/√rows); nan where none could (e.g. its change is below the floor itself), or only on more than
    `MAX_ROWS_FACTOR` times these rows (a change a hair above the floor: no eval set a user has would do)."""
    needed, closest = math.inf, None
    for r in fairer:
        gap = r["accuracy_change"] + (max_accuracy_drop or 0.0)
        if refused_by(r) == ["accuracy floor"] and gap > 0 and r["accuracy_standard_error"] > 0:
            rows_r = rows * (z * r["accuracy_standard_error"] / gap) ** 2
            if rows_r < needed and rows_r <= MAX_ROWS_FACTOR * rows:
                needed, closest = rows_r, r
    keys = ("threshold", "strength", "accuracy", "worst_group_accuracy", "equalized_odds_difference",
            "worst_group_loss", "gate_rate", "majority_gate_rate", "accuracy_change", "accuracy_standard_error",
            "accuracy_bound")
    out = {**{k: best[k] for k in keys}, "limits": refused_by(best), "max_accuracy_drop": max_accuracy_drop,
           "rows_needed": float(math.ceil(needed)) if closest is not None else math.nan}
    if closest is not None:
        out["closest"] = {k: closest[k] for k in ("threshold", "strength", "worst_group_accuracy", "accuracy_change")}
    return out


def off_explanation(info: dict, floor_standard_errors: float) -> str:
    """The sentence after "no threshold and strength beat the adapter off on the held-out rows …": what the
    selection saw (`select_correction`'s "refused", "worst_cell_rows") and what would change it."""
    refused = info.get("refused")
    if info.get("minority_rows") == 0:
        return ("no held-out row is marked minority (group 1: by its group label, or where that is unknown by the "
                "detector's or the pseudo-labeler's estimate), so no gain for the minority can show; give an "
                "eval_dataset with minority rows and their group labels")
    if not refused:
        cell = info.get("worst_cell_rows", 0)
        where = f" (the adapter-off model's worst cell holds {cell} of these rows)" if cell else ""
        wide = info.get("tie_break_bounded")
        if wide is not None:
            return (f"no candidate raised the held-out worst-group accuracy{where}; those that lowered the worst-group "
                    f"loss beyond the noise gate at least {100 * wide:.0f} % of the held-out majority rows (above "
                    "tie_break_max_majority_gate_rate): a change of the model for many majority rows, on the evidence "
                    "of one cell's loss alone")
        return ("no candidate raised the held-out worst-group accuracy, or lowered the worst-group loss beyond the "
                f"noise{where}: the trained correction did not help these rows, or too few of them show it")
    return _refusal_sentence("the best refused candidate", refused, info, info["worst_group_accuracy_off"],
                             floor_standard_errors)


GLOBAL_GATE_RATE = 0.8  # a kept correction gating more of the held-out majority than this is reported as global


def global_correction_warning(info: dict) -> Optional[str]:
    """With the adapter on: a warning when the kept correction gates most of the held-out majority rows (more than
    `GLOBAL_GATE_RATE`), i.e. it acts as an adapter for everyone rather than a per-group correction; None otherwise.
    It passed the limits, so it is kept; the warning names the bound that would keep it to the minority."""
    rate = info.get("majority_gate_rate", math.nan)
    if info.get("threshold", OFF) >= OFF or not (rate > GLOBAL_GATE_RATE):
        return None
    same = ("accuracy" in info and info["accuracy"] == info.get("accuracy_off")
            and _finite(info.get("worst_group_accuracy", math.nan))
            == _finite(info.get("worst_group_accuracy_off", math.nan)))
    why = (" It moved no held-out accuracy or worst-group accuracy and was kept for a lower worst-group loss "
           "(the tie-break, FairTrainingArguments.selection_tie_break, whose own majority bound, "
           "tie_break_max_majority_gate_rate, was raised or lifted)." if same else "")
    tau = format_threshold(info["threshold"], 3)
    return (f"FairNet kept a correction (τ = {tau} at strength {info['strength']:g}) that acts on "
            f"{100 * rate:.0f} % of the held-out majority rows: it passed the accuracy floor and the EOD ceiling, but "
            f"it works as an adapter for nearly everyone rather than a correction for the minority.{why} To keep it "
            "to the rows the detector rates as minority, bound it: trainer.reselect(max_majority_gate_rate=0.5), "
            "FairTrainingArguments(max_majority_gate_rate=0.5), or --max-majority-gate-rate 0.5 in the examples")


def held_back_explanation(info: dict, floor_standard_errors: float) -> Optional[str]:
    """With the adapter on: the fairer correction the limits refused (`select_correction`'s "held_back"), in the
    words of `off_explanation`, its worst-group accuracy against the chosen one's; None when there is none."""
    refused = info.get("held_back")
    if not refused:
        return None
    return _refusal_sentence("a fairer candidate", refused, info, info["worst_group_accuracy"], floor_standard_errors)


def _refusal_sentence(what: str, refused: dict, info: dict, reference_wga: float, floor_standard_errors: float) -> str:
    """`what` (τ, strength, WGA from `reference_wga`) fails these limits, by how much, and the rows that would let
    it pass the floor (`_refusal`)."""
    parts = [f"{what}, τ = {format_threshold(refused['threshold'], 3)} at strength {refused['strength']:g} "
             f"(worst-group accuracy {_percent(reference_wga)} → "
             f"{_percent(refused['worst_group_accuracy'])}), fails the {' and the '.join(refused['limits'])}"]
    if "accuracy floor" in refused["limits"]:
        parts.append(f"its accuracy change is {100 * refused['accuracy_change']:+.2f} ± "
                     f"{100 * refused['accuracy_standard_error']:.2f} points, and {floor_standard_errors:g} standard "
                     f"errors below it is {100 * (refused['accuracy_bound'] - info['accuracy_off']):+.2f}, under the "
                     f"floor's {-100 * (refused['max_accuracy_drop'] or 0.0):+.2f}")
    if "EOD ceiling" in refused["limits"]:
        parts.append(f"it raises EOD {_percent(info['equalized_odds_difference_off'])} → "
                     f"{_percent(refused['equalized_odds_difference'])}")
    closest = refused.get("closest")
    if closest is not None:
        which = ("it" if (closest["threshold"], closest["strength"]) == (refused["threshold"], refused["strength"])
                 else f"τ = {format_threshold(closest['threshold'], 3)} at strength {closest['strength']:g} "
                      f"(worst-group accuracy {_percent(closest['worst_group_accuracy'])}, accuracy change "
                      f"{100 * closest['accuracy_change']:+.2f} points), which fails the floor alone,")
        parts.append(f"{which} would pass the floor on about {refused['rows_needed']:.0f} held-out rows at the same "
                     "accuracy change: more held-out rows (a larger eval_dataset, or lora_cross_fit=True, which "
                     "selects on all of it where half of it trains the LoRA; without one, a larger "
                     "detector_holdout_fraction) let such a correction through, a looser max_accuracy_drop or "
                     "floor_standard_errors too, at the risk the floor guards against")
    return "; ".join(parts)


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %" if math.isfinite(value) else "n/a"


def searched_strengths(args, configured_strength: float) -> tuple:
    """The strengths α the selection searches under these `FairTrainingArguments`: every one of `STRENGTHS` for
    threshold_selection 'auto', else the configured one."""
    return STRENGTHS if args.threshold_selection == "auto" else (float(configured_strength),)


def select_with_arguments(args, logits_off: np.ndarray, logits_on: dict, risk, labels, groups, *,
                          configured_tau: float, configured_strength: float,
                          weights: Optional[np.ndarray] = None) -> dict:
    """`select_correction` with its limits and search read from `FairTrainingArguments` (threshold_selection, the
    floor and its margin, the EOD ceiling, the τ and majority-gate bounds): FairTrainer's stage 5 and an offline
    replay of it on saved passes (benchmarks/reselect.py) both call this. `logits_on` holds at least the strengths
    `searched_strengths` names. 'none' keeps the configured (τ, α) when admissible, else the adapter goes off."""
    strengths = searched_strengths(args, configured_strength)
    fixed = args.threshold_selection == "none"
    return select_correction(logits_off, {a: logits_on[a] for a in strengths}, risk, labels, groups,
                             configured_tau=float(configured_tau), max_accuracy_drop=args.resolved_max_accuracy_drop(),
                             max_eod_increase=args.resolved_max_eod_increase(),
                             floor_standard_errors=args.floor_standard_errors,
                             min_threshold=args.min_selected_threshold,
                             max_majority_gate_rate=args.resolved_max_majority_gate_rate(),
                             taus=(float(configured_tau),) if fixed else None, keep_if_admissible=fixed,
                             tie_break=args.selection_tie_break, weights=weights,
                             tie_break_standard_errors=args.tie_break_standard_errors,
                             tie_break_max_majority_gate_rate=args.resolved_tie_break_max_majority_gate_rate(),
                             floor_admits_harmless=args.floor_admits_harmless,
                             accuracy_gain_beyond_noise=args.accuracy_gain_beyond_noise)


def paired_change(pred: np.ndarray, pred_off: np.ndarray, labels: np.ndarray,
                  weights: Optional[np.ndarray] = None) -> tuple[float, float]:
    """(accuracy change against the adapter off, its standard error) on the same rows: the mean of the per-row
    difference d = [pred right] − [off right] ∈ {−1, 0, 1}, and std(d) / √n. Rows the correction does not change add
    nothing to either, so a targeted correction is measured as precisely as its few changed rows allow. With
    `weights`, the weighted mean and its standard error √(Σ w²(d − d̄)² · n/(n − 1)) / Σ w (the same at equal
    weights)."""
    d = (pred == labels).astype(np.float64) - (pred_off == labels).astype(np.float64)
    n = len(d)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if n < 2:
        return (float(d.mean()) if n else 0.0), 0.0
    mean = float(np.average(d, weights=w))
    return mean, float(np.sqrt((w ** 2 * (d - mean) ** 2).sum() * n / (n - 1)) / w.sum())


def mixture_weights(labels: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-row weights for `rows` (positions into `labels` / `groups`) under which their weighted mean estimates the
    mean over all rows: each (class × group) cell weighs its share of all rows, spread over its rows in `rows`
    (N_cell / n_cell each). The selection uses it when it sees more of some cells than others (`selection_rows`)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    cells = labels.astype(np.int64) * (int(groups.max(initial=0)) + 2) + (groups + 1)
    everywhere = dict(zip(*np.unique(cells, return_counts=True)))
    chosen = cells[np.asarray(rows, dtype=np.int64)]
    here = dict(zip(*np.unique(chosen, return_counts=True)))
    return np.array([everywhere[c] / here[c] for c in chosen], dtype=np.float64)


def pareto_frontier(rows: list[dict], rank=None) -> list[dict]:
    """The rows no other row matches or beats on both accuracy and worst-group accuracy (a row with another's
    accuracy and WGA, or less of one and no more of the other, is left out), by accuracy descending. Of rows equal
    on both, the one `rank` puts highest (the selection's own order, so the chosen row is the one listed), else the
    one with the lower worst-group loss."""
    if rank is None:
        rank = lambda r: _finite(-r.get("worst_group_loss", math.nan))  # noqa: E731
    ordered = sorted(sorted(rows, key=rank, reverse=True),  # stable: within equal ACC and WGA, rank order stays
                     key=lambda r: (-r["accuracy"], -_finite(r["worst_group_accuracy"])))
    frontier, best_wga = [], -math.inf
    for row in ordered:
        wga = _finite(row["worst_group_accuracy"])
        if wga > best_wga or not frontier:
            frontier.append({k: row[k] for k in ("threshold", "strength", "accuracy", "worst_group_accuracy",
                                                 "equalized_odds_difference", "worst_group_loss", "gate_rate",
                                                 "majority_gate_rate")
                             if k in row})
            best_wga = wga
    return frontier


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def detector_blind(detector_stats: dict, min_detector_auc: float, setting: Optional[str] = None) -> Optional[str]:
    """The reason to switch the adapter off when the detector cannot find the group, or None.

    The held-out detector AUC (rows the detector never trained on) below `min_detector_auc` means its risk barely
    orders minority above majority: whatever τ, the gate fires on about as many majority rows as minority rows. The
    AUC judged is the one among rows of the same class (`detector_auc_within_class`) where the rows give one, else
    the one across classes: when the group is correlated with the class, a risk that follows the class alone ranks
    the minority high across classes but tells no one apart within a class, so it would gate whole classes. In the
    unlabeled `setting` the AUC is against the pseudo-labels, and the reason says so."""
    def stat(key: str) -> Optional[float]:
        value = detector_stats.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    group = ("the pseudo-group (the rows the pseudo-labeler marked; the AUCs are against its marks)"
             if setting == "unlabeled" else "the group")
    within, across = stat("detector_auc_within_class"), stat("detector_auc")
    auc = within if within is not None else across
    if auc is not None:
        if auc >= min_detector_auc:
            return None
        probe = stat("probe_auc_within_class" if within is not None else "probe_auc")
        reason = (f"the bias detector cannot find {group}: held-out AUC "
                  f"{'among rows of the same class ' if within is not None else ''}{auc:.3f} < min_detector_auc "
                  f"{min_detector_auc:g} (a logistic probe on the same features reaches "
                  f"{math.nan if probe is None else probe:.3f})")
        if within is not None and across is not None and across >= min_detector_auc:
            reason += (f"; its AUC across classes, {across:.3f}, comes from the group's correlation with the class: "
                       "the risk follows the class, not the group")
        return reason
    # no held-out rows: whether the group is visible at all, by the probe cross-validated on the labelled rows
    cross_within, cross = stat("probe_auc_cross_validated_within_class"), stat("probe_auc_cross_validated")
    judged = cross_within if cross_within is not None else cross
    if judged is not None and judged < min_detector_auc:
        rows = detector_stats.get("probe_cross_validated_rows")
        return (f"no labelled rows could be held out from the detector (fewer than {3 * MIN_HOLDOUT_PER_GROUP} in a "
                f"group), and a logistic probe cross-validated on the {rows} labelled rows finds {group} with an AUC"
                f"{' among rows of the same class' if cross_within is not None else ''} of only {judged:.3f} < "
                f"min_detector_auc {min_detector_auc:g}: it is not visible in the detector's input")
    return None
