"""The accuracy guard (fairnet_peft/training/guard.py): τ is raised only when the adapter costs more eval accuracy
than `max_accuracy_drop`, to the smallest τ that keeps it, and the saved adapter carries that τ.

Unit tests build the two passes by hand; the end-to-end tests train on the synthetic task, once with an adapter a
callback breaks after the LoRA stage (the guard must switch it off and warn) and once in the unlabeled setting at
defaults (the guard's metrics must match an independent evaluation)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft import metrics as M
from fairnet_peft.evaluation.sweep import SweepScores
from fairnet_peft.training.guard import (NEVER, guard_threshold, resolve_max_drop, resolve_selection, select_threshold,
                                        tau_candidates)

T.logging.set_verbosity_error()
QUIET = dict(report_to=[], save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, use_cpu=True)


def _scores(y, pred_off, pred_on, risk) -> SweepScores:
    eye = np.eye(2, dtype=np.float32)
    return SweepScores(eye[pred_off], eye[pred_on], np.asarray(risk, np.float32), np.asarray(y), np.full(len(y), -1))


def test_resolve_max_drop():
    assert resolve_max_drop("auto", "unlabeled") == 0.005
    assert resolve_max_drop("auto", "full") is None and resolve_max_drop("auto", "partial") is None
    assert resolve_max_drop("none", "unlabeled") is None and resolve_max_drop(None, "unlabeled") is None
    assert resolve_max_drop(0.02, "full") == 0.02


def test_resolve_selection():
    assert resolve_selection("auto", "unlabeled") == "pseudo_group"
    assert resolve_selection("auto", "full") == "none" == resolve_selection("auto", "partial")
    assert resolve_selection("none", "unlabeled") == "none"


# rows: 0-1 minority (pseudo-group 1) of class 1 that the adapter fixes (risk 0.9, 0.8); 2-3 class 0, pseudo-group 1,
# right either way (0.7, 0.6); 4-5 class 0, pseudo-group 0, that the adapter breaks (0.35, 0.32); 6-7 right either way
_Y = np.array([1, 1, 0, 0, 0, 0, 1, 1])
_OFF = np.array([0, 0, 0, 0, 0, 0, 1, 1])
_ON = np.array([1, 1, 0, 0, 1, 1, 1, 1])
_RISK = np.array([0.9, 0.8, 0.7, 0.6, 0.35, 0.32, 0.1, 0.2])
_GROUPS = np.array([1, 1, 1, 1, 0, 0, 0, 0])


def test_pseudo_group_selection_picks_the_best_pseudo_group_wga_nearest_the_configured_tau():
    out = select_threshold(_scores(_Y, _OFF, _ON, _RISK), 0.3, None, _GROUPS)
    # at τ = 0.3 rows 4-5 are gated and broken: pseudo-group WGA 0; every τ in [0.35, 0.8) fixes 0-1 and spares 4-5
    assert out["accuracy_adapter"] == pytest.approx(0.75) and out["pseudo_group_wga"] == 1.0
    expected = min(t for t in tau_candidates(_RISK, 0.3) if 0.35 <= t < 0.8)
    assert out["threshold"] == pytest.approx(expected) and out["selected"] and not out["raised"]
    assert out["accuracy_guarded"] == 1.0
    kept = select_threshold(_scores(_Y, _OFF, _ON, _RISK), 0.5, 0.0, _GROUPS)  # already the best: τ stays
    assert kept["threshold"] == 0.5 and not kept["selected"] and kept["pseudo_group_wga"] == 1.0


def test_pseudo_group_selection_respects_the_accuracy_floor_and_can_switch_the_adapter_off():
    # ERM right everywhere, the adapter wrong everywhere: only the τ that gate no row are admissible
    worse = select_threshold(_scores(_Y, _Y, 1 - _Y, _RISK), 0.5, 0.005, _GROUPS)
    assert worse["threshold"] >= _RISK.max() and worse["raised"] and worse["gate_rate"] == 0.0
    assert worse["accuracy_guarded"] == worse["accuracy_off"] == 1.0
    # pseudo-groups that reward breaking rows 4-5 (they are "group 1" now): without a floor the selector would gate
    # them; with a floor of 0 the accuracy cost rules those τ out
    groups = np.array([0, 0, 0, 0, 1, 1, 0, 0])
    free = select_threshold(_scores(_Y, _OFF, _ON, _RISK), 0.5, None, groups)
    floored = select_threshold(_scores(_Y, _OFF, _ON, _RISK), 0.5, 0.0, groups)
    assert floored["accuracy_guarded"] >= floored["accuracy_off"] and floored["threshold"] >= 0.35
    assert free["pseudo_group_wga"] >= floored["pseudo_group_wga"]


def test_pseudo_group_selection_needs_the_unlabeled_setting(synthetic_data, synthetic_erm_dir, tmp_path):
    args = FairTrainingArguments(str(tmp_path), threshold_selection="pseudo_group", **QUIET)
    with pytest.raises(ValueError, match="threshold_selection='pseudo_group' needs the unlabeled setting"):
        FairTrainer(model=_fresh(synthetic_erm_dir), args=args, train_dataset=synthetic_data["train"])
    with pytest.raises(ValueError, match="threshold_selection"):
        FairTrainingArguments(str(tmp_path), threshold_selection="best", **QUIET)


def test_a_helpful_adapter_keeps_its_threshold():
    y = np.array([0, 0, 1, 1, 1, 0])
    out = guard_threshold(_scores(y, [0, 0, 0, 0, 1, 0], y, [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]), 0.5, 0.0)
    assert not out["raised"] and out["threshold"] == 0.5
    assert out["accuracy_adapter"] == pytest.approx(1.0) and out["accuracy_off"] == pytest.approx(4 / 6)


def test_a_harmful_low_risk_slice_is_ungated_and_the_risky_rows_kept():
    # rows 0-1 (risk 0.95/0.9): the adapter fixes them; rows 2-5 (risk 0.6-0.75): it breaks them
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    off = np.array([0, 0, 0, 0, 0, 0, 0, 0])
    on = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    risk = [0.95, 0.9, 0.75, 0.7, 0.65, 0.6, 0.1, 0.2]
    out = guard_threshold(_scores(y, off, on, risk), 0.5, 0.0)
    assert out["raised"] and out["accuracy_adapter"] == pytest.approx(4 / 8) and out["accuracy_off"] == pytest.approx(6 / 8)
    # the smallest τ within the bound (as much correction as the bound allows): ungating rows 4-5 (τ = 0.65) is
    # enough; the guard does not go on to maximise accuracy (τ = 0.75 would give 8/8)
    assert out["threshold"] == pytest.approx(0.65) and out["accuracy_guarded"] == pytest.approx(6 / 8)
    assert out["gate_rate"] == pytest.approx(4 / 8)
    # a looser bound (one row of eight) stops one row earlier
    looser = guard_threshold(_scores(y, off, on, risk), 0.5, 0.125)
    assert looser["raised"] and looser["threshold"] == pytest.approx(0.6)
    assert looser["accuracy_guarded"] == pytest.approx(5 / 8)


def test_an_adapter_harmful_everywhere_is_switched_off():
    y = np.array([0, 1, 0, 1])
    out = guard_threshold(_scores(y, y, 1 - y, [1.0, 0.9, 0.8, 0.7]), 0.5, 0.005)
    assert out["raised"] and out["threshold"] == NEVER and out["gate_rate"] == 0.0
    assert out["accuracy_guarded"] == out["accuracy_off"] == 1.0


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_bad_max_accuracy_drop_names_the_knob(tmp_path, value):
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        FairTrainingArguments(str(tmp_path), max_accuracy_drop=value, **QUIET)
    assert FairTrainingArguments(str(tmp_path), max_accuracy_drop="0.01", **QUIET).max_accuracy_drop == 0.01


def _fresh(erm_dir):
    return get_peft_model(T.BertForSequenceClassification.from_pretrained(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))


def _accuracy(model, split) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(split["input_ids"]),
                       attention_mask=torch.tensor(split["attention_mask"])).logits
    return M.accuracy(np.array(split["labels"]), logits.argmax(-1).numpy())


class _BreakTheAdapter(T.TrainerCallback):
    """After the LoRA stage: a LoRA that scrambles every row it touches (large random B) and a detector that
    gates every row (+50 on its last bias), so the adapter costs far more accuracy than it can give."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        if not any("fairlora_B" in n and p.detach().abs().sum() > 0 for n, p in params.items()):
            return  # the detector stage (B still 0)
        with torch.no_grad():
            for name, param in params.items():
                if "fairlora_B" in name:
                    param.normal_(0.0, 5.0, generator=torch.Generator().manual_seed(0))
            last_bias = [n for n in params if "risk_mlp" in n and n.endswith(".bias")][-1]
            params[last_bias].add_(50.0)


