"""FairTrainer on the tiny synthetic spurious-correlation task: ERM first, then FairNet in every label setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft import metrics as M
from fairnet_peft.evaluation.model_card import fairness_report

from .helpers import expect_warnings

T.logging.set_verbosity_error()

FAST = dict(report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=5, seed=0, dataloader_num_workers=0)


def erm(path):
    return T.BertForSequenceClassification.from_pretrained(path)


def evaluate(model, split):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(split["input_ids"]), attention_mask=torch.tensor(split["attention_mask"])).logits
    y, s = np.array(split["labels"]), np.array(split["sensitive"])
    pred = logits.argmax(-1).numpy()
    return M.accuracy(y, pred), M.worst_group_accuracy(y, pred, sensitive_features=s)


def fair_args(tmp_path, **kw):
    base = dict(num_train_epochs=6, learning_rate=5e-3, per_device_train_batch_size=64, detector_epochs=3,
                detector_learning_rate=3e-3, **FAST)
    base.update(kw)
    return FairTrainingArguments(str(tmp_path), **base)


def test_full_setting_raises_worst_group_accuracy_without_losing_accuracy(data, erm_dir, tmp_path):
    erm_acc, erm_wga = evaluate(erm(erm_dir), data["test"])
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    trainer = FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"], eval_dataset=data["validation"])
    assert trainer.label_setting == "full"
    trainer.train()
    acc, wga = evaluate(model, data["test"])
    print(f"ERM acc={erm_acc:.3f} wga={erm_wga:.3f} | FairNet acc={acc:.3f} wga={wga:.3f}")
    assert wga >= erm_wga + 0.10, (erm_wga, wga)
    assert acc >= erm_acc - 0.01, (erm_acc, acc)
    assert trainer.detector_stats["detector_tpr"] > 0.8 and trainer.detector_stats["detector_fpr"] < 0.2
    metrics = trainer.evaluate(data["test"])
    assert metrics["eval_gate_rate_s1"] > 0.8 and metrics["eval_gate_rate_s0"] < 0.2
    assert abs(metrics["eval_worst_group_accuracy"] - wga) < 1e-9
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"contrastive_loss", "task_loss", "hinge_active", "detector_loss"} <= logged

    # the saved adapter carries detector + prototypes and reproduces the evaluation
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(erm(erm_dir), str(out))
    proto = reloaded.base_model.model.fair_bias_detector.fairlora_prototypes["default"]
    assert proto.shape == (2, 2, 32) and proto.abs().sum() > 0
    assert evaluate(reloaded, data["test"]) == (acc, wga)
    again = FairTrainer(model=reloaded, args=fair_args(tmp_path / "e"), eval_dataset=data["test"]).evaluate()
    assert again["eval_worst_group_accuracy"] == metrics["eval_worst_group_accuracy"]


@pytest.mark.parametrize("setting", ["partial", "unlabeled"])
def test_partial_and_unlabeled_settings_run_end_to_end(data, erm_dir, tmp_path, setting):
    train = data["train"]
    rng = np.random.default_rng(0)
    s = np.array(train["sensitive"])
    if setting == "partial":
        s = np.where(rng.random(len(s)) < 0.1, s, -1)
    else:
        s = np.full(len(s), -1)
    train = train.remove_columns("sensitive").add_column("sensitive", s.tolist())
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    det_before = {k: v.clone() for k, v in model.state_dict().items() if "fairlora_detector" in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "fairlora_B" in k}
    kw = dict(num_train_epochs=1, detector_epochs=1)
    if setting == "unlabeled":
        kw["lof_contamination"] = 0.1
    trainer = FairTrainer(model=model, args=fair_args(tmp_path, **kw), train_dataset=train, eval_dataset=data["validation"])
    assert trainer.label_setting == setting
    trainer.train()
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in det_before.items()), "the detector was not trained"
    assert any(not torch.equal(v, after[k]) for k, v in lora_before.items()), "the LoRA was not trained"
    assert trainer.detector_stats["anchors"] > 0
    unread = rf"{len(data['validation'])} of these .* rows have a known group, but the group metrics .* left out: .* " \
             rf"the {setting} setting, .*eval_sensitive_labels='use'"
    with expect_warnings("LoRA stage trained on .* of these .* eval rows", unread):  # lora_rows="train+eval"
        metrics = trainer.evaluate()
    # no sensitive labels may be used for evaluation/selection in these settings
    assert "eval_worst_group_accuracy" not in metrics and "eval_accuracy" in metrics
    with expect_warnings() as caught:  # said once
        trainer.evaluate(data["test"].rename_column("labels", "label"))  # an explicit set: `label` renamed too
    assert not any("left out" in str(w.message) for w in caught)


def test_evaluate_and_predict_check_a_set_passed_to_them(data, erm_dir, tmp_path):
    """A test set passed to evaluate() / predict() is checked as eval_dataset is: an uncoded group column gets the
    clear error (before: a collator error about padding), and `label` is renamed."""
    trainer = FairTrainer(model=get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS")),
                          args=fair_args(tmp_path), eval_dataset=data["validation"])
    groups = [None] + data["test"]["sensitive"][1:]
    broken = data["test"].remove_columns("sensitive").add_column("sensitive", groups)
    with pytest.raises(ValueError, match=r"test_dataset column 'sensitive' has missing values \(None\) in rows \[0\]"):
        trainer.predict(broken)
    with pytest.raises(ValueError, match=r"eval_dataset column 'sensitive' has missing values"):
        trainer.evaluate(broken)
    out = trainer.predict(data["test"].rename_column("labels", "label"))
    assert out.label_ids is not None and out.metrics["test_accuracy"] > 0
    # the card keeps a fairness table over one evaluation without groups
    assert "eval_worst_group_accuracy" in trainer.evaluate(data["test"])
    with pytest.warns(UserWarning, match=r"metric_key_prefix='x'\) gave no group metrics, so the model card keeps the "
                                         r"fairness table of the 'eval' evaluation"):
        trainer.evaluate(data["test"].remove_columns("sensitive"), metric_key_prefix="x")
    assert fairness_report(trainer.model)["split"] == "eval"
    with pytest.raises(ValueError, match=r"needs a finished train\(\) of this trainer.*For an adapter you loaded"):
        trainer.reselect()


def test_the_unread_groups_warning_only_where_auto_left_known_groups_out(data, erm_dir, tmp_path):
    """Partial setting: an iterable eval set is evaluated (no warning: its groups cannot be counted); a user who chose
    eval_sensitive_labels='ignore' gets no warning either."""
    s = np.array(data["train"]["sensitive"])
    partial = _with(data["train"], "sensitive", np.where(np.arange(len(s)) % 2 == 0, s, -1).tolist())
    for labels, dataset in (("auto", data["test"].to_iterable_dataset()), ("ignore", data["test"])):
        trainer = FairTrainer(model=get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS")),
                              args=fair_args(tmp_path / labels, eval_sensitive_labels=labels), train_dataset=partial)
        assert trainer.label_setting == "partial"
        with expect_warnings() as caught:
            metrics = trainer.evaluate(dataset)
        assert "eval_accuracy" in metrics and "eval_worst_group_accuracy" not in metrics
        assert not any("left out" in str(w.message) for w in caught)


def test_ablations_switch_through_arguments(data, erm_dir, tmp_path):
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    args = fair_args(tmp_path, num_train_epochs=1, detector_epochs=1, gate_threshold=0.0, lora_objective="task")
    trainer = FairTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"])
    trainer.train()
    with expect_warnings("LoRA stage trained on .* of these .* eval rows"):  # lora_rows="train+eval"
        metrics = trainer.evaluate()
    assert metrics["eval_gate_rate_s0"] == 1.0 and metrics["eval_gate_rate_s1"] == 1.0  # w/o detector: always on
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "task_loss" in logged and "contrastive_loss" not in logged  # w/o contrastive


def test_extra_columns_never_reach_the_model_forward(data, erm_dir, tmp_path):
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    seen = set()
    model.get_base_model().register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    args = fair_args(tmp_path, num_train_epochs=1, detector_epochs=1, remove_unused_columns=True, max_steps=2)
    FairTrainer(model=model, args=args, train_dataset=data["train"]).train()
    assert seen and not seen & {"sensitive", "fairnet_row"}


# ---------------------------------------------------------------------------- bad input: clear errors before training
def _with(ds, column, values):
    return ds.remove_columns(column).add_column(column, values)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ds: ds.remove_columns("sensitive"), "no sensitive column 'sensitive'"),
        (lambda ds: _with(ds, "sensitive", [2] * len(ds)), r"values \[2\] outside.*encode_sensitive"),
        (lambda ds: _with(ds, "sensitive", [0] * len(ds)), "No minority rows"),
        (lambda ds: _with(ds, "labels", [1] * len(ds)), "single class"),
        (lambda ds: _with(ds.select(range(15)), "sensitive", [-1] * 15), r"lof_n_neighbors='auto'.*more than 20 per class"),
        (lambda ds: ds.add_column("embedding", [[0.5, float("nan")] if i == 3 else [0.5, 0.5] for i in range(len(ds))]),
         r"'embedding' has NaN/inf values in rows \[3\]"),
        (lambda ds: ds.select_columns(["labels", "sensitive"]).add_column("text", ["a review"] * len(ds)),
         r"none of the columns the model takes as input \(input_ids.*'text'.*Tokenize the text first"),
    ],
    ids=["missing-column", "bad-values", "no-minority", "single-class", "too-few-rows-for-lof", "nan-features",
         "not-tokenized"],
)
def test_bad_input_raises_clear_errors_before_training(data, mutate, message, tmp_path):
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=message):  # 'lof' as the pseudo-labeler: 'auto' skips one that cannot run
        FairTrainer(model=model, args=fair_args(tmp_path, pseudo_labeler="lof"), train_dataset=mutate(data["train"]))


def test_bad_eval_labels_and_token_ids_are_refused_before_training(data, tmp_path):
    """The LoRA stage trains on eval rows and the selection reads their labels: an id out of range is refused when the
    trainer is built (on a GPU it would surface as a device-side assert mid-training)."""
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    val = data["validation"]
    ignored = _with(val, "labels", [-100] + val["labels"][1:])
    with pytest.raises(ValueError, match=r"eval_dataset column 'labels' has -100 .* in rows \[0\]; FairTrainer selects"):
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"], eval_dataset=ignored)
    big = _with(val, "input_ids", [[40] + row[1:] if i == 2 else row for i, row in enumerate(val["input_ids"])])
    with pytest.raises(ValueError, match=r"eval_dataset column 'input_ids' has token ids outside 0\.\.31 .* rows \[2\]"):
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"], eval_dataset=big)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_decoder_classifier_without_pad_token_id_is_refused_with_the_fix(data, tmp_path, kind):
    """transformers cannot find a row's last token in a batch without pad_token_id; the detector stage stops before
    the head, so the trainer says so when it is built, not after the detector has trained."""
    from .helpers import tiny_model

    base = tiny_model(kind)
    base.config.pad_token_id = None
    model = get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"no pad_token_id.*model\.config\.pad_token_id = tokenizer\.pad_token_id"):
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"])
    model.get_base_model().config.pad_token_id = 0
    FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"])  # the fix is enough


def test_a_group_coded_1_on_most_rows_is_named_as_a_likely_swapped_coding(data, tmp_path):
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    s = np.asarray(data["train"]["sensitive"])
    assert s.mean() < 0.5  # the fixture's minority is coded 1
    swapped = _with(data["train"], "sensitive", (1 - s).tolist())
    with pytest.warns(UserWarning, match=rf"coded 1 in 'sensitive' is {1 - s.mean():.0%} .*encode_sensitive"):
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=swapped)
    with expect_warnings() as caught:
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"])
    assert not any("is most" in str(w.message) or "coded 1 in" in str(w.message) for w in caught)


def test_an_eval_set_the_selection_cannot_read_is_named(data, tmp_path):
    """Without class labels (or rows) an eval set cannot select the correction; the held-out training rows do,
    and the user hears it when the trainer is built."""
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    val = data["validation"]
    for eval_set, what in ((val.remove_columns("labels"), r"has no class labels \(no 'labels' or 'label' column"),
                           (val.select([]), "has no rows")):
        with pytest.warns(UserWarning, match=f"eval_dataset {what}.*holds out some training rows"):
            trainer = FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"],
                                  eval_dataset=eval_set)
        assert trainer._selection_eval_set() is None
    with expect_warnings() as caught:
        FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"], eval_dataset=val)
    assert not any("holds out some training rows" in str(w.message) for w in caught)


class _Stop(Exception):
    pass


class _StopWhenTrainingBegins(T.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        raise _Stop


def test_full_setting_with_eval_rows_of_unknown_group_warns_before_training(data, erm_dir, tmp_path):
    """Every training group known, but the eval rows' groups not (no column, or some -1): the selection would read
    the detector's estimate of them, so say so before the first stage trains; with every eval group known, nothing."""
    val = data["validation"]
    cases = ((val.remove_columns("sensitive"), "eval_dataset has no 'sensitive' column"),
             (_with(val, "sensitive", [-1, -1] + val["sensitive"][2:]), f"2 of the {len(val)} eval_dataset rows"),
             (val, None))
    for eval_set, what in cases:
        trainer = FairTrainer(model=get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS")),
                              args=fair_args(tmp_path), train_dataset=data["train"], eval_dataset=eval_set,
                              callbacks=[_StopWhenTrainingBegins()])
        assert trainer.label_setting == "full"
        required = () if what is None else (f"the full setting.*{what}.*detector's estimate.*'sensitive' column",)
        with expect_warnings(*required) as caught, pytest.raises(_Stop):
            trainer.train()
        if what is None:
            assert not any("the full setting" in str(w.message) for w in caught)


