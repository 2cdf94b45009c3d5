"""Two default-settings runs side by side: per task and setting, the test ACC / WGA / EOD of FairNet in run A and in
run B, and B − A paired by seed (mean with a 95 % t-interval over the seeds both runs have). No training.

Runs A and B are `benchmarks/defaults.py` outputs (`results.json`, or the folder holding it), e.g. the library
defaults and the same suite with one `--fair-arg` changed. Pairing needs the same ERM model per seed: a seed whose
ERM test accuracy differs between the runs is refused (other sizes or other data), so the difference is FairNet's.

    .venv/bin/python benchmarks/compare_runs.py runs/defaults-quick --vs runs/lora-train --names defaults,train

A run written `FOLDER@NAME` reads the run's selection variant NAME (`SELECTION_VARIANTS`: the same trained models with
the selection redone) in place of its own choice, e.g. a `--fair-arg lora_cross_fit=true` run against itself without
cross-fitting: `compare_runs.py 'runs/cf@no cross-fitting' --vs runs/cf --names plain,cross-fit --per-seed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from suite.common import t_interval  # noqa: E402

KEYS = (("accuracy", "ACC"), ("worst_group_accuracy", "WGA"), ("equalized_odds_difference", "EOD"))


def load(path: str) -> dict:
    """A results.json of benchmarks/defaults.py (or the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no results.json (give a benchmarks/defaults.py output folder or its results.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def per_seed(report: dict) -> dict:
    """{(task, setting): {seed: {"erm_accuracy", "accuracy", "worst_group_accuracy", ...}}} from a results.json."""
    out: dict = {}
    for task, entry in report.get("tasks", {}).items():
        for seed, run in (entry.get("runs") or {}).items():
            for setting, res in (run.get("settings") or {}).items():
                row = {key: res[key]["point"] for key, _ in KEYS}
                row["erm_accuracy"] = run["erm"]["accuracy"]["point"]
                row["erm"] = {key: run["erm"].get(key, {}).get("point", float("nan")) for key, _ in KEYS}
                out.setdefault((task, setting), {})[seed] = row
    return out


def compare(a: dict, b: dict) -> list[dict]:
    """One row per (task, setting) both runs have: A's and B's seed means and B − A paired by seed, in points."""
    rows = []
    sa, sb = per_seed(a), per_seed(b)
    for cell in sorted(set(sa) & set(sb), key=lambda c: (list(sa).index(c), c[1])):
        seeds = sorted(set(sa[cell]) & set(sb[cell]), key=int)
        for seed in seeds:
            if abs(sa[cell][seed]["erm_accuracy"] - sb[cell][seed]["erm_accuracy"]) > 1e-9:
                raise ValueError(f"{cell[0]} seed {seed}: the runs' ERM models differ (test ACC "
                                 f"{sa[cell][seed]['erm_accuracy']:.4f} vs {sb[cell][seed]['erm_accuracy']:.4f}); "
                                 "compare runs of the same sizes and data.")
        row = {"task": cell[0], "setting": cell[1], "seeds": seeds}
        for key, _ in KEYS:
            va = [100 * sa[cell][s][key] for s in seeds]
            vb = [100 * sb[cell][s][key] for s in seeds]
            row[key] = {"a": t_interval(va)["mean"], "b": t_interval(vb)["mean"],
                        "diff": t_interval([y - x for x, y in zip(va, vb)])}
        rows.append(row)
    return rows


def _diff(d: dict) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.1f}"
    return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def seed_table(a: dict, b: dict, names: tuple) -> str:
    """Per seed: ERM, A and B as ΔACC / ΔWGA / ΔEOD against ERM (points)."""
    sa, sb = per_seed(a), per_seed(b)
    lines = [f"| task | setting | seed | {names[0]} ΔACC / ΔWGA / ΔEOD | {names[1]} ΔACC / ΔWGA / ΔEOD |",
             "|---|---|---:|---|---|"]
    for cell in sorted(set(sa) & set(sb), key=lambda c: (list(sa).index(c), c[1])):
        for seed in sorted(set(sa[cell]) & set(sb[cell]), key=int):
            erm = sa[cell][seed]["erm"]
            cells = ["{:+.1f} / {:+.1f} / {:+.1f}".format(*(100 * (run[cell][seed][k] - erm[k]) for k, _ in KEYS))
                     for run in (sa, sb)]
            lines.append(f"| {cell[0]} | {cell[1]} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict], names: tuple) -> str:
    a, b = names
    head = "| task | setting | seeds | " + " | ".join(
        f"{label} {a} → {b} | Δ {label}" for _, label in KEYS) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|---:|" * len(KEYS)]
    for r in rows:
        cells = [f"{r[key]['a']:.1f} → {r[key]['b']:.1f} | {_diff(r[key]['diff'])}" for key, _ in KEYS]
        lines.append(f"| {r['task']} | {r['setting']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", nargs="+", help="results of run A (several folders: their tasks are merged)")
    p.add_argument("--vs", nargs="+", required=True, metavar="RUN_B", help="results of run B (same merging)")
    p.add_argument("--names", default="A,B", help="the two runs' names in the table, e.g. train,train+eval")
    p.add_argument("--per-seed", action="store_true", help="also each seed's change against ERM in both runs")
    a = p.parse_args(argv)
    names = tuple(a.names.split(","))
    if len(names) != 2:
        p.error(f"--names {a.names!r}: give two names separated by a comma")
    run_a, run_b = _merged(a.run_a), _merged(a.vs)
    text = table(compare(run_a, run_b), names)
    if a.per_seed:
        text += "\n\n" + seed_table(run_a, run_b, names)
    print(text)
    return text


def _merged(paths: list) -> dict:
    tasks: dict = {}
    for spec in paths:
        path, _, variant = spec.partition("@")
        for task, entry in load(path).get("tasks", {}).items():
            runs = tasks.setdefault(task, {"runs": {}})["runs"]
            for seed, run in (entry.get("runs") or {}).items():
                settings = {setting: _variant(res, variant, spec) for setting, res in (run.get("settings") or {}).items()}
                runs.setdefault(seed, {"erm": run["erm"], "settings": {}})["settings"].update(settings)
    return {"tasks": tasks}


def _variant(res: dict, variant: str, spec: str) -> dict:
    """The run's own result, or its selection variant `variant` (FOLDER@NAME)."""
    if not variant:
        return res
    found = res.get("selection_variants", {})
    if variant not in found:
        raise SystemExit(f"{spec}: no selection variant {variant!r} in this run (it has {sorted(found)})")
    return found[variant]


if __name__ == "__main__":
    main()
