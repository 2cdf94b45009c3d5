"""FairNet runs of both suites, on a copy of the selected ERM model.

`train_at_defaults` is the one way both suites build FairNet as users get it: `get_peft_model(erm,
FairLoraConfig(task_type))` and `FairTrainer` with `FairTrainingArguments` that set only the output dir, epochs, batch
sizes, seed and logging (no FairNet knob), the validation split as `eval_dataset`, the group labels the setting sees
(`data.setting_view`, i.e. `fairnet_peft.data.hide_group_labels`). Quality: `run_fairnet_defaults` (FairNet-Full /
Partial / Unlabeled rows: the model as the trainer hands it back, its test gate, the τ sweep and, in the full setting,
the oracle row with the test group as the gate); `run_fairnet` (the ablation rows: the suite's own grid, trained once
per grid point, (grid point, epoch, τ) selected on validation). Defaults suite (`fairnet_defaults`): test metrics with
bootstrap CIs, gate rates, detector/probe AUCs and the pseudo-labels against the true groups.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import numpy as np

from .common import epoch_callback, finite, logger, quiet, run_args
from .config import SELECTION_VARIANTS, FAIR_GRID_KEYS, FAIR_VARIANTS, FAIRNET_DEFAULTS, LABEL_FRACTION, TAU_GRID
from .data import Collator, InputStore, hf_dataset, setting_groups, setting_view
from .methods import (Context, bootstrap_scores, evaluate_candidate, gated_predictions, predict, sweep_rows,
                      test_result, training_args)
from .replay import dump_passes
from .selection import Selector, restore, setting_grid, snapshot, tau_candidates

log, dlog = logger("quality"), logger("defaults")


def _in_lora_stage(trainer) -> bool:
    return trainer.stage == "lora"


def _fair_args(ctx: Context, name: str, cfg: dict, grid_index: int):
    """FairTrainingArguments of one variant at one grid point (`cfg` = the preset with the point applied)."""
    from fairnet_peft import FairTrainingArguments

    spec = FAIR_VARIANTS[name]
    extra = dict(sensitive_column="sensitive", detector_epochs=cfg["detector_epochs"],
                 detector_learning_rate=cfg["detector_lr"], margin=cfg["margin"],
                 task_loss_weight=cfg["task_loss_weight"], lora_objective=spec["objective"],
                 pseudo_labeler=cfg.get("pseudo_labeler", "lof"),
                 lof_contamination=cfg["lof_contamination"], lof_n_neighbors=cfg["lof_n_neighbors"],
                 anchor_weighting=cfg.get("anchor_weighting", "none"),
                 gate_threshold=0.0 if spec["tau"] == 0.0 else None, weight_decay=0.0,
                 # this benchmark's protocol picks (epoch, τ) on validation: keep its stages epoch-sized, with
                 # no update floors and no detector early stopping (defaults.py measures the library defaults),
                 # and the LoRA trained whatever the blind check says (the grid reads it with its own gate)
                 lora_min_updates=0, detector_min_updates=0, detector_holdout_fraction=0.0, train_lora_when_blind=True)
    extra.update({key: cfg[key] for key in ("negative_strategy", "distance") if key in cfg})
    return training_args(ctx, f"{name}-{grid_index}", epochs=cfg["fair_epochs"], lr=cfg["fair_lr"],
                         cls=FairTrainingArguments, **extra)


def _offer_taus(ctx: Context, model, sel: Selector, taus: Optional[tuple], use_val_s: bool, **where) -> None:
    """Offer every τ candidate of `model` at this epoch to `sel` (validation; one lazy snapshot for all of them)."""
    val, off_val = ctx.split("validation"), ctx.erm["validation"]["logits"]
    scores = predict(model, val.store, ctx.cfg["eval_batch_size"], gate="on")
    snap: dict = {}

    def lazy_snapshot():
        if not snap:
            snap.update(snapshot(model))
        return snap

    for tau in taus or tau_candidates(scores["risk"]):
        pred = gated_predictions(off_val, scores["logits"], scores["risk"], tau)
        sel.offer(evaluate_candidate(ctx, np.eye(2)[pred], use_val_s, **where, tau=tau), lazy_snapshot)


def _train_fairnet(ctx: Context, name: str, sens: np.ndarray, point: dict, grid_index: int, sel: Selector,
                   taus: Optional[tuple], use_val_s: bool):
    """Train one FairNet model (one point of the hyper-parameter grid); `sel` sees its (epoch, τ) candidates."""
    from peft import get_peft_model

    from fairnet_peft import FairLoraConfig, FairTrainer

    train = ctx.split("train")
    model = get_peft_model(copy.deepcopy(ctx.erm_model), FairLoraConfig(**ctx.bundle.fair_config))
    holder: dict = {}

    def on_epoch(m, epoch):
        _offer_taus(ctx, m, sel, taus, use_val_s, grid=grid_index, epoch=epoch)

    trainer = FairTrainer(model=model, args=_fair_args(ctx, name, {**ctx.cfg, **point}, grid_index),
                          train_dataset=hf_dataset(train, sensitive=sens),
                          data_collator=Collator(train.store, ("sensitive", "fairnet_row")),
                          callbacks=[epoch_callback(on_epoch, lambda: _in_lora_stage(holder["t"]))])
    holder["t"] = trainer
    quiet(trainer).train()
    stats = {"label_setting": trainer.label_setting, "skipped_batches": int(trainer.skipped_batches),
             "train_detector_stats": {k: float(v) for k, v in trainer.detector_stats.items()}}
    del trainer
    return model, stats


def _train_groups(ctx: Context, setting: str) -> np.ndarray:
    """The train group labels a setting sees (`data.setting_groups`: `fairnet_peft.data.hide_group_labels`)."""
    train, val = ctx.split("train"), ctx.split("validation")
    train_s, _ = setting_groups({"train": train.labels, "validation": val.labels},
                                {"train": train.sensitive, "validation": val.sensitive}, setting, ctx.seed,
                                ctx.cfg["label_fraction"])
    return train_s


def _search_grid(ctx: Context, name: str, sens: np.ndarray, grid: list, sel: Selector) -> tuple:
    """Train every grid point; returns (model, stats) of the point holding `sel`'s best candidate, and the points
    that could not be trained (an empty error set) with their error."""
    spec = FAIR_VARIANTS[name]
    use_val_s = spec["setting"] == "full"
    taus = None if spec["tau"] == "grid" else (float(spec["tau"]),)  # None: tau_candidates of each epoch
    best, grid_errors = None, {}
    for gi, point in enumerate(grid):
        before = sel.best
        try:
            model, stats = _train_fairnet(ctx, name, sens, point, gi, sel, taus, use_val_s)
        except ValueError as err:  # the ERM model fits every training row: the error set is empty
            if len(grid) == 1 or "marked no minority rows" not in str(err):
                raise
            grid_errors[gi] = str(err)
            log(f"  {name}: grid point {point} not trainable: {err}")
            continue
        if sel.best is not before:  # this grid point holds the best candidate so far: keep its model
            best = (model, stats)
        del model
    if sel.best is None:
        raise ValueError(f"{name}: no grid point could be trained: {grid_errors}")
    return best, grid_errors


def run_fairnet(ctx: Context, name: str) -> dict:
    """One FairNet variant: grid × epochs × τ selected on validation, then its test metrics, gate rates and sweep."""
    spec, cfg = FAIR_VARIANTS[name], ctx.cfg
    sens = _train_groups(ctx, spec["setting"])
    metric = "worst_group_accuracy" if spec["setting"] == "full" else "worst_class_accuracy"
    grid = setting_grid(list(cfg.get("fair_grid") or [{}]), spec["setting"])
    sel = Selector(metric, ctx.erm_val_acc)
    try:
        (model, stats), grid_errors = _search_grid(ctx, name, sens, grid, sel)
    except ValueError as err:  # the trainer refused every grid point (e.g. no anchors): ERM's predictions
        log(f"  {name}: FairTrainer raised, reporting ERM's predictions: {err}")
        return test_result(ctx, ctx.erm["test"]["logits"].argmax(-1), trainer_error=str(err), tau=1.0, grid=grid,
                           detector_tpr=0.0, detector_fpr=0.0, gate_rate=0.0,
                           train_labelled_rows=int((sens >= 0).sum()))
    restore(model, sel.state)
    tau = float(sel.best["tau"])
    model.peft_config[model.active_adapter].threshold = tau
    test = ctx.split("test")
    on = predict(model, test.store, cfg["eval_batch_size"], gate="on")
    off = ctx.erm["test"]["logits"]
    gate = on["risk"] > tau
    point = grid[int(sel.best["grid"])]
    result = test_result(
        ctx, gated_predictions(off, on["logits"], on["risk"], tau), selected=sel.best,
        hyper_parameters={**{k: cfg[k] for k in FAIR_GRID_KEYS if k in cfg}, **point},
        grid=grid, grid_errors=grid_errors, val_history=sel.history, tau=tau, **stats,
        detector_tpr=float(gate[test.sensitive == 1].mean()), detector_fpr=float(gate[test.sensitive == 0].mean()),
        gate_rate=float(gate.mean()), train_labelled_rows=int((sens >= 0).sum()),
        sweep=sweep_rows(off, on["logits"], on["risk"], test.labels, test.sensitive, TAU_GRID),
    )
    if spec["setting"] == "full" and spec["tau"] == "grid" and spec["objective"] == "contrastive":
        oracle = np.where(test.sensitive == 1, on["logits"].argmax(-1), off.argmax(-1))  # the test group is the gate
        result["oracle_gate"] = test_result(ctx, oracle, detector_tpr=1.0, detector_fpr=0.0)
    return result


def train_at_defaults(erm, train, eval_dataset, fair_config: dict, out: str, seed: int, epochs: float, batch: int,
                      eval_batch: int, collate, **plumbing):
    """FairNet as users get it, on a copy of `erm`: `FairLoraConfig(**fair_config)` (the task type, and for a model cut
    below its frozen blocks the block that is the full model's default detector layer) and `FairTrainer` at default
    `FairTrainingArguments`: only output dir, epochs, batch sizes, seed and logging are set (`common.run_args`), plus
    `plumbing`: data-loading fields such as `remove_unused_columns`, and in the tiny test presets only the capped
    update floors (`config.TINY_FAIR_OVERRIDES`). One field departs from the defaults and changes no model handed
    back: `train_lora_when_blind=True`, so that where the detector cannot find the group (the adapter is off either
    way) the LoRA still trains, for the rows that read it: the oracle gate, the selection variants and the saved
    passes (`replay.dump_passes`) that `reselect.py` replays with other `min_detector_auc` values. Returns (trainer,
    train metrics)."""
    from peft import get_peft_model

    from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments

    model = get_peft_model(copy.deepcopy(erm), FairLoraConfig(**fair_config))
    args = FairTrainingArguments(**run_args(out, seed, epochs, batch, eval_batch), train_lora_when_blind=True,
                                 **plumbing)
    trainer = quiet(FairTrainer(model, args, train_dataset=train, eval_dataset=eval_dataset, data_collator=collate))
    return trainer, trainer.train().metrics


def _gates(predictions, n: int) -> tuple:
    """(logits, risk, gate) of `trainer.predict(...).predictions`, one risk and gate per row."""
    logits, risk, gate = predictions[:3]
    return (np.asarray(logits), np.asarray(risk, np.float64).reshape(n, -1)[:, 0],
            np.asarray(gate).reshape(n, -1)[:, 0] > 0)


def _train_summary(trainer, train_metrics: dict) -> dict:
    return dict(detector_auc=finite(train_metrics.get("train_detector_auc")),
                probe_auc=finite(train_metrics.get("train_probe_auc")),
                detector_auc_within_class=finite(train_metrics.get("train_detector_auc_within_class")),
                train_metrics={k: v for k, v in train_metrics.items() if isinstance(v, (int, float))})


def run_fairnet_defaults(ctx: Context, name: str) -> dict:
    """One FairNet-at-defaults row of the quality suite: `train_at_defaults` in the row's setting, then the test
    metrics of the model the trainer hands back (its own gate and τ), the gate rates, the τ sweep and (full) the
    oracle row with the test group label as the gate."""
    setting, cfg = FAIRNET_DEFAULTS[name], ctx.cfg
    train, val, test = (ctx.split(k) for k in ("train", "validation", "test"))
    train_s, val_s = setting_groups({"train": train.labels, "validation": val.labels},
                                    {"train": train.sensitive, "validation": val.sensitive}, setting, ctx.seed,
                                    cfg["label_fraction"])
    store = InputStore.concat([train.store, val.store, test.store])  # one collator for every split's row index
    collate = Collator(store, ("sensitive", "fairnet_row"))
    out = os.path.join(ctx.tmp, name.replace(" ", "_"))
    try:
        trainer, metrics = train_at_defaults(ctx.erm_model, hf_dataset(train, sensitive=train_s),
                                             hf_dataset(val, sensitive=val_s, offset=len(train)),
                                             ctx.bundle.fair_config, out, ctx.seed, cfg["fair_epochs"],
                                             cfg["batch_size"], cfg["eval_batch_size"], collate,
                                             remove_unused_columns=False, **cfg.get("fair_overrides", {}))
    except ValueError as err:  # the trainer refused (e.g. no anchors): the user keeps the ERM model
        log(f"  {name}: FairTrainer raised, reporting ERM's predictions: {err}")
        return test_result(ctx, ctx.erm["test"]["logits"].argmax(-1), trainer_error=str(err), tau=1.0,
                           label_setting=setting, train_labelled_rows=int((train_s >= 0).sum()),
                           detector_tpr=0.0, detector_fpr=0.0, gate_rate=0.0)
    model = trainer.model
    logits, risk, gate = _gates(trainer.predict(hf_dataset(test, offset=len(train) + len(val))).predictions,
                                len(test))
    s = test.sensitive
    res = test_result(ctx, logits.argmax(-1), tau=float(model.peft_config[model.active_adapter].threshold),
                      label_setting=trainer.label_setting, train_labelled_rows=int((train_s >= 0).sum()),
                      detector_tpr=float(gate[s == 1].mean()), detector_fpr=float(gate[s == 0].mean()),
                      gate_rate=float(gate.mean()), **_train_summary(trainer, metrics))
    bs = cfg["eval_batch_size"]
    on, off = predict(model, test.store, bs, gate="on"), predict(model, test.store, bs, gate="off")
    res["sweep"] = sweep_rows(off["logits"], on["logits"], on["risk"], test.labels, s, TAU_GRID)
    if setting == "full":  # the paper's train+test block: the test group label is the gate
        oracle = np.where(s == 1, on["logits"].argmax(-1), off["logits"].argmax(-1))
        res["oracle_gate"] = test_result(ctx, oracle, detector_tpr=1.0, detector_fpr=0.0)
    if ctx.passes_dir:  # `<dataset>-s<seed>-<setting>.npz`, the name benchmarks/reselect.py reads
        res["passes"] = dump_passes(trainer, hf_dataset(test, offset=len(train) + len(val)),
                                    os.path.join(ctx.passes_dir, f"{ctx.bundle.name}-s{ctx.seed}-{setting}.npz"),
                                    ctx.erm["test"]["logits"].argmax(-1))
    del trainer
    return res


def fairnet_defaults(erm, erm_pred, ds, setting: str, task_type, cfg: dict, seed: int, out: str, collate,
                     n_boot: int, passes: Optional[str] = None) -> dict:
    """FairNet at DEFAULT FairTrainingArguments on a copy of the ERM model; test metrics, gate, AUCs, pseudo-labels;
    `passes`: the .npz path for the selection's passes (`replay.dump_passes`, under "passes" in the result).
    When the trainer raises a ValueError (e.g. no anchor rows), the row is ERM's test predictions (what the user
    keeps) with the error under `trainer_error`."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    train_s = np.asarray(ds["train"]["sensitive"])
    seen = setting_view(ds, setting, seed, cfg.get("label_fraction", LABEL_FRACTION))
    y, s = (np.asarray(ds["test"][k]) for k in ("labels", "sensitive"))
    try:
        trainer, train_metrics = train_at_defaults(erm, seen["train"], seen["validation"], dict(task_type=task_type),
                                                   out, seed, cfg["fair_epochs"], cfg["batch"], cfg["eval_batch"],
                                                   collate, **cfg.get("fair_overrides", {}))
    except ValueError as err:  # the trainer refused (e.g. no anchors): the user keeps the ERM model
        dlog(f"  {setting}: FairTrainer raised, reporting ERM's predictions: {err}")
        res = bootstrap_scores(y, erm_pred, s, n_boot, seed)
        res.update(trainer_error=str(err), gate_rate_s0=0.0, gate_rate_s1=0.0, train_metrics={})
        return res
    logits, risk, gate = _gates(trainer.predict(ds["test"]).predictions, len(y))
    res = bootstrap_scores(y, logits.argmax(-1), s, n_boot, seed)
    res.update(gate_rate_s0=float(gate[s == 0].mean()), gate_rate_s1=float(gate[s == 1].mean()),
               test_risk_auc=float(roc_auc_score(s, risk)), **_train_summary(trainer, train_metrics))
    pseudo = trainer.pseudo_labels
    if setting == "unlabeled" and pseudo is not None:  # the pseudo-labeler against the true group (report only)
        pseudo = np.asarray(pseudo).reshape(-1)
        res.update(pseudo_precision=float(precision_score(train_s, pseudo, zero_division=0)),
                   pseudo_recall=float(recall_score(train_s, pseudo, zero_division=0)),
                   pseudo_details=dict(trainer.pseudo_label_details))
        res["selector"] = _selector(trainer, ds, collate)  # ρ of the label-free selectors with the true val WGA
    res["selection_variants"] = _selection_variants(trainer, ds["test"], y, s, n_boot, seed)
    if passes:
        res["passes"] = dump_passes(trainer, ds["test"], passes, erm_pred)
    return res