def test_selection_on_group_labels_is_refused_without_them(data, tmp_path):
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    train = _with(data["train"], "sensitive", [-1] * len(data["train"]))
    args = fair_args(tmp_path, metric_for_best_model="worst_group_accuracy", eval_strategy="epoch")
    with pytest.raises(ValueError, match="must not use for selection"):
        FairTrainer(model=model, args=args, train_dataset=train, eval_dataset=data["validation"])


def test_reentrant_checkpointing_is_refused_in_arguments(tmp_path):
    with pytest.raises(ValueError, match="reentrant"):
        fair_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})


def test_trainer_needs_a_fairlora_model(tmp_path):
    with pytest.raises(ValueError, match="PeftModel with a FairLoRA adapter"):
        FairTrainer(model=T.BertForSequenceClassification(T.BertConfig(num_hidden_layers=1)), args=fair_args(tmp_path))


def test_gradient_accumulation_divides_each_micro_batch_loss(data, erm_dir, tmp_path):
    """`loss_is_scaled_for_ga = False`: Trainer divides the per-batch-mean FairNet loss by the accumulation steps."""
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    trainer = FairTrainer(model=model, args=fair_args(tmp_path, max_steps=1, detector_epochs=1),
                          train_dataset=data["train"])
    trainer.train()  # runs the detector and prototype stages, then one LoRA step
    minority = trainer.train_dataset.filter(lambda r: r["sensitive"] == 1).select(range(8))
    batch = trainer.data_collator([minority[i] for i in range(8)])
    grads = {}
    with trainer.prepare_lora_stage():
        for steps in (1, 4):
            trainer.args.gradient_accumulation_steps = steps
            trainer.current_gradient_accumulation_steps = steps
            model.zero_grad()
            loss = trainer.training_step(model, dict(batch))
            grads[steps] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert grads[1][0] == pytest.approx(4 * grads[4][0], rel=1e-5)
    for g1, g4 in zip(grads[1][1], grads[4][1]):
        torch.testing.assert_close(g1, 4 * g4, rtol=1e-4, atol=1e-7)


