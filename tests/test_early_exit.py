"""The detector stage stops the forward at the detector's layer, and the frozen base features (z, logits,
pooled detector input) are computed once per `train()`; the results are the same as with whole forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, force_gate, gate_record
from fairnet_peft.training.passes import FEATURES
from fairnet_peft.tuner.early_exit import stop_at_detector

from .helpers import tiny_batch, tiny_model

T.logging.set_verbosity_error()


def _count_calls(module: torch.nn.Module, log: list, tag):
    return module.register_forward_hook(lambda *a: log.append(tag() if callable(tag) else tag))


def test_stop_at_detector_gives_the_whole_forwards_risk_and_runs_nothing_after_its_layer():
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(detector_layer=1, threshold=0.5)).eval()
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(**batch)
    full = gate_record(model).risk.clone()
    later = []
    handles = [_count_calls(model.base_model.model.bert.encoder.layer[i], later, i) for i in (1, 2, 3)]
    handles.append(_count_calls(model.base_model.model.classifier, later, "head"))
    try:
        with torch.no_grad(), stop_at_detector(model, "default") as stop:
            model(**batch)
            pytest.fail("the forward should have ended at the detector")  # never reached
    finally:
        for h in handles:
            h.remove()
    assert later == []  # the detector reads the input of block 1: blocks 1..3 and the head never ran
    torch.testing.assert_close(stop.record.risk, full)
    with pytest.raises(ValueError, match="No gate recorded"):
        gate_record(model)  # a stopped pass publishes nothing
    with torch.no_grad():
        assert model(**batch).logits.shape == (6, 2)  # the model is whole again afterwards


def test_stop_at_detector_keeps_the_detectors_graph_for_its_loss():
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(detector_layer=2))
    model.base_model._gate_state(model.base_model.model).detector.set_detector_trainable("default", True)
    with force_gate(model, False), stop_at_detector(model, "default") as stop:
        model(**tiny_batch("bert"))
    stop.record.risk.sum().backward()
    detector = model.base_model.trainable_parameters("detector", "default")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in detector)
    assert all(p.grad is None for n, p in model.named_parameters() if "fairlora_detector" not in n)


def test_stop_at_detector_says_when_no_forward_reached_the_detector():
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(detector_layer=1))
    with pytest.raises(RuntimeError, match="reached the detector"):
        with stop_at_detector(model, "default"):
            pass


def _spy(trainer, monkeypatch):
    """Record every pass (features or risk only) and every head call, with the stage it happened in."""
    passes, head_calls = [], []
    import fairnet_peft.training.passes as passes_module

    run = passes_module.gated_pass

    def spied(model, batches, modes, **kwargs):
        out = run(model, batches, modes, **kwargs)
        passes.append((trainer.stage, kwargs.get("forward") is not None, len(out["row"]), tuple(modes)))
        return out

    monkeypatch.setattr(passes_module, "gated_pass", spied)
    _count_calls(trainer.model.get_base_model().classifier, head_calls, lambda: trainer.stage)
    return passes, head_calls


@pytest.mark.parametrize("setting", ["full", "unlabeled"])
def test_detector_stage_stops_at_its_layer_and_base_features_are_computed_once(setting, data, erm_dir, tmp_path,
                                                                               monkeypatch):
    train = data["train"]
    if setting == "unlabeled":
        train = train.remove_columns("sensitive").add_column("sensitive", [-1] * len(train))
    model = get_peft_model(T.BertForSequenceClassification.from_pretrained(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    args = FairTrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=32, detector_epochs=1,
                                 detector_min_updates=0, report_to=[], save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, dataloader_num_workers=0)
    trainer = FairTrainer(model=model, args=args, train_dataset=train)
    passes, head_calls = _spy(trainer, monkeypatch)
    trainer.train()
    n = len(train)
    assert [p[:3] for p in passes if p[1]] == [(None, True, n)]  # one pass computes z/logits/features, before the stage
    holdout = [p for p in passes if p[0] == "detector"]
    assert holdout and all(not p[1] and p[3] == ("risk",) for p in holdout)  # held-out loss: risk-only passes
    assert "detector" not in head_calls  # no detector-stage step or pass ran the model up to its head
    assert head_calls.count("lora") == 3  # the three LoRA steps ran whole forwards
    cached = trainer.frozen_pass()  # after train() the cache is gone: a whole pass again, same numbers
    whole = trainer.passes.features(trainer.train_dataset)
    for key in ("risk", *FEATURES):
        np.testing.assert_allclose(cached[key], whole[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.frozen_pass(full=False)["risk"], whole["risk"], rtol=1e-5, atol=1e-6)
