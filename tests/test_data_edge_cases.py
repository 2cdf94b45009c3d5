"""Edge cases of your own data (`fairnet_peft.data.files` / `sampling`, and the eval check in
`training.validation`): `minority_value` matches 1, "1", 1.0 and "1.0" alike; number-looking labels written two ways
are one class; a layout without kept columns loads; a missing local path is a FileNotFoundError, not a Hub lookup;
empty and too-small files get errors that say what is wrong and how many rows are needed."""

from __future__ import annotations

import json
import os
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

import pytest
from datasets import Dataset

from fairnet_peft.data import encode_sensitive, load_group_dataset
from fairnet_peft.training.validation import check_eval_dataset

GROUPS = ["1.0", "0.0", "unknown"]


def _write_csv(path, header, rows):
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


@pytest.fixture
def float_groups(tmp_path):
    """160 rows whose group column is stored as '1.0' / '0.0' / 'unknown' (as pandas writes a float column with
    missing values, relabelled); the text says the row's group, so every loaded row can be checked."""
    rows = [(f"row{i}-{GROUPS[i % 3]}", i % 2, GROUPS[i % 3]) for i in range(160)]
    return _write_csv(tmp_path / "groups.csv", "text,label,sensitive", rows)


@pytest.mark.parametrize("minority_value", [1, "1", 1.0, "1.0"])
def test_minority_value_matches_a_column_stored_as_floats_or_strings(float_groups, minority_value):
    ds, _ = load_group_dataset(float_groups, keep_columns=["text"], minority_value=minority_value)
    expected = {"1.0": 1, "0.0": 0, "unknown": -1}
    counts = {1: 0, 0: 0, -1: 0}
    for split in ds.values():
        for row in split:
            assert row["sensitive"] == expected[row["text"].split("-")[1]], row
            counts[row["sensitive"]] += 1
    assert counts == {1: 54, 0: 53, -1: 53}


def test_encode_sensitive_normalises_numbers_and_number_strings():
    values = [1, 1.0, "1", "1.0", " 1.0 ", "1e0", True, 0, "0.0", "2", "unknown", "NA", None, float("nan")]
    for minority in (1, "1", 1.0, "1.0"):
        assert encode_sensitive(values, minority) == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, -1, -1, -1, -1]
    assert encode_sensitive(["1.0", "0.0", "-1.0", "unknown"]) == [1, 0, -1, -1]  # already coded, as strings
    # a bool column as a CSV writes it ('True' / 'false'), with minority_value True or "true", or already coded
    assert encode_sensitive(["True", "False", " true ", "FALSE", True, ""], "true") == [1, 0, 1, 0, 1, -1]
    assert encode_sensitive(["True", "False"], True) == encode_sensitive(["True", "False"]) == [1, 0]
    # -1 is the package's own "unknown" code, with a minority value too (a race coded 0-3, -1 for unknown)
    assert encode_sensitive([0, 2, 3, -1, "-1", " -1.0 ", None], 2) == [0, 1, 0, -1, -1, -1, -1]
    with pytest.raises(ValueError, match=r"minority_value=-1: -1 is the code for an unknown group"):
        encode_sensitive([0, -1], -1)


def test_a_minority_value_that_matches_no_row_names_the_values(tmp_path):
    rows = [(f"row{i}", i % 2, "FM"[i % 3 == 0]) for i in range(60)]
    path = _write_csv(tmp_path / "g.csv", "text,label,gender", rows)
    with pytest.raises(ValueError, match=r"minority_value='f' .* column 'gender', whose values are \['F', 'M'\] "
                                         r"\(values compare with their case: did you mean 'F'\?\)"):
        load_group_dataset(path, keep_columns=["text"], sensitive_column="gender", minority_value="f")
    with pytest.raises(ValueError, match=r"minority_value='X' .*\['F', 'M'\]\. Pass one of them"):
        load_group_dataset(path, keep_columns=["text"], sensitive_column="gender", minority_value="X")
    ds, _ = load_group_dataset(path, keep_columns=["text"], sensitive_column="gender", minority_value="M")
    assert 1 in ds["train"]["sensitive"]