def test_prepare_lora_stage_sets_up_the_contrastive_stage(data, tmp_path):
    """`prepare_lora_stage()` (the public stage API benchmarks/overhead.py uses): LoRA loss, only LoRA A/B trainable,
    and a fresh optimizer over exactly those parameters; on exit the trainer is back to evaluation."""
    model = get_peft_model(T.BertForSequenceClassification(T.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        FairLoraConfig(task_type="SEQ_CLS"))
    trainer = FairTrainer(model=model, args=fair_args(tmp_path), train_dataset=data["train"])
    trainer.optimizer, trainer.skipped_batches = torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 3  # stale
    assert trainer.stage is None
    with trainer.prepare_lora_stage():
        assert trainer.stage == "lora" and trainer.optimizer is None and trainer.lr_scheduler is None
        assert trainer.skipped_batches == 0
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trainable) == 2 * len(model.base_model.targeted_module_names)
        assert all(".fairlora_A.default." in n or ".fairlora_B.default." in n for n in trainable)
        optimizer = trainer.create_optimizer()
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
        assert (model.get_base_model().fair_bias_detector.fairlora_prototype_counts["default"][:, 0] > 0).all()
    assert trainer.stage is None and not any(p.requires_grad for p in model.parameters())


def _trained_adapter(data, erm_dir, tmp_path, rng_before: int, seed: int = 0) -> dict:
    torch.manual_seed(rng_before)  # what the global RNG did before get_peft_model must not matter
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    args = fair_args(tmp_path, num_train_epochs=1, detector_epochs=1, lora_min_updates=5, detector_min_updates=5,
                     seed=seed)
    FairTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"]).train()
    return {k: v.clone() for k, v in model.state_dict().items() if "fairlora" in k}


