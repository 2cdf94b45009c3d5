"""threshold_sweep: two passes over the data, and the same predictions as running the model at every τ."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from peft import get_peft_model

import fairnet_peft
from fairnet_peft import FairLoraConfig, metrics as M
from fairnet_peft.evaluation.sweep import (SweepScores, collect_sweep_scores, padding_collate, sweep_metrics, sweep_predictions,
                                threshold_sweep)

from .helpers import tiny_model

N, BATCH = 45, 16  # 3 batches, the last one short


def _model():
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    with torch.no_grad():  # a strong update, so that the gate changes many predictions
        for name, param in model.named_parameters():
            if "fairlora_B" in name:
                param.mul_(20)
    return model


def _dataset(seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (N, 10), generator=g)
    mask = torch.ones(N, 10, dtype=torch.long)
    for i, length in enumerate(torch.randint(4, 11, (N,), generator=g).tolist()):
        mask[i, length:] = 0
        ids[i, length:] = 0
    sensitive = torch.randint(0, 2, (N,), generator=g)
    sensitive[:3] = -1  # unknown group
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "text": [f"row {i}" for i in range(N)],  # not a model input: must be dropped
        "labels": torch.randint(0, 2, (N,), generator=g).tolist(),
        "sensitive": sensitive.tolist(),
    })


def _batches(ds):
    for start in range(0, len(ds), BATCH):
        rows = ds[start:start + BATCH]
        yield {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask")}


def _reference(model, ds, tau):
    """Run the model normally with its threshold set to τ: predictions, risk and gates."""
    config = model.peft_config["default"]
    saved = config.threshold
    config.threshold = tau
    preds, gates, risks = [], [], []
    try:
        with torch.no_grad():
            for batch in _batches(ds):
                preds.append(model(**batch).logits.argmax(-1))
                rec = fairnet_peft.gate_record(model)
                gates.append(rec.gate)
                risks.append(rec.risk)
    finally:
        config.threshold = saved
    return torch.cat(preds).numpy(), torch.cat(gates).numpy(), torch.cat(risks).numpy()


@pytest.fixture(scope="module")
def setup():
    model, ds = _model(), _dataset()
    scores = collect_sweep_scores(model, ds, batch_size=BATCH)
    risk = np.sort(scores.risk)
    # τ grid: the extremes, quantiles, and exact risk values (the gate is strict: risk == τ stays off)
    taus = [0.0, 1.0, *np.quantile(risk, [0.1, 0.5, 0.9]).tolist(), float(risk[5]), float(risk[-5])]
    return model, ds, scores, taus


def test_sweep_runs_the_model_exactly_twice_over_the_data(setup):
    model, ds, _, taus = setup
    calls = {"peft": 0, "base": 0}
    handles = [
        model.register_forward_pre_hook(lambda *a: calls.__setitem__("peft", calls["peft"] + 1)),
        model.get_base_model().register_forward_pre_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
    ]
    model.train()
    try:
        sweep = threshold_sweep(model, ds, taus, batch_size=BATCH)
    finally:
        for h in handles:
            h.remove()
    n_batches = math.ceil(N / BATCH)
    assert calls == {"peft": 2 * n_batches, "base": 2 * n_batches}  # no per-τ pass, no backtracking pass
    assert model.training  # the mode is restored
    assert model.peft_config["default"].threshold == 0.5  # the sweep does not change τ
    assert [row["threshold"] for row in sweep] == taus
    for key in ("accuracy", "worst_group_accuracy", "equalized_odds_difference", "tpr", "fpr", "gate_rate",
                "gate_rate_s0", "gate_rate_s1"):
        assert all(key in row for row in sweep), key


def test_sweep_matches_running_the_model_at_every_threshold(setup):
    model, ds, scores, taus = setup
    model.eval()
    assert (scores.pred_on != scores.pred_off).mean() > 0.2  # the gate matters in this setup
    sweep = threshold_sweep(model, ds, taus, batch_size=BATCH)
    y, s = np.asarray(ds["labels"]), np.asarray(ds["sensitive"])
    known = s != -1
    rates = set()
    for tau, row in zip(taus, sweep):
        pred, gate, risk = _reference(model, ds, tau)
        np.testing.assert_array_equal(risk, scores.risk)
        np.testing.assert_array_equal(scores.gate(tau), gate)
        np.testing.assert_array_equal(sweep_predictions(scores, tau), pred)
        expected = {
            "threshold": tau,
            "accuracy": M.accuracy(y, pred),
            "worst_group_accuracy": M.worst_group_accuracy(y, pred, sensitive_features=s),
            "equalized_odds_difference": M.equalized_odds_difference(y, pred, sensitive_features=s),
            "gate_rate": float(gate.mean()),
            "tpr": float(gate[known & (s == 1)].mean()),
            "fpr": float(gate[known & (s == 0)].mean()),
            "gate_rate_s0": float(gate[s == 0].mean()),
            "gate_rate_s1": float(gate[s == 1].mean()),
        }
        for key, value in expected.items():
            assert row[key] == value, (tau, key, row[key], value)
        rates.add(row["gate_rate"])
    assert 0.0 in rates and 1.0 in rates and len(rates) >= 5  # the grid spans off, on and mixed gates


def test_sweep_row_equals_compute_metrics_of_a_run_at_that_threshold(setup):
    """One evaluation path: the sweep's row at τ is make_compute_metrics(threshold=τ) of the model run at τ."""
    from transformers import EvalPrediction

    model, ds, scores, taus = setup
    model.eval()
    tau = taus[2]  # the 10 % quantile: gates mixed
    config = model.peft_config["default"]
    saved, config.threshold = config.threshold, tau
    logits, risks, gates = [], [], []
    try:
        with torch.no_grad():
            for batch in _batches(ds):
                logits.append(model(**batch).logits)
                rec = fairnet_peft.gate_record(model)
                risks.append(rec.risk)
                gates.append(rec.gate)
    finally:
        config.threshold = saved
    run = EvalPrediction(predictions=tuple(torch.cat(t).numpy() for t in (logits, risks, gates)),
                         label_ids=(np.asarray(ds["labels"]), np.asarray(ds["sensitive"])))
    expected = M.make_compute_metrics(threshold=tau)(run)
    row = sweep_metrics(scores, [tau])[0]
    assert 0 < row["gate_rate"] < 1 and "acc_y1_s0" in expected and "detector_tpr" in expected
    assert {k: row[k] for k in expected} == expected  # same predictions and gates, same counting: exact
    assert (row["tpr"], row["fpr"]) == (row["detector_tpr"], row["detector_fpr"])
    assert M.evaluate_predictions(scores.logits(tau), scores.labels, sensitive_features=scores.sensitive,
                                  gates=scores.gate(tau), threshold=tau).items() <= row.items()


