"""Tests for fairnet_peft.metrics: agreement with fairlearn 0.15 and the AIF360 formulas, edge
cases, the Trainer hook, the Markdown table and the offline `evaluate` module."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from fairlearn import metrics as flm
from sklearn.metrics import accuracy_score
from transformers import EvalPrediction

from fairnet_peft import metrics as M
from fairnet_peft.metrics import EmptyGroupWarning

SEEDS = [0, 1, 2, 3, 4]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(seed, n=800, k=2, n_groups=2, unknown=0.0):
    """Imbalanced groups; group 0 is predicted better than the others, so gaps are non-zero."""
    rng = np.random.default_rng(seed)
    p_group = np.full(n_groups, 0.3 / max(n_groups - 1, 1))
    p_group[0] = 0.7 if n_groups > 1 else 1.0
    s = rng.choice(n_groups, size=n, p=p_group)
    y = rng.integers(0, k, size=n)
    p_correct = np.where(s == 0, 0.9, 0.65) - 0.1 * (y == k - 1)
    correct = rng.random(n) < p_correct
    p = np.where(correct, y, (y + rng.integers(1, k, size=n)) % k)
    if unknown:
        s = np.where(rng.random(n) < unknown, -1, s)
    return y, p, s


def fl_cells(y, p, s):
    return flm.MetricFrame(
        metrics={"accuracy": accuracy_score, "count": flm.count},
        y_true=y,
        y_pred=p,
        sensitive_features={"y": y, "s": s},
    )


def rates_by_mask(y, p, mask):
    """TPR and FPR of rows in `mask`, written out independently of the package."""
    tpr = np.mean(p[mask & (y == 1)] == 1)
    fpr = np.mean(p[mask & (y == 0)] == 1)
    return tpr, fpr


def aif360_average_odds_error(y, p, s, unprivileged=1):
    """AIF360 ClassificationMetric.average_odds_error: ½(|FPR_u − FPR_p| + |TPR_u − TPR_p|)."""
    tpr_u, fpr_u = rates_by_mask(y, p, s == unprivileged)
    tpr_p, fpr_p = rates_by_mask(y, p, s != unprivileged)
    return 0.5 * (abs(fpr_u - fpr_p) + abs(tpr_u - tpr_p))


def aif360_average_odds_difference(y, p, s, unprivileged=1):
    """AIF360 average_odds_difference: the *signed* ½((FPR_u − FPR_p) + (TPR_u − TPR_p))."""
    tpr_u, fpr_u = rates_by_mask(y, p, s == unprivileged)
    tpr_p, fpr_p = rates_by_mask(y, p, s != unprivileged)
    return 0.5 * ((fpr_u - fpr_p) + (tpr_u - tpr_p))


def cells_with_accuracies(spec, n=10000):
    """Rows for cells {(y, s): accuracy} of n rows each, binary labels."""
    ys, ps, ss = [], [], []
    for (y, s), acc in spec.items():
        n_ok = int(round(acc * n))
        ys += [y] * n
        ss += [s] * n
        ps += [y] * n_ok + [1 - y] * (n - n_ok)
    return np.array(ys), np.array(ps), np.array(ss)


# --------------------------------------------------------------------------------------------
# Accuracy family vs sklearn / MetricFrame
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_and_worst_class_accuracy(seed):
    y, p, _ = make_data(seed, k=3)
    assert M.accuracy(y, p) == pytest.approx(accuracy_score(y, p))
    per_class = [np.mean(p[y == c] == c) for c in range(3)]
    assert M.worst_class_accuracy(y, p) == pytest.approx(min(per_class))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 3])
def test_group_accuracies_match_metricframe(seed, k):
    y, p, s = make_data(seed, k=k, n_groups=3)
    ours = M.group_accuracies(y, p, sensitive_features=s)
    ref = fl_cells(y, p, s).by_group
    assert len(ours) == len(ref) == 3 * k
    for (yy, ss), row in ref.iterrows():
        cell = ours[f"y={yy},s={ss}"]
        assert cell["accuracy"] == pytest.approx(row["accuracy"])
        assert cell["count"] == row["count"]
    # ordered by label, then group
    assert list(ours)[:2] == ["y=0,s=0", "y=0,s=1"]

    by_group = M.group_accuracies(y, p, sensitive_features=s, by="group")
    ref_g = flm.MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=s).by_group
    assert set(by_group) == {f"s={g}" for g in ref_g.index}
    for g, acc in ref_g.items():
        assert by_group[f"s={g}"]["accuracy"] == pytest.approx(acc)
        assert by_group[f"s={g}"]["count"] == int(np.sum(s == g))


@pytest.mark.parametrize("seed", SEEDS)
def test_worst_group_accuracy_cells_and_groups(seed):
    y, p, s = make_data(seed)
    wga_cell = M.worst_group_accuracy(y, p, sensitive_features=s)
    wga_group = M.worst_group_accuracy(y, p, sensitive_features=s, by="group")
    assert wga_cell == pytest.approx(fl_cells(y, p, s).group_min()["accuracy"])
    ref_group = flm.MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=s).group_min()
    assert wga_group == pytest.approx(ref_group)
    # the data make the last label of the weak group the worst cell: strictly below the group min
    assert wga_cell < wga_group
    assert M.worst_group_accuracy(y, p, sensitive_features=s, by="cell") == wga_cell
    with pytest.raises(ValueError):
        M.worst_group_accuracy(y, p, sensitive_features=s, by="label")


@pytest.mark.parametrize("seed", SEEDS)
def test_average_accuracy_plain_and_train_weighted(seed):
    y, p, s = make_data(seed)
    plain = M.average_accuracy(y, p, sensitive_features=s)
    assert plain == pytest.approx(fl_cells(y, p, s).by_group["accuracy"].mean())
    assert plain != pytest.approx(M.accuracy(y, p), abs=1e-3)  # not plain row accuracy

    # Weighting by the evaluation split's own cell shares gives back row accuracy.
    own = M.cell_proportions(y, sensitive_features=s)
    assert sum(own.values()) == pytest.approx(1.0)
    assert M.average_accuracy(y, p, sensitive_features=s, weighting="train", train_proportions=own) == pytest.approx(
        M.accuracy(y, p)
    )

    # Explicit training proportions (Waterbirds style), keyed by string or by (y, s) tuple, any scale.
    train = {"y=0,s=0": 0.70, "y=0,s=1": 0.05, "y=1,s=0": 0.05, "y=1,s=1": 0.20}
    accs = {k: v["accuracy"] for k, v in M.group_accuracies(y, p, sensitive_features=s).items()}
    expected = sum(train[c] * accs[c] for c in train)
    assert M.average_accuracy(y, p, sensitive_features=s, weighting="train", train_proportions=train) == pytest.approx(
        expected
    )
    as_tuples = {(0, 0): 700, (0, 1): 50, (1, 0): 50, (1, 1): 200}
    assert M.average_accuracy(
        y, p, sensitive_features=s, weighting="train", train_proportions=as_tuples
    ) == pytest.approx(expected)

    with pytest.raises(ValueError, match="y=1,s=1"):
        M.average_accuracy(y, p, sensitive_features=s, weighting="train", train_proportions={"y=0,s=0": 1.0,
                                                                                             "y=0,s=1": 1.0,
                                                                                             "y=1,s=0": 1.0})
    with pytest.raises(ValueError):
        M.average_accuracy(y, p, sensitive_features=s, weighting="train")


# --------------------------------------------------------------------------------------------
# Fairness differences vs fairlearn and AIF360
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_groups", [2, 3])
def test_differences_match_fairlearn(seed, n_groups):
    y, p, s = make_data(seed, n_groups=n_groups)
    for agg in ("mean", "worst_case"):
        ours = M.equalized_odds_difference(y, p, sensitive_features=s, agg=agg)
        assert ours == pytest.approx(flm.equalized_odds_difference(y, p, sensitive_features=s, agg=agg))
    assert M.equal_opportunity_difference(y, p, sensitive_features=s) == pytest.approx(
        flm.equal_opportunity_difference(y, p, sensitive_features=s)
    )
    assert M.demographic_parity_difference(y, p, sensitive_features=s) == pytest.approx(
        flm.demographic_parity_difference(y, p, sensitive_features=s)
    )
    # default is the paper's mean EOD, not fairlearn's worst-case default
    mean, worst = (M.equalized_odds_difference(y, p, sensitive_features=s, agg=a) for a in ("mean", "worst_case"))
    assert M.equalized_odds_difference(y, p, sensitive_features=s) == mean
    assert mean < worst
    with pytest.raises(ValueError):
        M.equalized_odds_difference(y, p, sensitive_features=s, agg="max")


@pytest.mark.parametrize("seed", SEEDS)
def test_eod_mean_is_aif360_average_odds_error(seed):
    y, p, s = make_data(seed)
    assert M.equalized_odds_difference(y, p, sensitive_features=s) == pytest.approx(
        aif360_average_odds_error(y, p, s)
    )


def test_eod_takes_abs_inside_not_outside():
    # group 0: TPR 1, FPR 0; group 1: TPR .5, FPR .5 -> ΔTPR and ΔFPR have opposite signs.
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    p = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    s = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert aif360_average_odds_difference(y, p, s) == pytest.approx(0.0)  # signed version cancels
    assert M.equalized_odds_difference(y, p, sensitive_features=s) == pytest.approx(0.5)
    assert M.equalized_odds_difference(y, p, sensitive_features=s, agg="worst_case") == pytest.approx(0.5)


def test_paper_notebook_erm_check():
    # fairnet-method.md §9: CelebA ERM cells (y = Male, s = Blond) -> EOD .1088, EOpp .1888, WGA .7667
    y, p, s = cells_with_accuracies({(0, 0): 0.9568, (1, 0): 0.9555, (0, 1): 0.9855, (1, 1): 0.7667})
    assert M.equalized_odds_difference(y, p, sensitive_features=s) == pytest.approx(0.5 * (0.1888 + 0.0287))
    assert M.equalized_odds_difference(y, p, sensitive_features=s, agg="worst_case") == pytest.approx(0.1888)
    assert M.equal_opportunity_difference(y, p, sensitive_features=s) == pytest.approx(0.1888)
    assert M.worst_group_accuracy(y, p, sensitive_features=s) == pytest.approx(0.7667)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_is_macro_one_vs_rest(seed):
    y, p, s = make_data(seed, k=3)
    with pytest.raises(ValueError):  # why the rule is needed: fairlearn is binary-only here
        flm.equalized_odds_difference(y, p, sensitive_features=s)
    for agg in ("mean", "worst_case"):
        ref = np.mean(
            [flm.equalized_odds_difference(y == c, p == c, sensitive_features=s, agg=agg) for c in range(3)]
        )
        assert M.equalized_odds_difference(y, p, sensitive_features=s, agg=agg) == pytest.approx(ref)
    ref_eopp = np.mean([flm.equal_opportunity_difference(y == c, p == c, sensitive_features=s) for c in range(3)])
    assert M.equal_opportunity_difference(y, p, sensitive_features=s) == pytest.approx(ref_eopp)
    ref_dp = np.mean([flm.demographic_parity_difference(y == c, p == c, sensitive_features=s) for c in range(3)])
    assert M.demographic_parity_difference(y, p, sensitive_features=s) == pytest.approx(ref_dp)


def test_labels_fixes_class_set():
    y, p, s = make_data(0, k=2)
    # as a binary problem, EOpp is the class-1 TPR gap ...
    binary = M.equal_opportunity_difference(y, p, sensitive_features=s)
    assert binary == pytest.approx(flm.equal_opportunity_difference(y, p, sensitive_features=s))
    # ... inside a 3-class problem whose batch lacks class 2, it is the macro OvR over defined classes
    ovr = M.equal_opportunity_difference(y, p, sensitive_features=s, labels=[0, 1, 2])
    ref = np.mean([flm.equal_opportunity_difference(y == c, p == c, sensitive_features=s) for c in (0, 1)])
    assert ovr == pytest.approx(ref)
    assert ovr != pytest.approx(binary)
    with pytest.raises(ValueError):
        M.equal_opportunity_difference(y, p, sensitive_features=s, labels=[0])


def test_non_01_binary_labels_use_larger_value_as_positive():
    y, p, s = make_data(3)
    y2, p2 = np.where(y == 1, 1, -1), np.where(p == 1, 1, -1)
    assert M.equalized_odds_difference(y2, p2, sensitive_features=s, agg="worst_case") == pytest.approx(
        flm.equalized_odds_difference(y2, p2, sensitive_features=s)
    )
    assert M.equal_opportunity_difference(y2, p2, sensitive_features=s) == pytest.approx(
        M.equal_opportunity_difference(y, p, sensitive_features=s)
    )


# --------------------------------------------------------------------------------------------
# Inputs and edge cases
# --------------------------------------------------------------------------------------------


def test_torch_inputs_equal_numpy():
    y, p, s = make_data(1, unknown=0.1)
    ty, tp, ts = torch.tensor(y), torch.tensor(p), torch.tensor(s)
    tp_grad = tp.float().requires_grad_(True)
    for fn in (M.worst_group_accuracy, M.equalized_odds_difference, M.demographic_parity_difference,
               M.equal_opportunity_difference, M.average_accuracy):
        assert fn(ty, tp, sensitive_features=ts) == fn(y, p, sensitive_features=s)
    assert M.accuracy(ty, tp_grad) == M.accuracy(y, p)
    assert M.group_accuracies(ty, tp, sensitive_features=ts) == M.group_accuracies(y, p, sensitive_features=s)
    assert M.gate_rates(torch.tensor(p, dtype=torch.bool), sensitive_features=ts) == M.gate_rates(
        p, sensitive_features=s
    )
    risk = torch.rand(len(y), generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert M.detector_rates(risk, sensitive_features=ts) == M.detector_rates(
        risk.float().numpy(), sensitive_features=s
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_unknown_sensitive_rows_are_excluded(seed):
    y, p, s = make_data(seed, unknown=0.25)
    known = s != -1
    assert (~known).sum() > 100
    ours = M.group_accuracies(y, p, sensitive_features=s)
    assert not any("s=-1" in key for key in ours)
    assert sum(c["count"] for c in ours.values()) == known.sum()
    for agg in ("mean", "worst_case"):
        assert M.equalized_odds_difference(y, p, sensitive_features=s, agg=agg) == pytest.approx(
            flm.equalized_odds_difference(y[known], p[known], sensitive_features=s[known], agg=agg)
        )
    assert M.worst_group_accuracy(y, p, sensitive_features=s) == pytest.approx(
        fl_cells(y[known], p[known], s[known]).group_min()["accuracy"]
    )
    # None / NaN also mean "unknown"
    s_obj = np.array([None if v == -1 else int(v) for v in s], dtype=object)
    s_nan = np.where(known, s, np.nan)
    for alt in (s_obj, s_nan):
        assert M.worst_group_accuracy(y, p, sensitive_features=alt) == M.worst_group_accuracy(
            y, p, sensitive_features=s
        )
    # so do the texts the data loaders read as an empty cell ("", "?", "NA", "unknown", ...), in str and object
    # arrays alike, as with `load_group_dataset`; any other text is a group of its own
    names = np.array(["men", "women", "other"])[np.maximum(s, 0)]
    blanks = np.array(["", " ", "?", "NA", "n/a", "Unknown", "nan", "None"])
    s_text = np.where(known, names, blanks[np.arange(len(s)) % len(blanks)])
    expected = M.group_accuracies(y, p, sensitive_features=np.where(known, names, None).astype(object))
    for alt in (s_text, s_text.astype(object), s_text.tolist()):
        got = M.group_accuracies(y, p, sensitive_features=alt)
        assert got == expected and sum(c["count"] for c in got.values()) == known.sum()
    assert "y=0,s=-" in M.group_accuracies(y, p, sensitive_features=np.where(known, names, "-"))


def test_single_group_gives_zero_difference():
    y, p, _ = make_data(2)
    s = np.zeros_like(y)
    for agg in ("mean", "worst_case"):
        assert M.equalized_odds_difference(y, p, sensitive_features=s, agg=agg) == 0.0
        assert flm.equalized_odds_difference(y, p, sensitive_features=s, agg=agg) == 0.0
    assert M.demographic_parity_difference(y, p, sensitive_features=s) == 0.0
    assert M.equal_opportunity_difference(y, p, sensitive_features=s) == 0.0
    assert M.worst_group_accuracy(y, p, sensitive_features=s, by="group") == pytest.approx(M.accuracy(y, p))
    # a single known group among unknown rows behaves the same
    s_partial = np.where(np.arange(len(y)) % 2 == 0, 0, -1)
    assert M.equalized_odds_difference(y, p, sensitive_features=s_partial) == 0.0


def test_empty_cell_is_nan_warned_and_skipped():
    y, p, s = make_data(4)
    drop = (y == 1) & (s == 1)  # remove every row of cell y=1,s=1
    y, p, s = y[~drop], p[~drop], s[~drop]
    with pytest.warns(EmptyGroupWarning, match="y=1,s=1"):
        cells = M.group_accuracies(y, p, sensitive_features=s)
    assert math.isnan(cells["y=1,s=1"]["accuracy"]) and cells["y=1,s=1"]["count"] == 0
    finite = [c["accuracy"] for c in cells.values() if not math.isnan(c["accuracy"])]
    assert len(finite) == 3
    with pytest.warns(EmptyGroupWarning):
        wga = M.worst_group_accuracy(y, p, sensitive_features=s)
    assert wga == pytest.approx(min(finite))
    with pytest.warns(EmptyGroupWarning):
        avg = M.average_accuracy(y, p, sensitive_features=s)
    assert avg == pytest.approx(np.mean(finite))
    # TPR of s=1 is undefined and left out: ΔTPR = 0, EOD = ½ΔFPR. fairlearn scores it 0 instead.
    fpr0, fpr1 = (np.mean(p[(s == g) & (y == 0)] == 1) for g in (0, 1))
    with pytest.warns(EmptyGroupWarning):
        eod = M.equalized_odds_difference(y, p, sensitive_features=s)
    assert eod == pytest.approx(0.5 * abs(fpr0 - fpr1))
    assert eod != pytest.approx(flm.equalized_odds_difference(y, p, sensitive_features=s, agg="mean"))
    assert issubclass(EmptyGroupWarning, UserWarning)


def test_no_known_rows_gives_nan_with_warning():
    y, p, _ = make_data(0, n=50)
    s = -np.ones_like(y)
    with pytest.warns(EmptyGroupWarning):
        assert math.isnan(M.worst_group_accuracy(y, p, sensitive_features=s))
    with pytest.warns(EmptyGroupWarning):
        assert math.isnan(M.equalized_odds_difference(y, p, sensitive_features=s))


def test_one_known_group_gives_zero_gaps_with_a_warning_that_says_why():
    """As fairlearn, the gaps between one group and itself are 0; unlike fairlearn, the caller is told."""
    y, p, _ = make_data(0, n=50)
    s = np.where(np.arange(len(y)) % 2 == 0, 1, -1)  # the other rows' group is unknown
    with pytest.warns(EmptyGroupWarning, match=r"one sensitive group among the known rows \(s=1\): every difference"):
        assert M.equalized_odds_difference(y, p, sensitive_features=s) == 0.0
    assert flm.equalized_odds_difference(y[s == 1], p[s == 1], sensitive_features=s[s == 1]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.accuracy(y, p)  # label-only metrics have no groups to compare


def test_no_warning_when_all_cells_present():
    y, p, s = make_data(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.fairness_summary(y, p, sensitive_features=s)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        M.worst_group_accuracy([0, 1], [0, 1, 1], sensitive_features=[0, 1])
    with pytest.raises(ValueError):
        M.worst_group_accuracy([0, 1], [0, 1], sensitive_features=[0, 1, 1])


# --------------------------------------------------------------------------------------------
# Gate and detector audit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_gate_rates_match_selection_rate(seed):
    rng = np.random.default_rng(seed + 100)
    _, _, s = make_data(seed, n_groups=3, unknown=0.1)
    gates = (rng.random(len(s)) < np.where(s == 1, 0.8, 0.1)).astype(int)
    known = s != -1
    ref = flm.MetricFrame(metrics=flm.selection_rate, y_true=gates[known], y_pred=gates[known],
                          sensitive_features=s[known]).by_group
    ours = M.gate_rates(gates, sensitive_features=s)
    assert set(ours) == {"s=0", "s=1", "s=2"}
    for g, rate in ref.items():
        assert ours[f"s={g}"] == pytest.approx(rate)
    assert ours["s=1"] > 0.6 > 0.2 > ours["s=0"]
    # (N, n_adapters): column 0; booleans
    two = np.stack([gates, 1 - gates], axis=1)
    assert M.gate_rates(two, sensitive_features=s) == ours
    assert M.gate_rates(gates.astype(bool), sensitive_features=s) == ours


@pytest.mark.parametrize("seed", SEEDS)
def test_detector_rates_match_fairlearn(seed):
    rng = np.random.default_rng(seed + 100)
    _, _, s = make_data(seed, unknown=0.1)
    risk = np.clip(rng.normal(np.where(s == 1, 0.7, 0.3), 0.2), 0, 1)
    known = s != -1
    for tau in (0.3, 0.5, 0.8):
        gate = (risk > tau).astype(int)
        out = M.detector_rates(risk, sensitive_features=s, threshold=tau)
        tpr = flm.true_positive_rate(s[known], gate[known])
        fpr = flm.false_positive_rate(s[known], gate[known])
        assert out["tpr"] == pytest.approx(tpr)
        assert out["fpr"] == pytest.approx(fpr)
        assert out["tpr_over_fpr"] == (pytest.approx(tpr / fpr) if fpr > 0 else math.inf)
    assert M.detector_rates(risk, sensitive_features=s, threshold=0.5)["tpr_over_fpr"] > 2


def test_detector_threshold_is_strict_and_edge_ratios():
    s = np.array([1, 1, 0, 0, -1])
    risk = np.array([0.5, 0.9, 0.5, 0.1, 0.99])
    out = M.detector_rates(risk, sensitive_features=s, threshold=0.5)
    assert out == {"tpr": 0.5, "fpr": 0.0, "tpr_over_fpr": math.inf}  # 0.5 is not > 0.5
    off = M.detector_rates(risk, sensitive_features=s, threshold=1.0)
    assert off["tpr"] == 0.0 and off["fpr"] == 0.0 and math.isnan(off["tpr_over_fpr"])
    gate = np.array([1, 0, 1, 0, 1])  # hard gates pass through the 0.5 threshold
    assert M.detector_rates(gate, sensitive_features=s) == {"tpr": 0.5, "fpr": 0.5, "tpr_over_fpr": 1.0}
    with pytest.raises(ValueError):
        M.detector_rates(risk, sensitive_features=np.array([1, 2, 0, 0, 1]))
    with pytest.warns(EmptyGroupWarning):
        assert math.isnan(M.detector_rates(risk[:2], sensitive_features=s[:2])["fpr"])


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_accuracy_matches_binomial_width():
    y, p, _ = make_data(0, n=2000)
    ci = M.bootstrap_ci(M.accuracy, y, p, n_resamples=1000, seed=0)
    acc = M.accuracy(y, p)
    assert ci["point"] == acc and ci["low"] < acc < ci["high"]
    se = math.sqrt(acc * (1 - acc) / len(y))
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert ci["n_resamples"] == 1000 and ci["confidence"] == 0.95


def test_bootstrap_wga_agrees_with_fairlearn_and_is_reproducible():
    y, p, s = make_data(1, n=2000)
    ci = M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, n_resamples=1000, seed=0)
    small = M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, n_resamples=200, seed=0)
    assert small == M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, n_resamples=200, seed=0)
    assert small != M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, n_resamples=200, seed=1)
    assert ci["low"] < ci["point"] < ci["high"]
    # the worst cell (y=1, s=1) dominates: width ≈ binomial interval of that cell
    worst = M.group_accuracies(y, p, sensitive_features=s)["y=1,s=1"]
    assert worst["accuracy"] == ci["point"]
    se = math.sqrt(ci["point"] * (1 - ci["point"]) / worst["count"])
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    # fairlearn's own bootstrap of the same statistic (few resamples: it is slow) lands close by
    mf = flm.MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features={"y": y, "s": s},
                         n_boot=40, ci_quantiles=[0.025, 0.975], random_state=0)
    fl_low, fl_high = mf.group_min_ci()
    assert ci["low"] == pytest.approx(fl_low, abs=0.03)
    assert ci["high"] == pytest.approx(fl_high, abs=0.03)
    # keyword arguments reach the metric; a narrower confidence gives a narrower interval
    by_group = M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, by="group", n_resamples=100)
    assert by_group["point"] == M.worst_group_accuracy(y, p, sensitive_features=s, by="group")
    narrow = M.bootstrap_ci(M.worst_group_accuracy, y, p, sensitive_features=s, confidence=0.5, n_resamples=300)
    assert narrow["high"] - narrow["low"] < ci["high"] - ci["low"]


def test_bootstrap_eod_skips_nan_resamples():
    # a 2-row minority cell is often absent from a resample; those resamples are dropped, no warning
    y, p, s = make_data(2, n=300)
    tiny = np.flatnonzero((s == 1) & (y == 1))[2:]
    keep = np.setdiff1d(np.arange(len(y)), tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ci = M.bootstrap_ci(M.worst_group_accuracy, y[keep], p[keep], sensitive_features=s[keep], n_resamples=200)
    assert ci["n_resamples"] == 200  # cells missing in a resample are skipped, value still finite
    assert ci["low"] <= ci["point"] <= ci["high"] or ci["point"] in (ci["low"], ci["high"])


# --------------------------------------------------------------------------------------------
# Trainer hook
# --------------------------------------------------------------------------------------------


def _binary_logits(y, p, rng):
    """(N, 2) logits whose argmax is p."""
    base = rng.normal(size=(len(p), 2))
    base[np.arange(len(p)), p] += 10
    return base


def test_compute_metrics_full_contract():
    rng = np.random.default_rng(0)
    y, p, s = make_data(0, unknown=0.2)
    logits = _binary_logits(y, p, rng)
    risk = np.clip(rng.normal(np.where(s == 1, 0.7, 0.3), 0.2), 0, 1)
    gate = (risk > 0.6).astype(np.int64)
    fn = M.make_compute_metrics(threshold=0.5)
    out = fn(EvalPrediction(predictions=(logits, risk, gate), label_ids=(y, s)))

    assert out["accuracy"] == pytest.approx(accuracy_score(y, p))  # all rows, unknown included
    assert out["worst_class_accuracy"] == pytest.approx(min(np.mean(p[y == c] == c) for c in (0, 1)))
    known = s != -1
    assert out["worst_group_accuracy"] == pytest.approx(fl_cells(y[known], p[known], s[known]).group_min()["accuracy"])
    assert out["equalized_odds_difference"] == pytest.approx(aif360_average_odds_error(y[known], p[known], s[known]))
    assert out["equalized_odds_difference_worst_case"] == pytest.approx(
        flm.equalized_odds_difference(y[known], p[known], sensitive_features=s[known])
    )
    for yy in (0, 1):
        for ss in (0, 1):
            mask = (y == yy) & (s == ss)
            assert out[f"acc_y{yy}_s{ss}"] == pytest.approx(np.mean(p[mask] == yy))
    # gate rates come from the gate (τ=0.6 here), the detector from risk > threshold (0.5)
    assert out["gate_rate"] == pytest.approx(gate.mean())
    assert out["gate_rate_s0"] == pytest.approx(gate[s == 0].mean())
    assert out["gate_rate_s1"] == pytest.approx(gate[s == 1].mean())
    assert out["detector_tpr"] == pytest.approx(np.mean(risk[s == 1] > 0.5))
    assert out["detector_fpr"] == pytest.approx(np.mean(risk[s == 0] > 0.5))
    assert out["detector_tpr_over_fpr"] == pytest.approx(out["detector_tpr"] / out["detector_fpr"])
    assert out["detector_tpr"] != pytest.approx(out["gate_rate_s1"])
    assert all(isinstance(v, float) for v in out.values())
    json.dumps(out)  # loggable


def test_compute_metrics_single_logit_and_adapter_columns():
    rng = np.random.default_rng(1)
    y, p, s = make_data(1)
    logit = np.where(p == 1, 1.0, -1.0) * rng.uniform(0.1, 3, len(p))
    risk = rng.uniform(size=(len(p), 3))
    gate = (rng.uniform(size=(len(p), 3)) > 0.5).astype(int)
    fn = M.make_compute_metrics()
    out_1d = fn(EvalPrediction(predictions=(logit, risk, gate), label_ids=(y.astype(np.float32), s)))
    out_2d = fn(EvalPrediction(predictions=(logit[:, None], risk[:, 0], gate[:, 0]), label_ids=(y, s)))
    assert out_1d == out_2d
    assert out_1d["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert out_1d["gate_rate"] == pytest.approx(gate[:, 0].mean())
    assert out_1d["detector_tpr"] == pytest.approx(np.mean(risk[s == 1, 0] > 0.5))
    # a logit of exactly 0 is sigmoid 0.5: predicted 0
    zero = fn(EvalPrediction(predictions=np.zeros(4), label_ids=np.array([0, 0, 1, 1])))
    assert zero["accuracy"] == 0.5


def test_compute_metrics_without_sensitive_labels():
    rng = np.random.default_rng(2)
    y, p, s = make_data(2)
    logits = _binary_logits(y, p, rng)
    gate = (rng.random(len(y)) < 0.3).astype(int)
    risk = rng.random(len(y))
    fn = M.make_compute_metrics()
    expected = {"accuracy", "worst_class_accuracy", "gate_rate"}
    cases = [
        EvalPrediction(predictions=(logits, risk, gate), label_ids=y),
        EvalPrediction(predictions=(logits, risk, gate), label_ids=(y, -np.ones_like(y))),
        EvalPrediction(predictions=(logits, risk, gate), label_ids=(y, None)),
    ]
    for ev in cases:
        out = fn(ev)
        assert set(out) == expected
        assert out["gate_rate"] == pytest.approx(gate.mean())
    assert set(fn(EvalPrediction(predictions=logits, label_ids=y))) == {"accuracy", "worst_class_accuracy"}
    # risk only: gate = risk > threshold
    out = M.make_compute_metrics(threshold=0.8)(EvalPrediction(predictions=(logits, risk), label_ids=(y, s)))
    assert out["gate_rate"] == pytest.approx(np.mean(risk > 0.8))
    # use_sensitive=False ignores labels that are there
    blind = M.make_compute_metrics(use_sensitive=False)(
        EvalPrediction(predictions=(logits, risk, gate), label_ids=(y, s)))
    assert set(blind) == expected


def test_compute_metrics_multiclass_and_options():
    rng = np.random.default_rng(3)
    y, p, s = make_data(3, k=3)
    logits = rng.normal(size=(len(y), 3))
    logits[np.arange(len(y)), p] += 10
    out = M.make_compute_metrics(per_cell=False)(EvalPrediction(predictions=torch.tensor(logits),
                                                                 label_ids=(torch.tensor(y), torch.tensor(s))))
    assert not any(k.startswith("acc_y") for k in out)
    assert out["equalized_odds_difference"] == pytest.approx(
        np.mean([flm.equalized_odds_difference(y == c, p == c, sensitive_features=s, agg="mean") for c in range(3)])
    )
    full = M.make_compute_metrics()(EvalPrediction(predictions=logits, label_ids=(y, s)))
    assert sum(k.startswith("acc_y") for k in full) == 6
    # -100 labels (ignore index) are dropped
    y_pad = np.concatenate([y, [-100, -100]])
    s_pad = np.concatenate([s, [0, 1]])
    logits_pad = np.concatenate([logits, np.zeros((2, 3))])
    assert M.make_compute_metrics()(EvalPrediction(predictions=logits_pad, label_ids=(y_pad, s_pad))) == full


def test_evaluate_predictions_drops_ignore_index_rows_and_prefixes():
    rng = np.random.default_rng(6)
    y, p, s = make_data(6, unknown=0.1)
    logits, risk = _binary_logits(y, p, rng), rng.random(len(y))
    gate = (rng.random(len(y)) < 0.3).astype(int)
    kwargs = dict(sensitive_features=s, gates=gate, risk=risk, threshold=0.4)
    clean = M.evaluate_predictions(logits, y, **kwargs)
    # -100 rows carry garbage everywhere else (even a group and a gate): they change nothing
    pad = lambda a, v: np.concatenate([a, np.full((3,) + a.shape[1:], v, dtype=a.dtype)])  # noqa: E731
    padded = M.evaluate_predictions(pad(logits, 50.0), pad(y, -100).astype(np.float32), sensitive_features=pad(s, 1),
                                    gates=pad(gate, 1), risk=pad(risk, 0.99), threshold=0.4)
    assert padded == clean
    assert clean["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert clean["detector_tpr"] == pytest.approx(np.mean(risk[s == 1] > 0.4))
    assert clean["gate_rate_s1"] == pytest.approx(gate[s == 1].mean())
    prefixed = M.evaluate_predictions(logits, y, prefix="test_", **kwargs)
    assert prefixed == {f"test_{k}": v for k, v in clean.items()}
    assert "**test** split" in M.render_fairness_table(prefixed, split="test")


def test_evaluate_predictions_unknown_groups():
    rng = np.random.default_rng(7)
    y, p, s = make_data(7, unknown=0.25)
    logits, gate = _binary_logits(y, p, rng), (rng.random(len(y)) < 0.4).astype(int)
    out = M.evaluate_predictions(logits, y, sensitive_features=s, gates=gate)
    known = s != -1
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p))  # unknown rows count here
    assert out["gate_rate"] == pytest.approx(gate.mean())
    assert out["worst_group_accuracy"] == pytest.approx(fl_cells(y[known], p[known], s[known]).group_min()["accuracy"])
    assert out["equalized_odds_difference"] == pytest.approx(
        flm.equalized_odds_difference(y[known], p[known], sensitive_features=s[known], agg="mean"))
    assert not any("s-1" in k for k in out)
    # gates only: the detector rates are those of the hard gate, whatever τ is (τ = 1 used to turn them off)
    for tau in (0.5, 1.0):
        hard = M.evaluate_predictions(logits, y, sensitive_features=s, gates=gate, threshold=tau)
        assert hard["detector_tpr"] == pytest.approx(gate[s == 1].mean()) == hard["gate_rate_s1"]
    # every group unknown (or none given): label-only keys and the overall gate rate
    for groups in (np.full_like(s, -1), None):
        assert set(M.evaluate_predictions(logits, y, sensitive_features=groups, gates=gate)) == {
            "accuracy", "worst_class_accuracy", "gate_rate"}
    # groups other than {0, 1}: gate rates per group, no detector rates
    three = M.evaluate_predictions(logits, y, sensitive_features=np.where(s == 1, 2, s), gates=gate)
    assert "gate_rate_s2" in three and not any(k.startswith("detector_") for k in three)


def test_evaluate_predictions_class_set_comes_from_the_logits_width():
    rng = np.random.default_rng(8)
    y, p, s = make_data(8, k=2)  # only classes 0 and 1 occur, but the model has 3 outputs
    logits = rng.normal(size=(len(y), 3))
    logits[np.arange(len(y)), p] += 10
    out = M.evaluate_predictions(logits, y, sensitive_features=s, per_cell=False)
    assert out["equalized_odds_difference"] == pytest.approx(np.mean(
        [flm.equalized_odds_difference(y == c, p == c, sensitive_features=s, agg="mean") for c in (0, 1)]))
    # the never-predicted class 2 is one of the three: its selection-rate spread (0) enters the macro average
    assert out["demographic_parity_difference"] == pytest.approx(np.mean(
        [flm.demographic_parity_difference(y == c, p == c, sensitive_features=s) for c in (0, 1, 2)]))
    assert out["demographic_parity_difference"] != pytest.approx(
        M.demographic_parity_difference(y, p, sensitive_features=s))
    assert out == M.fairness_summary(y, p, sensitive_features=s, labels=[0, 1, 2], per_cell=False)
    assert not any(k.startswith("acc_y") for k in out)
    # one logit per row: logit > 0 is class 1
    single = M.evaluate_predictions(np.where(p == 1, 2.0, -2.0)[:, None], y, sensitive_features=s)
    assert single == M.fairness_summary(y, p, sensitive_features=s)


def test_evaluate_predictions_gates_and_risk_present_or_absent():
    rng = np.random.default_rng(9)
    y, p, s = make_data(9)
    logits, risk = _binary_logits(y, p, rng), rng.random(len(y))
    gate = (risk > 0.7).astype(int)
    base = set(M.fairness_summary(y, p, sensitive_features=s))
    gate_keys = {"gate_rate", "gate_rate_s0", "gate_rate_s1", "detector_tpr", "detector_fpr", "detector_tpr_over_fpr"}
    assert set(M.evaluate_predictions(logits, y, sensitive_features=s)) == base
    risk_only = M.evaluate_predictions(logits, y, sensitive_features=s, risk=risk, threshold=0.7)
    gate_only = M.evaluate_predictions(logits, y, sensitive_features=s, gates=gate)
    assert set(risk_only) == set(gate_only) == base | gate_keys
    assert risk_only == gate_only  # risk > τ is that gate
    both = M.evaluate_predictions(logits, y, sensitive_features=s, gates=gate, risk=risk[:, None], threshold=0.2)
    assert both["gate_rate_s1"] == risk_only["gate_rate_s1"]  # gate rates from the gate
    assert both["detector_tpr"] == pytest.approx(np.mean(risk[s == 1] > 0.2))  # detector from risk > τ
    with pytest.raises(ValueError, match="gates has 5 rows"):
        M.evaluate_predictions(logits, y, gates=gate[:5])
    with pytest.raises(ValueError, match="labels has"):
        M.evaluate_predictions(logits[:5], y)
    with pytest.raises(ValueError, match="logits must be"):
        M.evaluate_predictions(logits[:, :, None], y)


def test_make_compute_metrics_is_evaluate_predictions():
    rng = np.random.default_rng(10)
    y, p, s = make_data(10, unknown=0.1)
    logits, risk = _binary_logits(y, p, rng), rng.random(len(y))
    gate = (risk > 0.6).astype(int)
    for kw, pred, labels, expected in [
        ({}, logits, y, M.evaluate_predictions(logits, y)),
        ({"threshold": 0.6}, (logits, risk, gate), (y, s),
         M.evaluate_predictions(logits, y, sensitive_features=s, gates=gate, risk=risk, threshold=0.6)),
        ({"use_sensitive": False, "per_cell": False}, (logits, risk), (y, s),
         M.evaluate_predictions(logits, y, risk=risk, per_cell=False)),
    ]:
        assert M.make_compute_metrics(**kw)(EvalPrediction(predictions=pred, label_ids=labels)) == expected
        assert M.make_compute_metrics(**kw)((pred, labels)) == expected


def test_gated_logits_and_predicted_labels():
    off = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    on = off[:, ::-1].copy()
    gate = np.array([1, 0, 1])
    np.testing.assert_array_equal(M.gated_logits(off, on, gate), [[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    np.testing.assert_array_equal(M.predicted_labels(M.gated_logits(off, on, gate.astype(bool))), [1, 1, 1])
    np.testing.assert_array_equal(M.predicted_labels(torch.tensor([-1.0, 0.0, 3.0])), [0, 0, 1])
    np.testing.assert_array_equal(M.gated_logits(off[:, 0], on[:, 0], torch.tensor([0, 1, 1])), [2.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        M.gated_logits(off, on[:, :1], gate)
    with pytest.raises(ValueError, match="gates has 2 rows"):
        M.gated_logits(off, on, gate[:2])


def test_compute_metrics_inside_trainer(tmp_path):
    """The real Trainer: tuple label_ids, (logits, risk, gate) predictions, eval_ prefix."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, labels=None, sensitive=None):
            logits = self.lin(x)
            risk = torch.sigmoid(4 * x[:, 1])
            gate = (risk > 0.5).long()
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits, "risk": risk, "gate": gate}

    y, p, s = make_data(5, n=64, unknown=0.1)
    x = np.stack([np.where(p == 1, 1.0, -1.0), np.where(s == 1, 1.0, -1.0)], axis=1).astype(np.float32)
    ds = Dataset.from_dict({"x": x.tolist(), "labels": y.tolist(), "sensitive": s.tolist()})
    model = Tiny()
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.lin.bias.zero_()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16, report_to=[],
                             label_names=["labels", "sensitive"], use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=ds, compute_metrics=M.make_compute_metrics())
    out = trainer.evaluate()
    assert out["eval_accuracy"] == pytest.approx(accuracy_score(y, p))
    known = s != -1
    assert out["eval_worst_group_accuracy"] == pytest.approx(
        fl_cells(y[known], p[known], s[known]).group_min()["accuracy"])
    assert out["eval_gate_rate_s1"] == 1.0 and out["eval_gate_rate_s0"] == 0.0
    assert out["eval_detector_tpr"] == 1.0 and out["eval_detector_fpr"] == 0.0


