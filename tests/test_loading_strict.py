"""Strict, cheap loading: an adapter config whose sizes disagree with its weights or with the model fails with an error
naming the field before any large tensor exists; missing detector/prototype/LoRA keys and NaN/inf weights fail naming
the key; the legitimate flows (fresh adapter, round trips, a config saved before training, the trainer's stage
reload) still load.

"Before any large tensor exists" is checked with `NoLargeTensors`, a torch dispatch mode that refuses to create any
tensor of more than LIMIT elements off the meta device, before the allocation happens (so the check costs nothing
even where the old code would have allocated gigabytes).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import fairnet_peft  # noqa: F401  (registers FAIRLORA)
from fairnet_peft import FairLoraConfig

from .helpers import tiny_batch, tiny_model

LIMIT = 1_000_000  # elements; the tiny models and their adapters are far below, the bad configs far above


class LargeAllocation(Exception):
    pass


class NoLargeTensors(TorchDispatchMode):
    """Refuse (before it runs) any factory op asking for more than `limit` elements off the meta device."""

    def __init__(self, limit: int = LIMIT):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema.arguments
        if schema and schema[0].name == "size" and args and isinstance(args[0], (list, tuple, torch.Size)):
            device = torch.device(kwargs.get("device") or "cpu")
            if device.type != "meta" and math.prod(int(s) for s in args[0]) > self.limit:
                raise LargeAllocation(f"{func} asked for a tensor of shape {list(args[0])}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT saved as a base folder, and a FairLoRA adapter for it with random (non-zero) weights."""
    root = tmp_path_factory.mktemp("strict")
    base_dir, adapter_dir = str(root / "base"), str(root / "adapter")
    tiny_model("bert").save_pretrained(base_dir)
    model = get_peft_model(T.AutoModelForSequenceClassification.from_pretrained(base_dir),
                           FairLoraConfig(task_type="SEQ_CLS", init_weights=False))
    with torch.no_grad():
        det = model.base_model.model.fair_bias_detector
        det.fairlora_prototypes["default"].normal_()
        det.fairlora_prototype_counts["default"].fill_(3.0)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _base(base_dir):
    return T.AutoModelForSequenceClassification.from_pretrained(base_dir).eval()


def _variant(saved, tmp_path, config_changes=None, weights_change=None) -> str:
    """A copy of the saved adapter with some config fields and/or tensors changed."""
    _, adapter_dir = saved
    out = str(tmp_path / "variant")
    shutil.copytree(adapter_dir, out)
    if config_changes:
        path = os.path.join(out, "adapter_config.json")
        config = json.load(open(path))
        config.update(config_changes)
        json.dump(config, open(path, "w"))
    if weights_change:
        path = os.path.join(out, "adapter_model.safetensors")
        tensors = load_file(path)
        weights_change(tensors)
        save_file(tensors, path)
    return out


HUGE = [
    ({"num_classes": 10_000_000}, "num_classes", "should be 2"),
    ({"r": 1_000_000}, "r", "should be 8"),
    ({"detector_hidden_sizes": [10_000_000, 64]}, "detector_hidden_sizes", r"should be \[128, 64\]"),
    ({"representation_dim": 10_000_000}, "representation_dim", "should be 32"),
    ({"detector_input_dim": 10_000_000}, "detector_input_dim", "should be 32"),
]


@pytest.mark.parametrize("changes, field_name, expected", HUGE, ids=[h[1] for h in HUGE])
def test_a_huge_size_in_the_config_fails_on_the_header_before_any_allocation(saved, tmp_path, changes, field_name,
                                                                             expected):
    base_dir, _ = saved
    bad = _variant(saved, tmp_path, changes)
    base = _base(base_dir)
    with NoLargeTensors(), pytest.raises(ValueError, match=rf"FairLoraConfig\.{field_name}=.*{expected}"):
        PeftModel.from_pretrained(base, bad)
    assert not hasattr(base, "fair_bias_detector")  # nothing was injected: the error came before the adapter


