"""Fairness evaluation section of the model card: write_model_card, and save_pretrained/push_to_hub via the hook."""

from __future__ import annotations

import numpy as np
import pytest
from peft import LoraConfig, PeftModel, get_peft_model

import fairnet_peft  # noqa: F401  (registers FAIRLORA)
from fairnet_peft import FairLoraConfig
from fairnet_peft.evaluation.model_card import (
    SECTION_TITLE,
    attach_fairness_report,
    detach_fairness_report,
    fairness_report,
    install_model_card_hook,
    uninstall_model_card_hook,
    write_model_card,
)

from .helpers import install_fake_hub, tiny_model

METRICS = {
    "eval_loss": 0.61,
    "eval_accuracy": np.float64(0.9125),
    "eval_worst_group_accuracy": 0.71875,
    "eval_equalized_odds_difference": 0.0625,
    "eval_gate_rate": 0.25,
    "eval_gate_rate_s0": 0.125,
    "eval_gate_rate_s1": 0.75,
    "eval_runtime": 1.5,
    "epoch": 3.0,
    "eval_model_preparation_time": "n/a",
}
ROWS = [
    "| ACC (accuracy over all rows) | 0.9125 |",
    "| WGA (min over label × group cells) | 0.7188 |",
    "| EOD, mean: ½(ΔTPR + ΔFPR) | 0.0625 |",
    "| gate rate, all rows | 0.2500 |",
    "| gate rate, s=0 | 0.1250 |",
    "| gate rate, s=1 | 0.7500 |",
]


def _model(threshold=0.5):
    return get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", threshold=threshold)).eval()


def _assert_card(text: str, split: str, count: int = 1) -> None:
    assert text.count(f"## {SECTION_TITLE}") == count
    assert f"on the **{split}** split" in text
    for row in ROWS:
        assert text.count(row) == count, row


@pytest.fixture(autouse=True)
def pristine_peft():
    """The deprecated class-level hook is off after every test, as after `import fairnet_peft`."""
    yield
    uninstall_model_card_hook()


