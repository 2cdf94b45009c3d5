"""Reports of the quality suite, and the outputs every suite writes: table.md, results.json and the generated blocks
of docs/benchmarks.md.

`write_block` is the one writer of generated blocks: it replaces the text between a block's begin/end markers and
keeps everything else. `publish` writes a suite's table, JSON and (unless --doc none) its block. The quality report
flows runs → `summarise` (mean ± std over seeds) → `targets` → `render_report` (Markdown) and `make_plots`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import REPO_ROOT
from .common import jsonable, machine
from .config import ACC_TOLERANCE, BUDGET, FAIR_VARIANTS, GATE_RATE_GRID, METHODS, ORACLE_ROW, PLOT_METHODS, TAU_GRID


# ------------------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class DocBlock:
    """A generated block of docs/benchmarks.md: its section heading and its begin/end markers."""

    heading: str
    begin: str
    end: str


def _markers(script: str) -> tuple:
    return f"<!-- {script}:begin (generated: do not edit by hand) -->", f"<!-- {script}:end -->"


QUALITY_BLOCK = DocBlock("## Quality (issue 6)", *_markers("quality.py"))
DEFAULTS_BLOCK = DocBlock("## Default-settings suite (issue 10)", *_markers("defaults.py"))


def write_block(path: str, block: DocBlock, body: str) -> None:
    """Put `body` between `block`'s markers in the Markdown file `path`; every other part of the file is kept.

    Markers present: only the text between them changes. Else the heading present: the block goes at the end of that
    section. Else a new section (heading + block) goes right after the document's title. No file: '# Benchmarks'."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    marked = f"{block.begin}\n{body.rstrip()}\n{block.end}"
    if block.begin in text and block.end in text:
        head, rest = text.split(block.begin, 1)
        text = head + marked + rest.split(block.end, 1)[1]
    elif block.heading in text:
        head, rest = text.split(block.heading, 1)
        nxt = rest.find("\n## ")
        section, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
        text = head + block.heading + section.rstrip("\n") + "\n\n" + marked + "\n" + tail
    else:
        first, sep, rest = text.partition("\n## ")
        text = first.rstrip("\n") + f"\n\n{block.heading}\n\n{marked}\n" + (f"\n## {rest}" if sep else "")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(jsonable(report), f, indent=1)


def header(script: str, argv: list, preset: str) -> dict:
    """The report fields every run starts with: its command line, preset, machine and start time."""
    import shlex

    command = f"python benchmarks/{script}" + (" " + shlex.join(argv) if argv else "")
    import torch

    return {"command": command, "preset": preset, "machine": machine(), "torch": torch.__version__,
            "started": _dt.datetime.now().isoformat(timespec="seconds")}


def stamp_end(report: dict, t_start: float) -> None:
    report["wall_minutes"] = (time.time() - t_start) / 60
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")


def publish(out: str, body: str, report: dict, doc: Optional[str], block: DocBlock, log: Callable[[str], None],
            json_path: Optional[str] = None) -> None:
    """table.md and results.json in `out` (or `json_path`), the table on stdout and, unless `doc` is None or 'none',
    the block in `doc`."""
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(body)
    json_path = json_path or os.path.join(out, "results.json")
    save_json(json_path, report)
    print(body, flush=True)
    if doc and doc.lower() != "none":
        write_block(doc, block, body)
        log(f"wrote the '{block.heading}' block of {doc}")
    log(f"results: {json_path}")


# ------------------------------------------------------------------------------------------------ quality summary
SUMMARY_KEYS = ("accuracy", "worst_group_accuracy", "equalized_odds_difference", "worst_class_accuracy",
                "detector_tpr", "detector_fpr", "tau")


def _majority_worst_cell(res: dict) -> float:
    """The lowest accuracy over the majority-group (s=0) cells: what a correction gated on s=1 rows leaves as is."""
    cells = [c["accuracy"] for k, c in (res.get("group_accuracies") or {}).items() if k.endswith("s=0")]
    return float(min(cells)) if cells else float("nan")


def summarise(runs: dict) -> dict:
    methods = [m for m in METHODS + [ORACLE_ROW] if any(m in r["results"] for r in runs.values())]
    out = {}
    for m in methods:
        row = {}
        results = [dict(r["results"][m], majority_worst_cell=_majority_worst_cell(r["results"][m]))
                   for r in runs.values() if m in r["results"]]
        for key in SUMMARY_KEYS + ("majority_worst_cell",):
            vals = [float(res[key]) for res in results if key in res]
            if vals:
                row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            "n": len(vals), "values": vals}
        out[m] = row
    return out