@pytest.mark.parametrize("changes, field_name", [(h[0], h[1]) for h in HUGE], ids=[h[1] for h in HUGE])
def test_a_huge_size_fails_before_allocation_on_every_loader(saved, tmp_path, changes, field_name):
    """A second adapter (`load_adapter`) and transformers' own `load_adapter` (which reads the config through
    PeftConfig and cannot see the header: there the bounds set by the model apply)."""
    base_dir, adapter_dir = saved
    bad = _variant(saved, tmp_path, changes)
    model = PeftModel.from_pretrained(_base(base_dir), adapter_dir)
    with NoLargeTensors(), pytest.raises(ValueError, match=rf"FairLoraConfig\.{field_name}="):
        model.load_adapter(bad, adapter_name="second")
    hf = _base(base_dir)
    with NoLargeTensors(), pytest.raises(ValueError, match=r"FairLoraConfig\.(r|num_classes|detector_\w+)="):
        hf.load_adapter(bad)


def test_model_bounds_apply_to_a_fresh_adapter_too():
    with pytest.raises(ValueError, match=r"FairLoraConfig\.num_classes=3 is more than the model's num_labels=2"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", num_classes=3))
    with pytest.raises(ValueError, match=r"FairLoraConfig\.r=33 is larger than the module '.*query' it adapts "
                                         r"\(32 inputs, 32 outputs\).*r <= 32"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", r=33))
    with NoLargeTensors(), pytest.raises(ValueError, match=r"FairLoraConfig\.detector_hidden_sizes=\[10000000\].*"
                                                           r"more than the"):
        get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", detector_hidden_sizes=[10_000_000]))
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", r=32))  # = the module's width
    assert model.peft_config["default"].r == 32


@pytest.mark.parametrize("dropped, named", [
    ("risk_mlp", "fair_bias_detector.fairlora_detector.risk_mlp"),
    ("fairlora_detector", "fair_bias_detector.fairlora_detector.in_norm.weight"),
    ("fairlora_prototype", "fair_bias_detector.fairlora_prototypes"),
])
def test_missing_detector_or_prototype_keys_are_an_error_naming_them(saved, tmp_path, dropped, named):
    base_dir, _ = saved
    bad = _variant(saved, tmp_path, weights_change=lambda t: [t.pop(k) for k in list(t) if dropped in k])
    with pytest.raises(ValueError, match=rf"no .*{named}.*"):
        PeftModel.from_pretrained(_base(base_dir), bad)


@pytest.mark.parametrize("dropped", ["risk_mlp.3.bias", "fairlora_prototype_counts", "layer.3.output.dense.fairlora_A"])
def test_missing_keys_in_a_state_dict_are_an_error_naming_them(saved, dropped):
    """The same check where no header is read: `set_peft_model_state_dict` with an incomplete state dict (the
    trainer's stage reload and Trainer's resume load this way)."""
    base_dir, adapter_dir = saved
    model = PeftModel.from_pretrained(_base(base_dir), adapter_dir)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    weights = {k: v for k, v in weights.items() if dropped not in k}
    with pytest.raises(ValueError, match=rf"lack 1 of its \d+ tensors: .*{dropped.replace('.', '[.]')}"):
        set_peft_model_state_dict(model, weights, adapter_name="default")


@pytest.mark.parametrize("key_part", ["fairlora_detector.risk_mlp.0.weight", "fairlora_prototypes",
                                      "layer.2.attention.self.query.fairlora_B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_naming_the_key(saved, tmp_path, key_part, value):
    base_dir, _ = saved

    def poison(tensors):
        key = next(k for k in tensors if key_part in k)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    bad = _variant(saved, tmp_path, weights_change=poison)
    with pytest.raises(ValueError, match=rf"NaN or inf values in .*{key_part.replace('.', '[.]')}"):
        PeftModel.from_pretrained(_base(base_dir), bad)


# ------------------------------------------------------------------------------------------ what must keep working
def test_round_trip_and_a_second_adapter_still_load(saved):
    base_dir, adapter_dir = saved
    batch = tiny_batch("bert")
    model = PeftModel.from_pretrained(_base(base_dir), adapter_dir)
    model.load_adapter(adapter_dir, adapter_name="second")
    hf = _base(base_dir)
    hf.load_adapter(adapter_dir)
    with torch.no_grad():
        first = model(**batch).logits
        model.set_adapter("second")
        second = model(**batch).logits
        third = hf(**batch).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, third, rtol=0, atol=0)


def test_low_cpu_mem_usage_loads_the_same_adapter_and_moves_the_detector_with_the_model(saved, monkeypatch):
    """With `low_cpu_mem_usage=True` PEFT assigns the loaded tensors where it loaded them (the GPU when there is one)
    and asks each module to move its adapter to its base layer's device, without naming one. The detector container
    has no base layer: the tuner must name the device of the module the detector reads, or the detector and the
    prototypes would stay on another device than the model."""
    from fairnet_peft.tuner.detector import FairBiasDetector

    base_dir, adapter_dir = saved
    moves = []
    original = FairBiasDetector._move_adapter_to_device_of_base_layer
    monkeypatch.setattr(FairBiasDetector, "_move_adapter_to_device_of_base_layer",
                        lambda self, name, device=None: (moves.append((name, device)), original(self, name, device)))
    batch = tiny_batch("bert")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(_base(base_dir), adapter_dir)(**batch).logits
        model = PeftModel.from_pretrained(_base(base_dir), adapter_dir, low_cpu_mem_usage=True)
        got = model(**batch).logits
    assert ("default", torch.device("cpu")) in moves  # the device is named, not None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    det = model.base_model.model.fair_bias_detector
    saved_prototypes = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    key = next(k for k in saved_prototypes if k.endswith("fairlora_prototypes"))
    torch.testing.assert_close(det.fairlora_prototypes["default"], saved_prototypes[key], rtol=0, atol=0)


def test_an_adapter_without_prototypes_yet_loads(tmp_path):
    """Saved before the prototype pass of a model that declares no num_labels: the prototype buffers are (0, 2, d)
    zeros, present in the file; `num_classes` is 0. Loading is not a false 'missing key'."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = get_peft_model(base, FairLoraConfig(target_modules=["0"], init_weights=False))
    model.save_pretrained(str(tmp_path))
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()
              if "prototype" in k}
    assert shapes == {"base_model.model.fair_bias_detector.fairlora_prototypes": (0, 2, 0),
                      "base_model.model.fair_bias_detector.fairlora_prototype_counts": (0, 2)}
    assert json.load(open(tmp_path / "adapter_config.json"))["num_classes"] == 0
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_config_saved_before_training_loads_and_builds_an_adapter(tmp_path):
    FairLoraConfig(task_type="SEQ_CLS", r=4).save_pretrained(str(tmp_path))  # no weights next to it
    config = FairLoraConfig.from_pretrained(str(tmp_path))
    assert config.num_classes is None and config.r == 4
    model = get_peft_model(tiny_model("bert"), config)
    assert model.peft_config["default"].num_classes == 2


def test_the_trainers_stage_reload_still_loads(saved, tmp_path):
    """FairTrainer's stage reload: `set_prototypes` with the saved shape, then `set_peft_model_state_dict`."""
    base_dir, _ = saved
    model = get_peft_model(_base(base_dir), FairLoraConfig(task_type="SEQ_CLS", init_weights=False))
    det = model.base_model.model.fair_bias_detector
    det.set_prototypes("default", torch.randn(2, 2, 32), torch.full((2, 2), 4.0))
    model.save_pretrained(str(tmp_path))
    fresh = get_peft_model(_base(base_dir), FairLoraConfig(task_type="SEQ_CLS"))
    fresh.base_model.model.fair_bias_detector.set_prototypes("default", torch.zeros(2, 2, 32), torch.zeros(2, 2))
    result = set_peft_model_state_dict(fresh, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not [k for k in result.missing_keys if "fairlora" in k]
    assert torch.equal(fresh.base_model.model.fair_bias_detector.fairlora_prototypes["default"],
                       det.fairlora_prototypes["default"])
