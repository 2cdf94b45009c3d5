"""What the examples write and print after training (not part of the package).

`save_outputs` writes --output-dir: adapter/ (`model.save_pretrained` with our model card on top of the package's
"Fairness evaluation" section), group_accuracies.png and metrics.json. `push_outputs` pushes the ERM base model and
the adapter (`model.push_to_hub`) with the card. `print_summary` prints the ERM vs FairNet table on the main process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import warnings
from typing import Optional

import numpy as np

import common
from common import PICKLED, dist_state, log

CARD_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md")
SUMMARY_COLUMNS = (("ACC", "accuracy"), ("WGA", "worst_group_accuracy"), ("EOD", "equalized_odds_difference"),
                   ("gate rate s=0", "gate_rate_s0"), ("gate rate s=1", "gate_rate_s1"))


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary_table(results: dict[str, dict], *, markdown: bool = False) -> str:
    """ERM vs FairNet: ACC, WGA (min over label × group cells), EOD (mean of |ΔTPR|, |ΔFPR|), gate rate per group."""
    header = ["model"] + [name for name, _ in SUMMARY_COLUMNS]
    rows = [[name] + [_fmt(m.get(key)) for _, key in SUMMARY_COLUMNS] for name, m in results.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    rule = "-" * len(fmt(header))
    return "\n".join([rule, fmt(header), rule] + [fmt(r) for r in rows] + [rule])


def model_card(*, title: str, base_model: str, loader: str, results: dict, details: dict, repo_or_dir: str) -> str:
    """The card text (examples/model_card.md) above the package's "Fairness evaluation" section."""
    with open(CARD_TEMPLATE, encoding="utf-8") as f:
        template = string.Template(f.read())
    return template.substitute(base_model=base_model, title=title, loader=loader, where=repr(repo_or_dir),
                               details="\n".join(f"| {k} | {v} |" for k, v in details.items()),
                               table=summary_table(results, markdown=True))


