"""The FairLoRA PEFT method: registration, config, gating exactness, single pass vs two passes, save/load/Hub."""

from __future__ import annotations

import importlib
import json
import math
import os

import pytest
import torch
import transformers as T
from peft import (
    AutoPeftModel,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    get_peft_model,
)
from safetensors.torch import load_file

import fairnet_peft
from fairnet_peft import FairLoraConfig, force_gate, gate_record
from fairnet_peft.tuner.layer import FairLoraLayer

from .helpers import install_fake_hub, tiny_batch, tiny_model

KINDS = ["bert", "roberta", "distilbert", "llama", "vit"]


def wrap(kind, **kw):
    kw.setdefault("init_weights", False)
    task = None if kind == "vit" else "SEQ_CLS"
    return get_peft_model(tiny_model(kind), FairLoraConfig(task_type=task, **kw)).eval()


def logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


# ---------------------------------------------------------------------------- registration and config
def test_registration_is_idempotent_and_enum_complete():
    fairnet_peft._register()
    importlib.reload(fairnet_peft)
    assert PeftType("FAIRLORA") is PeftType.FAIRLORA
    assert PeftType.FAIRLORA in list(PeftType)
    assert FairLoraConfig().peft_type == PeftType.FAIRLORA


def test_every_config_field_is_documented():
    from dataclasses import fields

    own = [f for f in fields(FairLoraConfig) if f.name not in {f2.name for f2 in fields(PeftConfig)}]
    assert own and all(f.metadata.get("help") for f in own)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [({"r": 0}, "r"), ({"threshold": 1.5}, "threshold"), ({"threshold": -0.1}, "threshold"),
     ({"lora_dropout": 1.0}, "lora_dropout"), ({"detector_pooling": "max"}, "detector_pooling"),
     ({"detector_layer": -1}, "detector_layer")],
)
def test_invalid_config_values_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=f"FairLoraConfig.{field_name}"):
        FairLoraConfig(**kwargs)


def test_model_dependent_errors_name_the_field():
    with pytest.raises(ValueError, match=r"detector_layer=9 is out of range.*0\.\.3"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", detector_layer=9))
    with pytest.raises(ValueError, match=r"target_modules=.*matches no module"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"detector_module='nope' is not a module"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", detector_module="nope"))


@pytest.mark.parametrize(
    "kind, targets, stack",
    [("bert", {"query", "key", "value", "dense"}, "bert.encoder.layer"),
     ("roberta", {"query", "key", "value", "dense"}, "roberta.encoder.layer"),
     ("distilbert", {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}, "distilbert.transformer.layer"),
     ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, "model.layers"),
     ("vit", {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, "vit.layers"),
     ("gpt2", {"c_attn", "c_proj", "c_fc"}, "transformer.h")],
)
def test_default_targets_layers_and_read_point(kind, targets, stack):
    model = wrap(kind)
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == targets
    assert cfg.detector_layer == 2 and cfg.detector_module == f"{stack}.2"
    assert cfg.layers_to_transform == [2, 3]
    adapted = [n for n, m in model.named_modules() if isinstance(m, FairLoraLayer)]
    assert adapted and all((".2." in n) or (".3." in n) for n in adapted)  # never the pooler or the head's "dense"
    linear_in_blocks = [n for n, m in tiny_model(kind).named_modules() if n.startswith((f"{stack}.2.", f"{stack}.3."))
                        and type(m).__name__ in ("Linear", "Conv1D")]
    assert len(adapted) == len(linear_in_blocks)  # every linear layer of the adapted blocks


# ---------------------------------------------------------------------------- gating exactness
@pytest.mark.parametrize("kind", KINDS)
def test_gate_zero_is_base_bit_for_bit_and_disable_adapter_is_base(kind):
    batch = tiny_batch(kind)
    ref = logits(tiny_model(kind), batch)
    model = wrap(kind)
    n = next(iter(batch.values())).shape[0]
    assert torch.equal(logits(model, batch, fair_gate=torch.zeros(n)), ref)
    with force_gate(model, False):
        assert torch.equal(logits(model, batch), ref)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), ref)
    assert not torch.allclose(logits(model, batch, fair_gate=torch.ones(n)), ref)


def _plain_lora_twin(kind, fair_model):
    cfg = fair_model.peft_config["default"]
    lora = get_peft_model(
        tiny_model(kind),
        LoraConfig(task_type=cfg.task_type, r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                   layers_to_transform=cfg.layers_to_transform, layers_pattern=cfg.layers_pattern),
    ).eval()
    fair_sd = fair_model.state_dict()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_" in name:
                param.copy_(fair_sd[name.replace(".lora_A.", ".fairlora_A.").replace(".lora_B.", ".fairlora_B.")])
    return lora


