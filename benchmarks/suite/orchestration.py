"""Runs, seeds and processes: what runs where, and in which order; results land in the report dict.

Quality: `run_quality` trains every (seed, dataset) in this process (`quality_sequential`, results.json rewritten
after each seed) or one child process per dataset (`--jobs`, `run_pool`), and turns SIGTERM (e.g. `timeout`) into a
report of the methods finished so far. Defaults: `run_defaults` trains every (task, seed) here or one child per task.
Both use one process pool (`run_pool`) and one rule for a child's command line (`child_argv`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np

from .common import logger
from .config import DEFAULTS_PRESETS, FAIRNET_DEFAULTS, GRID_ORACLE_ROW, METHODS, ORACLE_ROW, TASKS, floor_row
from .data import build_hidden, build_task, build_text, build_vision, task_loader
from .fairnet import fairnet_defaults, run_fairnet, run_fairnet_defaults
from .methods import RUNNERS, Context, bootstrap_scores, train_erm
from .report import save_json
from .report_defaults import summarise_task

log, dlog = logger("quality"), logger("defaults")


# ------------------------------------------------------------------------------------------------ processes
class Stop(Exception):
    """Raised by the SIGTERM handler (e.g. `timeout`): finish the report with the methods done so far."""


def _on_sigterm(signum, frame):
    raise Stop(f"stopped by signal {signum}")


@contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises `Stop` (in the main thread; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def child_argv(argv: list[str], overrides: dict) -> list[str]:
    """`argv` without the flags named in `overrides` ('--flag value' or '--flag=value'), then the overrides."""
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in overrides:
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    return kept + [x for flag, value in overrides.items() for x in (flag, str(value))]


def run_pool(commands: dict, jobs: int, on_done: Callable[[str, int, str], None], keep_on_stop: bool) -> None:
    """Run `commands` ({name: (argv, out)}) as child processes, at most `jobs` at once, in the given order;
    `on_done(name, returncode, out)` as each one ends. On any exception the running children get SIGTERM and are
    waited for; with `keep_on_stop` a `Stop` still hands each of them to `on_done` (they report what they did)."""
    pending, running = list(commands), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                cmd, out = commands[name]
                running[name] = (subprocess.Popen(cmd), out)
            for name, (proc, out) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    on_done(name, proc.returncode, out)
            time.sleep(0.5)
    except BaseException as err:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for name, (proc, out) in running.items():
            proc.wait()
            if keep_on_stop and isinstance(err, Stop):
                on_done(name, proc.returncode, out)
        raise


# ------------------------------------------------------------------------------------------------ quality suite
def _merge_quality_child(report: dict, keep: bool):
    def merge(dataset: str, returncode: int, out: str) -> None:
        path = os.path.join(out, "results.json")
        if not os.path.exists(path):
            raise RuntimeError(f"--jobs: the {dataset} process exited with {returncode} and wrote no {path}")
        with open(path) as f:
            child = json.load(f)
        if not keep:  # the parent writes the merged results, table and plots
            shutil.rmtree(out, ignore_errors=True)
        report["datasets"][dataset]["runs"] = child["datasets"][dataset]["runs"]
        report["seeds"] = sorted(set(report["seeds"]) | {int(k) for k in child["datasets"][dataset]["runs"]})
        if returncode != 0 or child.get("stopped_early"):
            report["stopped_early"] = child.get("stopped_early") or f"{dataset} process exited with {returncode}"

    return merge


def quality_parallel(script: str, argv: list[str], args, report: dict) -> None:
    """`--jobs N`: one child process per dataset (same options, one dataset, no doc); results merged into `report`."""
    commands = {}
    for dataset in args.dataset_list:
        out = os.path.join(args.out, f"part-{dataset}")
        cmd = [sys.executable, script] + child_argv(argv, {"--datasets": dataset, "--out": out, "--doc": "none",
                                                           "--jobs": 1, "--passes-dir": args.passes_dir or "none"})
        if args.threads is None:  # share the cores instead of each child taking all of them
            cmd += ["--threads", str(max(1, (os.cpu_count() or 1) // args.jobs))]
        log(f"--jobs: {dataset} in a child process ({out})")
        commands[dataset] = (cmd, out)
    run_pool(commands, args.jobs, _merge_quality_child(report, args.keep_tmp), keep_on_stop=True)


def quality_sequential(args, report: dict, json_path: str, t_start: float) -> None:
    for seed in range(args.seeds):
        if args.max_minutes is not None and seed > 0 and (time.time() - t_start) / 60 > args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached: no seed {seed}")
            break
        report["seeds"].append(seed)
        for dataset in args.dataset_list:
            slot = report["datasets"][dataset]["runs"].setdefault(str(seed), {})
            quality_seed(dataset, seed, args, slot)
            save_json(json_path, report)  # incremental: a killed run keeps its finished seeds


def _log_method(dataset: str, seed: int, method: str, res: dict, seconds: float) -> None:
    extra = f" tau={res['tau']:.3g} TPR={res['detector_tpr']:.3f} FPR={res['detector_fpr']:.3f}" if "tau" in res else ""
    log(f"{dataset} seed {seed} {method:<36} ACC={res['accuracy']:.4f} WGA={res['worst_group_accuracy']:.4f} "
        f"EOD={res['equalized_odds_difference']:.4f}{extra} ({seconds:.0f}s)")


def quality_seed(dataset: str, seed: int, args, slot: dict) -> dict:
    """Train and evaluate every method on one (dataset, seed); `slot` is filled as methods finish."""
    import transformers as T

    cfg = args.config[dataset]
    t0 = time.time()
    bundle = (build_text(cfg, seed, args.minilm) if dataset == "text" else build_vision(cfg, seed)
              if dataset == "vision" else build_hidden(cfg, seed))
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    log(f"{dataset} seed {seed}: data ready in {time.time() - t0:.0f}s {sizes}")
    tmp = tempfile.mkdtemp(prefix=f"quality-{dataset}-{seed}-", dir=args.tmp_root)
    ctx = Context(bundle, cfg, seed, tmp, passes_dir=args.passes_dir)
    results, timings = {}, {"data": round(time.time() - t0, 1)}
    slot.update(results=results, timings_s=timings, sizes=sizes, description=bundle.description)
    try:
        for method in [m for m in METHODS if m in args.method_list]:
            t = time.time()
            T.set_seed(seed)
            res = (RUNNERS[method](ctx) if method in RUNNERS else run_fairnet_defaults(ctx, method)
                   if method in FAIRNET_DEFAULTS else run_fairnet(ctx, method))
            oracle, floor = res.pop("oracle_gate", None), res.pop("floor", None)
            results[method] = res
            if oracle is not None:
                results[ORACLE_ROW if method in FAIRNET_DEFAULTS else GRID_ORACLE_ROW] = oracle
            if floor is not None:
                results[floor_row(method)] = floor
            timings[method] = round(time.time() - t, 1)
            _log_method(dataset, seed, method, res, timings[method])
            if floor is not None:
                _log_method(dataset, seed, floor_row(method), floor, 0)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return slot


def run_quality(script: str, argv: list[str], args, report: dict, json_path: str) -> None:
    """Every seed and dataset of `args` into `report` (here, or in child processes with --jobs); SIGTERM stops it
    with the methods finished so far kept. The trainers' folders go unless --keep-tmp."""
    t_start = time.time()
    args.tmp_root = os.path.join(args.out, "tmp")
    os.makedirs(args.tmp_root, exist_ok=True)
    try:
        with stop_on_sigterm():
            if args.jobs > 1 and len(args.dataset_list) > 1:
                quality_parallel(script, argv, args, report)
            else:
                quality_sequential(args, report, json_path, t_start)
    except Stop as stop:
        log(f"{stop}: reporting the methods finished so far")
        report["stopped_early"] = str(stop)
        for block in report["datasets"].values():  # drop seeds that had not produced any result yet
            block["runs"] = {k: v for k, v in block["runs"].items() if v.get("results")}
    finally:
        if not args.keep_tmp:
            shutil.rmtree(args.tmp_root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ default settings
def defaults_seed(task: str, cfg: dict, seed: int, settings, n_boot: int, tmp: str,
                  passes_dir: Optional[str] = None):
    """ERM, then FairNet in every setting, on one seed's splits; None when the task's loader does not exist yet.
    `passes_dir`: each FairNet model's selection passes go there (`replay.dump_passes`, `<task>-s<seed>-<setting>.npz`)."""
    from fairnet_peft.evaluation.sweep import padding_collate

    t0 = time.time()
    built = build_task(task, cfg, seed)
    if built is None:
        return None
    ds, new_model, task_type, pad, desc = built
    collate = padding_collate({"input_ids": pad})
    erm, erm_pred = train_erm(ds, new_model, cfg, seed, os.path.join(tmp, "erm"), collate)
    y, s = (np.asarray(ds["test"][k]) for k in ("labels", "sensitive"))
    run = {"description": desc, "sizes": {sp: len(d) for sp, d in ds.items()},
           "erm": bootstrap_scores(y, erm_pred, s, n_boot, seed), "settings": {},
           "timings_s": {"data+erm": time.time() - t0}}
    for setting in settings:
        t0 = time.time()
        passes = passes_dir and os.path.join(passes_dir, f"{task}-s{seed}-{setting}.npz")
        res = fairnet_defaults(erm, erm_pred, ds, setting, task_type, cfg, seed, os.path.join(tmp, setting), collate,
                               n_boot, passes=passes)
        run["settings"][setting], run["timings_s"][setting] = res, time.time() - t0
        dlog(f"{task} seed {seed} {setting}: ACC {res['accuracy']['point']:.3f} WGA "
             f"{res['worst_group_accuracy']['point']:.3f} (ERM {run['erm']['worst_group_accuracy']['point']:.3f}), "
             f"{run['timings_s'][setting]:.0f} s")
    for name, overrides in cfg.get("variants", {}).items():  # ablation variants on the same ERM model
        variant_cfg = {**cfg, "fair_overrides": {**cfg.get("fair_overrides", {}), **overrides}}
        for setting in settings:
            res = fairnet_defaults(erm, erm_pred, ds, setting, task_type, variant_cfg, seed,
                                   os.path.join(tmp, f"{setting}-{name}"), collate, n_boot)
            run.setdefault("variants", {}).setdefault(name, {})[setting] = res
            dlog(f"{task} seed {seed} {setting} [{name}]: ACC {res['accuracy']['point']:.3f} WGA "
                 f"{res['worst_group_accuracy']['point']:.3f}")
    return run


def defaults_task(task: str, cfg: dict, a) -> dict:
    """Every seed of one task: {'config', 'runs', 'summary'}, or {'skipped': why} when its loader is missing."""
    runs = {}
    if getattr(a, "fair_args", None):  # an ablation: these FairTrainingArguments on top of the defaults
        cfg = {**cfg, "fair_overrides": {**cfg.get("fair_overrides", {}), **a.fair_args}}
    if getattr(a, "variants", None):  # ablation variants, each beside the defaults on the same ERM model
        cfg = {**cfg, "variants": a.variants}
    for seed in a.seed_list:
        run = defaults_seed(task, cfg, seed, a.setting_list, a.n_boot, os.path.join(a.out, "tmp", task),
                            os.path.join(a.out, "passes"))
        if run is None:
            break
        runs[str(seed)] = run
    if not runs:
        loader_name = task_loader(task)[0] or "load_*_text"
        dlog(f"{task}: skipped: fairnet_peft.data has no {loader_name} yet")
        return {"skipped": f"fairnet_peft.data has no {loader_name}"}
    return {"config": cfg, "runs": runs, "summary": summarise_task(task, runs)}


def defaults_parallel(script: str, argv: list, a) -> dict:
    """--jobs N: one child process per task (same flags, its own --out, no doc); their tasks are merged."""
    done: dict = {}

    def collect(task: str, returncode: int, out: str) -> None:
        if returncode != 0:
            raise RuntimeError(f"--jobs: the {task} process exited with {returncode}")
        with open(os.path.join(out, "results.json")) as f:
            done[task] = json.load(f)["tasks"][task]

    order = sorted(a.task_list, key=lambda t: TASKS[t][1] != "minilm")  # the slow MiniLM tasks start first
    commands = {}
    for task in order:
        out = os.path.join(a.out, f"task-{task}")
        overrides = {"--tasks": task, "--out": out, "--doc": "none", "--jobs": 1}
        commands[task] = ([sys.executable, script, *child_argv(argv, overrides)], out)
    run_pool(commands, a.jobs, collect, keep_on_stop=False)
    return {t: done[t] for t in a.task_list}


def run_defaults(script: str, argv: list, a, report: dict) -> None:
    """Every task of `a` into report['tasks'] (children with --jobs); the trainers' folders go at the end."""
    try:
        if a.jobs > 1 and len(a.task_list) > 1:
            report["tasks"] = defaults_parallel(script, argv, a)
        for task in [t for t in a.task_list if t not in report["tasks"]]:
            report["tasks"][task] = defaults_task(task, DEFAULTS_PRESETS[a.preset][task], a)
    finally:
        shutil.rmtree(os.path.join(a.out, "tmp"), ignore_errors=True)