def targets(summary: dict) -> dict:
    def mean(m, k):
        return summary.get(m, {}).get(k, {}).get("mean", float("nan"))

    erm_acc, erm_wga = mean("ERM", "accuracy"), mean("ERM", "worst_group_accuracy")
    out = {}
    baselines = {b: mean(b, "worst_group_accuracy") for b in ("GroupDRO", "JTT", "DFR") if b in summary}
    if "FairNet-Full" in summary and baselines:
        best = max(baselines, key=lambda b: baselines[b])
        wga, acc = mean("FairNet-Full", "worst_group_accuracy"), mean("FairNet-Full", "accuracy")
        ok_w, ok_a = wga >= baselines[best] - 1e-12, acc >= erm_acc - ACC_TOLERANCE - 1e-12
        out["a"] = {"goal": "FairNet-Full WGA ≥ best of GroupDRO/JTT/DFR, and ACC ≥ ERM ACC − 0.5",
                    "fairnet_wga": wga, "best_baseline": best, "best_baseline_wga": baselines[best],
                    "erm_majority_worst_cell": mean("ERM", "majority_worst_cell"),
                    "fairnet_acc": acc, "erm_acc": erm_acc, "wga_met": ok_w, "acc_met": ok_a, "met": ok_w and ok_a}
    if "FairNet-Unlabeled" in summary:
        wga, acc = mean("FairNet-Unlabeled", "worst_group_accuracy"), mean("FairNet-Unlabeled", "accuracy")
        ok_w, ok_a = wga >= erm_wga + 0.03 - 1e-12, acc >= erm_acc - ACC_TOLERANCE - 1e-12
        out["b"] = {"goal": "FairNet-Unlabeled WGA ≥ ERM WGA + 3, and ACC ≥ ERM ACC − 0.5",
                    "fairnet_wga": wga, "erm_wga": erm_wga, "fairnet_acc": acc, "erm_acc": erm_acc,
                    "wga_met": ok_w, "acc_met": ok_a, "met": ok_w and ok_a}
    return out


