"""Bad-input fuzz: seeded random corruptions must each raise our own ValueError/TypeError naming the field/column.

Part 1 corrupts `FairLoraConfig` fields (wrong types, out-of-range values) and, against a tiny BERT, model-dependent
values (unknown module names, block indices). Part 2 corrupts a small synthetic training set and runs
`fairnet_peft.training.validation.validate_train_dataset` (missing columns, wrong dtypes, NaN, empty, one row, strings in the
sensitive column, bad labels, token ids outside the vocabulary). The error must come from fairnet_peft's own code,
never from inside torch, peft, numpy, pyarrow or datasets.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
from dataclasses import fields

import numpy as np
import pytest
import torch
import transformers as T
from peft import PeftConfig, get_peft_model

import fairnet_peft
from fairnet_peft import FairLoraConfig
from fairnet_peft.data import make_synthetic_text
from fairnet_peft.training.validation import check_eval_dataset, validate_train_dataset

PACKAGE = os.path.dirname(os.path.abspath(fairnet_peft.__file__))


def _raised_in_fairnet(excinfo) -> bool:
    """The innermost frame of the traceback is in fairnet_peft (our own check), not in a library."""
    return os.path.abspath(str(excinfo.traceback[-1].path)).startswith(PACKAGE + os.sep)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


# ------------------------------------------------------------------------------------------ FairLoraConfig
# field -> makers of invalid values (each takes the seeded rng)
BAD = {
    "r": [lambda g: g.randint(1, 63) + 0.5, lambda g: -g.randint(0, 64), lambda g: str(g.randint(1, 64)),
          lambda g: True, lambda g: None, lambda g: [8]],
    "lora_alpha": [lambda g: str(g.randint(1, 64)), lambda g: -g.uniform(0, 64), lambda g: 0, lambda g: math.inf,
                   lambda g: math.nan, lambda g: None, lambda g: True, lambda g: [16]],
    "lora_dropout": [lambda g: 1.0 + g.random(), lambda g: -g.uniform(0.01, 1), lambda g: f"{g.random():.2f}",
                     lambda g: None, lambda g: math.nan, lambda g: True],
    "target_modules": [lambda g: g.randint(0, 999), lambda g: g.random(), lambda g: [g.randint(0, 9)],
                       lambda g: {"query": 1}, lambda g: []],
    "exclude_modules": [lambda g: g.randint(0, 999), lambda g: [g.randint(0, 9), g.randint(0, 9)]],
    "layers_to_transform": [lambda g: [-g.randint(1, 9)], lambda g: -g.randint(1, 9), lambda g: str(g.randint(0, 3)),
                            lambda g: [g.randint(0, 3) + 0.5], lambda g: 1.5, lambda g: []],
    "layers_pattern": [lambda g: g.randint(0, 9), lambda g: [g.randint(0, 9)], lambda g: []],
    "modules_to_save": [lambda g: "classifier", lambda g: g.randint(0, 9), lambda g: [g.randint(0, 9)]],
    "bias": [lambda g: None, lambda g: _word(g), lambda g: g.randint(0, 2)],
    "init_weights": [lambda g: g.choice(["yes", "True", "gaussian"]), lambda g: g.randint(0, 1), lambda g: None],
    "detector_layer": [lambda g: -g.randint(1, 9), lambda g: g.randint(0, 3) + 0.5, lambda g: str(g.randint(0, 3)),
                       lambda g: True],
    "detector_module": [lambda g: g.randint(0, 9), lambda g: "", lambda g: "  ", lambda g: [_word(g)]],
    "detector_input_dim": [lambda g: 0, lambda g: -g.randint(1, 64), lambda g: 15.5, lambda g: "16"],
    "detector_pooling": [lambda g: None, lambda g: g.choice(["max", "sum", "CLS", _word(g)]), lambda g: 3],
    "detector_hidden_sizes": [lambda g: [0], lambda g: [g.randint(1, 64), -g.randint(1, 64)], lambda g: "abc",
                              lambda g: [16.5], lambda g: g.randint(1, 64), lambda g: None, lambda g: [True]],
    "detector_dropout": [lambda g: None, lambda g: 1.0, lambda g: -g.uniform(0.01, 1), lambda g: "0.1",
                         lambda g: True, lambda g: math.nan],
    "threshold": [lambda g: f"{g.random():.2f}", lambda g: math.nan, lambda g: 1.0 + g.uniform(0.01, 5),
                  lambda g: -g.uniform(0.01, 5), lambda g: None, lambda g: True],
    "adapter_strength": [lambda g: f"{g.random():.2f}", lambda g: math.nan, lambda g: 1.0 + g.uniform(0.01, 5),
                         lambda g: -g.uniform(0.01, 5), lambda g: None, lambda g: True],
    "num_classes": [lambda g: 1, lambda g: -g.randint(1, 9), lambda g: 2.0, lambda g: "2", lambda g: True],
    "representation_dim": [lambda g: -g.randint(1, 64), lambda g: 15.5, lambda g: "16"],
    "representation_pooling": [lambda g: None, lambda g: g.choice(["max", "pooler", _word(g)]), lambda g: 0],
    "representation_module": [lambda g: g.randint(0, 9), lambda g: "", lambda g: [_word(g)]],
    "selection_report": [lambda g: _word(g), lambda g: [g.random()], lambda g: g.random()],
}
# valid values, mixed into some corruptions so that a bad field is caught next to other non-default fields
GOOD = {
    "r": lambda g: g.choice([1, 4, 8, np.int64(16)]), "lora_alpha": lambda g: g.choice([1, 8, 16.0, 32]),
    "lora_dropout": lambda g: g.choice([0.0, 0.1, np.float32(0.2)]), "threshold": lambda g: g.choice([0, 0.3, 1]),
    "detector_hidden_sizes": lambda g: g.choice([[], [8], (32, 16)]), "detector_dropout": lambda g: g.random() * 0.9,
    "detector_pooling": lambda g: g.choice(["attention", "cls", "mean", "last"]), "init_weights": lambda g: g.random() < .5,
    "num_classes": lambda g: g.choice([None, 0, 2, 5]), "layers_to_transform": lambda g: g.choice([None, [0, 1], 1]),
}


def test_every_config_field_has_corruptions():
    own = {f.name for f in fields(FairLoraConfig)} - {f.name for f in fields(PeftConfig)}
    assert own == set(BAD), own ^ set(BAD)


def test_seeded_config_corruptions_name_the_field():
    failures, seen = [], set()
    for seed in range(300):
        rng = random.Random(seed)
        name = rng.choice(sorted(BAD))
        seen.add(name)
        value = rng.choice(BAD[name])(rng)
        kwargs = {k: make(rng) for k, make in GOOD.items() if k != name and rng.random() < 0.3}
        kwargs[name] = value
        try:
            config = FairLoraConfig(task_type="SEQ_CLS", **kwargs)
        except (ValueError, TypeError) as err:
            if f"FairLoraConfig.{name}=" not in str(err):
                failures.append((seed, kwargs, f"{type(err).__name__}: {err}"))
            continue
        except Exception as err:  # noqa: BLE001 - any other type is the failure this test looks for
            failures.append((seed, kwargs, f"{type(err).__name__}: {err}"))
            continue
        failures.append((seed, kwargs, f"accepted: {getattr(config, name)!r}"))
    assert seen == set(BAD)  # every field was corrupted at least once
    assert not failures, "\n".join(map(str, failures[:20]))


def test_config_errors_come_from_our_checks_not_a_library():
    for kwargs in ({"r": 2.5}, {"lora_alpha": "16"}, {"threshold": "0.5"}, {"detector_hidden_sizes": [0]},
                   {"detector_hidden_sizes": "abc"}, {"detector_dropout": None}, {"layers_to_transform": [-1]},
                   {"target_modules": 123}, {"num_classes": 1}, {"modules_to_save": "classifier"}):
        with pytest.raises((ValueError, TypeError), match="FairLoraConfig." + next(iter(kwargs))) as excinfo:
            FairLoraConfig(task_type="SEQ_CLS", **kwargs)
        assert _raised_in_fairnet(excinfo), (kwargs, excinfo.traceback[-1])


def test_valid_numpy_scalars_are_normalised_and_the_config_saves_as_json(tmp_path):
    config = FairLoraConfig(r=np.int64(4), lora_alpha=np.float32(8.0), threshold=np.float64(0.25),
                            layers_to_transform=[np.int64(1)], num_classes=np.int32(3))
    assert type(config.r) is int and type(config.lora_alpha) is float and type(config.num_classes) is int
    assert config.layers_to_transform == [1] and config.scaling == 2.0
    config.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["threshold"], saved["num_classes"]) == (4, 8.0, 0.25, 3)
    loaded = FairLoraConfig.from_pretrained(str(tmp_path))
    assert (loaded.r, loaded.threshold, loaded.layers_to_transform) == (4, 0.25, [1])


def _tiny_bert(layers: int = 2):
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))


MODEL_BAD = {  # corruptions only the model can refute (2 blocks, so valid block indices are 0..1)
    "detector_layer": lambda g: {"detector_layer": g.randint(2, 40)},
    "target_modules": lambda g: {"target_modules": g.choice([[_word(g)], _word(g) + ".*", ["LayerNorm"],
                                                             ["dropout"]])},
    "detector_module": lambda g: {"detector_module": g.choice(["bert." + _word(g), _word(g), "bert.encoder.layer.9"])},
}


def test_seeded_model_dependent_corruptions_name_the_field():
    failures = []
    for seed in range(12):
        rng = random.Random(seed)
        name = rng.choice(sorted(MODEL_BAD))
        kwargs = MODEL_BAD[name](rng)
        try:
            model = get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", **kwargs))
            model(torch.tensor([[1, 2, 3]]))
        except (ValueError, TypeError) as err:
            if f"FairLoraConfig.{name}" not in str(err):
                failures.append((seed, kwargs, f"{type(err).__name__}: {err}"))
            continue
        except Exception as err:  # noqa: BLE001
            failures.append((seed, kwargs, f"{type(err).__name__}: {err}"))
            continue
        failures.append((seed, kwargs, "accepted"))
    assert not failures, "\n".join(map(str, failures))


# Layer selection that selects nothing, or a misspelt name, must blame the field at fault, not target_modules.
@pytest.mark.parametrize("kwargs, field_name, detail", [
    ({"layers_to_transform": [5]}, "layers_to_transform", r"\[5\].*valid range is 0\.\.1"),
    ({"layers_to_transform": [1, 7], "target_modules": ["query"]}, "layers_to_transform", r"\[7\]"),
    ({"layers_pattern": "nope"}, "layers_pattern", r"stacks found are \['layer'\]"),
    ({"exclude_modules": ".*"}, "exclude_modules", "excludes every target"),
    ({"target_modules": ["query", "value"], "exclude_modules": ["query", "value"]}, "exclude_modules", "query"),
    ({"target_modules": ["query", "vaule"]}, "target_modules", r"\['vaule'\] matches no module"),
], ids=["layers_to_transform", "partly-out-of-range", "layers_pattern", "exclude-all-defaults", "exclude-all-targets",
        "misspelt-target"])
def test_model_dependent_layer_selection_names_the_field(kwargs, field_name, detail):
    with pytest.raises(ValueError, match=f"FairLoraConfig.{field_name}") as excinfo:
        get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", **kwargs))
    assert re.search(detail, str(excinfo.value)), str(excinfo.value)


def test_layer_selection_that_matches_is_accepted():
    # a name that exists only outside layers_to_transform is not "misspelt"; a partial exclusion leaves targets
    model = get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                        layers_to_transform=[1], layers_pattern="layer",
                                                        exclude_modules=["value"]))
    adapted = [k for k, m in model.named_modules() if hasattr(m, "fairlora_A")]
    assert adapted and all(".layer.1.attention.self.query" in k for k in adapted), adapted
    model = get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", exclude_modules=["query", "value"]))
    adapted = [k for k, m in model.named_modules() if hasattr(m, "fairlora_A")]
    assert adapted and not any(k.endswith(("query", "value")) for k in adapted), adapted


def test_detector_input_dim_mismatch_names_the_field():
    with pytest.raises(ValueError, match="FairLoraConfig.detector_input_dim=7 .* width 16"):
        get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", detector_input_dim=7))
    assert get_peft_model(_tiny_bert(), FairLoraConfig(task_type="SEQ_CLS", detector_input_dim=16)) is not None


def test_detector_width_checked_at_first_forward():
    from fairnet_peft.tuner.detector import DetectorNet

    net = DetectorNet(7, [4], 0.0, "attention")
    with pytest.raises(ValueError, match="FairLoraConfig.detector_input_dim=7 .* width 16") as excinfo:
        net(torch.zeros(2, 3, 16))
    assert _raised_in_fairnet(excinfo)
    assert net(torch.zeros(2, 3, 7)).shape == (2,)


def test_single_label_model_is_refused():
    model = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=1))
    with pytest.raises(ValueError, match="FairLoraConfig.num_classes.*num_labels=1.*regression"):
        get_peft_model(model, FairLoraConfig(task_type="SEQ_CLS"))
    peft_model = get_peft_model(model, FairLoraConfig(task_type="SEQ_CLS", num_classes=3))
    assert peft_model.peft_config["default"].num_classes == 3


# ------------------------------------------------------------------------------------------ training dataset
VOCAB = 32


@pytest.fixture(scope="module")
def train():
    return make_synthetic_text(n_train=200, n_val=50, n_test=50)["train"]


def _validate(ds, **kw):
    kw = {"sensitive_column": "sensitive", "num_labels": 2, "vocab_size": VOCAB, **kw}
    return validate_train_dataset(ds, **kw)


def _with(ds, column, values):
    return ds.remove_columns(column).add_column(column, values)


def _some_rows(rng: random.Random, n: int) -> list[int]:
    return sorted(rng.sample(range(n), rng.randint(1, 5)))


def _put(values: list, rows: list[int], make) -> list:
    values = list(values)
    for i in rows:
        values[i] = make(i)
    return values


def _ids_out_of_vocab(ds, rng):
    ids = [list(r) for r in ds["input_ids"]]
    for i in _some_rows(rng, len(ds)):
        ids[i][rng.randrange(len(ids[i]))] = rng.choice([VOCAB + rng.randint(0, 1000), -rng.randint(1, 5)])
    return _with(ds, "input_ids", ids)


def _ragged_ids_out_of_vocab(ds, rng):
    ids = [list(r)[: rng.randint(3, len(r))] for r in ds["input_ids"]]
    i = rng.randrange(len(ds))
    ids[i][-1] = VOCAB + rng.randint(0, 50)
    return _with(ds, "input_ids", ids)


def _nan_feature(ds, rng):
    bad = set(_some_rows(rng, len(ds)))
    poison = rng.choice([math.nan, math.inf, -math.inf])
    return ds.add_column("emb", [[0.5, poison, 0.1] if i in bad else [0.5, 0.2, 0.1] for i in range(len(ds))])


def _none_feature(ds, rng):
    bad = set(_some_rows(rng, len(ds)))
    row = rng.choice([None, [0.5, None, 0.1]])
    return ds.add_column("emb", [row if i in bad else [0.5, 0.2, 0.1] for i in range(len(ds))])


def _none_ids(ds, rng):
    ids = [list(r) for r in ds["input_ids"]]
    for i in _some_rows(rng, len(ds)):
        if rng.random() < 0.5:
            ids[i] = None
        else:
            ids[i][rng.randrange(len(ids[i]))] = None
    return _with(ds, "input_ids", ids)


def _all_minority(ds, rng):
    if rng.random() < 0.5:
        return _with(ds, "sensitive", [1] * len(ds))
    return _with(ds, "sensitive", [rng.choice([1, -1]) for _ in range(len(ds) - 1)] + [1])


def _no_minority(ds, rng):
    return _with(ds, "sensitive", [rng.choice([0, -1]) for _ in range(len(ds) - 1)] + [0])


# name -> (corrupt(ds, rng), text the message must contain)
CORRUPTIONS = {
    "drop-sensitive": (lambda ds, g: ds.remove_columns("sensitive"), "'sensitive'"),
    "drop-labels": (lambda ds, g: ds.remove_columns("labels"), "'labels'"),
    "empty": (lambda ds, g: ds.select([]), "empty"),
    "single-row": (lambda ds, g: ds.select([g.randrange(len(ds))]), "single row"),
    "sensitive-strings": (lambda ds, g: _with(ds, "sensitive", [g.choice(["F", "M", "", "1"]) for _ in range(len(ds))]),
                          "'sensitive'"),
    "sensitive-nan": (lambda ds, g: _with(ds, "sensitive", _put(np.asarray(ds["sensitive"], float).tolist(),
                                                                _some_rows(g, len(ds)), lambda i: math.nan)),
                      "'sensitive'"),
    "sensitive-fraction": (lambda ds, g: _with(ds, "sensitive", _put(np.asarray(ds["sensitive"], float).tolist(),
                                                                     _some_rows(g, len(ds)), lambda i: g.random())),
                           "'sensitive'"),
    "sensitive-out-of-range": (lambda ds, g: _with(ds, "sensitive", _put(ds["sensitive"], _some_rows(g, len(ds)),
                                                                         lambda i: g.choice([2, 3, -2, 7]))),
                               "'sensitive'"),
    "sensitive-none": (lambda ds, g: _with(ds, "sensitive", _put(ds["sensitive"], _some_rows(g, len(ds)),
                                                                 lambda i: None)), "'sensitive'"),
    "all-minority": (_all_minority, "sensitive == 0"),
    "no-minority": (_no_minority, "sensitive == 1"),
    "labels-strings": (lambda ds, g: _with(ds, "labels", [g.choice(["pos", "neg"]) for _ in range(len(ds))]), "'labels'"),
    "labels-floats": (lambda ds, g: _with(ds, "labels", [float(v) + g.choice([0.0, 0.5]) for v in ds["labels"]]),
                      "'labels'"),
    "labels-ignore-index": (lambda ds, g: _with(ds, "labels", _put(ds["labels"], _some_rows(g, len(ds)),
                                                                   lambda i: -100)), "'labels'"),
    "labels-out-of-range": (lambda ds, g: _with(ds, "labels", _put(ds["labels"], _some_rows(g, len(ds)),
                                                                   lambda i: g.choice([2, 5, -1]))), "'labels'"),
    "labels-none": (lambda ds, g: _with(ds, "labels", _put(ds["labels"], _some_rows(g, len(ds)), lambda i: None)),
                    "'labels'"),
    "labels-single-class": (lambda ds, g: _with(ds, "labels", [g.randint(0, 1)] * len(ds)), "single class"),
    "ids-out-of-vocab": (_ids_out_of_vocab, "'input_ids'"),
    "ragged-ids-out-of-vocab": (_ragged_ids_out_of_vocab, "'input_ids'"),
    "ids-floats": (lambda ds, g: _with(ds, "input_ids", np.asarray(ds["input_ids"], float).tolist()), "'input_ids'"),
    "nan-feature": (_nan_feature, "'emb'"),
    "none-feature": (_none_feature, "'emb'"),
    "none-ids": (_none_ids, "'input_ids'"),
}


def test_clean_dataset_passes_and_returns_the_columns(train):
    setting, sensitive, labels = _validate(train)
    assert setting == "full" and sensitive.dtype == labels.dtype == np.int64
    assert sensitive.tolist() == train["sensitive"] and labels.tolist() == train["labels"]
    view = train.shuffle(seed=3).select(range(60))  # an indices mapping: the arrays follow the view's row order
    assert _validate(view)[1].tolist() == view["sensitive"] and _validate(view)[2].tolist() == view["labels"]
    rng = np.random.default_rng(0)
    partial = _with(train, "sensitive", np.where(rng.random(len(train)) < 0.5, -1, train["sensitive"]).tolist())
    assert _validate(partial)[0] == "partial"
    assert _validate(_with(train, "sensitive", [-1] * len(train)))[0] == "unlabeled"
    floats = _with(train, "sensitive", np.asarray(train["sensitive"], float).tolist())  # 0.0/1.0 are group ids too
    assert _validate(floats)[1].tolist() == train["sensitive"]
    assert _validate(train.rename_column("labels", "label"), num_labels=None, vocab_size=None)[0] == "full"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_seeded_dataset_corruptions_name_the_column(train, name):
    corrupt, expected = CORRUPTIONS[name]
    for seed in range(3):
        bad = corrupt(train, random.Random(f"{name}-{seed}"))
        with pytest.raises((ValueError, TypeError)) as excinfo:
            _validate(bad)
        assert expected in str(excinfo.value), (seed, str(excinfo.value))
        assert _raised_in_fairnet(excinfo), excinfo.traceback[-1]


#: the corruptions an eval set must be refused for too: FairTrainer trains its LoRA on eval rows and selects on them,
#: and a bad class or token id reaches an index there (on a GPU a device-side assert at an unrelated line)
EVAL_CORRUPTIONS = sorted(n for n in CORRUPTIONS if n.startswith(("labels-", "ids-", "ragged-ids", "none-ids"))
                          and n != "labels-single-class")


@pytest.mark.parametrize("name", EVAL_CORRUPTIONS)
def test_eval_dataset_corruptions_name_the_split_and_the_column(train, name):
    corrupt, expected = CORRUPTIONS[name]
    for seed in range(3):
        bad = corrupt(train, random.Random(f"eval-{name}-{seed}"))
        with pytest.raises(ValueError) as excinfo:
            check_eval_dataset({"held_out": bad}, "sensitive", num_labels=2, vocab_size=VOCAB)
        assert expected in str(excinfo.value) and str(excinfo.value).startswith("eval_dataset"), str(excinfo.value)
    # one class in an eval set is fine (a small validation split may hold one), and without bounds ids are not read
    check_eval_dataset(_with(train, "labels", [1] * len(train)), "sensitive", num_labels=2, vocab_size=VOCAB)
    check_eval_dataset(train.remove_columns("labels"), "sensitive")


def test_dataset_corruptions_report_the_rows_of_the_view(train):
    rng = random.Random(0)
    for _ in range(5):
        rows = sorted(rng.sample(range(len(train)), 2))
        labels = _put(train["labels"], rows, lambda i: 7)
        with pytest.raises(ValueError, match=rf"values \[7\] outside 0\.\.1 \(num_labels=2\) in rows \[{rows[0]}, {rows[1]}\]"):
            _validate(_with(train, "labels", labels))
    # rows are positions in the view (after select), not in the parent dataset: rows 22 and 40 are view rows 11, 20
    emb = [[0.5, math.nan] if i in (22, 40) else [0.5, 0.5] for i in range(len(train))]
    view = train.add_column("emb", emb).select(range(0, len(train), 2))
    with pytest.raises(ValueError, match=r"'emb' has NaN/inf values in rows \[11, 20\]"):
        _validate(view)


def test_not_a_dataset_and_label_bounds(train):
    from datasets import DatasetDict

    for bad in ({"input_ids": [[1, 2]], "labels": [0], "sensitive": [1]}, DatasetDict(train=train), train.to_pandas()):
        with pytest.raises(ValueError, match="datasets.Dataset"):
            _validate(bad)
    with pytest.raises(ValueError, match=r"'labels' has values \[1\] outside 0\.\.0 \(num_labels=1\)"):
        _validate(train, num_labels=1)
    assert _validate(train, num_labels=5)[0] == "full"  # K = 5 only bounds the labels from above
    ids = np.asarray(train["input_ids"])
    assert _validate(train, vocab_size=int(ids.max()) + 1)[0] == "full"
    with pytest.raises(ValueError, match=rf"outside 0\.\.{ids.max() - 1} .*max {ids.max()}"):
        _validate(train, vocab_size=int(ids.max()))
