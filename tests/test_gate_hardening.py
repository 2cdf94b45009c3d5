"""Gate hardening: no stale gates, checkpoint replay, no pinned batch tensors, DataParallel refused,
detector device moves, a differentiable loss with no gated row, integer-only fair_gate, and the batch contract."""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch
import transformers as T
from peft import get_peft_model
from torch import nn

from fairnet_peft import FairLoraConfig, force_gate, gate_record
from fairnet_peft.tuner.detector import DetectorNet
from fairnet_peft.tuner.gate import GateRecord, GateState, find_gate_state

from .helpers import CustomCheckpointed, tiny_batch, tiny_model


def wrap(kind="bert", **kw):
    kw.setdefault("init_weights", False)
    task = None if kind == "vit" else "SEQ_CLS"
    return get_peft_model(tiny_model(kind), FairLoraConfig(task_type=task, **kw)).eval()


def _mixed_threshold(model, batch):
    """Put τ at the median risk so the detector gates a mix of rows."""
    with torch.no_grad(), force_gate(model, False):
        model(**batch)
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())


# ---------------------------------------------------------------------------- 1. stale gates
def test_inner_submodule_call_after_a_root_pass_is_base_behaviour():
    model, base = wrap(), tiny_model("bert")
    batch = tiny_batch("bert")
    with torch.no_grad():
        ref = base.bert(**batch).last_hidden_state
        for gate in (torch.ones(6), torch.zeros(6), torch.ones(6)):
            model(**batch, fair_gate=gate)
            inner = model.base_model.model.bert(**batch).last_hidden_state
            torch.testing.assert_close(inner, ref, rtol=0, atol=0)
        # the root call itself still applies the gate
        on = model(**batch, fair_gate=torch.ones(6)).logits
    assert not torch.allclose(on, base(**batch).logits)


def test_direct_call_with_another_batch_size_uses_no_gate():
    model, base = wrap(), tiny_model("bert")
    small, big = tiny_batch("bert", batch=2), tiny_batch("bert", batch=5, seed=3)
    with torch.no_grad():
        model(**small, fair_gate=torch.ones(2))
        got = model.base_model.model.bert(**big).last_hidden_state
        ref = base.bert(**big).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_gate_record_is_the_last_root_pass_and_a_failed_forward_publishes_none():
    model = wrap()
    batch = tiny_batch("bert")
    gate = torch.tensor([1, 0, 1, 1, 0, 0])
    with torch.no_grad():
        model(**batch, fair_gate=gate)
        model.base_model.model.bert(**tiny_batch("bert", batch=3))  # a bypass call does not overwrite the record
    assert torch.equal(gate_record(model).gate, gate.bool())
    state = find_gate_state(model)
    assert state.passes == []
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 0] = 10_000  # out of vocabulary: the forward raises after the pass opened
    with pytest.raises(IndexError), torch.no_grad():
        model(**bad, fair_gate=gate)
    assert state.passes == []  # closed by the always-called post-hook
    with pytest.raises(ValueError, match="No gate recorded"):
        gate_record(model)


def _grads(model, batch, labels):
    model.zero_grad()
    out = model(**batch, labels=labels)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layers", [None, [0, 1, 2, 3]], ids=["single-pass", "backtrack"])
def test_checkpoint_recompute_replays_the_mixed_detector_gate(layers):
    batch = tiny_batch("bert")
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    model = wrap(layers_to_transform=layers)
    _mixed_threshold(model, batch)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    plain = _grads(model, batch, labels)
    gate = gate_record(model).gate
    assert 0 < int(gate.sum()) < 6
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _grads(model, batch, labels)
    assert torch.equal(gate_record(model).gate, gate)
    assert plain.keys() == ckpt.keys() and any("fairlora_B" in k for k in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for n, g in plain.items() if "fairlora_B" in n)
    plain_model = model.unload()  # the wrapped checkpoint functions are put back
    assert not any(type(m.__dict__.get("_gradient_checkpointing_func")).__name__ == "_GateCheckpoint"
                   for m in plain_model.modules())


def test_checkpointing_with_torchs_reentrant_default_is_refused():
    model = wrap().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"preserve_rng_state": True})  # reentrant
    with pytest.raises(ValueError, match="non-reentrant activation checkpointing"):
        model(**tiny_batch("bert"))
    assert find_gate_state(model).passes == []