def test_guard_switches_a_harmful_adapter_off_end_to_end(synthetic_data, synthetic_erm_dir, tmp_path):
    data = synthetic_data
    args = FairTrainingArguments(str(tmp_path), num_train_epochs=1, per_device_train_batch_size=32,
                                 max_accuracy_drop=0.0, **QUIET)
    model = _fresh(synthetic_erm_dir)
    trainer = FairTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                          callbacks=[_BreakTheAdapter()])
    with pytest.warns(UserWarning, match="max_accuracy_drop"):
        metrics = trainer.train().metrics
    assert metrics["train_guard_raised"] == 1.0 and metrics["train_guard_threshold"] == NEVER  # every row at risk 1
    assert metrics["train_guard_accuracy_adapter"] < metrics["train_guard_accuracy_off"]
    assert model.peft_config["default"].threshold == pytest.approx(metrics["train_guard_threshold"])
    # the model now does what the guard measured, and the saved adapter keeps the raised τ
    assert _accuracy(model, data["validation"]) == pytest.approx(metrics["train_guard_accuracy_guarded"])
    assert metrics["train_guard_accuracy_guarded"] >= metrics["train_guard_accuracy_off"]
    model.save_pretrained(str(tmp_path / "adapter"))
    with open(os.path.join(tmp_path, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["threshold"] == pytest.approx(metrics["train_guard_threshold"])


def test_guard_at_defaults_in_the_unlabeled_setting(synthetic_data, synthetic_erm_dir, tmp_path):
    """'auto' in the unlabeled setting: τ chosen by the eval rows' pseudo-group WGA under the 0.5-point floor. Its
    'off' accuracy is the ERM model's, the final model is within the floor and has the reported pseudo-group WGA.
    With group labels: nothing runs; without an eval set: one warning."""
    from fairnet_peft.training.pseudo_labels import pseudo_group_worst_accuracy

    data = synthetic_data
    train = data["train"].remove_columns("sensitive").add_column("sensitive", [-1] * len(data["train"]))
    val = data["validation"].remove_columns("sensitive")
    args = FairTrainingArguments(str(tmp_path), num_train_epochs=1, per_device_train_batch_size=32, **QUIET)
    model = _fresh(synthetic_erm_dir)
    trainer = FairTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    metrics = trainer.train().metrics
    erm = T.BertForSequenceClassification.from_pretrained(synthetic_erm_dir)
    assert metrics["train_guard_accuracy_off"] == pytest.approx(_accuracy(erm, data["validation"]))
    assert metrics["train_guard_accuracy_guarded"] >= metrics["train_guard_accuracy_off"] - 0.005 - 1e-9
    assert model.peft_config["default"].threshold == pytest.approx(metrics["train_guard_threshold"])
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=torch.tensor(val["input_ids"]),
                     attention_mask=torch.tensor(val["attention_mask"])).logits.argmax(-1).numpy()
    y = np.array(val["labels"])
    assert M.accuracy(y, pred) == pytest.approx(metrics["train_guard_accuracy_guarded"])
    groups = trainer.eval_pseudo_groups(val)
    assert pseudo_group_worst_accuracy(pred, y, groups) == pytest.approx(metrics["train_guard_pseudo_group_wga"])
    full = FairTrainer(model=_fresh(synthetic_erm_dir), args=args, train_dataset=data["train"], eval_dataset=val)
    assert not any(k.startswith("train_guard") for k in full.train().metrics)  # 'auto': nothing with group labels
    blind = FairTrainer(model=_fresh(synthetic_erm_dir), args=args, train_dataset=train)  # unlabeled, no eval set
    with pytest.warns(UserWarning, match="No eval_dataset"):
        assert not any(k.startswith("train_guard") for k in blind.train().metrics)