@pytest.mark.parametrize("kind", KINDS)
def test_gate_one_equals_plain_peft_lora_with_same_weights(kind):
    batch = tiny_batch(kind)
    model = wrap(kind)
    lora = _plain_lora_twin(kind, model)
    with force_gate(model, True):
        fair = logits(model, batch)
    torch.testing.assert_close(fair, logits(lora, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_gates_are_correct_row_by_row(kind):
    batch = tiny_batch(kind)
    model = wrap(kind)
    n = next(iter(batch.values())).shape[0]
    gate = torch.tensor([1, 0, 1, 0, 0, 1])[:n]
    mixed = logits(model, batch, fair_gate=gate)
    assert torch.equal(gate_record(model).gate, gate.bool())
    assert gate_record(model).source == "fair_gate"
    on, off = logits(model, batch, fair_gate=torch.ones(n)), logits(model, batch, fair_gate=torch.zeros(n))
    for row in range(n):
        expected = on[row] if gate[row] else off[row]
        torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-6)


def _two_pass_reference(model, batch):
    """The paper's definition: base pass → risk → gate; corrected pass; pick per row."""
    with torch.no_grad(), force_gate(model, False):
        off = model(**batch).logits
        risk = gate_record(model).risk
    gate = risk > model.peft_config["default"].threshold
    with torch.no_grad(), force_gate(model, True):
        on = model(**batch).logits
    return torch.where(gate[:, None], on, off), gate


@pytest.mark.parametrize("kind", ["bert", "llama", "vit"])
@pytest.mark.parametrize("layers", [None, [0, 1, 2, 3]], ids=["single-pass", "backtrack"])
def test_detector_gate_equals_two_pass_reference(kind, layers):
    batch = tiny_batch(kind)
    model = wrap(kind, layers_to_transform=layers)
    with torch.no_grad(), force_gate(model, False):
        model(**batch)
    # put τ at the median risk so the batch is mixed
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())
    expected, gate = _two_pass_reference(model, batch)
    assert 0 < int(gate.sum()) < gate.numel()
    got = logits(model, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    rec = gate_record(model)
    assert torch.equal(rec.gate, gate) and rec.source == "detector"


def test_single_pass_runs_each_layer_once_and_backtrack_reruns_only_gated_rows():
    batch = tiny_batch("bert")
    calls = []
    for layers, expect_rows in ((None, None), ([0, 1, 2, 3], "gated")):
        model = wrap("bert", layers_to_transform=layers)
        with torch.no_grad(), force_gate(model, False):
            model(**batch)
        model.peft_config["default"].threshold = float(gate_record(model).risk.median())
        first = model.base_model.model.bert.encoder.layer[0]
        calls.clear()
        handle = first.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        logits(model, batch)
        handle.remove()
        if expect_rows is None:
            assert calls == [6]
        else:
            assert calls == [6, gate_record(model).n_on]


def test_threshold_extremes():
    batch = tiny_batch("bert")
    for tau, expected in ((0.0, True), (1.0, False)):
        model = wrap("bert", threshold=tau)
        logits(model, batch)
        assert bool(gate_record(model).gate.all()) is expected if expected else not gate_record(model).gate.any()


def test_no_gated_row_means_no_lora_compute(monkeypatch):
    calls = []
    original = FairLoraLayer._lora_hidden
    monkeypatch.setattr(FairLoraLayer, "_lora_hidden", lambda self, x, a: calls.append(x.shape[0]) or original(self, x, a))
    model = wrap("bert")
    batch = tiny_batch("bert")
    logits(model, batch, fair_gate=torch.zeros(6))
    assert calls == []
    logits(model, batch, fair_gate=torch.tensor([1, 0, 0, 0, 0, 0]))
    assert calls and set(calls) == {1}  # only the gated row reaches the LoRA math


def test_fair_gate_validation_errors():
    model = wrap("bert")
    batch = tiny_batch("bert")
    with pytest.raises(ValueError, match="has 3 entries but the batch has 6 rows"):
        logits(model, batch, fair_gate=torch.ones(3))
    with pytest.raises(ValueError, match="must be 1 .* 0 .* or -1"):
        logits(model, batch, fair_gate=torch.full((6,), 2))
    with pytest.raises(ValueError, match="not an active FairLoRA adapter"):
        logits(model, batch, fair_gate={"nope": torch.ones(6)})
    with pytest.raises(ValueError, match=r"has 1 entries .* use force_gate\(model, True / False\)"):
        logits(model, batch, fair_gate=1)
    model.peft_config["default"].threshold = 1.5  # set after the config was checked
    with pytest.raises(ValueError, match=r"peft_config\['default'\]\.threshold = 1\.5: τ must be in \[0, 1\]"):
        logits(model, batch)
    model.peft_config["default"].threshold = 1.0
    logits(model, batch)


def test_fair_gate_minus_one_defers_to_detector():
    model = wrap("bert", threshold=0.0)  # detector says "on" for every row
    logits(model, tiny_batch("bert"), fair_gate=torch.tensor([0, -1, 0, -1, 1, 0]))
    rec = gate_record(model)
    assert rec.gate.tolist() == [False, True, False, True, True, False] and rec.source == "mixed"
    assert rec.risk is not None and rec.risk.shape == (6,)
    # every row -1: the detector decides every row, as with no fair_gate, and the record says so
    batch = tiny_batch("bert")
    deferred = logits(model, batch, fair_gate=torch.full((6,), -1))
    assert gate_record(model).source == "detector" and gate_record(model).gate.all()
    assert torch.equal(deferred, logits(model, batch))


# ---------------------------------------------------------------------------- several attributes
def test_multi_attribute_adapters_add_their_deltas():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = get_peft_model(base, FairLoraConfig(target_modules=["0"], init_weights=False), adapter_name="gender")
    model.add_adapter("age", FairLoraConfig(target_modules=["0"], init_weights=False))
    model.base_model.set_adapter(["gender", "age"])
    x = torch.randn(4, 8)
    layer = model.base_model.model[0]
    with torch.no_grad():
        both = model(x, fair_gate={"gender": torch.tensor([1, 1, 0, 0]), "age": torch.tensor([1, 0, 1, 0])})
        base_out = layer.base_layer(x)
        d_g, d_a = layer.lora_delta(x, "gender"), layer.lora_delta(x, "age")
    expected = base_out + torch.tensor([1, 1, 0, 0.])[:, None] * d_g + torch.tensor([1, 0, 1, 0.])[:, None] * d_a
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-6)
    assert set(model.base_model.model.fair_bias_detector.fairlora_detector) == {"gender", "age"}
    model.delete_adapter("age")
    assert set(model.base_model.model.fair_bias_detector.fairlora_detector) == {"gender"}