def test_a_label_no_training_row_has_is_an_error_naming_it_and_the_split(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    _write_csv(folder / "train.csv", "text,label,sensitive", [(f"r{i}", "yes" if i % 2 else "no", i % 3 == 0)
                                                              for i in range(40)])
    _write_csv(folder / "validation.csv", "text,label,sensitive", [("v0", "no", 1), ("v1", "yes", 0)])
    _write_csv(folder / "test.csv", "text,label,sensitive", [("t0", "maybe", 1), ("t1", "yes", 0)])
    with pytest.raises(ValueError, match=r"the test split has labels \['maybe'\] that no training row has "
                                         r"\(training labels: \['no', 'yes'\]\)"):
        load_group_dataset(str(folder), keep_columns=["text"], minority_value=True)


@pytest.mark.parametrize("keep", [(), ("text",)], ids=["no kept column", "text kept"])
def test_rows_without_a_label_are_dropped_in_every_layout(tmp_path, keep):
    """Dropping unlabelled rows leaves the split with an indices mapping; adding columns to it must work whether or
    not any input column is kept (without one, `datasets` used to fail with an IndexError)."""
    rows = [(f"row{i}", "" if i % 7 == 0 else i % 2, GROUPS[i % 3]) for i in range(160)]
    path = _write_csv(tmp_path / "gaps.csv", "text,label,sensitive", rows)
    ds, names = load_group_dataset(path, keep_columns=keep, minority_value=1)
    assert names == ["0", "1"]
    assert sum(len(s) for s in ds.values()) == sum(1 for i in range(160) if i % 7)
    for split in ds.values():
        assert split.column_names == [*keep, "labels", "sensitive"]
        if keep:
            for row in split:
                i = int(row["text"][3:])
                assert (row["labels"], row["sensitive"]) == (i % 2, {0: 1, 1: 0, 2: -1}[i % 3])
        else:
            assert set(split["labels"]) == {0, 1} and set(split["sensitive"]) == {-1, 0, 1}


def test_labels_written_as_1_and_1_0_are_one_class(tmp_path):
    path = tmp_path / "labels.jsonl"
    spellings = ["1", "1.0", "0", "0.0", 1, 0.0]
    path.write_text("".join(json.dumps({"text": f"row{i}", "label": str(spellings[i % 6]), "sensitive": i % 2}) + "\n"
                            for i in range(120)))
    ds, names = load_group_dataset(str(path), keep_columns=["text"])
    assert names == ["0", "1"]
    for split in ds.values():
        for row in split:
            i = int(row["text"][3:])
            assert row["labels"] == int(float(spellings[i % 6]))


@pytest.mark.parametrize("spec", ["missing.csv", "./missing", "../missing", "data/missing.csv", "a/b/c"])
def test_a_missing_local_path_is_file_not_found_naming_the_working_directory(spec, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"looked {args[0]!r} up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError) as err:
        load_group_dataset(spec)
    assert repr(spec) in str(err.value) and os.getcwd() in str(err.value)


def test_a_hub_name_still_goes_to_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda spec, *a, **k: asked.append(spec) or
                        Dataset.from_dict({"label": [0, 1] * 10, "sensitive": [0, 1, 1, 0] * 5}))
    ds, names = load_group_dataset("someone/their-data")
    assert asked == ["someone/their-data"] and names == ["0", "1"]


def _parquet(path, rows):
    pq.write_table(pa.table({"text": pa.array([f"r{i}" for i in range(rows)], pa.string()),
                             "label": pa.array([i % 2 for i in range(rows)], pa.int64()),
                             "sensitive": pa.array([i % 2 for i in range(rows)], pa.int64())}), str(path))
    return str(path)


@pytest.mark.parametrize("name, content, what", [
    ("empty.csv", "", r"is empty \(0 bytes\)"),
    ("header.csv", "text,label,sensitive\n", "has a header but no data rows"),
    ("empty.jsonl", "", r"is empty \(0 bytes\)"),
    ("blank.jsonl", "\n\n", "has no data rows"),
    ("array.json", "[]", "has no data rows"),
    ("empty.parquet", None, "has no data rows"),
])
def test_an_empty_file_says_it_is_empty(tmp_path, name, content, what):
    path = tmp_path / name
    if content is None:
        _parquet(path, 0)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=rf"dataset file '.*{name}' {what}"):
        load_group_dataset(str(path))