# --------------------------------------------------------------------------------------------
# fairness_summary, Markdown table
# --------------------------------------------------------------------------------------------


def test_fairness_summary_equals_functions():
    y, p, s = make_data(0, unknown=0.1)
    out = M.fairness_summary(y, p, sensitive_features=s)
    assert out["worst_group_accuracy"] == M.worst_group_accuracy(y, p, sensitive_features=s)
    assert out["worst_sensitive_group_accuracy"] == M.worst_group_accuracy(y, p, sensitive_features=s, by="group")
    assert out["average_group_accuracy"] == M.average_accuracy(y, p, sensitive_features=s)
    assert out["equalized_odds_difference"] == M.equalized_odds_difference(y, p, sensitive_features=s)
    assert out["equalized_odds_difference_worst_case"] == M.equalized_odds_difference(
        y, p, sensitive_features=s, agg="worst_case")
    assert out["equal_opportunity_difference"] == M.equal_opportunity_difference(y, p, sensitive_features=s)
    assert out["demographic_parity_difference"] == M.demographic_parity_difference(y, p, sensitive_features=s)
    cells = M.group_accuracies(y, p, sensitive_features=s)
    assert out["acc_y1_s0"] == cells["y=1,s=0"]["accuracy"]


def _table_rows(md):
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    return {line.split(" | ")[0][2:]: line.split(" | ")[1].rstrip(" |") for line in rows}