def test_a_run_is_reproducible_from_its_seed_alone(data, erm_dir, tmp_path):
    """get_peft_model draws the adapter's weights before Trainer sets the seed; FairTrainer draws a fresh adapter's
    weights again from args.seed, so two runs with one seed give the same adapter, and another seed another one."""
    first = _trained_adapter(data, erm_dir, tmp_path / "a", rng_before=1)
    second = _trained_adapter(data, erm_dir, tmp_path / "b", rng_before=2)
    assert first.keys() == second.keys() and any("fairlora_detector" in k for k in first)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    other = _trained_adapter(data, erm_dir, tmp_path / "c", rng_before=1, seed=1)
    assert any(not torch.equal(first[k], other[k]) for k in first if "fairlora_A" in k)


def test_a_trained_adapter_is_not_drawn_again_when_training_continues(data, erm_dir, tmp_path):
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    tuner = model.base_model
    assert tuner.is_fresh("default")
    layer = tuner.lora_layers("default")[0]
    with torch.no_grad():
        layer.fairlora_B["default"].weight.fill_(0.5)  # someone's LoRA weights: not a fresh adapter any more
    assert not tuner.is_fresh("default")
    kept = layer.fairlora_A["default"].weight.clone()
    args = fair_args(tmp_path, num_train_epochs=1, detector_epochs=1, lora_min_updates=1, detector_min_updates=2,
                     learning_rate=0.0)
    FairTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"]).train()
    torch.testing.assert_close(layer.fairlora_A["default"].weight, kept, rtol=0, atol=0)
    assert not tuner.is_fresh("default")  # the prototypes are set now