def test_an_empty_split_file_in_a_folder_is_named_and_removing_it_carves_the_split(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    rows = [(f"r{i}", i % 2, int(i % 5 == 0)) for i in range(40)]
    _write_csv(folder / "train.csv", "text,label,sensitive", rows)
    _write_csv(folder / "test.csv", "text,label,sensitive", rows[:10])
    (folder / "validation.csv").write_text("text,label,sensitive\n")
    with pytest.raises(ValueError, match=r"dataset folder '.*splits': 'validation.csv' has a header but no data "
                                         r"rows\. Fill it, or remove it: a split without a file is carved"):
        load_group_dataset(str(folder))
    (folder / "validation.csv").unlink()
    ds, _ = load_group_dataset(str(folder))
    assert len(ds["validation"]) > 0 and len(ds["train"]) + len(ds["validation"]) == 40


def test_a_rare_training_class_absent_from_the_other_splits_warns_as_a_likely_typo(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    classes = ["complaint", "praise", "question"]
    rows = [(f"r{i}", classes[i % 3], int(i % 5 == 0)) for i in range(600)]
    _write_csv(folder / "validation.csv", "text,label,sensitive", rows[:60])
    _write_csv(folder / "test.csv", "text,label,sensitive", rows[60:120])
    _write_csv(folder / "train.csv", "text,label,sensitive", rows + [("typo", "complaimt", 0)] * 4)
    with pytest.warns(UserWarning, match=r"class 'complaimt' has 4 of the 604 training rows and no row in the "
                                         r"validation or test split.* reads like 'complaint': a typo\?"):
        ds, names = load_group_dataset(str(folder))
    assert names == ["complaimt", "complaint", "praise", "question"]  # a warning: the user's labels stay as given
    _write_csv(folder / "train.csv", "text,label,sensitive", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_group_dataset(str(folder))[1] == classes


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_too_few_rows_to_carve_the_splits_says_how_many_are_needed(tmp_path, kind):
    path = (_write_csv(tmp_path / "four.csv", "text,label,sensitive", [(f"r{i}", i % 2, i % 2) for i in range(4)])
            if kind == "csv" else _parquet(tmp_path / "four.parquet", 4))
    with pytest.raises(ValueError, match=r"has 4 rows and no validation or test split; .* needs at least 6 rows"):
        load_group_dataset(path)
    ds, _ = load_group_dataset(_parquet(tmp_path / "six.parquet", 6))  # the minimum carves three non-empty splits
    assert [len(ds[s]) for s in ("train", "validation", "test")] == [4, 1, 1]


def test_a_single_missing_split_needs_two_rows(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    _write_csv(folder / "train.csv", "text,label,sensitive", [("r0", 0, 1)])
    _write_csv(folder / "test.csv", "text,label,sensitive", [("t0", 0, 1), ("t1", 1, 0)])
    with pytest.raises(ValueError, match=r"has 1 row and no validation split; .* needs at least 2 rows"):
        load_group_dataset(str(folder))


def test_eval_sensitive_column_error_names_the_values():
    with pytest.raises(ValueError, match=r"eval_dataset column 'sensitive' holds string values .*encode_sensitive"):
        check_eval_dataset(Dataset.from_dict({"sensitive": ["1.0", "0.0"]}), "sensitive")
    with pytest.raises(ValueError, match=r"eval_dataset column 'sensitive' has missing values \(None\) in rows \[1\].*-1"):
        check_eval_dataset(Dataset.from_dict({"sensitive": [1, None, 0]}), "sensitive")
    with pytest.raises(ValueError, match=r"eval_dataset column 'sensitive' has values \[2\] outside"):
        check_eval_dataset(Dataset.from_dict({"sensitive": [1, 2, 0]}), "sensitive")
    check_eval_dataset(Dataset.from_dict({"sensitive": [1.0, 0.0, -1.0]}), "sensitive")  # floats 1.0 / 0.0 are fine


def test_stratified_split_keeps_every_cell_on_both_sides_and_singletons_in_train():
    import numpy as np

    from fairnet_peft.data import stratified_split

    rng = np.random.default_rng(0)
    cells = [("pos" if rng.random() < 0.3 else "neg", int(rng.random() < 0.1)) for _ in range(997)] + [("rare", 1)]
    train, test = stratified_split(cells, 100, seed=5)
    assert len(test) == 100 and len(train) == 898 and not set(train) & set(test)
    assert (np.diff(test) > 0).all() and (np.diff(train) > 0).all()
    for cell in set(cells) - {("rare", 1)}:  # each cell's share of the test part is its share of the rows, ± 1 row
        share = sum(c == cell for c in cells) / len(cells)
        assert abs(sum(cells[i] == cell for i in test) - 100 * share) <= 1, cell
    assert 997 in train  # the one-row cell stays where the model can learn it
    again, _ = stratified_split(cells, 100, seed=5)
    assert (again == train).all() and not np.array_equal(stratified_split(cells, 100, seed=6)[1], test)
    # a minority cell of 3 rows in 300: 10 % proportional rounding would leave it out of the test part
    small = [("a", 0)] * 297 + [("a", 1)] * 3
    for seed in range(5):
        train, test = stratified_split(small, 30, seed)
        assert sum(small[i] == ("a", 1) for i in test) == 1 and sum(small[i] == ("a", 1) for i in train) == 2
    # every cell a single row: nothing to stratify on, a plain seeded split of the same size
    train, test = stratified_split([(i, 0) for i in range(6)], 2, seed=0)
    assert len(train) == 4 and len(test) == 2
    with pytest.raises(ValueError, match="test_rows must be between 1 and 5"):
        stratified_split([(i, 0) for i in range(6)], 6, seed=0)


def test_carved_splits_keep_the_minority_share_of_every_class(tmp_path):
    """A single file whose minority "yes" cell is 12 % of the rows: an unstratified 80/10/10 carve gives validation
    and test 24 ± 5 of its rows by chance; stratified, each holds its share, 24 of 200, in every seed, and a cap
    keeps the share too."""
    rows = [(f"r{i}", "yes" if i % 5 == 0 else "no", "F" if i % 10 < 2 or i % 50 == 5 else "M")
            for i in range(2000)]
    path = _write_csv(tmp_path / "one.csv", "text,label,group", rows)
    counts = {}
    for seed in (0, 1, 2):
        ds, names = load_group_dataset(path, sensitive_column="group", minority_value="F", keep_columns=["text"],
                                       seed=seed)
        assert names == ["no", "yes"] and [len(ds[s]) for s in ("train", "validation", "test")] == [1600, 200, 200]
        for split in ("validation", "test"):
            y, s = ds[split]["labels"], ds[split]["sensitive"]
            counts[seed, split] = sum(a == 1 and b == 1 for a, b in zip(y, s))
        texts = [set(ds[s]["text"]) for s in ("train", "validation", "test")]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
        assert len(set().union(*texts)) == 2000
    minority_yes = sum(1 for _, label, group in rows if label == "yes" and group == "F")
    assert minority_yes == 240 and set(counts.values()) == {24}  # 12 % of 2000 rows; 10 % of them in each split
    capped, _ = load_group_dataset(path, sensitive_column="group", minority_value="F", keep_columns=["text"],
                                   max_train=500, max_eval=50)
    y, s = capped["train"]["labels"], capped["train"]["sensitive"]
    assert len(y) == 500 and sum(a == 1 and b == 1 for a, b in zip(y, s)) == 60  # 12 % of the cap, exactly


def test_a_missing_column_names_the_argument_and_the_examples_flag(tmp_path):
    path = tmp_path / "d.csv"
    _write_csv(path, "text,label,group", [(f"t{i}", i % 2, i % 3 == 0) for i in range(40)])
    with pytest.raises(ValueError, match=r"no column 'tnt' .* pass the right column name as sensitive_column "
                                         r"\(--sensitive-column in the examples\)"):
        load_group_dataset(str(path), sensitive_column="tnt", keep_columns=("text",))
    with pytest.raises(ValueError, match=r"no column 'y' .* as label_column \(--label-column in the examples\)"):
        load_group_dataset(str(path), label_column="y", sensitive_column="group", keep_columns=("text",))
    with pytest.raises(ValueError, match=r"no column 'image' .* as keep_columns \(--text-column / --text-pair-column / --image-column"):
        load_group_dataset(str(path), sensitive_column="group", keep_columns=("image",))