@pytest.mark.parametrize("prefix", ["eval_", "test_", ""])
def test_render_fairness_table(prefix):
    rng = np.random.default_rng(0)
    y, p, s = make_data(0)
    gate = (rng.random(len(y)) < np.where(s == 1, 0.8, 0.1)).astype(int)
    out = M.make_compute_metrics()(EvalPrediction(predictions=(_binary_logits(y, p, rng), gate.astype(float), gate),
                                                  label_ids=(y, s)))
    metrics = {f"{prefix}{k}": v for k, v in out.items()}
    metrics[f"{prefix}loss"] = 0.3  # unrelated keys are ignored
    md = M.render_fairness_table(metrics, split="validation")
    assert "**validation** split" in md
    lines = md.strip().splitlines()
    assert lines[2] == "| metric | value |" and lines[3] == "|---|---:|"
    assert all(line.count("|") == 3 for line in lines[2:])
    rows = _table_rows(md)
    assert rows["ACC (accuracy over all rows)"] == f"{out['accuracy']:.4f}"
    assert rows["WGA (min over label × group cells)"] == f"{out['worst_group_accuracy']:.4f}"
    assert rows["EOD, mean: ½(ΔTPR + ΔFPR)"] == f"{out['equalized_odds_difference']:.4f}"
    assert rows["gate rate, s=0"] == f"{gate[s == 0].mean():.4f}"
    assert rows["gate rate, s=1"] == f"{gate[s == 1].mean():.4f}"
    assert rows["accuracy of cell y=1, s=1"] == f"{out['acc_y1_s1']:.4f}"
    assert "loss" not in md
    # ACC comes first, then WGA
    assert list(rows)[:2] == ["ACC (accuracy over all rows)", "WGA (min over label × group cells)"]


