"""Report of the default-settings suite: per task and setting, ERM vs FairNet at default arguments.

Runs → `summarise_task` (seed means with a 95 % t-interval, detector/probe AUCs, gate rates, ERM's worst cells) →
`goal` (the targets, only where ERM's worst cell is a minority cell; "do no harm" on a task whose group is not in
the input) → `render` (the headline table
with its command first, then the legend, per-task notes and the per-seed bootstrap CIs). `finish_defaults` writes
table.md, results.json and the generated block through `report.publish`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .common import t_interval
from .config import (ACC_TOL, DETECTOR_FINDS, EOD_TOL, GOAL_GAIN, HELD_OUT_TASKS, METRICS, MIN_CELL, NO_HARM_TASKS,
                     NO_HARM_WGA, SETTINGS)
from .report import DEFAULTS_BLOCK, publish


def summarise_task(task: str, runs: dict) -> dict:
    out = {}
    settings = {st for r in runs.values() for st in r["settings"]}
    for st in [x for x in SETTINGS if x in settings]:
        rs = [r for r in runs.values() if st in r["settings"]]
        row = {f"{who}_{k}": t_interval([(r["erm"] if who == "erm" else r["settings"][st])[k]["point"] for r in rs])
               for who in ("erm", "fairnet") for k in METRICS}
        for k in ("detector_auc", "detector_auc_within_class", "probe_auc", "gate_rate_s0", "gate_rate_s1",
                  "test_risk_auc", "pseudo_precision", "pseudo_recall"):
            row[k] = t_interval([r["settings"][st].get(k) for r in rs])
        cells = [r["erm"]["worst_cell"] for r in rs]
        row["erm_worst_cells"] = [f"{c['cell']} (n={c['count']})" for c in cells]
        row["erm_worst_is_minority"] = sum(c["minority"] for c in cells) * 2 > len(cells)
        out[st] = row
    for st, row in out.items():
        row["goal"] = goal(task, st, row, out.get("full"))
    return out


def goal(task: str, setting: str, row: dict, full: Optional[dict]) -> dict:
    """The no-loss goals on seed means, in every setting: ACC ≥ ERM − 0.5 and EOD ≤ ERM's EOD + 1 point. The WGA goal:
    on a task whose group is not in the input (`NO_HARM_TASKS`) WGA ≥ ERM − 1 (do no harm); in the full setting
    WGA ≥ ERM + 5 where ERM's worst cell is a minority cell and the detector finds the group (held-out AUC among
    rows of the same class, else across them, ≥ `DETECTOR_FINDS`); elsewhere no WGA target (the WGA is reported,
    and must not fall: see the row)."""
    wga, acc = row["fairnet_worst_group_accuracy"]["mean"], row["fairnet_accuracy"]["mean"]
    eod, erm_eod = row["fairnet_equalized_odds_difference"]["mean"], row["erm_equalized_odds_difference"]["mean"]
    erm_wga, erm_acc = row["erm_worst_group_accuracy"]["mean"], row["erm_accuracy"]["mean"]
    ok_a = acc >= erm_acc - ACC_TOL - 1e-12
    ok_e = not math.isfinite(eod) or eod <= erm_eod + EOD_TOL + 1e-12
    parts = [f"ACC ≥ ERM − 0.5: {'met' if ok_a else 'NOT met'}", f"EOD ≤ ERM + 1: {'met' if ok_e else 'NOT met'}"]
    # the AUC the trainer's blind check judges: among rows of the same class where the run reported it
    finds = next((v for k in ("detector_auc_within_class", "detector_auc")
                  if (v := (row.get(k) or {}).get("mean")) is not None and math.isfinite(v)), None)
    target = None
    if task in NO_HARM_TASKS:
        target, what = erm_wga - NO_HARM_WGA, "ERM − 1 (the group is not in the input)"
    elif setting == "full" and row["erm_worst_is_minority"] and finds is not None and finds >= DETECTOR_FINDS:
        target, what = erm_wga + GOAL_GAIN["full"], f"ERM + {100 * GOAL_GAIN['full']:.0f}"
    ok_w = True if target is None else wga >= target - 1e-12
    if target is not None:
        parts.insert(0, f"WGA ≥ {what} ({100 * target:.1f}): {'met' if ok_w else 'NOT met'}")
    return {"applies": True, "wga_target": target, "wga_met": ok_w, "acc_met": ok_a, "eod_met": ok_e,
            "met": ok_w and ok_a and ok_e, "text": "; ".join(parts)}


def _pct(st: Optional[dict], scale: float = 100.0) -> str:
    if not st or st.get("mean") is None or not math.isfinite(st["mean"]):
        return "n/a"
    if st.get("low") is None:
        return f"{scale * st['mean']:.1f}"
    return f"{scale * st['mean']:.1f} [{scale * st['low']:.1f}, {scale * st['high']:.1f}]"


def _auc(st: Optional[dict]) -> str:
    return "n/a" if not st or not st["n"] else f"{st['mean']:.3f}"


HEADLINE = ["| task | setting | ERM ACC | FairNet ACC | ERM WGA | FairNet WGA | ERM EOD ↓ | FairNet EOD ↓ | "
            "det. AUC / probe AUC | gate s=1 / s=0 | pseudo-label P / R | ERM worst cell | goal |",
            "|---|---|" + "---:|" * 9 + "---|---|"]


PER_SEED = ["| task | seed | model | ACC [bootstrap] | WGA [bootstrap] | EOD [bootstrap] | "
            "worst cell (n): acc [bootstrap] |", "|---|---|---|---:|---:|---:|---|"]


LEGEND = ("Test-split percentages: mean over seeds [95 % t-interval over seeds; none with one seed]. "
          "FairNet = `FairTrainer` with default `FairTrainingArguments` (only output dir, epochs, batch sizes, seed "
          "and logging set); ERM = plain `Trainer`, fixed epochs. WGA = min over label × group cells; EOD = "
          "½(|ΔTPR| + |ΔFPR|); det./probe AUC = `train_detector_auc` / `train_probe_auc`; gate = test rows with the "
          "LoRA on, per group, at the τ and strength the trainer selected after training (in every setting); "
          "pseudo-label P / R = precision / recall of the unlabeled setting's "
          "pseudo-labels against the true train groups (reported, never used). Partial and unlabeled: the group labels "
          "`fairnet_peft.data.hide_group_labels` leaves (partial: a seeded 10 % of the train rows; validation without "
          "group labels in both). Goals (no loss), in every setting: ACC ≥ ERM − 0.5 and EOD ≤ ERM + 1; full WGA ≥ "
          "ERM + 5 where ERM's worst cell is a minority (s=1) cell in most seeds and the detector finds the group "
          "(held-out AUC ≥ 0.65); hidden (the group is not in the input): WGA ≥ ERM − 1.")


def _headline_row(task: str, st: str, row: dict) -> str:
    keys = ("erm_accuracy", "fairnet_accuracy", "erm_worst_group_accuracy", "fairnet_worst_group_accuracy",
            "erm_equalized_odds_difference", "fairnet_equalized_odds_difference")
    worst = "; ".join(sorted(set(row["erm_worst_cells"]))) + (" (minority)" if row["erm_worst_is_minority"] else
                                                               " (majority)")
    return (f"| {task} | {st} | " + " | ".join(_pct(row[k]) for k in keys) + f" | {_auc(row['detector_auc'])} / "
            f"{_auc(row['probe_auc'])} | {_pct(row['gate_rate_s1'])} / {_pct(row['gate_rate_s0'])} | "
            f"{_pct(row['pseudo_precision'])} / {_pct(row['pseudo_recall'])} | {worst} | {row['goal']['text']} |")


def _seed_rows(task: str, seed: str, run: dict) -> list:
    def ci(c):
        return f"{100 * c['point']:.1f} [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"
    rows = []
    for who, res in [("ERM", run["erm"])] + [(f"FairNet {st}", v) for st, v in run["settings"].items()]:
        w = res["worst_cell"]
        rows.append(f"| {task} | {seed} | {who} | " + " | ".join(ci(res[k]) for k in METRICS)
                    + f" | {w['cell']} ({w['count']}): {ci(w)} |")
    return rows


def _task_note(task: str, block: dict) -> str:
    if "skipped" in block:
        return f"- {task}: skipped ({block['skipped']})."
    runs = block["runs"]
    run0, cfg = next(iter(runs.values())), block["config"]
    smallest = min(c["count"] for r in runs.values() for c in r["erm"]["cells"].values())
    times = ", ".join(f"{k} {np.mean([r['timings_s'].get(k, 0) for r in runs.values()]):.0f} s"
                      for k in run0["timings_s"])
    held_out = " (held out: added after the current defaults were chosen, never used to choose one)" \
        if task in HELD_OUT_TASKS else ""
    return (f"- {task}{held_out}: {run0['description']}; splits {run0['sizes']}; ERM "
            + ", ".join(f"{k}={cfg[k]}" for k in ("erm_epochs", "erm_lr", "scheduler", "batch"))
            + f"; FairNet num_train_epochs={cfg['fair_epochs']}; mean time per seed: {times}."
            + (f" Smallest test cell: {smallest} rows (< {MIN_CELL}): see its bootstrap CI per seed."
               if smallest < MIN_CELL else "") + _selection_and_labeler_note(runs))


def _selection_and_labeler_note(runs: dict) -> str:
    """Per setting: the correction selected after training per seed (τ and strength, or off), auto's pseudo-labeler choice and the
    label-free selectors' rank correlation with the true validation WGA."""
    notes = []
    for st in SETTINGS:
        res = [r["settings"][st] for r in runs.values() if st in r["settings"]]
        errors = [x["trainer_error"] for x in res if x.get("trainer_error")]
        if errors:
            notes.append(f"{st}: FairTrainer raised in {len(errors)} of {len(res)} seeds, the row keeps ERM's "
                         f"predictions there (first error: {errors[0]})")
        chosen_tau = [x["train_metrics"] for x in res if "train_selection_threshold" in x.get("train_metrics", {})]
        if chosen_tau:
            picks = [f"τ {m['train_selection_threshold']:.6g} α {m.get('train_selection_strength', 1.0):g}"
                     if m["train_selection_threshold"] < 1 else "off" for m in chosen_tau]
            notes.append(f"{st}: correction selected per seed: {', '.join(picks)}")
        chosen = [x["pseudo_details"]["method"] for x in res if x.get("pseudo_details")]
        if chosen:
            notes.append(f"{st}: pseudo-labeler chosen per seed {', '.join(chosen)}")
        sel = [x["selector"] for x in res if x.get("selector")]
        if sel:
            def rho(name):
                return ", ".join("n/a" if x[name]["rho"] is None or x[name]["rho"] != x[name]["rho"]  # nan: constant
                                 else f"{x[name]['rho']:.2f}" for x in sel)

            def picked(name):
                return ", ".join(f"{100 * x[name]['test_wga']:.1f}" for x in sel)
            notes.append(f"{st}: Spearman ρ with the true validation WGA over the τ candidates, per seed: pseudo-group "
                         f"WGA {rho('pseudo')}, worst-class accuracy {rho('worst_class')}; test WGA at the τ each "
                         f"picks: {picked('pseudo')} vs {picked('worst_class')}")
    return (" " + "; ".join(notes) + ".") if notes else ""


