"""benchmarks/outside_tasks.py without the network or a training run: its tables become CSVs that the examples'
loader reads with the flags the script passes, and its limits line counts the seeds that keep issue 19's limits.

The raw files here are hand-made rows in the `fairness` package's column layout (only the columns the script reads).
"""

from __future__ import annotations

import os
import sys

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import outside_tasks  # noqa: E402
from fairnet_peft.data.files import load_group_dataset  # noqa: E402

ROWS = 60


def _raw(tmp_path) -> str:
    raw = tmp_path / "raw"
    raw.mkdir()
    i = pd.RangeIndex(ROWS)
    pd.DataFrame({
        "age": 20 + i % 40, "sex": ["Female" if k % 5 == 0 else "Male" for k in i],
        "race": ["Caucasian", "African-American", "Hispanic"] * (ROWS // 3),
        "c_charge_degree": ["F", "M"] * (ROWS // 2), "c_charge_desc": ["Battery", float("nan")] * (ROWS // 2),
        "priors_count": i % 7, "juv_fel_count": i % 2, "juv_misd_count": i % 3, "two_year_recid": (i // 2) % 2,
    }).to_csv(raw / "propublica-recidivism.csv", index=False)
    pd.DataFrame({
        "status": ["A11", "A12", "A13", "A14"] * (ROWS // 4), "month": 6 + i % 30,
        "credit_history": ["A30", "A31", "A32", "A33", "A34"] * (ROWS // 5),
        "purpose": ["A40", "A43", "A410"] * (ROWS // 3), "credit_amount": 1000 + 10 * i,
        "savings": ["A61", "A65"] * (ROWS // 2), "employment": ["A71", "A72", "A73", "A74", "A75"] * (ROWS // 5),
        "housing": ["A151", "A152", "A153"] * (ROWS // 3), "age": 19 + i % 30, "number_of_credits": 1 + i % 3,
        "credit": 1 + (i // 3) % 2, "personal_status": ["A91", "A92", "A93", "A94", "A95"] * (ROWS // 5),
    }).to_csv(raw / "german.csv", index=False)
    return str(raw)


@pytest.mark.parametrize("name", sorted(n for n, t in outside_tasks.TASKS.items() if t.needs_raw))
def test_task_csv_loads_with_the_flags_the_script_passes(tmp_path, name):
    task = outside_tasks.TASKS[name]
    assert task.example == "train_text.py" and task.flags[:4] == ("--text-column", "text", "--label-column", "label")
    frame = task.data.frame(_raw(tmp_path))
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    flags = dict(zip(task.flags[::2], task.flags[1::2]))
    ds, classes = load_group_dataset(str(path), label_column="label", sensitive_column=flags["--sensitive-column"],
                                     minority_value=flags["--minority-value"], keep_columns=("text",))
    assert len(classes) == 2
    rows = sum(len(ds[s]) for s in ("train", "validation", "test"))
    assert rows == ROWS
    # every row's group is known, and the minority is the named value's rows
    expected = int((frame[flags["--sensitive-column"]] == flags["--minority-value"]).sum())
    assert sum(sum(1 for v in ds[s]["sensitive"] if v == 1) for s in ds) == expected
    assert all(v in (0, 1) for s in ds for v in ds[s]["sensitive"])
    # the codes are spelled out, and the group is written in the text, except in german-sex (never in it)
    text = " ".join(frame["text"])
    assert "nan" not in text and " A1" not in text and " A4" not in text
    if name.startswith("compas"):
        assert "female" in text and "felony" in text and "misdemeanor" in text and "race Hispanic" in text
    else:
        assert "owns a home" in text and "no checking account" in text and "Applicant aged 19" in text
    if name == "german-sex":  # A92 and A95 are the women: 2 of the 5 codes
        assert expected == 2 * ROWS // 5 and list(frame.columns) == ["text", "label", "sex"]
        assert not any(word in text.lower() for word in ("female", "male", "woman", "women", " man ", "sex"))


def test_the_image_folder_task_loads_as_the_vision_example_reads_it(tmp_path):
    """`shapes`: one folder with metadata.csv, no split; the loader carves train/validation/test stratified, the
    named group is the minority, the images decode at their size, and drawing it again changes no file."""
    from PIL import Image

    task = outside_tasks.TASKS["shapes"]
    assert task.example == "train_vision.py" and not task.needs_raw
    folder = outside_tasks.shapes_folder(str(tmp_path / "shapes"), rows=80)
    meta = pd.read_csv(os.path.join(folder, "metadata.csv"))
    assert len(meta) == 80 and set(meta["label"]) == {"cat", "dog"} and set(meta["group"]) == {"indoor", "outdoor"}
    outdoor = meta[meta["group"] == "outdoor"]
    assert 0.05 < len(outdoor) / len(meta) < 0.3 and (outdoor["label"] == "dog").mean() > 0.6
    flags = dict(zip(task.flags[::2], task.flags[1::2]))
    ds, classes = load_group_dataset(folder, label_column=flags["--label-column"],
                                     sensitive_column=flags["--sensitive-column"],
                                     minority_value=flags["--minority-value"], keep_columns=("image",))
    assert list(classes) == ["cat", "dog"]
    assert sum(len(ds[s]) for s in ("train", "validation", "test")) == 80
    assert sum(v == 1 for s in ds for v in ds[s]["sensitive"]) == len(outdoor)
    image = ds["train"][0]["image"]
    image = image if isinstance(image, Image.Image) else Image.open(os.path.join(folder, str(image)))
    assert image.size == (32, 32)
    stamps = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
    outside_tasks.shapes_folder(folder, rows=80)
    assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)} == stamps


@pytest.mark.parametrize("name", ["support", "support-hidden"])
def test_the_support_tasks_correlate_the_group_with_the_class_in_training_only(tmp_path, name):
    """`support` / `support-hidden`: a split folder the text example's loader reads with the script's flags; 80 % of
    the Scots rows complain in training, about a third in test; the dialect is written in `support` only (the two
    differ in nothing else a detector could read)."""
    task = outside_tasks.TASKS[name]
    assert task.example == "train_text.py" and not task.needs_raw
    folder = task.data(None, str(tmp_path), name)
    flags = dict(zip(task.flags[::2], task.flags[1::2]))
    ds, classes = load_group_dataset(folder, label_column="label", sensitive_column=flags["--sensitive-column"],
                                     minority_value=flags["--minority-value"], keep_columns=("text",))
    assert list(classes) == ["complaint", "praise", "question"]
    assert {s: len(ds[s]) for s in ds} == {"train": 2000, "validation": 600, "test": 1000}
    complains = {}
    for split in ("train", "test"):
        minority = [y for y, g in zip(ds[split]["labels"], ds[split]["sensitive"]) if g == 1]
        assert 0.15 < len(minority) / len(ds[split]) < 0.25
        complains[split] = minority.count(0) / len(minority)
    assert complains["train"] > 0.7 and complains["test"] < 0.45
    scots = [t for t, g in zip(ds["train"]["text"], ds["train"]["sensitive"]) if g == 1]
    dialect = sum(any(w in t for w in ("cannae", "dinnae", "Awright", "pal", " ma ")) for t in scots) / len(scots)
    assert dialect > 0.5 if name == "support" else dialect == 0
    before = {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)}
    task.data(None, str(tmp_path), name)  # the same seed writes the same files
    assert {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)} == before


def _run(erm: tuple, fair: tuple) -> dict:
    keys = outside_tasks.KEYS
    return {"erm": dict(zip(keys, erm)), "fairnet": dict(zip(keys, fair)), "threshold": 0.5, "adapter_strength": 1.0}


def test_limits_line_counts_the_seeds_that_keep_both_limits():
    runs = {"0": _run((0.80, 0.50, 0.10), (0.796, 0.60, 0.105)),  # −0.4 ACC, +0.5 EOD: keeps
            "1": _run((0.80, 0.50, 0.10), (0.794, 0.70, 0.05)),  # −0.6 ACC: breaks
            "2": _run((0.80, 0.50, 0.10), (0.81, 0.55, 0.12))}  # +2 EOD: breaks
    line = outside_tasks.limits_line(runs)
    assert "1/3 seeds keep" in line
    assert "ΔWGA +11.7" in line
    text = outside_tasks.render({"command": "c", "finished": "f", "machine": "m", "wall_minutes": 1.0,
                                 "tasks": {"compas": {"full": runs}}})
    assert "**compas, full**" in text and text.count("| 0 |") == 1 and "1/3 seeds keep" in text
    assert "wall time 1.0 min" in text
    assert "assembled with --reuse" in outside_tasks.render({"command": "c", "finished": "f", "machine": "m",
                                                              "wall_minutes": 0.0, "reused": True, "tasks": {}})


def test_unknown_task_or_setting_is_an_error_that_names_the_valid_ones(capsys, tmp_path):
    for spec in ("adult", "compas:full+biased"):
        with pytest.raises(SystemExit):
            outside_tasks.main(["--tasks", spec, "--doc", "none", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert "compas, compas-race, german, german-sex, shapes" in err and "full, partial, unlabeled" in err
        assert ("'adult'" if spec == "adult" else "'biased'") in err


def test_each_task_runs_its_own_settings(monkeypatch, tmp_path):
    """`name:setting+setting` gives that task its settings; the others take --settings. No training: the runs are
    recorded, and the report holds one entry per task × setting × seed."""
    calls = []

    def fake_run(seed, folder, flags, reuse, example):
        calls.append((os.path.relpath(folder, tmp_path), flags[flags.index("--setting") + 1], seed, example))
        return _run((0.8, 0.5, 0.1), (0.8, 0.5, 0.1))

    monkeypatch.setattr(outside_tasks, "run_seed", fake_run)
    monkeypatch.setattr(outside_tasks, "raw_dir", lambda cache: _raw(tmp_path))
    report = outside_tasks.main(["--tasks", "compas:full+unlabeled,german", "--settings", "partial", "--seeds", "0,1",
                                 "--out", str(tmp_path / "out"), "--doc", "none"])
    assert {k: set(v) for k, v in report["tasks"].items()} == {"compas": {"full", "unlabeled"}, "german": {"partial"}}
    assert sorted(calls) == sorted((os.path.join("out", t, s), s, seed, "train_text.py") for t, ss in
                                   (("compas", ("full", "unlabeled")), ("german", ("partial",)))
                                   for s in ss for seed in (0, 1))
    # the image task runs the vision example on its folder, and needs no raw tables
    calls.clear()
    monkeypatch.setattr(outside_tasks, "raw_dir", lambda cache: pytest.fail("the image task needs no raw tables"))
    monkeypatch.setattr(outside_tasks, "shapes_folder", lambda folder, **kw: folder)
    outside_tasks.main(["--tasks", "shapes", "--seeds", "0", "--out", str(tmp_path / "out"), "--doc", "none"])
    assert calls == [(os.path.join("out", "shapes", "full"), "full", 0, "train_vision.py")]


def test_a_task_csv_is_rewritten_only_when_its_contents_change(tmp_path):
    path = str(tmp_path / "task.csv")
    assert outside_tasks.write_if_changed(path, "text,label\na,0\n") == path
    os.utime(path, ns=(1, 1))
    outside_tasks.write_if_changed(path, "text,label\na,0\n")
    assert os.stat(path).st_mtime_ns == 1  # the same contents: not touched, so a run reading it beside is safe
    outside_tasks.write_if_changed(path, "text,label\na,1\n")
    assert open(path, encoding="utf-8").read() == "text,label\na,1\n"
