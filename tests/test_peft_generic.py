"""PEFT's own generic tuner tests (`tests/test_custom_models.py` of the installed peft) run against `FairLoraConfig`.

The suite is fetched at test time from the peft sdist into the git-ignored `tests/peft_suite/` (see
`peft_suite_fetch.py`); if that fails (e.g. no network on first use) the test `test_peft_suite_available` FAILS with
the reason, it does not skip. Every method of the suite's `TestPeftCustomModel` and `TestPeftFsdpStateDict` that is
parametrized over the suite's `TEST_CASES` is copied into a class of this module, re-parametrized over `FAIR_CASES`
(other marks kept); the method bodies are PEFT's, unchanged.

FairLoRA specifics:
- `threshold=0.0`: the gate is on for every row, so all LoRA parameters get gradients (the generic training tests
  require a gradient, and a change, on every trainable `fairlora_` parameter). The detector is frozen by default.
- Merging is refused by design (the gate depends on the input): merge tests skip with `MERGE_SKIP_REASON`.
- The custom models have no `config.hidden_size` and no layer stack: every case leaves `detector_module` and
  `detector_input_dim` at their defaults (the detector reads the input of the first adapted module), which is part
  of what is tested.

A real gate (`TestFairLoraCustomModelGated`): the same tests at the default τ = 0.5 with a seeded detector that gates
2-6 of the 9 rows (`FAIR_GATED_CASES`, no Conv2d: that mock model reshapes its batch); all pass, training included.
`TestFairLoraCustomModelGatedOff` runs the training tests with every row gated off (τ = 1); the two that fail
inherently are strict xfails with the reason (`GATED_OFF_EXPECTED_FAILURES`).

Plus no-hub decoder checks on a tiny seeded `LlamaForCausalLM` (gradient checkpointing, training, disable/delete
adapter, safetensors inference).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import sys
import traceback
import types

import pytest
import torch

import fairnet_peft  # registers the FAIRLORA PEFT type
from fairnet_peft import FairLoraConfig

from .peft_suite_fetch import PeftSuiteUnavailable, ensure_peft_suite

MERGE_SKIP_REASON = "FairLoRA refuses merging: the gate is input-dependent"
SUITE_PARAMS = "test_name, model_id, config_cls, config_kwargs"

FAIR_CASES = [
    ("Vanilla MLP 1 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], "threshold": 0.0}),
    ("Vanilla MLP 2 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0", "lin1"], "threshold": 0.0}),
    (
        "Vanilla MLP 3 FairLoRA",
        "MLP",
        FairLoraConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "threshold": 0.0},
    ),
    (
        "Vanilla MLP 4 FairLoRA",
        "MLP",
        FairLoraConfig,
        {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1, "threshold": 0.0},
    ),
    # Conv2d base layer; the detector reads the conv input (B, C, H, W) as H·W tokens of C features.
    ("Conv2d 1 FairLoRA", "Conv2d", FairLoraConfig, {"target_modules": ["conv2d"], "threshold": 0.0}),
    # GPT-2 style transformers Conv1D base layer (after an embedding, input (B, T, 5)); r=4 because FairLoraConfig
    # refuses a rank above the module's width (5 inputs, 1 output).
    ("Embedding + transformers Conv1D 1 FairLoRA", "EmbConv1D", FairLoraConfig,
     {"target_modules": ["conv1d"], "r": 4, "threshold": 0.0}),
]

# Names the suite imports from packages that may be missing; stubbed only while the suite is imported.
_STUBS = {"diffusers": ("StableDiffusionPipeline",)}


def _stub_class(module_name: str, name: str) -> type:
    def from_pretrained(*args, **kwargs):
        raise RuntimeError(f"{module_name} is not installed: {name} is a stub made by tests/test_peft_generic.py")

    return type(name, (), {"from_pretrained": staticmethod(from_pretrained)})


def _import_suite():
    """Fetch (if needed) and import the suite; returns (module, None) or (None, error message)."""
    try:
        ensure_peft_suite()
    except PeftSuiteUnavailable as exc:
        return None, str(exc)
    stubbed = []
    for module_name, names in _STUBS.items():
        if module_name in sys.modules or importlib.util.find_spec(module_name) is not None:
            continue
        stub = types.ModuleType(module_name)
        stub.__doc__ = "Stub made by tests/test_peft_generic.py while importing PEFT's generic test suite."
        for name in names:
            setattr(stub, name, _stub_class(module_name, name))
        sys.modules[module_name] = stub
        stubbed.append(module_name)
    try:
        suite = importlib.import_module(f"{__package__}.peft_suite.custom_models_suite")
    except Exception:  # noqa: BLE001 - reported by test_peft_suite_available
        return None, "Importing PEFT's generic test suite failed:\n" + traceback.format_exc()
    finally:
        for module_name in stubbed:  # the suite keeps its references; other tests never see the stub
            sys.modules.pop(module_name, None)
    return suite, None


suite, SUITE_ERROR = _import_suite()


def test_peft_suite_available():
    if SUITE_ERROR is not None:
        pytest.fail(SUITE_ERROR, pytrace=False)


# ---------------------------------------------------------------------------------------------------- re-parametrize
def _is_case_parametrize(mark) -> bool:
    return mark.name == "parametrize" and mark.args and str(mark.args[0]).replace(" ", "") == SUITE_PARAMS.replace(" ", "")


def _copy_function(func, marks):
    """A new test function running `func` (PEFT's body, its globals: the patched suite module) with `marks`."""

    @functools.wraps(func)  # pytest reads the signature (fixtures, parameters) through __wrapped__
    def test(*args, **kwargs):
        if "config_kwargs" in kwargs:  # a few suite helpers mutate config_kwargs; keep FAIR_CASES pristine
            kwargs["config_kwargs"] = copy.deepcopy(kwargs["config_kwargs"])
        return func(*args, **kwargs)

    test.pytestmark = marks
    return test


def _case_mark(cases: list, test: str, expected_failures: dict):
    """The suite's parametrize mark over `cases`; (test, case) pairs in `expected_failures` get a strict xfail."""
    params = []
    for case in cases:
        reason = expected_failures.get((test, case[0])) or expected_failures.get((test, "*"))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(*case, id=case[0], marks=marks))
    return pytest.mark.parametrize(SUITE_PARAMS, params).mark