# ---------------------------------------------------------------------------- drop-in Trainer usage
def _short(tmp_path, **kw):
    """Short stages: these tests check Trainer features, not the size of a gain."""
    return fair_args(tmp_path, **{"num_train_epochs": 1, "detector_min_updates": 20, "detector_epochs": 1,
                                  "lora_min_updates": 20, **kw})


def test_a_label_column_and_bool_groups_work_as_labels_and_0_1(data, erm_dir, tmp_path):
    """`label` (as many HF datasets name it) is the class column on the training and eval sets alike (the LoRA stage
    trains on both, the selection reads the eval one), and a bool group column is reported as s0 / s1."""
    def relabel(ds):
        return _with(ds.rename_column("labels", "label"), "sensitive", [bool(v) for v in ds["sensitive"]])

    trainer = FairTrainer(model=get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS")),
                          args=_short(tmp_path), train_dataset=relabel(data["train"]),
                          eval_dataset=relabel(data["validation"]))
    metrics = trainer.train().metrics
    assert metrics["train_lora_eval_rows"] > 0 and metrics["train_selection_rows"] > 0  # the eval set was used
    evaluated = trainer.evaluate(relabel(data["test"]))
    assert {"eval_gate_rate_s0", "eval_gate_rate_s1", "eval_acc_y1_s1"} <= set(evaluated)