# ---------------------------------------------------------------------------- merging, checkpointing, training
def test_merging_is_refused_with_reason():
    model = wrap("bert")
    with pytest.raises(ValueError, match="cannot be merged.*per example"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert not hasattr(plain, "fair_bias_detector") and not any(isinstance(m, FairLoraLayer) for m in plain.modules())
    batch = tiny_batch("bert")
    torch.testing.assert_close(logits(plain, batch), logits(tiny_model("bert"), batch), rtol=0, atol=0)


def _lora_grads(model, batch):
    model.zero_grad()
    with force_gate(model, True):
        out = model(**batch, labels=torch.tensor([0, 1, 0, 1, 0, 1]))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_non_reentrant_checkpointing_gives_same_grads_and_reentrant_is_refused():
    batch = tiny_batch("bert")
    model = wrap("bert")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    plain = _lora_grads(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _lora_grads(model, batch)
    assert plain.keys() == ckpt.keys() and any("fairlora_A" in k for k in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], rtol=1e-5, atol=1e-7)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant activation checkpointing"):
        _lora_grads(model, batch)


def test_detector_is_frozen_by_default_and_lora_trainable():
    model = wrap("bert")
    det = model.base_model.model.fair_bias_detector.fairlora_detector["default"]
    assert not any(p.requires_grad for p in det.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "fairlora_A" in n or "fairlora_B" in n)


# ---------------------------------------------------------------------------- save / load / share
def _fresh_dir_model(kind, path):
    model = tiny_model(kind)
    model.save_pretrained(path)
    return model


def _loaders(kind, base_dir, adapter_dir):
    cls = T.ViTForImageClassification if kind == "vit" else T.AutoModelForSequenceClassification
    fresh = lambda: cls.from_pretrained(base_dir).eval()  # noqa: E731
    yield "PeftModel.from_pretrained", PeftModel.from_pretrained(fresh(), adapter_dir)
    yield "other adapter name", PeftModel.from_pretrained(fresh(), adapter_dir, adapter_name="group")
    if kind == "vit":
        yield "AutoPeftModel", AutoPeftModel.from_pretrained(adapter_dir)
    else:
        yield "AutoPeftModelForSequenceClassification", AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    hf = fresh()
    hf.load_adapter(adapter_dir)
    yield "transformers load_adapter", hf


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_save_load_round_trips_give_identical_logits(kind, tmp_path):
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    base = _fresh_dir_model(kind, base_dir)
    cls = T.ViTForImageClassification if kind == "vit" else T.AutoModelForSequenceClassification
    base = cls.from_pretrained(base_dir)
    model = get_peft_model(base, FairLoraConfig(task_type=None if kind == "vit" else "SEQ_CLS", init_weights=False,
                                                base_model_name_or_path=base_dir)).eval()
    det = model.base_model.model.fair_bias_detector
    with torch.no_grad():
        det.fairlora_prototypes["default"].normal_()
        det.fairlora_prototype_counts["default"].fill_(3.0)
        for p in det.fairlora_detector["default"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = tiny_batch(kind)
    logits(model, batch)
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())
    expected = logits(model, batch)
    model.save_pretrained(adapter_dir)
    files = set(os.listdir(adapter_dir))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert any("fairlora_detector" in k for k in saved) and any("fairlora_prototypes" in k for k in saved)
    assert json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["peft_type"] == "FAIRLORA"
    for name, loaded in _loaders(kind, base_dir, adapter_dir):
        loaded.eval()
        torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0, msg=name)
        loaded_det = next(m for m in loaded.modules() if hasattr(m, "fairlora_prototypes"))
        adapter = next(iter(loaded_det.fairlora_prototypes))
        assert torch.equal(loaded_det.fairlora_prototypes[adapter], det.fairlora_prototypes["default"]), name