def _reparametrized_class(name: str, source: type, cases: list, bases: tuple, *, only: tuple = (),
                          expected_failures: dict | None = None, extra: dict | None = None) -> type:
    """A copy of `source` holding only its TEST_CASES-parametrized tests (or those named in `only`), parametrized
    over `cases` instead; `extra` adds class attributes (e.g. an autouse fixture)."""
    attrs = {"__module__": __name__, "__doc__": f"PEFT's `{source.__name__}` tests, re-parametrized with {name}."}
    for attr, value in source.__dict__.items():
        if attr.startswith("__"):
            continue
        if attr.startswith("test_"):
            marks = list(getattr(value, "pytestmark", []))
            if not any(_is_case_parametrize(m) for m in marks):
                continue  # tests of specific PEFT methods (LoRA, IA3, ...), not generic over TEST_CASES
            if only and attr not in only:
                continue
            case_mark = _case_mark(cases, attr, expected_failures or {})
            attrs[attr] = _copy_function(value, [case_mark if _is_case_parametrize(m) else m for m in marks])
        else:
            attrs[attr] = value  # helpers, fixtures, transformers_class, prepare_inputs_for_testing
    attrs.update(extra or {})
    return type(name, bases, attrs)


if suite is not None:
    _testing_common = sys.modules[f"{__package__}.peft_suite.testing_common"]
    _original_skip_merge = _testing_common._skip_if_merging_not_supported

    def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):
        if isinstance(config_cls, type) and issubclass(config_cls, FairLoraConfig):
            pytest.skip(MERGE_SKIP_REASON)
        return _original_skip_merge(model_id, config_cls, config_kwargs)

    # The suite modules are private copies under tests/peft_suite/, so patching them affects only these tests.
    for _module in (suite, _testing_common):
        _module._skip_if_merging_not_supported = _skip_if_merging_not_supported

    TestFairLoraCustomModel = _reparametrized_class(
        "TestFairLoraCustomModel", suite.TestPeftCustomModel, FAIR_CASES, (suite.PeftCommonTester,)
    )
    TestFairLoraFsdpStateDict = _reparametrized_class(
        "TestFairLoraFsdpStateDict", suite.TestPeftFsdpStateDict, FAIR_CASES, (object,)
    )