def _pm(stat: Optional[dict]) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "–"
    if stat["n"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def render_table(dataset: str, summary: dict, n_seeds: int) -> str:
    lines = [f"| {dataset}: method | train s | val s | selection | ACC | WGA | EOD ↓ | det. TPR | det. FPR | τ |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, row in summary.items():
        tr, va, rule = BUDGET[m]
        tau = row.get("tau")
        tau_s = "–" if not tau else (f"{tau['mean']:.2f}" if tau["n"] == 1 else f"{tau['mean']:.2f} (mean)")
        lines.append(f"| {m} | {tr} | {va} | {rule} | {_pm(row.get('accuracy'))} | "
                     f"{_pm(row.get('worst_group_accuracy'))} | {_pm(row.get('equalized_odds_difference'))} | "
                     f"{_pm(row.get('detector_tpr'))} | {_pm(row.get('detector_fpr'))} | {tau_s} |")
    return "\n".join(lines)


def _verdict(key: str, t: dict, wga_reference: str) -> str:
    """One target line: the WGA half against `wga_reference`, the ACC half against ERM − 0.5, and the verdict."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"- ({key}) {t['goal']}: WGA {100 * t['fairnet_wga']:.1f} vs {wga_reference} → {met(t['wga_met'])}; "
            f"ACC {100 * t['fairnet_acc']:.1f} vs ERM {100 * t['erm_acc']:.1f} − 0.5 → {met(t['acc_met'])}. "
            f"**Target ({key}): {'MET' if t['met'] else 'NOT MET'}.**")


def render_targets(tg: dict) -> str:
    lines = []
    if "a" in tg:
        t = tg["a"]
        lines.append(_verdict("a", t, f"{t['best_baseline']} {100 * t['best_baseline_wga']:.1f}"))
        ceiling = t.get("erm_majority_worst_cell", float("nan"))
        if math.isfinite(ceiling):
            lines.append(f"  Ceiling of a correction gated on the minority: ERM's worst majority-group (s=0) cell is "
                         f"{100 * ceiling:.1f}; a model that leaves s=0 rows as ERM has them cannot reach a higher WGA"
                         + (f", so {100 * t['best_baseline_wga']:.1f} is out of reach by design."
                            if ceiling < t["best_baseline_wga"] else "."))
    if "b" in tg:
        t = tg["b"]
        lines.append(_verdict("b", t, f"ERM {100 * t['erm_wga']:.1f} + 3"))
    return "\n".join(lines) if lines else "- (targets need the ERM, baseline and FairNet rows)"


def _config_line(cfg: dict, keys) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _choices_line(runs: dict) -> str:
    """The FairNet grid point, epoch and τ each variant selected on validation, per seed."""
    items = []
    for m in FAIR_VARIANTS:
        picks = []
        for seed, run in runs.items():
            res = run["results"].get(m)
            if res and res.get("selected"):
                hp = (res.get("grid") or [{}])[int(res["selected"].get("grid", 0))]
                hp_s = ",".join(f"{k}={v}" for k, v in hp.items()) or "defaults"
                picks.append(f"s{seed}: {hp_s}, epoch {res['selected']['epoch']}, τ {res['tau']:g}")
        if picks:
            items.append(f"{m} [{'; '.join(picks)}]")
    return ("Selected on validation: " + "; ".join(items) + ".") if items else ""


def _seed_time_line(runs: dict) -> str:
    minutes = [sum(r.get("timings_s", {}).values()) / 60 for r in runs.values()]
    if not minutes:
        return ""
    return (f"Wall time of one seed (data + every method): {', '.join(f'{m:.1f}' for m in minutes)} min; "
            + ", ".join(f"{k} {np.mean([r['timings_s'].get(k, 0) for r in runs.values()]):.0f} s"
                        for k in next(iter(runs.values())).get("timings_s", {})) + " (mean per seed).")


def render_report(report: dict) -> str:
    parts = [f"Command: `{report['command']}`", "",
             f"Run: {report['finished']}, {report['machine']}, wall time {report['wall_minutes']:.1f} min, "
             f"seeds {report['seeds']} (mean ± sample std over seeds; one seed has no ±). All numbers are test-split "
             "percentages; EOD = ½(|ΔTPR| + |ΔFPR|) (fairlearn `agg=\"mean\"`); WGA = min over (label × group) "
             "cells; det. TPR/FPR = P(gate on | s=1) / P(gate on | s=0) on test at the selected τ.", ""]
    for dataset, block in report["datasets"].items():
        cfg = block["config"]
        sizes = next(iter(block["runs"].values()))["sizes"] if block["runs"] else {}
        desc = next(iter(block["runs"].values()))["description"] if block["runs"] else {}
        parts += [f"### {dataset}: " + ("UCI Adult as text" if dataset == "text" else "digits on backgrounds"), "",
                  f"Splits {sizes}; {', '.join(f'{k}: {v}' for k, v in desc.items())}.",
                  "ERM/GroupDRO/JTT: " + _config_line(cfg, ("erm_epochs", "erm_lr", "batch_size", "scheduler",
                                                             "weight_decay", "dro_eta", "jtt_T", "jtt_lambda")) +
                  "; FairNet: " + _config_line(cfg, ("detector_epochs", "detector_lr", "fair_epochs", "fair_lr",
                                                     "margin", "task_loss_weight", "lof_contamination",
                                                     "label_fraction")) +
                  f"; FairNet grid (searched on validation) {cfg.get('fair_grid') or [{}]}; τ candidates "
                  f"{list(TAU_GRID)} and the τ that gate {int(100 * GATE_RATE_GRID[0])}-"
                  f"{int(100 * GATE_RATE_GRID[-1])} % of the validation rows (5 % steps).",
                  _choices_line(block["runs"]), _seed_time_line(block["runs"]), "",
                  render_table(dataset, block["summary"], len(report["seeds"])), "",
                  "Targets (means over seeds):", render_targets(block["targets"]), "",
                  f"Plots: `{block['plots'].get('groups', '–')}`, `{block['plots'].get('sweep', '–')}`.", ""]
    return "\n".join(parts).rstrip() + "\n"


def _display_path(path) -> str:
    path = os.path.abspath(str(path))
    return os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT + os.sep) else path


def make_plots(dataset: str, runs: dict, out: str) -> dict:
    from fairnet_peft.evaluation.plots import plot_group_accuracies, plot_threshold_sweep

    paths = {}
    first = runs[min(runs)]["results"] if runs else {}
    groups = {m: first[m]["group_accuracies"] for m in PLOT_METHODS if m in first}
    if groups:
        paths["groups"] = _display_path(plot_group_accuracies(groups, os.path.join(out, f"{dataset}_group_accuracies.png"),
                                                    title=f"{dataset}, seed {min(runs)}: test accuracy per cell"))
    if "FairNet-Full" in first:
        res = first["FairNet-Full"]
        paths["sweep"] = _display_path(plot_threshold_sweep(res["sweep"], os.path.join(out, f"{dataset}_tau_sweep.png"),
                                                  chosen_threshold=res["tau"],
                                                  title=f"{dataset}, FairNet-Full, seed {min(runs)}: test τ sweep"))
    return paths


def finish_quality(report: dict, out: str, doc: Optional[str], json_path: str, log: Callable[[str], None]) -> dict:
    """Summary, targets and plots per dataset, then table.md, results.json and (unless --doc none) the doc block."""
    for dataset, block in report["datasets"].items():
        block["summary"] = summarise(block["runs"])
        block["targets"] = targets(block["summary"])
        block["plots"] = make_plots(dataset, block["runs"], out)
    publish(out, render_report(report), report, doc, QUALITY_BLOCK, log, json_path)
    return report
