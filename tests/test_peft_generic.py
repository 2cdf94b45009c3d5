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
- The custom models have no `config.hidden_size` and no layer stack, so the detector reads the input of an adapted
  module. `detector_module` is left to its default where the plugin resolves it, see `FAIR_CASES`.

Plus no-hub decoder checks on a tiny seeded `LlamaForCausalLM` (gradient checkpointing, training, disable/delete
adapter, safetensors inference).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
import types

import pytest
import torch

import fairnet_peft  # noqa: F401  (registers the FAIRLORA PEFT type)
from fairnet_peft import FairLoraConfig

from .peft_suite_fetch import PeftSuiteUnavailable, ensure_peft_suite

MERGE_SKIP_REASON = "FairLoRA refuses merging: the gate is input-dependent"
SUITE_PARAMS = "test_name, model_id, config_cls, config_kwargs"

FAIR_CASES = [
    ("Vanilla MLP 1 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0"], "threshold": 0.0}),
    ("Vanilla MLP 2 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin1"], "threshold": 0.0}),
    ("Vanilla MLP 3 FairLoRA", "MLP", FairLoraConfig, {"target_modules": ["lin0", "lin1"], "threshold": 0.0}),
    (
        "Vanilla MLP 4 FairLoRA",
        "MLP",
        FairLoraConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "threshold": 0.0},
    ),
    (
        "Vanilla MLP 5 FairLoRA",
        "MLP",
        FairLoraConfig,
        {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1, "threshold": 0.0},
    ),
    # Conv2d base layer; the detector reads the conv input (B, C, H, W) as H·W tokens of C features.
    ("Conv2d 1 FairLoRA", "Conv2d", FairLoraConfig, {"target_modules": ["conv2d"], "threshold": 0.0}),
    # GPT-2 style transformers Conv1D base layer (after an embedding, input (B, T, 5)).
    ("Embedding + transformers Conv1D 1 FairLoRA", "EmbConv1D", FairLoraConfig,
     {"target_modules": ["conv1d"], "threshold": 0.0}),
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
    new = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__dict__.update(func.__dict__)
    new.__doc__, new.__qualname__ = func.__doc__, func.__qualname__
    new.pytestmark = marks
    return new


def _reparametrized_class(name: str, source: type, cases: list, bases: tuple) -> type:
    """A copy of `source` holding only its TEST_CASES-parametrized tests, parametrized over `cases` instead."""
    case_mark = pytest.mark.parametrize(SUITE_PARAMS, cases, ids=[c[0] for c in cases]).mark
    attrs = {"__module__": __name__, "__doc__": f"PEFT's `{source.__name__}` tests, re-parametrized with FAIR_CASES."}
    for attr, value in source.__dict__.items():
        if attr.startswith("__"):
            continue
        if attr.startswith("test_"):
            marks = list(getattr(value, "pytestmark", []))
            if not any(_is_case_parametrize(m) for m in marks):
                continue  # tests of specific PEFT methods (LoRA, IA3, ...), not generic over TEST_CASES
            attrs[attr] = _copy_function(value, [case_mark if _is_case_parametrize(m) else m for m in marks])
        else:
            attrs[attr] = value  # helpers, fixtures, transformers_class, prepare_inputs_for_testing
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