def test_sweep_rows_without_known_groups_keep_their_keys(setup):
    _, _, scores, taus = setup
    blind = SweepScores(scores.logits_off, scores.logits_on, scores.risk, scores.labels,
                        np.full_like(scores.sensitive, -1))
    row = sweep_metrics(blind, taus[:1])[0]
    for key in ("worst_group_accuracy", "equalized_odds_difference", "tpr", "fpr", "tpr_over_fpr"):
        assert math.isnan(row[key]), key
    assert row["accuracy"] == M.accuracy(scores.labels, sweep_predictions(blind, taus[0]))


def test_sweep_threshold_at_a_risk_value_is_strict(setup):
    _, _, scores, _ = setup
    tau = float(np.sort(scores.risk)[5])
    assert scores.gate(tau).sum() == int((scores.risk > tau).sum()) == len(scores.risk) - 6


def test_padding_collate_pads_ragged_rows_and_matches_the_padded_run(setup):
    model, ds, scores, _ = setup
    # a ragged copy of the data: every row cut at its length; the default collate pads it back (pad id 0)
    lengths = [sum(m) for m in ds["attention_mask"]]
    ragged = ds.map(lambda r, i: {"input_ids": r["input_ids"][:lengths[i]],
                                  "attention_mask": r["attention_mask"][:lengths[i]]}, with_indices=True)
    collate = padding_collate({"input_ids": 0})
    batch = collate([{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1])},
                     {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    again = collect_sweep_scores(model.eval(), ragged, batch_size=BATCH)
    # batches padded to their own longest row: same gates and predictions (logits equal up to float noise)
    np.testing.assert_allclose(again.risk, scores.risk, rtol=0, atol=1e-5)
    np.testing.assert_allclose(again.logits_on, scores.logits_on, rtol=0, atol=1e-4)
    np.testing.assert_allclose(again.logits_off, scores.logits_off, rtol=0, atol=1e-4)


def test_sweep_feeds_plot_threshold_sweep(setup, tmp_path):
    from fairnet_peft.evaluation.plots import plot_threshold_sweep

    model, ds, _, _ = setup
    sweep = threshold_sweep(model, ds, [0.0, 0.495, 0.5, 1.0], batch_size=64)
    assert plot_threshold_sweep(sweep, tmp_path / "sweep.png").exists()


def test_sweep_errors_name_the_missing_column(setup):
    model, ds, _, _ = setup
    with pytest.raises(ValueError, match="sensitive column 'group'"):
        threshold_sweep(model, ds, [0.5], sensitive_column="group")
    with pytest.raises(ValueError, match="no dataset column is a model input"):
        threshold_sweep(model, ds.remove_columns(["input_ids", "attention_mask"]), [0.5])


def test_gate_rate_thresholds_gate_the_asked_share_and_reject_bad_input():
    from fairnet_peft.evaluation.sweep import SweepScores, gate_rate_thresholds

    risk = np.random.default_rng(0).uniform(0.47, 0.53, 2000).astype(np.float32)  # a narrow band around 0.5
    rates = [0.0, 0.05, 0.1, 0.5, 0.9, 1.0]
    taus = gate_rate_thresholds(risk, rates)
    got = [float((risk > t).mean()) for t in taus]
    assert got == pytest.approx(rates, abs=1e-3)
    scores = SweepScores(np.zeros((2000, 2)), np.zeros((2000, 2)), risk, np.zeros(2000), np.zeros(2000))
    assert gate_rate_thresholds(scores, rates) == taus
    assert gate_rate_thresholds(torch.from_numpy(risk), rates) == taus
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        gate_rate_thresholds(risk, [10])
    with pytest.raises(ValueError, match="non-empty"):
        gate_rate_thresholds(np.array([0.5, np.nan]), [0.1])