def _selection_variants(trainer, test, y, s, n_boot: int, seed: int) -> dict:
    """The same trained model with the selection after training redone under other rules (`SELECTION_VARIANTS`,
    `FairTrainer.reselect`: no retraining, the held-out passes are reused): test scores and the chosen τ and α of
    each. The trainer's own choice is restored at the end."""
    if trainer.run_state.stage != "done" or not trainer.run_state.selection.get("selected"):
        return {}
    out = {}
    for name, overrides in SELECTION_VARIANTS.items():
        trainer.reselect(**overrides)
        logits = np.asarray(trainer.predict(test).predictions[0])
        config = trainer.adapter_config
        out[name] = {**bootstrap_scores(y, logits.argmax(-1), s, n_boot, seed), "threshold": float(config.threshold),
                     "strength": float(config.adapter_strength)}
    trainer.reselect()
    return out


def _selector(trainer, ds, collate) -> dict:
    """`selection.selector_ranks` on this run: validation and test sweeps (gate forced off/on), the validation
    pseudo-groups from the labeler the trainer fitted on training."""
    from fairnet_peft.evaluation.sweep import collect_sweep_scores

    from .selection import selector_ranks

    def sweep(split):
        return collect_sweep_scores(trainer.model, ds[split], collate_fn=collate)
    groups = trainer.eval_pseudo_groups(ds["validation"].remove_columns("sensitive"))
    return selector_ranks(sweep("validation"), groups, sweep("test"))