def test_render_fairness_table_edge_cases():
    md = M.render_fairness_table({"test_accuracy": 0.9, "test_worst_group_accuracy": float("nan"),
                                  "test_detector_tpr_over_fpr": float("inf")}, split="test")
    rows = _table_rows(md)
    assert rows == {"ACC (accuracy over all rows)": "0.9000", "WGA (min over label × group cells)": "n/a",
                    "detector TPR / FPR": "inf"}
    with pytest.raises(ValueError):
        M.render_fairness_table({"eval_loss": 0.1}, split="validation")
    with pytest.raises(ValueError):
        M.render_fairness_table({"accuracy": 0.9}, split="")


# --------------------------------------------------------------------------------------------
# Packaging: evaluate module offline, lazy torch
# --------------------------------------------------------------------------------------------

@pytest.fixture
def offline_evaluate(tmp_path, monkeypatch):
    """`evaluate` with every cache under tmp_path and no network; sys state restored afterwards."""
    hf = tmp_path / "hf"
    for name, value in {"HF_HOME": hf, "HF_MODULES_CACHE": hf / "modules", "HF_METRICS_CACHE": hf / "metrics",
                        "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    import evaluate  # config is read at first import; patch it too in case it was imported earlier

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", hf / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", hf / "metrics")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(sys, "path", list(sys.path))  # evaluate appends its module cache
    for mod in [m for m in sys.modules if m == "evaluate_modules" or m.startswith("evaluate_modules.")]:
        monkeypatch.delitem(sys.modules, mod)
    return hf


