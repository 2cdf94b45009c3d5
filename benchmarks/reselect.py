"""Selection rules replayed offline on the models a default-settings run trained (no training; seconds).

`benchmarks/defaults.py` saves, for each task × seed × setting, the passes its selection used and the same passes on
the test rows (`<out>/passes/*.npz`, `suite/replay.py`). This replays the selection after training under the library
defaults and under each rule given (FairTrainingArguments overrides; by default the suite's `SELECTION_VARIANTS`) and
prints, per task, setting and rule, the test ACC / WGA / EOD change against ERM (seed means with a 95 % t-interval)
and how many seeds keep the issue's limits (ACC ≥ ERM − 0.5, EOD ≤ ERM + 1 point).

    .venv/bin/python benchmarks/reselect.py runs/defaults-quick
    .venv/bin/python benchmarks/reselect.py runs/a runs/b --rule 'eod0:{"max_eod_increase": 0.0}' --only
    .venv/bin/python benchmarks/reselect.py runs/a runs/b --headline   # ERM vs FairNet at the defaults, goals

`--headline` prints, from the same replay, the default-settings suite's headline for the library defaults as they are
now (absolute ACC / WGA / EOD of ERM and FairNet per task and setting, seed means with t-intervals, and the issue's
goals as `benchmarks/defaults.py` states them): how a change to the selection's defaults is reported without
training again.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys
from collections import defaultdict
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fairnet_peft import metrics as M  # noqa: E402
from suite.common import t_interval  # noqa: E402
from suite.config import ACC_TOL, EOD_TOL, METRICS, SELECTION_VARIANTS  # noqa: E402
from suite.report_defaults import goal  # noqa: E402
from suite.replay import selection_arguments, load, replay  # noqa: E402

DEFAULTS = "defaults"
NAME = re.compile(r"(?P<task>.+)-s(?P<seed>\d+)-(?P<setting>full|partial|unlabeled)\.npz$")


def scores(labels, pred, groups) -> tuple:
    return (M.accuracy(labels, pred), M.worst_group_accuracy(labels, pred, sensitive_features=groups),
            M.equalized_odds_difference(labels, pred, sensitive_features=groups))


def pass_files(folder: str) -> list:
    """The saved passes of one run folder (with --jobs, each task's child saved its own), or a folder of them."""
    paths = sorted(glob.glob(os.path.join(folder, "passes", "*.npz"))
                   + glob.glob(os.path.join(folder, "task-*", "passes", "*.npz"))
                   or glob.glob(os.path.join(folder, "*.npz")))
    if not paths:
        raise SystemExit(f"{folder}: no passes (*.npz) found; run benchmarks/defaults.py at this version first")
    return paths


def evaluate(folders, rules: dict) -> dict:
    """{(task, setting): {rule: {"seeds", "d_acc", "d_wga", "d_eod" (t-intervals of the change vs ERM), "keeps",
    "off", "erm_<metric>" / "fairnet_<metric>" (t-intervals of the absolute values), "detector_auc",
    "erm_worst_is_minority" (in most seeds)}}}."""
    parsed = {name: selection_arguments(overrides) for name, overrides in rules.items()}  # validated once per rule
    cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for folder in folders:
        for path in pass_files(folder):
            match = NAME.search(os.path.basename(path))
            if not match:
                continue
            data = load(path)
            y, s = data["test_labels"], data["test_sensitive"]
            erm = data["test_erm_pred"] if "test_erm_pred" in data else data["test_logits_off"].argmax(-1)
            base = scores(y, erm, s)
            cell_acc = M.group_accuracies(y, erm, sensitive_features=s)
            worst = min((c for c in cell_acc if cell_acc[c]["count"] > 0), key=lambda c: cell_acc[c]["accuracy"])
            auc = data["header"]["detector_stats"].get("detector_auc", float("nan"))
            within = data["header"]["detector_stats"].get("detector_auc_within_class", float("nan"))
            for name, args in parsed.items():
                got = replay(data, args=args)
                new = scores(y, got["test_pred"], s)
                row = cells[(match["task"], match["setting"])][name]
                row["seeds"].append(int(match["seed"]))
                for key, a, b in zip(("d_acc", "d_wga", "d_eod"), new, base):
                    row[key].append(a - b)
                for metric, a, b in zip(METRICS, new, base):
                    row[f"fairnet_{metric}"].append(a)
                    row[f"erm_{metric}"].append(b)
                row["detector_auc"].append(auc)
                row["detector_auc_within_class"].append(within)
                row["worst_minority"].append(worst.endswith("s=1"))
                row["tau"].append(got["threshold"])
                info = got["selection"]
                row["per_seed"].append({"seed": int(match["seed"]), "tau": got["threshold"], "alpha": got["strength"],
                                        "detector_auc": auc, "d_acc": new[0] - base[0], "d_wga": new[1] - base[1],
                                        "why_off": why_off(info),
                                        **{k: info.get(k, math.nan) for k in PER_SEED_SELECTION}})
    out = {}
    for cell, by_rule in sorted(cells.items()):
        out[cell] = {}
        for name, row in by_rule.items():
            keeps = sum(a >= -ACC_TOL - 1e-12 and e <= EOD_TOL + 1e-12 for a, e in zip(row["d_acc"], row["d_eod"]))
            absolute = [f"{who}_{m}" for who in ("erm", "fairnet") for m in METRICS]
            absolute += ["detector_auc", "detector_auc_within_class"]
            out[cell][name] = {**{k: t_interval(row[k]) for k in ("d_acc", "d_wga", "d_eod", *absolute)},
                               "seeds": row["seeds"], "off": sum(t >= 1.0 for t in row["tau"]), "keeps": keeps,
                               "erm_worst_is_minority": sum(row["worst_minority"]) * 2 > len(row["worst_minority"]),
                               "per_seed": row["per_seed"]}
    return out


# what the selection saw for its choice, per seed (`select_correction`'s keys; validation rows)
PER_SEED_SELECTION = ("accuracy", "accuracy_off", "accuracy_bound", "majority_gate_rate", "candidates")


def why_off(info: dict) -> str:
    """What kept the adapter off (`select_correction`'s "refused", "worst_cell_rows"; the reason's short form), or
    with the adapter on, what held a fairer correction back ("held_back")."""
    if info.get("threshold", 1.0) < 1.0:
        return "on" + (f"; held back: {_limits(info['held_back'])}" if "held_back" in info else "")
    if "refused" in info:
        return _limits(info["refused"])
    if "worst_cell_rows" in info:
        return f"nothing beat off (worst cell: {info['worst_cell_rows']} rows)"
    return info.get("reason", "off")[:60]


def _limits(refused: dict) -> str:
    """The limits a refused candidate fails, and the held-out rows at which it would pass the floor."""
    needed = refused["rows_needed"]
    return " + ".join(refused["limits"]) + (f"; passes on ~{needed:.0f} rows" if math.isfinite(needed) else "")


def per_seed(result: dict) -> str:
    """One line per task × setting × rule × seed: the choice, what validation said of it, and the test change."""
    lines = ["| task | setting | rule | seed | det. AUC | τ | α | val ACC off → on | floor's bound | val majority gated "
             "| candidates | test ΔACC | test ΔWGA | off because |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for (task, setting), by_rule in result.items():
        for name, row in by_rule.items():
            for r in row["per_seed"]:
                val = (f"{100 * r['accuracy_off']:.1f} → {100 * r['accuracy']:.1f}"
                       if math.isfinite(r["accuracy_off"]) else "n/a")
                lines.append(f"| {task} | {setting} | {name} | {r['seed']} | {r['detector_auc']:.2f} | {r['tau']:.3g} "
                             f"| {r['alpha']:g} | {val} | {100 * r['accuracy_bound']:.1f} "
                             f"| {100 * r['majority_gate_rate']:.0f} % | {r['candidates']:.0f} "
                             f"| {100 * r['d_acc']:+.1f} | {100 * r['d_wga']:+.1f} | {r.get('why_off', '')} |")
    return "\n".join(lines) + "\n"


def _pm(ci: dict) -> str:
    mean = 100 * ci["mean"]
    if ci["low"] is None:
        return f"{mean:+.1f}"
    return f"{mean:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def table(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "Test change against ERM, seed mean [95 % t-interval], points; `keeps`: seeds with ACC ≥ ERM − 0.5 and "
             "EOD ≤ ERM + 1; `off`: seeds where the adapter is off.", "",
             "| task | setting | rule | ΔACC | ΔWGA | ΔEOD | keeps | off |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (task, setting), by_rule in result.items():
        for name, row in by_rule.items():
            n = len(row["seeds"])
            lines.append(f"| {task} | {setting} | {name} | {_pm(row['d_acc'])} | {_pm(row['d_wga'])} | "
                         f"{_pm(row['d_eod'])} | {row['keeps']}/{n} | {row['off']}/{n} |")
    return "\n".join(lines) + "\n"


def headline(result: dict, command: str) -> str:
    """ERM and FairNet at the library defaults (the "defaults" rule), absolute, with the goals per task × setting."""
    lines = [f"Command: `{command}`", "",
             "Test %, seed mean [95 % t-interval]; FairNet = the trained models of these runs under the selection "
             "defaults of this version (replayed); goals as in `benchmarks/defaults.py`.", "",
             "| task | setting | seeds | ERM ACC | FairNet ACC | ERM WGA | FairNet WGA | ERM EOD ↓ | FairNet EOD ↓ | "
             "det. AUC | off | goal |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (task, setting), by_rule in result.items():
        row = by_rule[DEFAULTS]
        full = result.get((task, "full"), {}).get(DEFAULTS)
        text = goal(task, setting, row, full)["text"]
        cols = [_ci100(row[f"{who}_{m}"]) for m in METRICS for who in ("erm", "fairnet")]
        auc = row["detector_auc"]["mean"]
        n = len(row["seeds"])
        lines.append(f"| {task} | {setting} | {n} | " + " | ".join(cols)
                     + f" | {f'{auc:.3f}' if math.isfinite(auc) else 'n/a'} | {row['off']}/{n} | {text} |")
    return "\n".join(lines) + "\n"


def _ci100(ci: dict) -> str:
    if not math.isfinite(ci["mean"]):
        return "n/a"
    if ci["low"] is None:
        return f"{100 * ci['mean']:.1f}"
    return f"{100 * ci['mean']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="output folders of benchmarks/defaults.py (with passes/)")
    p.add_argument("--rule", action="append", default=[], metavar="NAME:JSON",
                   help="a selection rule: FairTrainingArguments overrides, e.g. 'bound:{\"max_majority_gate_rate\": "
                        "0.5}' (repeatable)")
    p.add_argument("--only", action="store_true", help="only the defaults and the --rule rules, not SELECTION_VARIANTS")
    p.add_argument("--headline", action="store_true",
                   help="also print ERM vs FairNet at the defaults, absolute, with the goals (see the module docstring)")
    p.add_argument("--per-seed", action="store_true",
                   help="also list each seed's choice: τ, α, validation ACC off → on, the floor's bound (the "
                        "change, less 2 SE under the rule's floor), the share of the validation majority gated, "
                        "the candidates searched, and the test change")
    p.add_argument("--out", default=None, help="also write the table (Markdown) and the numbers (JSON) here")
    a = p.parse_args(argv)
    rules = {DEFAULTS: {}, **({} if a.only else SELECTION_VARIANTS)}
    for item in a.rule:
        name, _, spec = item.partition(":")
        try:
            rules[name] = json.loads(spec)
        except ValueError:
            p.error(f"--rule {item!r}: use NAME:JSON, e.g. 'eod0:{{\"max_eod_increase\": 0.0}}'")
    result = evaluate(a.folders, rules)
    command = "python benchmarks/reselect.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = table(result, command)
    if a.headline:
        text += "\n" + headline(result, command)
    if a.per_seed:
        text += "\n" + per_seed(result)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "reselect.md"), "w") as f:
            f.write(text)
        with open(os.path.join(a.out, "reselect.json"), "w") as f:
            json.dump({f"{t}/{s}": v for (t, s), v in result.items()}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