def test_import_patches_nothing_in_peft_and_a_report_hooks_only_its_model(tmp_path):
    """Importing fairnet_peft leaves PeftModel's methods as they are; attaching a report changes one model."""
    import subprocess
    import sys

    code = ("import peft; card, up = peft.PeftModel.create_or_update_model_card, peft.PeftModel._upload_modified_files\n"
            "import fairnet_peft\n"
            "assert peft.PeftModel.create_or_update_model_card is card and peft.PeftModel._upload_modified_files is up\n"
            "assert not hasattr(card, '__fairnet_original__')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    original = PeftModel.create_or_update_model_card
    model, other = _model(), _model()
    attach_fairness_report(model, METRICS, split="test")
    assert PeftModel.create_or_update_model_card is original
    other.save_pretrained(tmp_path / "other")
    assert SECTION_TITLE not in (tmp_path / "other" / "README.md").read_text()
    model.save_pretrained(tmp_path / "model")
    _assert_card((tmp_path / "model" / "README.md").read_text(), "test")


def test_hook_install_is_idempotent():
    install_model_card_hook()
    first = (PeftModel.create_or_update_model_card, PeftModel._upload_modified_files)
    install_model_card_hook()
    assert (PeftModel.create_or_update_model_card, PeftModel._upload_modified_files) == first
    assert not hasattr(PeftModel.create_or_update_model_card.__fairnet_original__, "__fairnet_original__")


def test_save_pretrained_writes_the_fairness_section_once(tmp_path):
    model = _model(threshold=0.35)
    attach_fairness_report(model, METRICS, split="validation")
    assert fairness_report(model)["split"] == "validation"
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    _assert_card(text, "validation")
    assert "τ = 0.35" in text
    assert "library_name: peft" in text and "PEFT" in text  # PEFT's own card is kept
    assert "eval_runtime" not in text and "loss" not in text.lower().split("## fairness evaluation")[1]
    # saving again (same folder) replaces the section instead of adding a second one
    model.save_pretrained(tmp_path)
    _assert_card((tmp_path / "README.md").read_text(), "validation")
    # a new report replaces the old one
    attach_fairness_report(model, {**METRICS, "eval_accuracy": 0.5}, split="test")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count(f"## {SECTION_TITLE}") == 1 and "**test** split" in text and "**validation**" not in text
    assert "| ACC (accuracy over all rows) | 0.5000 |" in text


def test_the_cell_rows_name_the_classes_of_the_base_models_id2label(tmp_path):
    cells = {**METRICS, "eval_acc_y0_s1": 0.5, "eval_acc_y1_s1": 0.75}
    model = _model()
    attach_fairness_report(model, cells, split="test")
    model.save_pretrained(tmp_path / "ids")  # transformers' placeholder names (LABEL_0, ...): the ids
    text = (tmp_path / "ids" / "README.md").read_text()
    assert "| accuracy of cell y=0, s=1 | 0.5000 |" in text and "LABEL_" not in text
    base = tiny_model("bert")
    base.config.id2label, base.config.label2id = {0: "<=50K", 1: ">50K"}, {"<=50K": 0, ">50K": 1}
    named = get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS")).eval()
    attach_fairness_report(named, cells, split="test")
    named.save_pretrained(tmp_path / "names")
    text = (tmp_path / "names" / "README.md").read_text()
    assert "| accuracy of cell y=<=50K, s=1 | 0.5000 |" in text and "| accuracy of cell y=>50K, s=1 | 0.7500 |" in text


def test_no_report_no_section_and_other_models_unaffected(tmp_path):
    install_model_card_hook()
    model = _model()
    model.save_pretrained(tmp_path / "plain")
    assert SECTION_TITLE not in (tmp_path / "plain" / "README.md").read_text()
    lora = get_peft_model(tiny_model("bert"), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    lora.save_pretrained(tmp_path / "lora")
    assert SECTION_TITLE not in (tmp_path / "lora" / "README.md").read_text()
    attach_fairness_report(model, METRICS, split="test")
    detach_fairness_report(model)
    model.save_pretrained(tmp_path / "detached")
    assert SECTION_TITLE not in (tmp_path / "detached" / "README.md").read_text()


def test_push_to_hub_card_has_the_table(tmp_path, monkeypatch):
    api = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
    model = _model()
    attach_fairness_report(model, METRICS, split="test")
    model.push_to_hub("me/fair-adapter")
    pushed = tmp_path / "hub" / "me" / "fair-adapter"
    assert api.commits and (pushed / "adapter_model.safetensors").exists()
    text = (pushed / "README.md").read_text()
    _assert_card(text, "test")
    assert "library_name: peft" in text


def test_write_model_card_on_a_folder(tmp_path):
    model = _model(threshold=0.6)
    model.save_pretrained(tmp_path)
    path = write_model_card(str(tmp_path), METRICS, split="test")
    text = path.read_text()
    _assert_card(text, "test")
    assert "τ = 0.6" in text and "library_name: peft" in text
    write_model_card(tmp_path, METRICS, split="test")  # idempotent
    _assert_card((tmp_path / "README.md").read_text(), "test")
    # a second adapter gets its own section; the first stays
    write_model_card(tmp_path, METRICS, split="test", adapter_name="other")
    text = (tmp_path / "README.md").read_text()
    assert f"## {SECTION_TITLE} (adapter `other`)" in text and text.count("| gate rate, s=1 | 0.7500 |") == 2
    # a fresh folder without README.md
    fresh = write_model_card(tmp_path / "new", METRICS, split="dev")
    _assert_card(fresh.read_text(), "dev")


def test_write_model_card_with_a_model_attaches(tmp_path):
    model = _model()
    assert write_model_card(model, METRICS, split="test") is None
    model.save_pretrained(tmp_path)
    _assert_card((tmp_path / "README.md").read_text(), "test")


def test_bad_input_fails_at_attach_time():
    model = _model()
    with pytest.raises(ValueError, match="no known fairness metric"):
        attach_fairness_report(model, {"eval_loss": 0.3}, split="test")
    with pytest.raises(ValueError, match="split"):
        attach_fairness_report(model, METRICS, split="")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        attach_fairness_report(model, METRICS, split="test", adapter_name="nope")
    with pytest.raises(TypeError, match="PeftModel"):
        attach_fairness_report(tiny_model("bert"), METRICS, split="test")


def test_uninstall_restores_peft(tmp_path):
    install_model_card_hook()
    uninstall_model_card_hook()
    assert not hasattr(PeftModel.create_or_update_model_card, "__fairnet_original__")
    assert "_upload_modified_files" not in PeftModel.__dict__
    model = _model()
    model.__dict__["_fairnet_fairness_reports"] = {"default": {"metrics": {"accuracy": 1.0}, "split": "x"}}
    model.save_pretrained(tmp_path)
    assert SECTION_TITLE not in (tmp_path / "README.md").read_text()


def test_the_selection_lines_name_the_choice_and_the_frontier_with_its_majority_gate_share():
    from fairnet_peft.evaluation.report import render_selection

    row = dict(threshold=0.42, strength=0.5, accuracy=0.9, worst_group_accuracy=0.7, equalized_odds_difference=0.05,
               gate_rate=0.3, majority_gate_rate=0.125)
    lines = render_selection({"selected": True, "threshold": 0.42, "strength": 0.5, "rows": 200, "on": "eval rows",
                              "accuracy": 0.9, "accuracy_off": 0.89, "worst_group_accuracy": 0.7,
                              "worst_group_accuracy_off": 0.5, "frontier": [row, {**row, "majority_gate_rate": None}]})
    assert lines[0].startswith("Correction chosen after training on 200 eval rows: τ = 0.42, strength α = 0.5")
    assert "worst-group loss" not in lines[0]  # not reported: not claimed
    assert "| τ | α | ACC | WGA | EOD | worst-group loss | gated | majority gated |" in lines
    assert "| 0.42 | 0.5 | 0.9000 | 0.7000 | 0.0500 | n/a | 0.3000 | 0.1250 |" in lines
    # a choice the tie-break made (same ACC and WGA as off) says what it gained: the worst-group loss
    tied = render_selection({"selected": True, "threshold": 0.5, "strength": 1.0, "rows": 150, "on": "eval rows",
                             "accuracy": 0.8, "accuracy_off": 0.8, "worst_group_accuracy": 0.6,
                             "worst_group_accuracy_off": 0.6, "worst_group_loss": 0.9, "worst_group_loss_off": 1.25,
                             "frontier": [{**row, "worst_group_loss": 0.9}]})
    assert tied[0].endswith("worst-group accuracy 60.0 % against 60.0 %; worst-group loss 0.900 against 1.250).")
    assert "| 0.42 | 0.5 | 0.9000 | 0.7000 | 0.0500 | 0.900 | 0.3000 | 0.1250 |" in tied
    assert not any("Held back" in line for line in tied)
    held = render_selection({"selected": True, "threshold": 0.5, "strength": 0.5, "rows": 150, "on": "eval rows",
                             "accuracy": 0.8, "accuracy_off": 0.8, "worst_group_accuracy": 0.6,
                             "worst_group_accuracy_off": 0.5, "held_back_reason": "a fairer candidate, τ = 0.5"})
    assert held[-1] == "Held back by the selection's limits: a fairer candidate, τ = 0.5."
    searched = [{"threshold": 1.0, "strength": 0.0, "accuracy": 0.8, "worst_group_accuracy": 0.6}]
    off = render_selection({"selected": True, "threshold": 1.0, "reason": "nothing passed", "rows": 9,
                            "frontier": searched})
    assert off[0] == "**The adapter is off** (τ = 1; chosen on 9 held-out rows): nothing passed."
    # switched off before any candidate was searched (the detector cannot find the group): no frontier
    blind = render_selection({"selected": True, "threshold": 1.0, "reason": "the bias detector cannot find it", "rows": 9})
    assert blind == ["**The adapter is off** (τ = 1, before any candidate was searched): the bias detector cannot "
                     "find it."]
    assert render_selection({"selected": False, "threshold": 0.5}) == []
    # a τ just below 1 keeps the adapter on for the rows above it: it must not print as 1, which reads as off
    near = render_selection({"selected": True, "threshold": 0.9999724, "strength": 0.25, "rows": 300,
                             "on": "eval rows", "frontier": [{**row, "threshold": 0.9999724}]})
    assert "τ = 0.999972, strength α = 0.25" in near[0]
    assert any(line.startswith("| 0.999972 | 0.5 |") for line in near)


def test_format_threshold_never_prints_a_threshold_below_one_as_one():
    from fairnet_peft.evaluation.report import format_threshold

    assert [format_threshold(t) for t in (0.5, 0.123456, 1.0, 0.99994, 0.99996, 1 - 4e-8)] == [
        "0.5", "0.1235", "1", "0.9999", "0.99996", "1 - 4e-08"]
    assert format_threshold(0.9996, digits=3) == "0.9996" and format_threshold(0.9994, digits=3) == "0.999"
