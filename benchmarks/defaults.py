"""Default-settings quality suite: FairNet at the library defaults against ERM, per task and label setting.

Per task and seed: ERM with a plain `transformers.Trainer` (fixed epochs), then FairNet at the library defaults
(`suite.fairnet.train_at_defaults`, shared with quality.py: `FairLoraConfig(task_type)`, `FairTrainingArguments` with
only output dir, epochs, batch sizes, seed and logging set) in the settings full, partial and unlabeled, with the group
labels `fairnet_peft.data.hide_group_labels` leaves. Tasks in `suite/config.py`, among them `hidden` (the group is not
in the input: the goal is to do no harm). Test ACC, WGA and EOD (`fairnet_peft.metrics`) as seed means with a
t-interval and per-seed bootstrap CIs; the detector vs probe AUC, the test gate rate per group and ERM's worst cell.

    .venv/bin/python benchmarks/defaults.py --tiny --out /tmp/d          # seconds; what the tests run
    .venv/bin/python benchmarks/defaults.py --quick --jobs 2 --threads 1  # CPU sizes, 3 seeds, both cores
    .venv/bin/python benchmarks/defaults.py                               # standard sizes (one GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from suite import DOC_PATH, REPO_ROOT  # noqa: E402
from suite.common import logger, silence_libraries, torch_threads  # noqa: E402
from suite.config import DEFAULTS_PRESETS as PRESETS, SETTINGS, TASKS  # noqa: E402
from suite.orchestration import run_defaults  # noqa: E402
from suite.report import header, stamp_end  # noqa: E402
from suite.report_defaults import finish_defaults, merge_reports  # noqa: E402

log = logger("defaults")


def _key_value(item: str, parser) -> tuple:
    """"KEY=VALUE" → (KEY, VALUE as JSON if it parses, else the string)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        parser.error(f"--fair-arg {item!r}: use KEY=VALUE, e.g. --fair-arg anchor_weighting=majority_prior")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true",
                      help="tiny sizes, 1 seed, synthetic + digits by default, capped update floors (seconds; tests)")
    size.add_argument("--quick", action="store_true", help="CPU sizes (see the PRESETS table)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --tiny)")
    p.add_argument("--first-seed", type=int, default=0, help="start at this seed: seeds K..K+N-1 (to add seeds)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="no training: merge the runs of these results.json files (e.g. seed 0 and seeds 1-2) "
                        "into one report in --out (and --doc), statistics recomputed over all seeds")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of full,partial,unlabeled")
    p.add_argument("--out", default=None, help="output folder for results.json and table.md")
    p.add_argument("--doc", default=None, help="write the generated block into this Markdown file ('none' = no; "
                                               "default docs/benchmarks.md, none with --tiny)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples per CI (default 1000; 100 --tiny)")
    p.add_argument("--jobs", type=int, default=1, help="tasks in this many parallel child processes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per process")
    p.add_argument("--fair-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="ablation only: set this FairTrainingArguments field in every FairNet run (repeatable; the "
                        "report then no longer shows the library defaults, and its header says so)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:JSON",
                   help="ablation: also run FairNet with these FairTrainingArguments on the same ERM model, e.g. "
                        "'majority:{\"anchor_weighting\": \"majority_prior\"}' (repeatable); a table compares them")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.tiny else "quick" if a.quick else "standard"
    a.seeds = a.seeds or (1 if a.tiny else 3)
    a.seed_list = list(range(a.first_seed, a.first_seed + a.seeds))
    a.task_list = [t for t in (a.tasks or ("synthetic,digits" if a.tiny else ",".join(TASKS))).split(",") if t]
    a.setting_list = [s for s in a.settings.split(",") if s]
    if bad := [t for t in a.task_list if t not in TASKS] + [s for s in a.setting_list if s not in SETTINGS]:
        p.error(f"--tasks/--settings: unknown {bad}; tasks {list(TASKS)}, settings {list(SETTINGS)}")
    if bad := [t for t in a.task_list if t not in PRESETS[a.preset]]:
        p.error(f"--tasks {bad}: no {a.preset} sizes; the {a.preset} preset has {list(PRESETS[a.preset])}")
    a.n_boot = a.n_boot or (100 if a.tiny else 1000)
    a.fair_args = dict(_key_value(item, p) for item in a.fair_arg)
    a.variants = {}
    for item in a.variant:
        name, sep, spec = item.partition(":")
        try:
            a.variants[name] = json.loads(spec)
        except ValueError:
            p.error(f"--variant {item!r}: use NAME:JSON, e.g. 'none:{{\"anchor_weighting\": \"none\"}}'")
    a.out = a.out or os.path.join(REPO_ROOT, "runs", f"defaults-{a.preset}")
    a.doc = a.doc or ("none" if a.tiny else DOC_PATH)
    return a


def main(argv: Optional[list] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(x.startswith(("--jobs=", "--tasks=", "--out=", "--doc=")) for x in argv):
        raise ValueError("use '--jobs N' style flags (not '--jobs=N'), so child processes can override them")
    a = parse_args(argv)
    silence_libraries()
    import fairnet_peft  # noqa: F401  (registers FAIRLORA)

    os.makedirs(a.out, exist_ok=True)
    if a.merge:
        return finish_defaults(merge_reports(a.merge, argv), a.out, a.doc, log)
    t_start = time.time()
    with torch_threads(a.threads):
        report = header("defaults.py", argv, a.preset)
        report.update(seeds=a.seed_list, settings=a.setting_list, n_boot=a.n_boot, tasks={}, fair_args=a.fair_args,
                      variants=a.variants)
        run_defaults(os.path.abspath(__file__), argv, a, report)
    stamp_end(report, t_start)
    return finish_defaults(report, a.out, a.doc, log)


if __name__ == "__main__":
    main()