def test_custom_torch_checkpoint_recomputes_with_the_pass_gate():
    grads = []
    for use_checkpoint in (False, True):
        model = get_peft_model(CustomCheckpointed(use_checkpoint), FairLoraConfig(target_modules=["mid"],
                                                                             init_weights=False)).train()
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        model(x, fair_gate=torch.tensor([1, 0, 1, 0])).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("fairlora_B" in k for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- 2. no pinned batch tensors
def _reachable_tensors(state: GateState) -> list[torch.Tensor]:
    """Tensors reachable from the gate state (the calling thread's part included), not counting the detector module,
    configs and hook handles."""
    seen, out = set(), []
    todo = [v for k, v in vars(state).items() if k not in ("detector", "configs", "read_handles", "root_handles")]
    assert any(isinstance(v, threading.local) for v in todo)  # the per-thread passes and records are walked too
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
        elif isinstance(obj, threading.local):
            todo.extend(vars(obj).values())
        elif dataclasses.is_dataclass(obj):
            todo.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    return out


def test_gate_state_holds_no_batch_tensors_after_a_train_and_an_eval_step():
    model = wrap()
    batch = tiny_batch("bert")
    _mixed_threshold(model, batch)
    state = find_gate_state(model)
    seen_hidden = []
    hook = model.base_model.model.bert.encoder.layer[2].register_forward_pre_hook(
        lambda m, a: seen_hidden.append(weakref.ref(a[0])))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in ("train", "eval"):
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        refs = [weakref.ref(ids), weakref.ref(mask)]
        if step == "train":
            out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1] * 3))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            model.eval()
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
        del out, ids, mask
        gc.collect()
        assert all(r() is None for r in refs + seen_hidden), f"{step}: the gate state pins the batch"
        for tensor in _reachable_tensors(state):
            assert tensor.dim() == 1 and tensor.shape[0] <= 6 and not tensor.requires_grad  # gate, idx, risk
        assert isinstance(gate_record(model), GateRecord)
    hook.remove()


# ---------------------------------------------------------------------------- 3. DataParallel
def test_data_parallel_replicas_are_refused_with_the_launcher_to_use():
    model = wrap()
    root = model.base_model.model
    replica = root._replicate_for_data_parallel()  # what nn.DataParallel's replicate() makes, CPU-safe
    with pytest.raises(RuntimeError, match=r"DataParallel.*torchrun.*accelerate launch"):
        replica(**tiny_batch("bert"))
    assert find_gate_state(model).passes == []
    with torch.no_grad():
        model(**tiny_batch("bert"))  # the original keeps working


# ---------------------------------------------------------------------------- 4. detector on another device/dtype
def test_detector_input_goes_to_the_detector_device_and_the_gate_comes_back(monkeypatch):
    """CPU proof of the moves only: a fake detector 'lives' on meta, so its input must arrive on meta, and its
    (CPU) risk must reach the layers. A real CPU/GPU split is covered by the device check in the lead's script."""
    model = wrap()
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(**batch)
    ref = gate_record(model).risk
    seen = {}

    def spy(self, hidden, mask=None):  # a detector on meta: records where its inputs arrive, answers from the CPU run
        seen["hidden"], seen["mask"] = hidden.device, None if mask is None else mask.device
        return ref.clone()

    monkeypatch.setattr(DetectorNet, "forward", spy)
    monkeypatch.setattr("fairnet_peft.tuner.gate._device_of", lambda module, default: torch.device("meta"))
    model.peft_config["default"].threshold = float(ref.median())
    with torch.no_grad():
        model(**batch)
    assert seen == {"hidden": torch.device("meta"), "mask": torch.device("meta")}
    rec = gate_record(model)
    assert rec.risk.device.type == "cpu" and rec.gate.device.type == "cpu"
    assert torch.equal(rec.gate, ref > ref.median()) and 0 < rec.n_on < 6


def test_float64_detector_reads_float32_hidden_states():
    model = wrap()
    batch = tiny_batch("bert")
    with torch.no_grad(), force_gate(model, False):
        model(**batch)
        ref = gate_record(model).risk
        model.base_model.model.fair_bias_detector.fairlora_detector["default"].double()
        model(**batch)
    risk = gate_record(model).risk
    assert risk.dtype == torch.float64
    torch.testing.assert_close(risk.float(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- 5. backward with no gated row
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _lora_only_model():
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), FairLoraConfig(target_modules=["mid"], threshold=1.0, init_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("fairlora_A" in n or "fairlora_B" in n for n in trainable)
    return model


def test_backward_with_no_gated_row_gives_zero_lora_grads_in_a_plain_loop():
    model = _lora_only_model().train()
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    out = model(x, labels=y)
    assert not gate_record(model).gate.any()
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
    with torch.no_grad():
        base = model.base_model.model
        expected = base.out(torch.relu(base.mid.base_layer(torch.relu(base.inp(x)))))
        torch.testing.assert_close(model(x)["logits"], expected, rtol=0, atol=0)


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 8, generator=g), torch.tensor([0, 1] * 4)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_backward_with_no_gated_row_in_a_plain_trainer_step(tmp_path):
    model = _lora_only_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                               use_cpu=True, learning_rate=0.1, weight_decay=0.0, save_strategy="no",
                               remove_unused_columns=False)
    result = T.Trainer(model=model, args=args, train_dataset=_Rows()).train()
    assert result.global_step == 2
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n]), f"{n} moved with zero gradients"