def _strict_json(value):
    """`value` as strict JSON takes it: NaN and ±inf (e.g. a TPR/FPR ratio with no false positives) become null,
    which every JSON parser reads (Python's NaN literal is not JSON); numpy scalars become Python numbers; anything
    else without a JSON form becomes its string."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _add_card_tags(path: str, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys(list(card.data.tags or []) + tags))
    card.save(path)


def output_paths(output_dir: str) -> dict:
    out = os.path.abspath(output_dir)
    adapter_dir = os.path.join(out, "adapter")
    return {"adapter": adapter_dir, "plot": os.path.join(out, "group_accuracies.png"),
            "metrics": os.path.join(out, "metrics.json"), "model_card": os.path.join(adapter_dir, "README.md")}


def save_outputs(*, args, model, card: str, fair_test: dict, cells: dict, metrics: dict) -> dict:
    """Adapter + model card, group-accuracy plot and metrics.json in --output-dir.

    Every process calls it: under FSDP the adapter's shards are gathered (`save_adapter`, a collective) and the main
    process writes; everything else is written by the main process alone."""
    from fairnet_peft.evaluation.model_card import attach_fairness_report
    from fairnet_peft.evaluation.plots import plot_group_accuracies
    from fairnet_peft.training.distributed import save_adapter

    paths = output_paths(args.output_dir)
    main = dist_state().is_main_process
    if main:
        os.makedirs(paths["adapter"], exist_ok=True)
        for scratch in ("predict", "erm_trainer"):  # Trainer output dirs that stay empty (save_strategy="no")
            path = os.path.join(os.path.abspath(args.output_dir), scratch)
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        # Our card first; save_pretrained then lets PEFT update its metadata, and the attached report adds the
        # "Fairness evaluation" section (the FairNet test metrics).
        with open(paths["model_card"], "w", encoding="utf-8") as f:
            f.write(card)
    attach_fairness_report(model, fair_test, split="test")
    dist_state().wait_for_everyone()
    save_adapter(model, paths["adapter"])  # every process: gathers FSDP shards; the main process writes
    if not main:
        return paths
    _add_card_tags(paths["model_card"], ["fairness", "fairnet", "fairlora"])
    group = metrics.get("minority_group")
    plot_group_accuracies(cells, paths["plot"], title="Test accuracy per (label × group) cell"
                          + (f"; s=1: {group}" if group else ""), class_names=metrics.get("class_names"))
    with open(paths["metrics"], "w") as f:
        json.dump(_strict_json({**metrics, "outputs": paths}), f, indent=2, allow_nan=False)
    return paths


def _push_base_model(api, erm_dir: str, base_id: str, scratch: str) -> None:
    """Upload the ERM model (without the cache's own key files, nor a pickle an older cache may hold) to `base_id`."""
    api.create_repo(base_id, exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(erm_dir, scratch, ignore=shutil.ignore_patterns("erm_key.json", "erm_info.json", *PICKLED))
    api.upload_folder(repo_id=base_id, folder_path=scratch, commit_message="ERM base model for a FairLoRA adapter")
    shutil.rmtree(scratch, ignore_errors=True)


def push_outputs(*, args, model, erm_dir: str, card_path: str) -> dict:
    """Push the ERM base model and the adapter (model.push_to_hub), then the model card (main process only)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not dist_state().is_main_process:
        return {}
    api = HfApi()
    base_id = args.hub_base_id or f"{args.hub_model_id}-erm"
    _push_base_model(api, erm_dir, base_id, os.path.join(args.output_dir, "erm_upload"))
    config = model.peft_config[model.active_adapter]
    local_base = config.base_model_name_or_path
    config.base_model_name_or_path = base_id  # so AutoPeftModel*.from_pretrained(<adapter repo>) finds the base
    try:
        with warnings.catch_warnings():  # PEFT probes the base repo for a changed vocabulary; it has not changed
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.push_to_hub(args.hub_model_id, commit_message="FairLoRA adapter (fairnet_peft)")
    finally:
        config.base_model_name_or_path = local_base
    with open(card_path, encoding="utf-8") as f:  # the local card, with the Hub ids instead of local paths
        card = f.read().replace(repr(os.path.dirname(card_path)), repr(args.hub_model_id))
    tmp = card_path + ".hub"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(card.replace(local_base, base_id))
    try:
        api.create_commit(repo_id=args.hub_model_id, commit_message="Model card with the fairness table",
                          operations=[CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=tmp)])
    finally:
        os.remove(tmp)
    return {"adapter_repo": args.hub_model_id, "base_repo": base_id}


def selection_line(train_metrics: dict) -> str:
    """What the selection after training chose, from FairTrainer's train metrics: τ and α (with the fairer
    correction the limits held back, `train_selection_held_back`), or why the adapter is off
    (`train_selection_reason`); empty when nothing was selected. An adapter switched off before any candidate was
    searched (the detector cannot find the group: no `train_selection_candidates`) is not called a selection."""
    if "train_selection_threshold" not in train_metrics:
        return ""
    rows = f"{train_metrics.get('train_selection_rows', float('nan')):.0f} held-out rows"
    if train_metrics.get("train_selection_adapter_off") and "train_selection_candidates" not in train_metrics:
        return f"no selection: the adapter is off ({train_metrics.get('train_selection_reason', 'τ = 1')})"
    if train_metrics.get("train_selection_adapter_off"):
        return f"selection on {rows}: the adapter is off ({train_metrics.get('train_selection_reason', 'τ = 1')})"
    from fairnet_peft.evaluation.report import format_threshold

    held = train_metrics.get("train_selection_held_back")
    return (f"selection on {rows}: tau = {format_threshold(train_metrics['train_selection_threshold'])}"
            f"{_gate_share(train_metrics)}, "
            f"strength = {train_metrics['train_selection_strength']:g}{_held_out_change(train_metrics)}"
            + (f" (held back: {held})" if held else ""))


def _gate_share(m: dict) -> str:
    """' (gate on a % of them, b % of the majority)': what τ means on the held-out rows, whose risk scale is the
    detector's own (τ = 0.99997 can gate a tenth of the rows); empty when the metrics do not say."""
    rate, majority = m.get("train_selection_gate_rate"), m.get("train_selection_majority_gate_rate")
    if rate is None or math.isnan(rate):
        return ""
    return (f" (gate on {100 * rate:.1f} % of them" + ("" if majority is None or math.isnan(majority)
                                                      else f", {100 * majority:.1f} % of the majority") + ")")


def _held_out_change(m: dict) -> str:
    """', held-out ACC a → b, WGA c → d' (%), or that the correction moved neither and won on the worst-group loss;
    empty when the metrics do not say."""
    keys = ("accuracy", "accuracy_off", "worst_group_accuracy", "worst_group_accuracy_off")
    values = [m.get(f"train_selection_{k}") for k in keys]
    if any(v is None for v in values):
        return ""
    acc, acc_off, wga, wga_off = (100 * float(v) for v in values)
    if acc == acc_off and (wga == wga_off or math.isnan(wga) and math.isnan(wga_off)):
        return (f"; held-out ACC and WGA as with the adapter off ({acc:.1f} / {wga:.1f} %), kept for a lower "
                "worst-group loss")
    return f"; held-out ACC {acc_off:.1f} → {acc:.1f} %, WGA {wga_off:.1f} → {wga:.1f} %"


def print_summary(*, setting: str, name: str, results: dict, timings: dict, paths: dict, pushed: dict,
                  memory: Optional[dict] = None, selection: str = "") -> None:
    log("")
    log(f"{name}: ERM vs FairNet on the test split ({setting} setting)")
    log(summary_table(results))
    log("WGA = worst (label x group) cell accuracy; EOD = mean of |dTPR|, |dFPR| (more than two classes: averaged over\n"
        "the classes, each against the rest); gate rate = P(LoRA on | s).")
    if selection:
        log(selection)
    log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if memory:
        log("peak GPU memory (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
    log(f"outputs: {paths.get('adapter')}, {paths.get('plot')}, {paths.get('metrics')}")
    if pushed:
        log(f"pushed: adapter → {pushed['adapter_repo']}, ERM base → {pushed['base_repo']}")


def _card_details(card: dict, *, setting: str, erm_dir: str, n_train: int, n_test: int, tau: float,
                  strength: float) -> dict:
    off = tau >= 1.0  # the gate is risk > τ and risk ≤ 1: no row is gated
    return {**card["details"], "classes": ", ".join(map(str, card["class_names"])), "label setting": setting,
            "ERM base model": erm_dir, "train / test rows": f"{n_train} / {n_test}",
            "gate threshold τ": f"{tau:g}" + (" (the adapter is off)" if off else ""),
            "adapter strength α": f"{strength:g}" + (" (unused: no row is gated)" if off else "")}


def finish_run(*, args, kind: str, model, trainer, train_result, erm: tuple, data, logits: dict, results: dict,
               card: dict, timings: dict, memory: Optional[dict] = None) -> dict:
    """Step 6 of the examples: model card, metrics.json, adapter, plot (→ push) and the printed table.

    `data` is the DatasetDict trained and tested on; `erm` is (ERM directory, ERM training info); `logits` and
    `results` map "ERM"/"FairNet" to the test logits and test metrics; `card` holds title, loader, details and
    class_names; `memory` is the peak GPU memory (GiB) per step, empty without a GPU."""
    erm_dir, erm_info = erm
    test = data["test"]
    config = model.peft_config[model.active_adapter]
    fair_test, tau, strength = results["FairNet"], float(config.threshold), float(config.adapter_strength)
    cells = {name: common.cell_accuracies(pred, test["labels"], test["sensitive"]) for name, pred in logits.items()}
    paths = output_paths(args.output_dir)
    setting = common.setting_text(args, trainer.label_setting, trainer.train_dataset[trainer.args.sensitive_column])
    details = _card_details(card, setting=setting, erm_dir=erm_dir, n_train=len(data["train"]), n_test=len(test),
                            tau=tau, strength=strength)
    text = model_card(title=card["title"], base_model=erm_dir, loader=card["loader"], results=results,
                      details=details, repo_or_dir=paths["adapter"])
    metrics = {"task": kind, "setting": args.setting, "label_setting_inferred": trainer.label_setting,
               "erm": results["ERM"], "fairnet": fair_test, "threshold": tau, "adapter_strength": strength,
               "fairnet_train": dict(train_result.metrics), "erm_train": erm_info, "erm_dir": erm_dir,
               "cells_test": cells, "class_names": [str(n) for n in card["class_names"]],
               "minority_group": card["details"].get("minority group (s=1)"), "timings_s": timings,
               "peak_gpu_memory_gib": memory or {}, "args": vars(args),
               "mixed_precision": trainer.accelerator.mixed_precision, "world_size": dist_state().num_processes,
               "distributed_type": str(dist_state().distributed_type).rsplit(".", 1)[-1]}
    paths = save_outputs(args=args, model=model, card=text, fair_test=fair_test, cells=cells, metrics=metrics)
    pushed = push_outputs(args=args, model=model, erm_dir=erm_dir, card_path=paths["model_card"]) \
        if args.push_to_hub else {}
    print_summary(setting=setting, name=kind, results=results, timings=timings, paths=paths, pushed=pushed,
                  memory=memory, selection=selection_line(train_result.metrics))
    dist_state().wait_for_everyone()
    return {"erm": results["ERM"], "fairnet": fair_test, "paths": paths, "pushed": pushed, "timings": timings,
            "label_setting": trainer.label_setting}