def test_evaluate_module_offline_matches_functions(offline_evaluate):
    metric = M.load_evaluate_metric(cache_dir=str(offline_evaluate / "metrics"))
    assert type(metric).__name__ == "FairnetMetric"
    assert list((offline_evaluate / "modules").rglob("fairnet_metric.py"))  # module cache in the tmp HF home

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 400), rng.integers(0, 3, 400)
    s = rng.integers(-1, 2, 400)
    full = metric.compute(predictions=p.tolist(), references=y.tolist(), sensitive_features=s.tolist())
    assert full == pytest.approx(M.fairness_summary(y, p, sensitive_features=s))
    assert full["equalized_odds_difference"] == pytest.approx(np.mean(
        [flm.equalized_odds_difference(y[s >= 0] == c, p[s >= 0] == c, sensitive_features=s[s >= 0], agg="mean")
         for c in range(3)]))
    assert full["worst_group_accuracy"] == M.worst_group_accuracy(y, p, sensitive_features=s)
    assert "acc_y2_s1" in full and not any("s-1" in k for k in full)

    binary = metric.compute(predictions=p % 2, references=y % 2, sensitive_features=torch.tensor(s))
    assert binary == pytest.approx(M.fairness_summary(y % 2, p % 2, sensitive_features=s))
    assert binary["equal_opportunity_difference"] == pytest.approx(
        M.equal_opportunity_difference(y % 2, p % 2, sensitive_features=s))
    ovr = metric.compute(predictions=p % 2, references=y % 2, sensitive_features=s, labels=[0, 1, 2])
    assert ovr == pytest.approx(M.fairness_summary(y % 2, p % 2, sensitive_features=s, labels=[0, 1, 2]))
    assert ovr["equal_opportunity_difference"] != pytest.approx(binary["equal_opportunity_difference"])

    assert metric.compute(predictions=p, references=y) == pytest.approx(
        {"accuracy": M.accuracy(y, p), "worst_class_accuracy": M.worst_class_accuracy(y, p)})

    for lo in range(0, 400, 100):  # batches accumulate; sensitive features go to compute in row order
        metric.add_batch(predictions=p[lo:lo + 100], references=y[lo:lo + 100])
    assert metric.compute(sensitive_features=s) == full
    # the script path also loads directly with evaluate.load, offline
    import evaluate

    again = evaluate.load(str(M.EVALUATE_METRIC_PATH), keep_in_memory=True)
    assert again.compute(predictions=p, references=y, sensitive_features=s) == full


def test_metrics_module_does_not_import_torch():
    # import the public metrics module and the evaluation modules it stands on under a bare `fairnet_peft` package object (the real
    # package __init__ imports peft, hence torch): metrics and what it imports (counting, bootstrap, report) load
    code = ("import sys, types; pkg = types.ModuleType('fairnet_peft'); "
            f"pkg.__path__ = [{os.path.join(REPO, 'fairnet_peft')!r}]; sys.modules['fairnet_peft'] = pkg; "
            "import fairnet_peft.metrics as mod; "
            "print(mod.worst_group_accuracy([0, 1, 1], [0, 1, 0], sensitive_features=[0, 0, 1]), "
            "mod.evaluate_predictions([[1.0, 0.0], [0.0, 1.0]], [0, 1])['accuracy'], "
            "mod.render_fairness_table({'accuracy': 1.0}, split='test').count('|'), "
            "sorted(m for m in sys.modules if m.startswith('fairnet_peft.evaluation.')), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(" ", 3)[:3] == ["0.0", "1.0", "9"]
    assert proc.stdout.rsplit(" ", 1)[1].strip() == "False"
    for name in ("bootstrap", "counting", "report"):
        assert f"'fairnet_peft.evaluation.{name}'" in proc.stdout