def test_saved_config_lists_the_module_names_sorted(tmp_path):
    """adapter_config.json is the same bytes in every process: the target modules are a set in memory (whose order
    follows the hash seed), saved sorted; they load back as the same set."""
    names = ["value", "query", "key", "dense", "output"]
    config = FairLoraConfig(task_type="SEQ_CLS", target_modules=names, exclude_modules=["pooler", "classifier"])
    assert isinstance(config.target_modules, set) and config.to_dict()["target_modules"] == sorted(names)
    config.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "adapter_config.json"))
    assert saved["target_modules"] == sorted(names) and saved["exclude_modules"] == ["classifier", "pooler"]
    assert FairLoraConfig.from_pretrained(str(tmp_path)).target_modules == set(names)


def test_push_to_hub_goes_through_peft_with_a_local_fake(tmp_path, monkeypatch):
    api = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
    model = wrap("bert")
    model.push_to_hub("me/fair-adapter")
    pushed = tmp_path / "hub" / "me" / "fair-adapter"
    assert (pushed / "adapter_model.safetensors").exists() and (pushed / "adapter_config.json").exists()
    assert api.commits
    reloaded = PeftModel.from_pretrained(tiny_model("bert"), str(pushed)).eval()
    batch = tiny_batch("bert")
    torch.testing.assert_close(logits(reloaded, batch, fair_gate=torch.ones(6)),
                               logits(model, batch, fair_gate=torch.ones(6)), rtol=0, atol=0)


def test_loading_without_import_is_documented_in_readme():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "import fairnet_peft" in readme and "before" in readme.lower()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_fused_inference_path_equals_autograd_path(kind):
    batch = tiny_batch(kind)
    model = wrap(kind)
    gate = torch.tensor([1, 0, 1, 1, 0, 1])
    for fair_gate in (gate, torch.ones(6)):
        with torch.no_grad():
            fused = model(**batch, fair_gate=fair_gate).logits
        with torch.enable_grad():
            plain = model(**batch, fair_gate=fair_gate).logits.detach()
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)


def test_lora_relative_update_skips_quantized_base_weights():
    """A quantized base layer (bitsandbytes stores packed integers) has no ‖W‖ to divide by: it is skipped, not an
    error at the end of train(); with every base layer quantized the ratio is unknown (nan), not "did not move"."""
    model = wrap("bert", init_weights=False)  # B drawn too: the update is non-zero
    tuner = model.base_model
    layers = list(tuner.lora_layers("default"))
    before = tuner.lora_relative_update("default")
    assert before > 0
    base = layers[0].get_base_layer()
    base.weight = torch.nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.uint8), requires_grad=False)
    partly = tuner.lora_relative_update("default")
    assert 0 < partly and partly != before
    for layer in layers[1:]:
        b = layer.get_base_layer()
        b.weight = torch.nn.Parameter(torch.zeros(b.weight.shape, dtype=torch.uint8), requires_grad=False)
    assert math.isnan(tuner.lora_relative_update("default"))