def variants_table(report: dict) -> list[str]:
    """Ablations beside the defaults, per task and setting: training variants (--variant, same ERM models) and the
    selection redone under other rules on the same trained model (`SELECTION_VARIANTS`); test ACC / WGA / EOD, mean
    over seeds [95 % t-interval]."""
    names = list(report.get("variants") or {})
    lines = ["Ablations on the same ERM models (test %, mean over seeds [95 % t-interval]; training variants: "
             + ("; ".join(f"`{n}` = {report['variants'][n]}" for n in names) or "none")
             + "; selection variants: the selection after training redone on the same trained model, "
               "`FairTrainer.reselect`):", "",
             "| task | setting | variant | ACC | WGA | EOD | Δ ACC vs ERM (min seed) |", "|---|---|---|---:|---:|---:|---:|"]
    count = len(lines)
    for task, block in report["tasks"].items():
        runs = list(block.get("runs", {}).values())
        for st in SETTINGS:
            have = [r for r in runs if st in r["settings"]]
            if not have:
                continue
            selection = sorted({k for r in have for k in r["settings"][st].get("selection_variants", {})})
            rows = [("defaults", [r["settings"][st] for r in have])]
            rows += [(f"train: {n}", [r.get("variants", {}).get(n, {}).get(st) for r in have]) for n in names]
            rows += [(f"select: {n}", [r["settings"][st].get("selection_variants", {}).get(n) for r in have])
                     for n in selection]
            for name, results in rows:
                pairs = [(r, x) for r, x in zip(have, results) if x]
                if not pairs:
                    continue
                cells = [_ci(t_interval([x[k]["point"] for _, x in pairs])) for k in METRICS]
                worst = min(x["accuracy"]["point"] - r["erm"]["accuracy"]["point"] for r, x in pairs)
                lines.append(f"| {task} | {st} | {name} | " + " | ".join(cells) + f" | {100 * worst:+.1f} |")
    return lines + [""] if len(lines) > count else []