# ---------------------------------------------------------------------------------------------------- a real gate
# The same suite at the default τ = 0.5 with a detector that gates a MIX of the rows (checked by
# test_gated_cases_gate_a_mix_of_rows). The suite's own input `arange(90).view(9, 10)` has rows that are affine copies
# of each other, which the detector's LayerNorm maps to one vector (every row would get the same gate), so this class
# feeds the same 90 values in a seeded random order (`gated_inputs`). The detector is a mean-pooled linear probe whose
# output weights are drawn with gain GATE_GAIN (instead of 0.1) from a generator seeded with GATE_SEED: the risk
# scores sit far from τ (the gate does not flip under fp16/bf16 rounding) and are the same in every test of a case.
# MLP 2 and 4 read the input of lin1, after the adapted lin0: lin0's update is then backtracked once the gate is known.
GATED_DETECTOR = {"detector_hidden_sizes": [], "detector_pooling": "mean"}
GATE_GAIN = 20.0
GATE_SEED = 0
FAIR_GATED_CASES = [
    ("Gated MLP 1 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], **GATED_DETECTOR}),
    ("Gated MLP 2 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0", "lin1"], "detector_module": "lin1",
                                                     **GATED_DETECTOR}),
    ("Gated MLP 3 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"],
                                                     **GATED_DETECTOR}),
    ("Gated MLP 4 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1,
                                                     "detector_module": "lin1", **GATED_DETECTOR}),
    ("Gated Embedding + transformers Conv1D 1 FairLoRA", "EmbConv1D", FairLoraConfig,
     {"target_modules": ["conv1d"], "r": 4, **GATED_DETECTOR}),
]


def gated_inputs(device="cpu") -> dict:
    """The suite's 90 input values (0..89, valid EmbConv1D token ids) as 9 rows of 10 in a seeded random order."""
    order = torch.randperm(90, generator=torch.Generator().manual_seed(GATE_SEED))
    return {"X": order.view(9, 10).to(device)}


# Not gated: the Conv2d mock model reshapes its batch (9 rows of 10 -> 2 samples of 5x3x3), so there are no
# per-row gates for the suite's 9 rows; a mixed gate refuses such a layer by design (gate.py, batch contract).
# (test, case id or "*") -> why it fails with a hard, detector-decided gate. Strict xfail: a fix makes them fail.
GATED_EXPECTED_FAILURES: dict = {}  # none: every test passes with a mixed gate


def _gated_detector_init(self) -> None:
    """The detector's usual init, then its output weights drawn with gain GATE_GAIN from a generator seeded with
    GATE_SEED: the gate is the same in every test of a case, whatever the global RNG state."""
    _original_detector_init(self)
    weight = self.risk_mlp[-1].weight
    if weight.device.type != "meta":  # low_cpu_mem_usage: the weights are loaded later
        generator = torch.Generator(device=weight.device).manual_seed(GATE_SEED)
        torch.nn.init.xavier_uniform_(weight, gain=GATE_GAIN, generator=generator)


from fairnet_peft.tuner.detector import DetectorNet  # noqa: E402

_original_detector_init = DetectorNet.reset_parameters


@pytest.fixture
def gated_detector(monkeypatch):
    monkeypatch.setattr(DetectorNet, "reset_parameters", _gated_detector_init)


def _autouse_gated_detector():
    """A class-level autouse fixture (made in a function so that the module does not see it)."""

    @pytest.fixture(autouse=True)
    def use_gated_detector(self, gated_detector):
        yield

    return use_gated_detector


if suite is not None:
    TestFairLoraCustomModelGated = _reparametrized_class(
        "TestFairLoraCustomModelGated", suite.TestPeftCustomModel, FAIR_GATED_CASES, (suite.PeftCommonTester,),
        expected_failures=GATED_EXPECTED_FAILURES,
        extra={"_use_gated_detector": _autouse_gated_detector(),
               "prepare_inputs_for_testing": lambda self: gated_inputs(self.torch_device)},
    )


