"""An adapter saved by an earlier main (tests/fixtures/legacy_adapter, written by tests/scripts/make_legacy_adapter.py)
still loads and gives the logits it gave when it was saved."""

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import fairnet_peft  # noqa: F401

from .helpers import tiny_model

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_adapter")


def test_fixture_is_safetensors_and_json_only():
    assert sorted(os.listdir(FIXTURE)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                           "expected.safetensors", "meta.json"]
    with open(os.path.join(FIXTURE, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "FAIRLORA"


@pytest.mark.parametrize("adapter_name", ["default", "group"])
def test_legacy_adapter_loads_with_the_logits_it_was_saved_with(adapter_name):
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    model = PeftModel.from_pretrained(tiny_model("bert"), FIXTURE, adapter_name=adapter_name).eval()
    batch = {k: expected[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    gated = torch.tensor([True, False, False, False, True, False])  # the saved detector's gate (threshold 0.33)
    assert torch.equal(fairnet_peft.gate_record(model).gate, gated)
    with model.disable_adapter(), torch.no_grad():
        plain = model(**batch).logits
    torch.testing.assert_close(plain[~gated], expected["logits"][~gated])
    assert (plain[gated] - expected["logits"][gated]).abs().min() > 1e-3, "the LoRA must change the gated rows"
