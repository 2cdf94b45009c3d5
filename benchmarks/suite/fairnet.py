"""FairNet runs of both suites, on a copy of the selected ERM model.

Quality (`run_fairnet`): one variant (Full/Partial/Unlabeled or an ablation) trained once per point of the preset's
grid; at every LoRA epoch the (epoch, τ) candidates go to the variant's `Selector` on validation; the best
candidate's LoRA is restored and evaluated on test, with the τ sweep and (Full) the oracle gate row. Defaults
(`fairnet_defaults`): `FairTrainer` with default `FairTrainingArguments`, test metrics with bootstrap CIs, gate
rates, detector/probe AUCs and the pseudo-labels against the true groups.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from .common import epoch_callback, finite, logger, quiet, run_args
from .config import FAIR_GRID_KEYS, FAIR_VARIANTS, TAU_GRID
from fairnet_peft.data import partial_group_labels

from .data import Collator, hf_dataset, partial_mask
from .methods import (Context, bootstrap_scores, evaluate_candidate, gated_predictions, predict, sweep_rows,
                      test_result, training_args)
from .selection import Selector, restore, setting_grid, snapshot, tau_candidates

log = logger("quality")


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
                 class_balanced_anchors=bool(cfg.get("class_balanced_anchors", False)),
                 gate_threshold=0.0 if spec["tau"] == 0.0 else None, weight_decay=0.0,
                 # this benchmark's protocol picks (epoch, τ) on validation: keep its stages epoch-sized, with
                 # no update floors and no detector early stopping (defaults.py measures the library defaults)
                 lora_min_updates=0, detector_min_updates=0, detector_holdout_fraction=0.0)
    extra.update({key: cfg[key] for key in ("negative_strategy", "distance") if key in cfg})
    return training_args(ctx, f"{name}-{grid_index}", epochs=cfg["fair_epochs"], lr=cfg["fair_lr"],
                         cls=FairTrainingArguments, **extra)


def _offer_taus(ctx: Context, model, sel: Selector, taus: Optional[tuple], use_val_s: bool, **where) -> None:
    """Offer every τ candidate of `model` at this epoch to `sel` (validation; one lazy snapshot for all of them)."""
    val, off_val = ctx.split("validation"), ctx.erm["validation"]["logits"]
    scores = predict(model, val.store, ctx.cfg["eval_batch_size"], gate_on=True)
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


def _train_groups(setting: str, train, cfg: dict, seed: int) -> np.ndarray:
    """The train group labels a setting sees: all, a seeded 10 % (-1 elsewhere) or none (all -1)."""
    if setting == "full":
        return train.sensitive
    if setting == "partial":
        return partial_group_labels(train.sensitive, cfg["label_fraction"], seed + 101)
    return np.full(len(train), -1)


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
    spec, cfg, train = FAIR_VARIANTS[name], ctx.cfg, ctx.split("train")
    sens = _train_groups(spec["setting"], train, cfg, ctx.seed)
    metric = "worst_group_accuracy" if spec["setting"] == "full" else "worst_class_accuracy"
    grid = setting_grid(list(cfg.get("fair_grid") or [{}]), spec["setting"])
    sel = Selector(metric, ctx.erm_val_acc)
    (model, stats), grid_errors = _search_grid(ctx, name, sens, grid, sel)
    restore(model, sel.state)
    tau = float(sel.best["tau"])
    model.peft_config[model.active_adapter].threshold = tau
    test = ctx.split("test")
    on = predict(model, test.store, cfg["eval_batch_size"], gate_on=True)
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
    if name == "FairNet-Full":  # the paper's train+test block: the test group label is the gate
        oracle = np.where(test.sensitive == 1, on["logits"].argmax(-1), off.argmax(-1))
        result["oracle_gate"] = test_result(ctx, oracle, detector_tpr=1.0, detector_fpr=0.0)
    return result


def fairnet_defaults(erm, ds, setting: str, task_type, cfg: dict, seed: int, out: str, collate, n_boot: int) -> dict:
    """FairNet at DEFAULT FairTrainingArguments on a copy of the ERM model; test metrics, gate, AUCs, pseudo-labels."""
    from peft import get_peft_model
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments

    train_s, train_y = np.asarray(ds["train"]["sensitive"]), np.asarray(ds["train"]["labels"])
    masked = {"full": train_s, "partial": partial_mask(train_s, train_y, seed),
              "unlabeled": np.full_like(train_s, -1)}[setting]
    train = ds["train"].remove_columns("sensitive").add_column("sensitive", masked.tolist()).with_format("torch")
    model = get_peft_model(copy.deepcopy(erm), FairLoraConfig(task_type=task_type))
    args = FairTrainingArguments(**run_args(out, seed, cfg["fair_epochs"], cfg["batch"], cfg["eval_batch"]))  # no FairNet knob: defaults
    trainer = quiet(FairTrainer(model, args, train_dataset=train, eval_dataset=ds["validation"],
                                 data_collator=collate))
    train_metrics = trainer.train().metrics
    logits, risk, gate = trainer.predict(ds["test"]).predictions[:3]
    y, s = (np.asarray(ds["test"][k]) for k in ("labels", "sensitive"))
    res = bootstrap_scores(y, logits.argmax(-1), s, n_boot, seed)
    gate = np.asarray(gate).reshape(len(y), -1)[:, 0] > 0
    risk = np.asarray(risk, np.float64).reshape(len(y), -1)[:, 0]
    res.update(gate_rate_s0=float(gate[s == 0].mean()), gate_rate_s1=float(gate[s == 1].mean()),
               test_risk_auc=float(roc_auc_score(s, risk)),
               detector_auc=finite(train_metrics.get("train_detector_auc")),
               probe_auc=finite(train_metrics.get("train_probe_auc")),
               train_metrics={k: v for k, v in train_metrics.items() if isinstance(v, (int, float))})
    pseudo = trainer.pseudo_labels
    if setting == "unlabeled" and pseudo is not None:  # the pseudo-labeler against the true group (report only)
        pseudo = np.asarray(pseudo).reshape(-1)
        res.update(pseudo_precision=float(precision_score(train_s, pseudo, zero_division=0)),
                   pseudo_recall=float(recall_score(train_s, pseudo, zero_division=0)),
                   pseudo_details=dict(trainer.pseudo_label_details))
        res["selector"] = _selector(trainer, ds, collate)  # issue 11 item 2: ρ of the label-free selectors
    return res


def _selector(trainer, ds, collate) -> dict:
    """`selection.selector_ranks` on this run: validation and test sweeps (gate forced off/on), the validation
    pseudo-groups from the labeler the trainer fitted on training."""
    from fairnet_peft.evaluation.sweep import collect_sweep_scores

    from .selection import selector_ranks

    def sweep(split):
        return collect_sweep_scores(trainer.model, ds[split], collate_fn=collate)
    groups = trainer.eval_pseudo_groups(ds["validation"].remove_columns("sensitive"))
    return selector_ranks(sweep("validation"), groups, sweep("test"))

