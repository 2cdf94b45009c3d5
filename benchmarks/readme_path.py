"""The README's own training path, as a new user runs it: `examples/train_text.py` at its defaults (UCI Adult as
text, 10,000 train rows, MiniLM, full labels), once per seed, then ERM vs FairNet on the test split with a 95 %
t-interval over seeds. Each seed is one process running the example unchanged; its metrics.json is read back.

    .venv/bin/python benchmarks/readme_path.py --seeds 0,1,2               # CPU: ~10 min per seed, ERM cached
    .venv/bin/python benchmarks/readme_path.py --seeds 0,1,2 --extra --bf16 # the same with an example flag

The generated block goes into docs/benchmarks.md (`--doc none` to skip) and table.md / results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from suite import DOC_PATH, REPO_ROOT  # noqa: E402
from suite.common import t_interval  # noqa: E402
from suite.report import DocBlock, block_markers, header, publish, stamp_end  # noqa: E402

BLOCK = DocBlock("## README path", *block_markers("readme_path.py"))
KEYS = ("accuracy", "worst_group_accuracy", "equalized_odds_difference")


def run_seed(seed: int, out: str, extra: list, reuse: bool = False, example: str = "train_text.py") -> dict:
    """One run of `examples/<example>` (its own process); with `reuse`, a seed whose metrics.json a finished run left
    is read back."""
    folder = os.path.join(out, f"seed{seed}")
    if reuse and os.path.exists(os.path.join(folder, "metrics.json")):
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    command = [sys.executable, os.path.join(REPO_ROOT, "examples", example), "--seed", str(seed),
               "--output-dir", folder, *extra]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def _cell(stat: dict) -> str:
    if stat["low"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} [{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]"


def summary_lines(runs: dict) -> list:
    """ERM and FairNet on the test split: the seed mean of ACC, WGA and EOD with its 95 % t-interval."""
    lines = ["| model | ACC | WGA | EOD |", "|---|---:|---:|---:|"]
    for who in ("erm", "fairnet"):
        lines.append(f"| {'ERM' if who == 'erm' else 'FairNet (defaults)'} | "
                     + " | ".join(_cell(t_interval([r[who][k] for r in runs.values()])) for k in KEYS) + " |")
    return lines


def per_seed_lines(runs: dict) -> list:
    """Per seed: ERM → FairNet on each metric, the selected τ and α, and why the adapter is off where it is."""
    lines = ["| seed | ACC | WGA | EOD | τ | α | adapter off because |", "|---|---|---|---|---:|---:|---|"]
    for seed, r in runs.items():
        moves = [f"{100 * r['erm'][k]:.1f} → {100 * r['fairnet'][k]:.1f}" for k in KEYS]
        reason = r.get("fairnet_train", {}).get("train_selection_reason", "")
        lines.append(f"| {seed} | " + " | ".join(moves) + f" | {r['threshold']:.6g} | "
                     f"{r.get('adapter_strength', 1.0):g} | {reason} |")
    return lines


def render(report: dict) -> str:
    lines = [f"Command: `{report['command']}`", "", *summary_lines(report["runs"]),
             "", f"Run {report['finished']}, {report['machine']}, wall time {report['wall_minutes']:.1f} min. Test "
             "split, %, mean over seeds [95 % t-interval]. Per seed (ERM → FairNet; τ and strength α chosen after "
             "training on the example's validation rows):", "", *per_seed_lines(report["runs"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "readme-path"))
    p.add_argument("--doc", default=DOC_PATH, help="Markdown file for the generated block ('none' = no)")
    p.add_argument("--reuse", action="store_true",
                   help="read back the seeds a finished run left in --out (metrics.json) instead of training again")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to the example")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    started = time.time()
    report = header("readme_path.py", argv if argv is not None else sys.argv[1:], "readme")
    report["runs"] = {seed: run_seed(int(seed), a.out, a.extra, a.reuse) for seed in a.seeds.split(",")}
    stamp_end(report, started)
    publish(a.out, render(report), report, a.doc, BLOCK, print)
    return report


if __name__ == "__main__":
    main()
