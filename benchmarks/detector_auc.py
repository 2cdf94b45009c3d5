"""The detector's ROC-AUC across classes and among rows of the same class, on the trained models a default-settings
run saved (no training; seconds).

`benchmarks/defaults.py` saves the passes its selection used and the same passes on the test rows
(`<out>/passes/*.npz`). The blind check (`min_detector_auc`) judges the AUC among rows of the same class
(`fairnet_peft.training.detector_stage.roc_auc` with the class as strata), so that a risk that follows a class the
group is common in does not pass; this prints, per task and setting, the seed means of both AUCs on the test rows,
the AUC of the class alone as a score of the group (how far the group follows the class), and the seeds whose
within-class AUC is below the bound while the AUC across classes is not (where the two rules decide differently).

    .venv/bin/python benchmarks/detector_auc.py runs/defaults-quick [more run folders] [--rows validation] [--per-seed]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fairnet_peft.training.detector_stage import roc_auc  # noqa: E402
from reselect import NAME, pass_files  # noqa: E402
from suite.replay import load  # noqa: E402

BOUND = 0.65  # FairTrainingArguments.min_detector_auc's default


def aucs(path: str, rows: str = "test") -> dict:
    """The AUCs of one saved run on its test rows (against the true group) or its validation rows (against the groups
    the selection read: in the unlabeled setting the pseudo-labeler's marks): across classes, within classes, and of
    the class alone."""
    data = load(path)
    prefix, group_key = ("test", "test_sensitive") if rows == "test" else ("val", "val_groups")
    groups, risk, labels = data[group_key], data[f"{prefix}_risk"], data[f"{prefix}_labels"]
    return {"across": roc_auc(groups, risk), "within": roc_auc(groups, risk, labels),
            "class_alone": roc_auc(groups, labels.astype(np.float64))}


def table(folders, bound: float = BOUND, rows: str = "test", per_seed: bool = False) -> str:
    cells = defaultdict(list)
    for folder in folders:
        for path in pass_files(folder):
            match = NAME.search(os.path.basename(path))
            if match:
                key = (match["task"], match["setting"]) + ((f"s{match['seed']}",) if per_seed else ())
                cells[key].append(aucs(path, rows))
    lines = ["| task | setting | seeds | AUC across classes | AUC within classes | class alone | seeds the rules "
             f"split at {bound:g} |", "|---|---|---:|---:|---:|---:|---:|"]
    for (task, setting, *seed), runs in sorted(cells.items()):
        setting = " ".join([setting, *seed])
        with warnings.catch_warnings():  # a run whose rows hold one group only is NaN, and left out
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = {k: np.nanmean([r[k] for r in runs]) for k in runs[0]}
        split = sum(r["within"] < bound <= r["across"] for r in runs)
        lines.append(f"| {task} | {setting} | {len(runs)} | {mean['across']:.3f} | {mean['within']:.3f} | "
                     f"{mean['class_alone']:.3f} | {split} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="output folders of benchmarks/defaults.py (with passes/)")
    p.add_argument("--bound", type=float, default=BOUND, help="the min_detector_auc to compare the rules at")
    p.add_argument("--rows", choices=("test", "validation"), default="test",
                   help="test rows against the true group, or the validation rows against the selection's groups")
    p.add_argument("--per-seed", action="store_true", help="one line per saved run")
    a = p.parse_args(argv)
    text = table(a.folders, a.bound, a.rows, a.per_seed)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
