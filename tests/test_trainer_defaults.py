"""FairTrainer with its defaults and the stage rules behind them (last batch, anchors vs gate, update counts).

ERM is trained once on the synthetic spurious task; every FairNet run below sets only output_dir, epochs and batch size
plus logging knobs, unless the test is about one knob. Unit tests cover the held-out split, the early-stopping rule,
the LoRA-stage update budget and prototypes.py.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft import metrics as M
from fairnet_peft.training.prototypes import anchor_weights, compute_prototypes
from fairnet_peft.training.detector_stage import DetectorEarlyStopping, holdout_rows, propagated_labels
from fairnet_peft.training.state import EarlyStoppingState

from .helpers import expect_warnings

T.logging.set_verbosity_error()
QUIET = dict(report_to=[], save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, use_cpu=True)


def fresh(erm_dir):
    return get_peft_model(T.BertForSequenceClassification.from_pretrained(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))


def scores(model, split):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(split["input_ids"]), attention_mask=torch.tensor(split["attention_mask"])).logits
    y, s, pred = np.array(split["labels"]), np.array(split["sensitive"]), logits.argmax(-1).numpy()
    return M.accuracy(y, pred), M.worst_group_accuracy(y, pred, sensitive_features=s)


def defaults(tmp_path, **kw):
    return FairTrainingArguments(str(tmp_path), num_train_epochs=3, per_device_train_batch_size=32, **QUIET, **kw)


# ---------------------------------------------------------------------------- defaults that correct
def test_defaults_raise_worst_group_accuracy_and_report_detector_vs_probe(data, erm_dir, tmp_path):
    args = defaults(tmp_path)
    assert args.learning_rate == 1e-3 and args.anchor_weighting == "class_balanced" and args.detector_learning_rate == 1e-3
    erm_acc, erm_wga = scores(T.BertForSequenceClassification.from_pretrained(erm_dir), data["test"])
    model = fresh(erm_dir)
    trainer = FairTrainer(model=model, args=args, train_dataset=data["train"])
    metrics = trainer.train().metrics
    acc, wga = scores(model, data["test"])
    print(f"ERM {erm_acc:.3f}/{erm_wga:.3f} → FairNet {acc:.3f}/{wga:.3f}; {metrics}")
    assert wga >= erm_wga + 0.3 and acc >= erm_acc - 0.005
    # the detector stage stopped early (before its 2 × 300-update bound) and reached its probe on held-out rows
    assert 0 < metrics["train_detector_holdout_rows"] < len(data["train"])
    assert metrics["train_detector_auc"] >= 0.97 * metrics["train_probe_auc"]
    assert trainer.lora_updates() == max(args.lora_min_updates, 3 * int(np.ceil(trainer.anchor_rows().size / 32)))
    assert metrics["train_lora_relative_update"] > 1e-3
    # the model card gets the detector line
    trainer.evaluate(data["validation"])
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "ROC-AUC" in card and f"{metrics['train_detector_auc']:.3f}" in card


def test_drop_last_keeps_every_row_in_the_frozen_passes(data, erm_dir, tmp_path):
    """1200 rows with batch 64 leave a partial last batch that `dataloader_drop_last` drops."""
    trainer = FairTrainer(model=fresh(erm_dir), args=defaults(tmp_path, dataloader_drop_last=True, lora_min_updates=5,
                                                              detector_min_updates=5, detector_epochs=1,
                                                              per_device_eval_batch_size=64),
                          train_dataset=data["train"])
    trainer.train()
    # every minority row is an anchor, except the held-out rows the selection uses (no eval set here)
    minority = (np.array(data["train"]["sensitive"]) == 1) & ~trainer.run_state.holdout
    np.testing.assert_array_equal(trainer.anchor_rows(), np.flatnonzero(minority))


def test_gate_threshold_zero_changes_the_gate_not_the_anchors(data, erm_dir, tmp_path):
    """In the partial setting the 'w/o detector' ablation (τ = 0) keeps the anchors of τ = 0.5."""
    rng = np.random.default_rng(0)
    s = np.array(data["train"]["sensitive"])
    partial = np.where(rng.random(len(s)) < 0.2, s, -1)
    train = data["train"].remove_columns("sensitive").add_column("sensitive", partial.tolist())
    groups = {}
    for tau in (None, 0.0):
        torch.manual_seed(0)
        trainer = FairTrainer(model=fresh(erm_dir), args=defaults(tmp_path / str(tau), gate_threshold=tau, max_steps=2),
                              train_dataset=train)
        trainer.train()
        groups[tau] = trainer.anchor_rows()
        assert trainer.detector_stats["gate_rate_s0"] == (1.0 if tau == 0.0 else trainer.detector_stats["gate_rate_s0"])
    np.testing.assert_array_equal(groups[None], groups[0.0])
    assert len(groups[0.0]) < 0.5 * len(train)  # the unlabelled rows did not all become anchors


def test_no_op_warnings_name_the_knob(data, erm_dir, tmp_path):
    trainer = FairTrainer(model=fresh(erm_dir), args=defaults(tmp_path, learning_rate=0.0, max_steps=3,
                                                              detector_min_updates=5, detector_epochs=1),
                          train_dataset=data["train"])
    with pytest.warns(UserWarning, match="LoRA barely moved.*learning_rate"):
        trainer.train()


def test_a_detector_that_cannot_learn_warns_once_and_stays_near_one_half(data, erm_dir, tmp_path):
    """Random group labels: nothing in the features predicts them."""
    rng = np.random.default_rng(1)
    noise = (rng.random(len(data["train"])) < 0.2).astype(int)
    train = data["train"].remove_columns("sensitive").add_column("sensitive", noise.tolist())
    trainer = FairTrainer(model=fresh(erm_dir), args=defaults(tmp_path, max_steps=2), train_dataset=train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # one warning, from the do-no-harm check: it names the AUC and switches the adapter off
    detector_warnings = [w for w in caught if "minority" in str(w.message) or "find the group" in str(w.message)]
    assert len(detector_warnings) == 1 and "switched the adapter off" in str(detector_warnings[0].message)
    assert trainer.adapter_config.threshold == 1.0
    risk = trainer.frozen_pass(full=False)["risk"]
    assert abs(float(np.median(risk)) - 0.5) < 0.2


def test_data_parallel_is_refused_with_the_launcher_to_use(data, erm_dir, tmp_path, monkeypatch):
    args = defaults(tmp_path)
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel.*torchrun"):
        FairTrainer(model=fresh(erm_dir), args=args, train_dataset=data["train"])


# ---------------------------------------------------------------------------- units
def test_holdout_rows_are_stratified_and_leave_small_groups_alone():
    target = np.array([0] * 900 + [1] * 100 + [-1] * 50)
    mask = holdout_rows(target, 0.1, seed=0)
    assert mask[:900].sum() == 90 and mask[900:1000].sum() == 10 and not mask[1000:].any()
    assert (holdout_rows(target, 0.1, seed=0) == mask).all() and (holdout_rows(target, 0.1, seed=1) != mask).any()
    assert holdout_rows(np.array([0] * 900 + [1] * 40), 0.1, 0)[900:].sum() == 5  # at least 5 per group
    assert not holdout_rows(np.array([0] * 900 + [1] * 10), 0.1, 0).any()  # too few to hold any out
    assert not holdout_rows(target, 0.0, 0).any()


def test_propagated_labels_keep_the_known_ones_and_label_the_rest_with_the_probe():
    """partial_label_propagation: the class-balanced probe fitted on the labelled fit rows labels the unknown rows
    (-1); known labels stay, held-out known rows are not fitted on, and one group among the fit rows changes nothing."""
    rng = np.random.default_rng(0)
    groups = (rng.random(600) < 0.2).astype(np.int64)
    features = np.c_[groups * 5.0 + rng.normal(0, 1, 600), rng.normal(0, 1, (600, 3))]  # the group is visible
    labels = np.where(rng.random(600) < 0.1, groups, -1)
    fit = labels >= 0
    out = propagated_labels(features, labels, fit)
    assert (out >= 0).all() and (out[fit] == labels[fit]).all()
    unknown = labels < 0
    assert (out[unknown] == groups[unknown]).mean() > 0.9  # the probe finds a visible group
    one_group = np.where(labels == 1, -1, labels)
    assert (propagated_labels(features, one_group, one_group >= 0) == one_group).all()


def test_early_stopping_keeps_the_best_detector_and_waits_for_min_updates():
    net = torch.nn.Linear(2, 1)
    trainer = types.SimpleNamespace(detector_network=lambda: net)
    losses = iter([0.9, 0.5, 0.6, 0.55, 0.7, 0.8, 0.9])
    weights_at_best = {}

    def holdout_loss():
        loss = next(losses)
        if loss == 0.5:
            weights_at_best["w"] = net.weight.detach().clone()
        return loss

    trainer.holdout_loss = holdout_loss
    counters = EarlyStoppingState()
    stopper = DetectorEarlyStopping(trainer, counters, every=10, patience=2, min_updates=50)
    state, control = types.SimpleNamespace(max_steps=1000), types.SimpleNamespace(should_training_stop=False)
    stopped_at = None
    for step in range(1, 71):
        state.global_step = step
        with torch.no_grad():
            net.weight.add_(1.0)
        stopper.on_step_end(None, state, control)
        if control.should_training_stop:
            stopped_at = step
            break
    assert stopped_at == 50  # patience ran out at step 40, but not before min_updates
    assert counters.stopped and counters.evaluations == 5 and counters.best_loss == 0.5 and counters.has_best
    stopper.restore_best()
    torch.testing.assert_close(net.weight, weights_at_best["w"])


def test_prototypes_average_correct_majority_rows_and_anchor_weights_balance_classes():
    z = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [0.0, 4.0], [1.0, 1.0], [5.0, 5.0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    group = np.array([0, 0, 0, 0, 1, 1])
    correct = np.array([True, True, False, True, True, True])
    protos, counts = compute_prototypes(z, labels, group, 2, correct=correct)
    np.testing.assert_allclose(protos[0, 0], [1.0, 0.0])  # the misclassified [10, 10] is left out
    np.testing.assert_allclose(protos[1, 1], [3.0, 3.0])
    assert counts.tolist() == [[2, 0], [1, 2]]
    all_rows, _ = compute_prototypes(z, labels, group, 2)
    np.testing.assert_allclose(all_rows[0, 0], [4.0, 10 / 3])
    fallback, _ = compute_prototypes(z, labels, group, 2, correct=np.zeros(6, bool))
    np.testing.assert_allclose(fallback[0, 0], all_rows[0, 0])  # no correct row in a cell: the whole cell
    with pytest.raises(ValueError, match="No majority-group rows of classes \\[1\\]"):
        compute_prototypes(z, labels, np.array([0, 0, 0, 1, 1, 1]), 2)
    w = anchor_weights(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 1, 1, 0]), 3)
    assert w[2] == 0 and w[0] * 3 == pytest.approx(w[1] * 1)  # equal total weight per present class


def test_unlabeled_setting_reports_the_label_free_pseudo_group_selector(data, erm_dir, tmp_path):
    """With no sensitive labels anywhere, evaluate() adds worst accuracy over (class × pseudo-group)
    cells, the pseudo-groups of the eval rows coming from the labeler fitted on training; selection on it is allowed."""
    train = data["train"].remove_columns("sensitive").add_column("sensitive", [-1] * len(data["train"]))
    val = data["validation"].remove_columns("sensitive")
    args = defaults(tmp_path, max_steps=20, metric_for_best_model="pseudo_worst_group_accuracy")
    trainer = FairTrainer(model=fresh(erm_dir), args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    assert trainer.pseudo_labels is not None and trainer.pseudo_labels.shape == (len(train),)
    details = trainer.pseudo_label_details  # auto's choice and its per-labeler scores stay on the trainer
    assert details["auto"] is True and details["method"] in ("lof", "gmm", "kmeans", "error_set")
    assert set(details["scores"]) <= {"lof", "gmm", "kmeans"} and details["scores"]
    assert all(-1 <= v <= 1 for v in details["scores"].values())
    with expect_warnings("LoRA stage trained on .* of these .* eval rows"):  # lora_rows="train+eval"
        metrics = trainer.evaluate()
    groups = trainer.eval_pseudo_groups(val)
    assert groups.shape == (len(val),) and 0 < groups.mean() < 0.5
    # recompute it from predict(): the same number
    out = trainer.predict(val)
    pred = out.predictions[0].argmax(-1)
    from fairnet_peft.training.pseudo_labels import pseudo_group_worst_accuracy

    expected = pseudo_group_worst_accuracy(pred, np.array(val["labels"]), groups)
    assert metrics["eval_pseudo_worst_group_accuracy"] == pytest.approx(expected)
    assert metrics["eval_pseudo_worst_group_accuracy"] <= metrics["eval_accuracy"]
    # the pseudo-groups track the true groups on this task (reported, never used for selection)
    true = np.array(data["validation"]["sensitive"])
    assert (groups[true == 1]).mean() > (groups[true == 0]).mean()
