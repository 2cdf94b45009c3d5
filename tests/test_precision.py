"""Mixed precision: the detector and FairNet's losses compute in fp32, and the gate does not depend on bf16.

Two bf16 set-ups, both on the CPU: `bf16=True` (autocast around an fp32 model) and a base cast to bf16 before
wrapping (what `from_pretrained(..., torch_dtype=torch.bfloat16)` gives). On a fixed batch the gate decisions equal
the fp32 model's for every row whose fp32 risk is more than 0.05 from τ; FairTrainer trains and evaluates with
finite risks in both.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, gate_record
from fairnet_peft.data import make_synthetic_text
from fairnet_peft.training.losses import class_balanced_bce, pairwise_distance, prototype_triplet_loss
from fairnet_peft.tuner.detector import DetectorNet

from .helpers import expect_warnings

T.logging.set_verbosity_error()
TAU, AWAY = 0.5, 0.05


def _bert(seed: int = 0) -> T.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return T.BertForSequenceClassification(cfg).eval()


def _wrap(base, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS", threshold=TAU, detector_dropout=0.0)).eval()


def _spread_detector(model, gain: float = 40.0) -> None:
    """A fresh detector scores every row ≈ 0.5; a larger output layer spreads the risks over (0, 1)."""
    net = model.base_model.model.fair_bias_detector.fairlora_detector["default"]
    with torch.no_grad():
        net.risk_mlp[-1].weight.mul_(gain)


def _batch(n: int = 64, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 32, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _gate(model, batch, autocast: bool = False):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch).logits
    record = gate_record(model)
    return record.risk, record.gate, logits


def _assert_same_gate_away_from_tau(risk32, gate32, risk16, gate16) -> None:
    assert risk16.dtype == torch.float32 and torch.isfinite(risk16).all()
    away = (risk32 - TAU).abs() > AWAY
    assert int(away.sum()) >= len(away) // 2, f"only {int(away.sum())} rows away from τ: the check would be vacuous"
    assert torch.equal(gate16[away], gate32[away]), (risk32[away], risk16[away])
    assert (risk16 - risk32).abs().max() < AWAY  # bf16 features move the risk a little, never across the band


# ---------------------------------------------------------------------------- the detector and the losses
def test_detector_computes_in_fp32_under_autocast_and_with_half_weights():
    torch.manual_seed(0)
    net = DetectorNet(16, [8], dropout=0.0, pooling="attention").eval()
    hidden = torch.randn(5, 7, 16).bfloat16()
    mask = torch.ones(5, 7)
    mask[0, :3] = 0  # left padding
    ref = net(hidden.float(), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        risk = net(hidden, mask)
    assert risk.dtype == torch.float32
    torch.testing.assert_close(risk, ref, rtol=0, atol=1e-6)
    half = copy.deepcopy(net).to(torch.bfloat16)  # a model cast to bf16 after wrapping
    risk_half = half(hidden, mask)
    assert risk_half.dtype == torch.float32
    assert (risk_half - ref).abs().max() < 2e-2  # only the weights' bf16 rounding is left
    risk_half.sum().backward()
    assert half.risk_mlp[-1].weight.grad is not None and half.risk_mlp[-1].weight.grad.dtype == torch.bfloat16


def test_losses_are_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 32, generator=g).bfloat16()
    protos = torch.randn(3, 32, generator=g)
    labels = torch.arange(12) % 3
    for distance in ("cosine", "euclidean", "squared_euclidean"):
        ref = pairwise_distance(z.float(), protos, distance)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = pairwise_distance(z, protos, distance)
            loss, _ = prototype_triplet_loss(z, labels, protos, margin=0.3, distance=distance)
        assert got.dtype == torch.float32 and loss.dtype == torch.float32, distance
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # a bf16 matmul is off by ~1e-2
        ref_loss, _ = prototype_triplet_loss(z.float(), labels, protos, margin=0.3, distance=distance)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    risk = torch.tensor([0.999, 0.001, 0.7, 0.2]).bfloat16()
    target = torch.tensor([1, 0, 1, -1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bce = class_balanced_bce(risk, target, pos_weight=3.0)
    assert bce.dtype == torch.float32
    torch.testing.assert_close(bce, class_balanced_bce(risk.float(), target, 3.0), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- gate decisions on a fixed batch
def test_gate_under_autocast_matches_fp32_away_from_tau():
    model = _wrap(_bert())
    _spread_detector(model)
    batch = _batch()
    risk32, gate32, logits32 = _gate(model, batch)
    risk16, gate16, logits16 = _gate(model, batch, autocast=True)
    assert logits16.dtype == torch.bfloat16  # the base really ran in bf16
    _assert_same_gate_away_from_tau(risk32, gate32, risk16, gate16)


def test_gate_of_a_bf16_base_matches_fp32_away_from_tau():
    base = _bert()
    model32 = _wrap(copy.deepcopy(base))
    model16 = _wrap(base.to(torch.bfloat16))  # = from_pretrained(..., torch_dtype=torch.bfloat16)
    detector = model16.base_model.model.fair_bias_detector.fairlora_detector["default"]
    assert detector.in_norm.weight.dtype == torch.float32  # PEFT keeps adapter weights in fp32
    _spread_detector(model32)
    _spread_detector(model16)
    batch = _batch()
    risk32, gate32, _ = _gate(model32, batch)
    risk16, gate16, logits16 = _gate(model16, batch)
    assert logits16.dtype == torch.bfloat16
    _assert_same_gate_away_from_tau(risk32, gate32, risk16, gate16)


# ---------------------------------------------------------------------------- FairTrainer end to end
@pytest.fixture(scope="module")
def small_data():
    return make_synthetic_text(seed=0, n_train=256, n_val=64, n_test=8)


def _train(model, data, tmp_path, bf16: bool, **extra):
    args = FairTrainingArguments(
        str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=bf16, seed=0,
        detector_epochs=2, detector_min_updates=4, detector_learning_rate=1e-2, lora_min_updates=4, max_steps=4,
        learning_rate=1e-2, per_device_train_batch_size=32, per_device_eval_batch_size=32, logging_steps=2, **extra)
    trainer = FairTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"])
    result = trainer.train()
    return trainer, result


def _check_trained(trainer, result, data, tmp_path):
    assert np.isfinite(result.training_loss)
    detector_losses = [e["detector_loss"] for e in trainer.state.log_history if "detector_loss" in e]
    assert detector_losses and np.isfinite(detector_losses).all()
    assert torch.isfinite(trainer.model.base_model.model.fair_bias_detector.fairlora_prototypes["default"]).all()
    with expect_warnings("LoRA stage trained on .* of these .* eval rows"):  # lora_rows="train+eval"
        metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and np.isfinite(metrics["eval_worst_group_accuracy"])
    _, risk, gate = trainer.predict(data["validation"]).predictions
    assert np.isfinite(risk).all() and ((risk >= 0) & (risk <= 1)).all()
    tau = trainer.adapter_config.threshold  # as chosen after training (selection.py)
    assert np.array_equal(gate, (risk > tau).astype(gate.dtype))


def test_fair_trainer_with_bf16_autocast_trains_and_evaluates(small_data, tmp_path):
    model = _wrap(_bert())
    trainer, result = _train(model, small_data, tmp_path, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    _check_trained(trainer, result, small_data, tmp_path)
    for name, p in model.named_parameters():
        if "fairlora_" in name:
            assert p.dtype == torch.float32, name  # trainable weights stay fp32 masters
    model.eval()  # the trained detector's gate does not depend on the autocast
    batch = _batch()
    risk32, gate32, _ = _gate(model, batch)
    risk16, gate16, _ = _gate(model, batch, autocast=True)
    away = (risk32 - TAU).abs() > AWAY
    assert torch.isfinite(risk16).all() and torch.equal(gate16[away], gate32[away])


def test_fair_trainer_on_a_bf16_base_trains_and_evaluates(small_data, tmp_path):
    model = _wrap(_bert().to(torch.bfloat16))
    before = {k: v.clone() for k, v in model.state_dict().items() if "fairlora_detector" in k}
    trainer, result = _train(model, small_data, tmp_path, bf16=False)
    _check_trained(trainer, result, small_data, tmp_path)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the detector stage trained the detector
    assert trainer.lora_relative_update() > 0


def test_bf16_full_eval_leaves_the_adapter_as_the_selection_chose_it(small_data, tmp_path):
    """`bf16_full_eval`: Trainer casts the model to bf16 for an evaluation outside training and leaves it so; the base
    stays cast (the user's choice), the adapter's tensors get their fp32 values back."""
    model = _wrap(_bert())
    trainer, _ = _train(model, small_data, tmp_path, bf16=False, bf16_full_eval=True)
    adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if "fairlora_" in k}
    with expect_warnings("LoRA stage trained on"):
        metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    assert model.base_model.model.classifier.weight.dtype == torch.bfloat16  # Trainer's cast of the base
    after = model.state_dict()
    for key, value in adapter.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_passes_before_the_first_stage_run_under_the_training_autocast(small_data, tmp_path):
    """The partial and unlabeled settings pass over the rows before the first stage prepares the model (which adds
    the autocast): with bf16=True that pass computes in bf16 too, as every later pass does."""
    from fairnet_peft.training.trainer import _with_row_column

    model = _wrap(_bert())
    args = FairTrainingArguments(str(tmp_path), report_to=[], use_cpu=True, bf16=True, per_device_eval_batch_size=32)
    trainer = FairTrainer(model=model, args=args, train_dataset=small_data["train"])
    rows = _with_row_column(small_data["validation"].remove_columns("sensitive"))
    logits = trainer.frozen_pass(rows)["logits"]
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.base_model.model(**batch).logits.float().numpy()
    with torch.no_grad():
        full = model.base_model.model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    assert np.abs(logits - full).max() > 1e-4  # it did compute in bf16
