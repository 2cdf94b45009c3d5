"""The methods of the quality suite (ERM, GroupDRO, JTT, DFR, AFR; FairNet lives in `fairnet`) and the ERM of the
default-settings suite.

Quality: every runner takes the `Context` of one (dataset, seed), trains on its train split, offers its candidates
(epochs, and hyper-parameter points where a method has a grid) to a `selection.Selector` on validation, and returns
the test metrics of the selected model (`evaluate`: the one place metrics are computed). A baseline's result also
holds, under "floor", its row selected under FairNet's accuracy floor (`selection.floor_selector`). ERM runs first:
its selected model, logits and features seed JTT's error set, DFR's features and every FairNet variant; AFR trains its
own ERM on part of the train rows. Defaults suite: `train_erm` + `bootstrap_scores`.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .common import epoch_callback, quiet, run_args
from .config import ACC_TOLERANCE, AFR_GAMMAS, AFR_HOLDOUT, AFR_LAMBDAS, METRICS
from .data import Bundle, Collator, InputStore, Split, hf_dataset
from .selection import Selector, floor_selector, restore, snapshot


# ------------------------------------------------------------------------------------------------ prediction
def _head(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError("model has no classifier/score head")


@torch.no_grad()
def predict(model: nn.Module, store: InputStore, batch_size: int, *, gate: Optional[str] = None,
            features: bool = False) -> dict:
    """Logits for every row of `store`, in order; with `features` also the head's input. `gate` (FairLoRA models):
    None = no gate record, "on" / "off" = the gate forced on / off for every row, "model" = the model's own per-row
    decision; with any of the three the detector's risk comes back too, and with "model" the gate. Restores the
    model's train/eval mode."""
    from fairnet_peft import force_gate, gate_record

    if gate not in (None, "on", "off", "model"):
        raise ValueError(f"predict: gate must be None, 'on', 'off' or 'model', got {gate!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"logits": [], "risk": [], "gate": [], "features": []}
    hook = _head(model).register_forward_pre_hook(
        lambda m, a: out["features"].append(a[0].detach().float().cpu())) if features else None
    try:
        with (force_gate(model, gate == "on") if gate in ("on", "off") else nullcontext()):
            for start in range(0, len(store), batch_size):
                batch = store.batch(range(start, min(start + batch_size, len(store))))
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                out["logits"].append(logits.float().cpu())
                if gate is not None:
                    record = gate_record(model)
                    risk = record.risk if record.risk is not None else record.gate.float()
                    out["risk"].append(risk.float().reshape(len(logits), -1)[:, 0].cpu())
                    if gate == "model":
                        out["gate"].append(record.gate.reshape(len(logits), -1)[:, 0].bool().cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def evaluate(y, pred, s=None) -> dict:
    """Test/validation metrics of predicted labels through `fairnet_peft`'s one evaluation path
    (`evaluate_predictions`), plus the per-cell accuracies with their counts. `s=None`: the label-free ones only
    (accuracy, worst-class accuracy)."""
    from fairnet_peft.metrics import evaluate_predictions, group_accuracies

    keys = ("accuracy", "worst_class_accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_predictions(np.eye(2)[pred], y, sensitive_features=s, per_cell=False)
        if s is None:
            return {k: m[k] for k in keys}
        out = {k: m[k] for k in keys + ("worst_group_accuracy", "equalized_odds_difference")}
        out["group_accuracies"] = group_accuracies(y, pred, sensitive_features=s)
    return out


def gated_predictions(logits_off, logits_on, risk, tau: float) -> np.ndarray:
    """FairNet's prediction at threshold τ: the corrected logits where risk > τ (strict), else the base model's."""
    return np.where(risk > tau, logits_on.argmax(-1), logits_off.argmax(-1))


def sweep_rows(logits_off, logits_on, risk, labels, sensitive, taus) -> list[dict]:
    """ACC/WGA/EOD/TPR/FPR per τ (`fairnet_peft.evaluation.sweep.sweep_metrics`)."""
    from fairnet_peft.evaluation.sweep import SweepScores, sweep_metrics

    return sweep_metrics(SweepScores(logits_off, logits_on, risk.astype(np.float32), labels, sensitive), taus)


# ------------------------------------------------------------------------------------------------ quality runners
@dataclass
class Context:
    """Everything one (dataset, seed) run shares between methods."""

    bundle: Bundle
    cfg: dict
    seed: int
    tmp: str
    erm_model: Optional[nn.Module] = None
    erm: dict = field(default_factory=dict)  # val/test logits + features of the selected ERM model
    jtt_errors: Optional[np.ndarray] = None
    erm_val_acc: Optional[float] = None
    passes_dir: Optional[str] = None  # FairNet-at-defaults rows save their selection passes here (replay.dump_passes)

    def split(self, name: str) -> Split:
        return self.bundle.splits[name]


def training_args(ctx: Context, name: str, *, epochs: float, lr: float, cls=None, **extra):
    """`cls` (default `TrainingArguments`) for one method of this run: the preset's optimiser settings, no saving or
    evaluation by the Trainer (selection runs in epoch callbacks), `extra` last (it may override any field)."""
    from transformers import TrainingArguments

    cfg = ctx.cfg
    out = os.path.join(ctx.tmp, name.replace(" ", "_").replace("/", "_"))
    fields = dict(run_args(out, ctx.seed, epochs, cfg["batch_size"], cfg["eval_batch_size"]), learning_rate=lr,
                  warmup_steps=cfg["warmup_ratio"], weight_decay=cfg["weight_decay"],
                  lr_scheduler_type=cfg["scheduler"], eval_strategy="no", data_seed=ctx.seed,
                  remove_unused_columns=False)
    return (cls or TrainingArguments)(**{**fields, **extra})


def evaluate_candidate(ctx: Context, logits: np.ndarray, use_val_s: bool, **extra) -> dict:
    val = ctx.split("validation")
    m = evaluate(val.labels, logits.argmax(-1), val.sensitive if use_val_s else None)
    m.pop("group_accuracies", None)
    m.pop("equalized_odds_difference", None)
    return {**extra, **m}


def test_result(ctx: Context, pred: np.ndarray, **extra) -> dict:
    test = ctx.split("test")
    return {**evaluate(test.labels, pred, test.sensitive), **extra}


def fit_erm(ctx: Context, train: Split, name: str, on_epoch: Optional[Callable] = None):
    """A fresh model trained on `train` with the ERM recipe; the epoch with the best validation accuracy is restored.
    Returns (model, selector). `on_epoch(model, epoch)` runs after each epoch's validation pass."""
    from transformers import Trainer

    cfg = ctx.cfg
    model = ctx.bundle.new_model()
    sel = Selector("accuracy")
    bs = cfg["eval_batch_size"]

    def epoch_end(m, epoch):
        sel.offer(evaluate_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], False, epoch=epoch),
                  lambda: snapshot(m))
        if on_epoch is not None:
            on_epoch(m, epoch)

    trainer = Trainer(model=model, args=training_args(ctx, name, epochs=cfg["erm_epochs"], lr=cfg["erm_lr"]),
                      train_dataset=hf_dataset(train), data_collator=Collator(train.store),
                      callbacks=[epoch_callback(epoch_end)])
    quiet(trainer).train()
    restore(model, sel.state)
    model.eval()
    return model, sel


def run_erm(ctx: Context) -> dict:
    cfg, train = ctx.cfg, ctx.split("train")
    bs = cfg["eval_batch_size"]

    def on_epoch(m, epoch):
        if epoch == cfg["jtt_T"]:  # JTT's early-stopped ERM: its training errors are the error set
            ctx.jtt_errors = predict(m, train.store, bs)["logits"].argmax(-1) != train.labels

    model, sel = fit_erm(ctx, train, "erm", on_epoch)
    ctx.erm_model = model
    ctx.erm_val_acc = sel.best["accuracy"]
    for name in ("validation", "test"):
        ctx.erm[name] = predict(model, ctx.split(name).store, bs, features=True)
    if ctx.jtt_errors is None:  # fewer ERM epochs than T: use the last epoch
        ctx.jtt_errors = predict(model, train.store, bs)["logits"].argmax(-1) != train.labels
    return test_result(ctx, ctx.erm["test"]["logits"].argmax(-1), selected=sel.best, val_history=sel.history)


def as_grid(value) -> list:
    """A preset value that may be one number or a list of them (a grid searched on validation)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _label_free(cand: dict) -> dict:
    return {k: v for k, v in cand.items() if k != "worst_group_accuracy"}


def _train_with_floor_row(ctx: Context, metric: str, grid_key: str, grid: list, make_trainer) -> tuple:
    """Train one fresh model per grid value; at every epoch offer the candidate to the method's own selector (`metric`
    with the ACC floor; label-free metrics never see the validation groups) and to the ACC-floor row's selector.
    Returns the two (selector, test predictions) pairs."""
    bs = ctx.cfg["eval_batch_size"]
    own, floor = Selector(metric, ctx.erm_val_acc), floor_selector(ctx.erm_val_acc)
    for value in grid:
        model = ctx.bundle.new_model()

        def on_epoch(m, epoch, value=value):
            cand = evaluate_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], True, epoch=epoch,
                                      **{grid_key: value})
            snap: dict = {}

            def lazy():
                if not snap:
                    snap.update(snapshot(m))
                return snap
            own.offer(cand if metric == "worst_group_accuracy" else _label_free(cand), lazy)
            floor.offer(cand, lazy)

        quiet(make_trainer(model, value, [epoch_callback(on_epoch)])).train()
    out = []
    for sel in (own, floor):
        model = ctx.bundle.new_model()
        restore(model, sel.state)
        out.append((sel, predict(model, ctx.split("test").store, bs)["logits"].argmax(-1)))
    return out


def _floor_result(ctx: Context, sel: Selector, pred: np.ndarray, **extra) -> dict:
    return test_result(ctx, pred, selected=sel.best, floor_met=sel.floor_met, **extra)


def run_groupdro(ctx: Context) -> dict:
    from .baselines import GroupDROTrainer

    cfg, train = ctx.cfg, ctx.split("train")
    cells = np.bincount(train.labels * 2 + train.sensitive, minlength=4)
    trainers: list = []

    def make(model, eta, callbacks):
        trainer = GroupDROTrainer(model=model, args=training_args(ctx, f"groupdro-{eta}", epochs=cfg["erm_epochs"],
                                                                    lr=cfg["erm_lr"]),
                                  train_dataset=hf_dataset(train),
                                  data_collator=Collator(train.store, ("sensitive",)), callbacks=callbacks, eta=eta,
                                  adjustment=cfg["dro_adjustment"], cell_counts=cells.tolist())
        trainers.append(trainer)
        return trainer

    (own, pred), (floor, floor_pred) = _train_with_floor_row(ctx, "worst_group_accuracy", "eta",
                                                             as_grid(cfg["dro_eta"]), make)
    return test_result(ctx, pred, selected=own.best, val_history=own.history,
                       final_q=[[round(float(q), 4) for q in t.q] for t in trainers],
                       floor=_floor_result(ctx, floor, floor_pred))


def run_jtt(ctx: Context) -> dict:
    from .baselines import WeightedTrainer, jtt_weights

    cfg, train = ctx.cfg, ctx.split("train")
    errors = ctx.jtt_errors

    def make(model, lambda_up, callbacks):
        return WeightedTrainer(model=model, args=training_args(ctx, f"jtt-{lambda_up}", epochs=cfg["erm_epochs"],
                                                                 lr=cfg["erm_lr"]),
                               train_dataset=hf_dataset(train, weight=jtt_weights(errors, lambda_up)),
                               data_collator=Collator(train.store, ("weight",)), callbacks=callbacks)

    (own, pred), (floor, floor_pred) = _train_with_floor_row(ctx, "worst_class_accuracy", "lambda_up",
                                                             as_grid(cfg["jtt_lambda"]), make)
    return test_result(ctx, pred, selected=own.best, val_history=own.history, error_set_size=int(errors.sum()),
                       error_set_minority_share=float(train.sensitive[errors].mean()) if errors.any() else float("nan"),
                       floor=_floor_result(ctx, floor, floor_pred))


def run_dfr(ctx: Context) -> dict:
    from .baselines import dfr_fit

    val = ctx.split("validation")
    feats, test_feats = ctx.erm["validation"]["features"], ctx.erm["test"]["features"]
    head = dfr_fit(feats, val.labels, val.sensitive, seed=ctx.seed)
    floor = dfr_fit(feats, val.labels, val.sensitive, seed=ctx.seed, acc_tolerance=ACC_TOLERANCE,
                    reference_pred=ctx.erm["validation"]["logits"].argmax(-1))
    return test_result(ctx, head.predict(test_feats), dfr=head.info,
                       floor=test_result(ctx, floor.predict(test_feats), dfr=floor.info,
                                         floor_met=floor.info.get("floor_met")))


def afr_split(labels: np.ndarray, holdout: float, seed: int) -> tuple:
    """(ERM rows, held-out rows) of AFR: a seeded split stratified on the class label only (AFR uses no group
    labels), through `fairnet_peft.data.stratified_subsample`."""
    from fairnet_peft.data import stratified_subsample

    labels = np.asarray(labels, np.int64)
    n_fit = int(round((1.0 - holdout) * len(labels)))
    if not 0 < n_fit < len(labels):
        raise ValueError(f"AFR: holdout={holdout} leaves no rows on one side of {len(labels)} train rows")
    fit = stratified_subsample(labels, np.zeros_like(labels), n_fit, seed)
    return fit, np.setdiff1d(np.arange(len(labels)), fit)


def run_afr(ctx: Context) -> dict:
    """AFR: ERM on (1 − AFR_HOLDOUT) of the train rows, then its last layer retrained on the held-out rows for every
    (γ, λ); the row keeps the point with the best validation worst-class accuracy under the ACC floor (no group
    labels), the ACC-floor row the best validation WGA under it."""
    from .baselines import afr_fit, afr_weights

    cfg, train = ctx.cfg, ctx.split("train")
    bs = cfg["eval_batch_size"]
    fit_rows, held_rows = afr_split(train.labels, cfg.get("afr_holdout", AFR_HOLDOUT), ctx.seed)
    model, erm_sel = fit_erm(ctx, train.subset(fit_rows), "afr-erm")
    held = train.subset(held_rows)
    out = {"held": predict(model, held.store, bs, features=True),
           **{k: predict(model, ctx.split(k).store, bs, features=True) for k in ("validation", "test")}}
    head = _head(model)
    w0, b0 = head.weight.detach().double().cpu().numpy(), head.bias.detach().double().cpu().numpy()
    own, floor = Selector("worst_class_accuracy", ctx.erm_val_acc), floor_selector(ctx.erm_val_acc)
    for gamma in cfg.get("afr_gammas", AFR_GAMMAS):
        weights = afr_weights(out["held"]["logits"], held.labels, gamma)
        for lam in cfg.get("afr_lambdas", AFR_LAMBDAS):
            fitted = afr_fit(out["held"]["features"], held.labels, weights, w0, b0, lam)
            cand = evaluate_candidate(ctx, fitted.logits(out["validation"]["features"]), True, gamma=gamma, lam=lam)
            own.offer(_label_free(cand), lambda h=fitted: h)
            floor.offer(cand, lambda h=fitted: h)
    info = {"erm_rows": int(len(fit_rows)), "held_out_rows": int(len(held_rows)), "erm_selected": erm_sel.best}
    test_feats = out["test"]["features"]
    return test_result(ctx, own.state.predict(test_feats), selected=own.best, val_history=own.history, afr=info,
                       floor=_floor_result(ctx, floor, floor.state.predict(test_feats), afr=info))


RUNNERS = {"ERM": run_erm, "GroupDRO": run_groupdro, "JTT": run_jtt, "DFR": run_dfr, "AFR": run_afr}


# ------------------------------------------------------------------------------------------------ default-settings ERM
def bootstrap_scores(y, pred, s, n_boot: int, seed: int) -> dict:
    """ACC/WGA/EOD with per-seed bootstrap CIs, every cell, and the worst cell (identity, size, minority?, CI)."""
    from fairnet_peft import metrics as M

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in METRICS:
            kw = {} if key == "accuracy" else {"sensitive_features": s}
            if key == "equalized_odds_difference":
                kw["agg"] = "mean"
            out[key] = M.bootstrap_ci(getattr(M, key), y, pred, n_resamples=n_boot, seed=seed, **kw)
        cells = M.group_accuracies(y, pred, sensitive_features=s)
        worst = min((c for c in cells if cells[c]["count"] > 0), key=lambda c: cells[c]["accuracy"])
        yc, sc = (int(v.split("=")[1]) for v in worst.split(","))
        in_cell = (y == yc) & (s == sc)
        ci = M.bootstrap_ci(M.accuracy, y[in_cell], pred[in_cell], n_resamples=n_boot, seed=seed)
    out["cells"] = cells
    out["worst_cell"] = {"cell": worst, "count": int(in_cell.sum()), "minority": sc == 1, **ci}
    return out


def train_erm(ds, new_model, cfg: dict, seed: int, out: str, collate):
    """ERM: a plain `Trainer`, fixed epochs (nothing selected); returns the model and its test predictions."""
    import transformers as T

    T.set_seed(seed)
    args = T.TrainingArguments(**run_args(out, seed, cfg["erm_epochs"], cfg["batch"], cfg["eval_batch"]),
                               learning_rate=cfg["erm_lr"], lr_scheduler_type=cfg["scheduler"],
                               weight_decay=cfg["weight_decay"], warmup_steps=0.1)
    trainer = quiet(T.Trainer(model=new_model(), args=args, train_dataset=ds["train"], data_collator=collate))
    trainer.train()
    logits = trainer.predict(ds["test"]).predictions
    return trainer.model, (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)