def _ci(stat: dict) -> str:
    mean, low, high = (100 * stat.get(k, float("nan")) if stat.get(k) is not None else float("nan")
                       for k in ("mean", "low", "high"))
    return f"{mean:.1f}" + ("" if math.isnan(low) else f" [{low:.1f}, {high:.1f}]")


def render(report: dict) -> str:
    """The headline table (with the command) first, then the legend, per-task notes and per-seed bootstrap CIs."""
    head, seeds = list(HEADLINE), list(PER_SEED)
    for task, block in report["tasks"].items():
        head += [_headline_row(task, st, row) for st, row in block.get("summary", {}).items()]
        seeds += [x for seed, run in block.get("runs", {}).items() for x in _seed_rows(task, seed, run)]
    sources = [f"- `{c}`" for c in report.get("merged_from", [])]
    return "\n".join([
        f"Command: `{report['command']}`", *(["", "Merging the runs of:", *sources] if sources else []), "", *head, "",
        f"Run {report['finished']}, {report['machine']}, wall time {report['wall_minutes']:.1f} min, seeds "
        f"{report['seeds']}. " + LEGEND, "", *[_task_note(t, b) for t, b in report["tasks"].items()], "",
        *variants_table(report),
        f"Per seed, percentile bootstrap CIs over test rows ({report['n_boot']} resamples, "
        "`fairnet_peft.metrics.bootstrap_ci`):", "", *seeds]) + "\n"


