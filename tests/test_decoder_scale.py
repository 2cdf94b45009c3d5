"""Llama-style decoder classifiers as a 7B recipe runs them (docs/scale.md), on a tiny seeded config.

Non-reentrant gradient checkpointing, a bf16 base and LEFT padding (pad_token_id set) together: z, the prototype
representation, is the last non-padding token's final hidden state, i.e. exactly what the `score` head reads; the
detector pools over the non-padding tokens only; FairTrainer trains; the saved adapter reloads with equal logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset
from peft import PeftModel, get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, force_gate, gate_record
from fairnet_peft.tuner.representation import capture_head_input

T.logging.set_verbosity_error()
PAD, VOCAB, SEQ = 0, 48, 12


def _llama(dtype=torch.bfloat16) -> T.LlamaForSequenceClassification:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD, num_labels=2,
                        attention_dropout=0.0)
    model = T.LlamaForSequenceClassification(cfg).to(dtype)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _wrap(base):
    torch.manual_seed(1)
    return get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS", detector_dropout=0.0))


def _left_padded(n: int, seed: int = 0) -> dict:
    """Rows of 5..SEQ real tokens, padded on the LEFT with PAD (as decoder tokenizers with padding_side='left')."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(5, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ).unsqueeze(0) >= SEQ - lengths.unsqueeze(1)).long()
    ids[mask == 0] = PAD
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()
    return {"input_ids": ids, "attention_mask": mask}


def test_z_is_the_last_real_tokens_final_hidden_state_the_score_head_reads():
    model = _wrap(_llama()).eval()
    batch = _left_padded(6)
    with torch.no_grad(), force_gate(model, False), capture_head_input(model, batch) as cap:
        out = model(**batch, output_hidden_states=True)
    z = cap.z
    assert z.shape == (6, 32) and z.dtype == torch.bfloat16
    last = out.hidden_states[-1][:, -1]  # left padding: the last real token is the last position
    torch.testing.assert_close(z, last, rtol=0, atol=0)
    score = model.get_base_model().score
    torch.testing.assert_close(score(z), out.logits, rtol=0, atol=0)  # exactly what the head's logits come from
    # right padding of the same rows: z still follows the last real token, not the last position
    right = {k: torch.stack([torch.roll(r, int(-(1 - m).sum())) for r, m in zip(v, batch["attention_mask"])])
             for k, v in batch.items()}
    with torch.no_grad(), force_gate(model, False), capture_head_input(model, right) as cap_right:
        out_right = model(**right)
    torch.testing.assert_close(out_right.logits, out.logits, rtol=0.05, atol=0.05)  # positions shift (RoPE)
    assert not torch.equal(cap_right.z, out.hidden_states[-1][:, -1])  # the last position is padding now


def test_detector_pools_over_the_non_padding_tokens_only():
    model = _wrap(_llama()).eval()
    config = model.peft_config["default"]
    batch = _left_padded(6, seed=1)
    captured = {}

    def keep_input(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    read = model.get_base_model().get_submodule(config.detector_module)
    handle = read.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    risk = gate_record(model).risk
    net = model.base_model.model.fair_bias_detector.fairlora_detector["default"]
    with torch.no_grad():
        expected = torch.stack([net(captured["h"][i:i + 1, batch["attention_mask"][i] == 1]) for i in range(6)])
    torch.testing.assert_close(risk, expected.squeeze(1), rtol=0, atol=1e-6)  # = the detector on the real tokens
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    with torch.no_grad():
        model(**other)  # other ids at the padded positions: the real tokens' states do not change, nor the risk
    torch.testing.assert_close(gate_record(model).risk, risk, rtol=0, atol=1e-6)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])  # without the mask the pads count, and the risk moves
    assert (gate_record(model).risk - risk).abs().max() > 1e-4


def _train_set(n: int = 96) -> Dataset:
    batch = _left_padded(n, seed=2)
    g = np.random.default_rng(0)
    labels = g.integers(0, 2, n)
    sensitive = (g.random(n) < 0.25).astype(int)
    ids = batch["input_ids"].clone()
    ids[:, -1] = torch.as_tensor(3 + labels + 2 * sensitive)  # the class and the group are visible to the model
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": batch["attention_mask"].tolist(),
                              "labels": labels.tolist(), "sensitive": sensitive.tolist()})


@pytest.mark.slow
@pytest.mark.parametrize("bf16_autocast", [False, True], ids=["bf16-base", "bf16-base+autocast"])
def test_fair_trainer_trains_and_the_adapter_reloads_with_equal_logits(tmp_path, bf16_autocast):
    model = _wrap(_llama())
    train = _train_set()
    args = FairTrainingArguments(
        str(tmp_path / "run"), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        bf16=bf16_autocast, detector_epochs=1, detector_min_updates=2, detector_learning_rate=1e-2,
        lora_min_updates=2, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=32,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = FairTrainer(model=model, args=args, train_dataset=train)
    result = trainer.train()
    assert np.isfinite(result.training_loss) and trainer.lora_relative_update() > 0
    assert model.get_base_model().is_activation_checkpointing
    protos = model.base_model.model.fair_bias_detector.fairlora_prototypes["default"]
    assert protos.dtype == torch.float32 and torch.isfinite(protos).all() and protos.abs().sum() > 0
    model.save_pretrained(str(tmp_path / "adapter"))
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()  # drops bf16=True's autocast
    batch = _left_padded(8, seed=5)
    with torch.no_grad():
        logits = model(**batch).logits
    gate = gate_record(model).gate
    reloaded = PeftModel.from_pretrained(_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits_again = reloaded(**batch).logits
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)
    assert torch.equal(gate_record(reloaded).gate, gate)
    torch.testing.assert_close(reloaded.base_model.model.fair_bias_detector.fairlora_prototypes["default"], protos)