# ---------------------------------------------------------------------------- 6. fair_gate values
@pytest.mark.parametrize("value", [0.7, [1.0, 0.5, 0, 0, 1, 1], float("nan")])
def test_fair_gate_non_integer_values_are_refused(value):
    model = wrap()
    gate = torch.full((6,), value) if not isinstance(value, list) else torch.tensor(value)
    with pytest.raises(ValueError, match="fair_gate values must be 1.*non-integer"), torch.no_grad():
        model(**tiny_batch("bert"), fair_gate=gate)
    assert find_gate_state(model).passes == []


def test_fair_gate_integral_floats_bools_and_strings():
    model = wrap()
    batch = tiny_batch("bert")
    with torch.no_grad():
        a = model(**batch, fair_gate=torch.tensor([1.0, 0.0, 1.0, 0.0, -1.0, 0.0])).logits
        assert gate_record(model).gate[:4].tolist() == [True, False, True, False]
        b = model(**batch, fair_gate=torch.tensor([True, False, True, False, False, False])).logits
        torch.testing.assert_close(a[:4], b[:4], rtol=0, atol=0)
        with pytest.raises(TypeError, match="fair_gate for adapter 'default'"):
            model(**batch, fair_gate="on")


# ---------------------------------------------------------------------------- 7. the batch contract
def _row_by_row(model, inputs, n):
    gate = torch.tensor([1, 0, 1, 0, 0, 1])[:n]
    with torch.no_grad():
        mixed = model(**inputs, fair_gate=gate).logits
        assert gate_record(model).batch_size == n and torch.equal(gate_record(model).gate, gate.bool())
        on, off = model(**inputs, fair_gate=torch.ones(n)).logits, model(**inputs, fair_gate=torch.zeros(n)).logits
    assert not torch.allclose(on, off)
    for row in range(n):
        torch.testing.assert_close(mixed[row], (on if gate[row] else off)[row], rtol=0, atol=1e-6)


def test_batch_contract_vit_pixel_values():
    model = wrap("vit")
    assert {"q_proj", "v_proj"} <= set(model.peft_config["default"].target_modules)  # ViT's transformers-5 names
    _row_by_row(model, tiny_batch("vit"), 6)
    with torch.no_grad():
        model(tiny_batch("vit")["pixel_values"])  # positional
    assert gate_record(model).batch_size == 6 and gate_record(model).risk.shape == (6,)


def test_batch_contract_inputs_embeds_uses_the_token_mask():
    model = wrap()
    batch = tiny_batch("bert")
    embeds = model.base_model.model.bert.embeddings.word_embeddings(batch["input_ids"]).detach()
    inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}
    _row_by_row(model, inputs, 6)
    with torch.no_grad(), force_gate(model, False):
        model(**batch)
        by_ids = gate_record(model).risk
        model(**inputs)
        by_embeds = gate_record(model).risk
        model(inputs_embeds=embeds)
        unmasked = gate_record(model).risk
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-6)  # the padded row's mask reached the detector
    assert not torch.allclose(unmasked[1], by_ids[1])


def _tiny_wav2vec2():
    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2, num_labels=2, vocab_size=10)
    return T.Wav2Vec2ForSequenceClassification(cfg).eval()


def test_batch_contract_audio_input_values_pool_the_real_frames():
    """A per-sample audio mask is not sliced onto frames; the detector gets the model's own frame mask
    (`_get_feature_vector_attention_mask`), so it pools only the frames of real samples."""
    model = get_peft_model(_tiny_wav2vec2(), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 400, generator=g)
    mask = torch.ones(4, 400, dtype=torch.long)
    mask[1, 200:] = 0
    _row_by_row(model, {"input_values": values}, 4)
    cfg = model.peft_config["default"]
    read = model.base_model.model.get_submodule(cfg.detector_module)
    seen = []
    hook = read.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()),
                                          with_kwargs=True)
    with torch.no_grad(), force_gate(model, False):
        model(input_values=values, attention_mask=mask)
    hook.remove()
    risk = gate_record(model).risk
    base = model.base_model.model
    net = base.fair_bias_detector.fairlora_detector["default"]
    hidden = seen[0]
    assert hidden.shape[0] == 4 and hidden.shape[1] < 400  # frames, not the 400 samples the mask counts
    frames = base.wav2vec2._get_feature_vector_attention_mask(hidden.shape[1], mask).long()
    assert frames[1].sum() < hidden.shape[1] and bool(frames[[0, 2, 3]].all())
    with torch.no_grad():
        unmasked = net(hidden, None)
        framed = net(hidden, frames)
        sliced = net(hidden, mask[:, -hidden.shape[1]:])  # what slicing the sample mask onto frames would give
    torch.testing.assert_close(risk, framed, rtol=0, atol=1e-6)
    torch.testing.assert_close(risk[[0, 2, 3]], unmasked[[0, 2, 3]], rtol=0, atol=1e-6)
    assert not torch.allclose(risk[1], unmasked[1]) and not torch.allclose(risk[1], sliced[1])