def test_a_users_compute_metrics_gets_logits_and_labels(data, erm_dir, tmp_path):
    """As from `Trainer`: `EvalPrediction(predictions=logits, label_ids=labels)`, whether passed to the constructor
    or set on the trainer later; `metrics.make_compute_metrics` still gets FairTrainer's tuples."""
    seen = []

    def accuracy(eval_pred):
        seen.append((np.shape(eval_pred.predictions), np.shape(eval_pred.label_ids)))
        return {"my_accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}

    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    test = data["test"]
    trainer = FairTrainer(model=model, args=_short(tmp_path), eval_dataset=test, compute_metrics=accuracy)
    first = trainer.evaluate()
    trainer.compute_metrics = accuracy
    assert trainer.evaluate()["eval_my_accuracy"] == first["eval_my_accuracy"] > 0.5
    assert seen == [((len(test), 2), (len(test),))] * 2
    trainer.compute_metrics = M.make_compute_metrics()
    assert "eval_gate_rate_s1" in trainer.evaluate()


def test_early_stopping_and_label_smoothing_reach_the_lora_stage(data, erm_dir, tmp_path):
    """EarlyStoppingCallback watches the LoRA stage's evaluations (the detector stage evaluates nothing, and the
    callback would refuse it), which read the eval rows the LoRA does not train on; label_smoothing_factor smooths the
    LoRA stage's task term."""
    losses = {}
    for smoothing in (0.0, 0.5):
        args = _short(tmp_path / str(smoothing), lora_objective="task", label_smoothing_factor=smoothing,
                      eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                      metric_for_best_model="eval_accuracy")
        trainer = FairTrainer(model=get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS")), args=args,
                              train_dataset=data["train"], eval_dataset=data["validation"],
                              callbacks=[T.EarlyStoppingCallback(early_stopping_patience=1)])
        seen = []

        class Rows(T.TrainerCallback):  # the rows each of the LoRA stage's evaluations reads
            def on_evaluate(self, args, state, control, **kwargs):
                seen.append(len(trainer.eval_dataset))

        trainer.add_callback(Rows())
        losses[smoothing] = trainer.train().metrics["train_loss"]
        assert any(isinstance(c, T.EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
        # they read the eval rows the LoRA did not train on (best checkpoint and early stopping are not optimistic)
        assert seen and set(seen) == {len(trainer.eval_split()["select"])} and seen[0] < len(data["validation"])
        assert trainer.eval_dataset is data["validation"]
    assert losses[0.5] != pytest.approx(losses[0.0], rel=1e-3)


def test_dict_eval_sets_say_which_one_trains_and_selects_and_a_list_is_refused(data, erm_dir, tmp_path):
    model = get_peft_model(erm(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    with expect_warnings(r"trains its LoRA on half of eval_dataset\['test'\].*Put your validation split first"):
        FairTrainer(model=model, args=_short(tmp_path), train_dataset=data["train"],
                    eval_dataset={"test": data["test"], "validation": data["validation"]})
    with pytest.raises(ValueError, match=r"needs a `datasets.Dataset` .* got list"):
        FairTrainer(model=model, args=_short(tmp_path), train_dataset=list(data["train"]))
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=1 is below min_anchors_per_batch=2"):
        _short(tmp_path, per_device_train_batch_size=1)
    assert _short(tmp_path, per_device_train_batch_size=1, min_anchors_per_batch=1).min_anchors_per_batch == 1