# Every row gated off (τ = 1): the training tests, where the hard gate's inherent limits show.
GATED_OFF_CASES = [("Gated-off MLP 1 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], "threshold": 1.0})]
GATED_OFF_TESTS = ("test_training_custom_models", "test_only_params_are_updated", "test_disable_adapters",
                   "test_forward_output_finite", "test_save_load_roundtrip", "test_parameters_after_loading_model")
GATED_OFF_EXPECTED_FAILURES = {  # inherent to a hard gate that is off for every row (strict xfail)
    ("test_only_params_are_updated", "*"): (
        "asserts every trainable parameter changed after training; with no row gated the LoRA's loss gradient is "
        "exactly zero (the batch stays differentiable, see test_training_custom_models), so nothing moves"),
    ("test_disable_adapters", "*"): (
        "asserts the output after training differs from before; with no row gated the adapter never applies, so the "
        "output is the base model's before and after"),
}

if suite is not None:
    TestFairLoraCustomModelGatedOff = _reparametrized_class(
        "TestFairLoraCustomModelGatedOff", suite.TestPeftCustomModel, GATED_OFF_CASES, (suite.PeftCommonTester,),
        only=GATED_OFF_TESTS, expected_failures=GATED_OFF_EXPECTED_FAILURES,
    )


@pytest.mark.skipif(suite is None, reason="PEFT suite unavailable (see test_peft_suite_available)")
@pytest.mark.parametrize(SUITE_PARAMS, FAIR_GATED_CASES, ids=[c[0] for c in FAIR_GATED_CASES])
def test_gated_cases_gate_a_mix_of_rows(test_name, model_id, config_cls, config_kwargs, gated_detector):
    """The gated cases really gate: on `gated_inputs()` (eval mode) some rows are on, some off, and the adapter
    (non-zero B) changes exactly the gated rows' outputs. (In train mode the MLP's own dropout sits before lin1, the
    detector's read point, so the gate may differ from step to step.)"""
    from peft import get_peft_model

    X = gated_inputs()
    base, config = _fair_case_model(model_id, config_kwargs)
    with torch.no_grad():
        out_base = base(**X)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        out = model(**X)
    record = fairnet_peft.gate_record(model)
    assert record.source == "detector" and config.threshold == 0.5
    n_on = int(record.gate.sum())
    assert 2 <= n_on <= 7, record.risk  # a mix, about half of the 9 rows
    assert (record.risk - 0.5).abs().min() > 0.02, record.risk  # far enough from τ not to flip under fp16
    changed = (out - out_base).abs().amax(dim=-1) > 1e-6
    assert torch.equal(changed, record.gate), (changed, record.gate)


# ---------------------------------------------------------------------------------------------------- merge refusal
# The merge tests above skip for FairLoRA; this checks the refusal itself (and that it leaves the model untouched).
def _fair_case_model(model_id, config_kwargs):
    model = suite.MockTransformerWrapper.from_pretrained(model_id).eval()  # eval: MLP has dropout
    return model, FairLoraConfig(**{**config_kwargs, "init_weights": False})


@pytest.mark.skipif(suite is None, reason="PEFT suite unavailable (see test_peft_suite_available)")
@pytest.mark.parametrize(SUITE_PARAMS, FAIR_CASES, ids=[c[0] for c in FAIR_CASES])
def test_merge_is_refused_and_unload_restores_base(test_name, model_id, config_cls, config_kwargs):
    from peft import get_peft_model

    X = {"X": torch.arange(90).view(9, 10)}
    base, config = _fair_case_model(model_id, config_kwargs)
    with torch.no_grad():
        out_base = base(**X)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        out_peft = model(**X)
    assert not torch.allclose(out_base, out_peft)
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
        with torch.no_grad():
            assert torch.allclose(model(**X), out_peft)  # nothing was (partially) merged
    unloaded = model.unload()
    assert not any("fairlora_" in name for name, _ in unloaded.named_modules())
    assert not any("fairlora_" in name for name in unloaded.state_dict())
    assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks
    with torch.no_grad():
        assert torch.allclose(unloaded(**X), out_base)


# ---------------------------------------------------------------------------------------------------- tiny decoder
HELPER_CHECKPOINTING_SKIP_REASON = (
    "PEFT's _test_training_gradient_checkpointing requires a gradient on every parameter whose name contains the "
    "prefix, frozen or not; FairLoRA's detector (fair_bias_detector.fairlora_detector.*) is frozen by design "
    "(requires_grad=False, hard gate), unlike _test_training which exempts frozen adapter parameters. Covered by "
    "test_non_reentrant_checkpointing_gives_same_lora_grads (exact gradient equality)"
)
LLAMA_ID = "fairnet-tests/tiny-LlamaForCausalLM-from-config"  # not a Hub id: built from a config, no download
LLAMA_CASES = [
    # default read point: detector before block L // 2 = 1, blocks 1.. adapted (q_proj, v_proj)
    ("detector_layer default", {"threshold": 0.0, "init_weights": False}),
    # detector before block 0, both blocks adapted: the gate is consumed in every checkpointed block
    ("detector_layer 0", {"threshold": 0.0, "init_weights": False, "detector_layer": 0}),
]


class TinyLlamaWrapper:
    """`transformers_class` for PEFT's helpers: a seeded tiny LlamaForCausalLM (vocab 50, hidden 32, 2 layers)."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        from transformers import LlamaConfig, LlamaForCausalLM

        assert model_id == LLAMA_ID, model_id
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)
        model = LlamaForCausalLM(config).to(dtype or torch.float32)
        model.generation_config.max_new_tokens = 3  # _test_disable_adapter compares the first step's scores only
        return model


def _llama_inputs():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0], [20, 21, 22, 23, 24, 25]])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


if suite is not None:

    class TestFairLoraTinyLlama(suite.PeftCommonTester):
        """PEFT's decoder helpers on a tiny seeded Llama built from a config (no Hub access)."""

        transformers_class = TinyLlamaWrapper

        def prepare_inputs_for_testing(self):
            return {k: v.to(self.torch_device) for k, v in _llama_inputs().items()}

        @pytest.mark.skip(reason=HELPER_CHECKPOINTING_SKIP_REASON)
        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_training_gradient_checkpointing_non_reentrant(self, name, config_kwargs):
            self._test_training_gradient_checkpointing(LLAMA_ID, FairLoraConfig, dict(config_kwargs),
                                                       use_reentrant=False)

        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_training_gradient_checkpointing_reentrant_is_refused(self, name, config_kwargs):
            # Reentrant checkpointing cannot replay a gate computed outside the checkpointed block; the plugin
            # refuses it with an actionable error instead of failing in backward.
            with pytest.raises(ValueError, match="non-reentrant"):
                self._test_training_gradient_checkpointing(LLAMA_ID, FairLoraConfig, dict(config_kwargs),
                                                           use_reentrant=True)

        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_training(self, name, config_kwargs):
            self._test_training(LLAMA_ID, FairLoraConfig, dict(config_kwargs))

        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_disable_adapter(self, name, config_kwargs):
            self._test_disable_adapter(LLAMA_ID, FairLoraConfig, dict(config_kwargs))

        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_delete_adapter(self, name, config_kwargs):
            self._test_delete_adapter(LLAMA_ID, FairLoraConfig, dict(config_kwargs))

        @pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
        def test_inference_safetensors(self, name, config_kwargs):
            self._test_inference_safetensors(LLAMA_ID, FairLoraConfig, dict(config_kwargs))


@pytest.mark.parametrize("name, config_kwargs", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_non_reentrant_checkpointing_gives_same_lora_grads(name, config_kwargs):
    """PEFT's helper only checks that gradients are non-zero; here they must equal those without checkpointing."""
    from peft import get_peft_model

    def grads(checkpointing: bool) -> dict:
        model = get_peft_model(TinyLlamaWrapper.from_pretrained(LLAMA_ID), FairLoraConfig(**config_kwargs))
        model.train()  # checkpointing is only active in training mode; Llama has no dropout by default
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        loss = model(**_llama_inputs()).logits.pow(2).mean()
        loss.backward()
        assert bool(fairnet_peft.gate_record(model).gate.all())  # threshold 0: every row corrected
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert plain and all(n.count("fairlora_A") + n.count("fairlora_B") == 1 for n in plain)  # only LoRA trains
    for name_ in plain:
        assert plain[name_].abs().sum() > 0, name_
        torch.testing.assert_close(ckpt[name_], plain[name_], rtol=1e-5, atol=1e-7, msg=name_)