def merge_reports(paths: list, argv: list) -> dict:
    """One report from several results.json of this suite (e.g. seed 0, then seeds 1-2 added with --first-seed):
    per task and seed the settings are joined, a later file's setting replacing an earlier one (the first file's ERM
    run is kept: the same seed trains the same ERM), and the statistics are recomputed over every seed. A task whose
    model description differs from an earlier file's (another backbone recipe) is replaced as a whole. Wall time is
    the sum of the files'."""
    import json

    merged: dict = {}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        if not merged:
            merged = {**part, "tasks": {}, "seeds": [], "settings": [], "wall_minutes": 0.0,
                      "command": "python benchmarks/defaults.py " + " ".join(argv), "merged_from": []}
        merged["merged_from"].append(part["command"])
        merged["wall_minutes"] += part.get("wall_minutes", 0.0)
        merged["finished"] = max(merged.get("finished", ""), part.get("finished", ""))
        merged["seeds"] = sorted(set(merged["seeds"]) | set(part["seeds"]))
        merged["settings"] = [x for x in SETTINGS if x in set(merged["settings"]) | set(part["settings"])]
        for task, block in part["tasks"].items():
            if "runs" not in block:
                continue
            into = merged["tasks"].setdefault(task, {"config": block["config"], "runs": {}})
            if into["runs"] and next(iter(into["runs"].values()))["description"] != next(iter(block["runs"].values()))[
                    "description"]:  # another model recipe is another experiment: the later file's runs replace
                into.update(config=block["config"], runs={})
            for seed, run in block["runs"].items():
                have = into["runs"].setdefault(seed, {**run, "settings": {}, "timings_s": dict(run["timings_s"])})
                have["settings"].update(run["settings"])
                have["timings_s"].update({k: v for k, v in run["timings_s"].items() if k != "data+erm"})
    for task, block in merged["tasks"].items():
        block["runs"] = dict(sorted(block["runs"].items(), key=lambda kv: int(kv[0])))
        block["summary"] = summarise_task(task, block["runs"])
    return merged


def finish_defaults(report: dict, out: str, doc: str, log: Callable[[str], None]) -> dict:
    """table.md, results.json and (unless --doc none) the generated block of the default-settings suite."""
    publish(out, render(report), report, doc, DEFAULTS_BLOCK, log)
    return report
