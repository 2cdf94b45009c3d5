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
from fairnet_peft.training.guard import NEVER, guard_threshold, resolve_max_drop

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
    """'auto' runs the guard in the unlabeled setting: its 'off' accuracy is the ERM model's, and the final model
    is within the allowed 0.5 points of it on the eval set. Without an eval set (or with gate_threshold) no guard."""
    data = synthetic_data
    train = data["train"].remove_columns("sensitive").add_column("sensitive", [-1] * len(data["train"]))
    val = data["validation"].remove_columns("sensitive")
    args = FairTrainingArguments(str(tmp_path), num_train_epochs=1, per_device_train_batch_size=32, **QUIET)
    model = _fresh(synthetic_erm_dir)
    metrics = FairTrainer(model=model, args=args, train_dataset=train, eval_dataset=val).train().metrics
    erm = T.BertForSequenceClassification.from_pretrained(synthetic_erm_dir)
    assert metrics["train_guard_accuracy_off"] == pytest.approx(_accuracy(erm, data["validation"]))
    assert metrics["train_guard_accuracy_guarded"] >= metrics["train_guard_accuracy_off"] - 0.005 - 1e-9
    assert _accuracy(model, data["validation"]) == pytest.approx(metrics["train_guard_accuracy_guarded"])
    full = FairTrainer(model=_fresh(synthetic_erm_dir), args=args, train_dataset=data["train"], eval_dataset=val)
    assert not any(k.startswith("train_guard") for k in full.train().metrics)  # 'auto': no guard with group labels
    blind = FairTrainer(model=_fresh(synthetic_erm_dir), args=args, train_dataset=train)  # unlabeled, no eval set
    with pytest.warns(UserWarning, match="No eval_dataset: the accuracy guard"):
        assert not any(k.startswith("train_guard") for k in blind.train().metrics)
