"""The methods of the quality suite (ERM, GroupDRO, JTT, DFR, the FairNet variants) and of the default-settings
suite (ERM with a plain Trainer, FairNet at default arguments).

Quality: every runner takes the `Context` of one (dataset, seed), trains on its train split, offers its epochs (and
for FairNet its grid points and τ) to a `selection.Selector` on validation, and returns the test metrics of the
selected model (`evaluate`: the one place metrics are computed). ERM runs first: its selected model, logits and
features seed JTT's error set, DFR's features and every FairNet variant. Defaults: `train_erm` + `fairnet_defaults`.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from .common import epoch_callback, quiet, run_args
from .config import METRICS
from .data import Bundle, Collator, InputStore, Split, hf_dataset
from .selection import Selector, restore, snapshot



# ------------------------------------------------------------------------------------------------ prediction
def _head(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError("model has no classifier/score head")


@torch.no_grad()
def predict(model: nn.Module, store: InputStore, batch_size: int, *, gate_on: bool = False,
            features: bool = False) -> dict:
    """Logits (and with `gate_on` the FairLoRA gate forced on + the detector's risk; with `features` the head's
    input) for every row of `store`, in order. Restores the model's train/eval mode."""
    from fairnet_peft import force_gate, gate_record

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"logits": [], "risk": [], "features": []}
    hook = _head(model).register_forward_pre_hook(
        lambda m, a: out["features"].append(a[0].detach().float().cpu())) if features else None
    try:
        with (force_gate(model, True) if gate_on else nullcontext()):
            for start in range(0, len(store), batch_size):
                batch = store.batch(range(start, min(start + batch_size, len(store))))
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                out["logits"].append(logits.float().cpu())
                if gate_on:
                    out["risk"].append(gate_record(model).risk.float().reshape(-1).cpu())
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


def run_erm(ctx: Context) -> dict:
    from transformers import Trainer

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("accuracy")
    bs = cfg["eval_batch_size"]

    def on_epoch(m, epoch):
        sel.offer(evaluate_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], False, epoch=epoch),
                  lambda: snapshot(m))
        if epoch == cfg["jtt_T"]:  # JTT's early-stopped ERM: its training errors are the error set
            ctx.jtt_errors = predict(m, train.store, bs)["logits"].argmax(-1) != train.labels

    trainer = Trainer(model=model, args=training_args(ctx, "erm", epochs=cfg["erm_epochs"], lr=cfg["erm_lr"]),
                      train_dataset=hf_dataset(train), data_collator=Collator(train.store),
                      callbacks=[epoch_callback(on_epoch)])
    quiet(trainer).train()
    restore(model, sel.state)
    model.eval()
    ctx.erm_model = model
    ctx.erm_val_acc = sel.best["accuracy"]
    for name in ("validation", "test"):
        ctx.erm[name] = predict(model, ctx.split(name).store, bs, features=True)
    if ctx.jtt_errors is None:  # fewer ERM epochs than T: use the last epoch
        ctx.jtt_errors = predict(model, train.store, bs)["logits"].argmax(-1) != train.labels
    return test_result(ctx, ctx.erm["test"]["logits"].argmax(-1), selected=sel.best, val_history=sel.history)


def run_groupdro(ctx: Context) -> dict:
    from .baselines import GroupDROTrainer

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("worst_group_accuracy", ctx.erm_val_acc)
    bs = cfg["eval_batch_size"]
    cells = np.bincount(train.labels * 2 + train.sensitive, minlength=4)

    def on_epoch(m, epoch):
        sel.offer(evaluate_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], True, epoch=epoch),
                  lambda: snapshot(m))

    trainer = GroupDROTrainer(model=model, args=training_args(ctx, "groupdro", epochs=cfg["erm_epochs"],
                                                                lr=cfg["erm_lr"]),
                              train_dataset=hf_dataset(train), data_collator=Collator(train.store, ("sensitive",)),
                              callbacks=[epoch_callback(on_epoch)], eta=cfg["dro_eta"],
                              adjustment=cfg["dro_adjustment"], cell_counts=cells.tolist())
    quiet(trainer).train()
    restore(model, sel.state)
    logits = predict(model, ctx.split("test").store, bs)["logits"]
    return test_result(ctx, logits.argmax(-1), selected=sel.best, val_history=sel.history,
                        final_q=[round(float(q), 4) for q in trainer.q])


def run_jtt(ctx: Context) -> dict:
    from .baselines import WeightedTrainer, jtt_weights

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("worst_class_accuracy", ctx.erm_val_acc)
    bs = cfg["eval_batch_size"]
    weights = jtt_weights(ctx.jtt_errors, cfg["jtt_lambda"])

    def on_epoch(m, epoch):
        sel.offer(evaluate_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], False, epoch=epoch),
                  lambda: snapshot(m))

    trainer = WeightedTrainer(model=model, args=training_args(ctx, "jtt", epochs=cfg["erm_epochs"], lr=cfg["erm_lr"]),
                              train_dataset=hf_dataset(train, weight=weights),
                              data_collator=Collator(train.store, ("weight",)), callbacks=[epoch_callback(on_epoch)])
    quiet(trainer).train()
    restore(model, sel.state)
    logits = predict(model, ctx.split("test").store, bs)["logits"]
    errors = ctx.jtt_errors
    return test_result(ctx, logits.argmax(-1), selected=sel.best, val_history=sel.history,
                        error_set_size=int(errors.sum()),
                        error_set_minority_share=float(train.sensitive[errors].mean()) if errors.any() else float("nan"))


def run_dfr(ctx: Context) -> dict:
    from .baselines import dfr_fit

    val = ctx.split("validation")
    head = dfr_fit(ctx.erm["validation"]["features"], val.labels, val.sensitive, seed=ctx.seed)
    pred = head.predict(ctx.erm["test"]["features"])
    return test_result(ctx, pred, dfr=head.info)


RUNNERS = {"ERM": run_erm, "GroupDRO": run_groupdro, "JTT": run_jtt, "DFR": run_dfr}


# ------------------------------------------------------------------------------------------------ default-settings ERM
def bootstrap_scores(y, pred, s, n_boot: int, seed: int) -> dict:
    """ACC/WGA/EOD with per-seed bootstrap CIs, every cell, and the worst cell (identity, size, minority?, CI)."""
    from fairnet_peft.evaluation import metrics as M

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


def pretrain_backbone(vit_config, pre: dict, seed: int, out: str) -> dict:
    """The stand-in for an ImageNet checkpoint (Waterbirds-style task): a ViT of `vit_config`'s shape trained with a
    plain `Trainer` to name the digit (10 classes) on `fairnet_peft.data.load_digit_objects` (the seed's *train*
    digit pool, plain backgrounds: neither task photo, so no background-label link). Returns the backbone's
    state dict without the classifier; the task model loads it and keeps its own fresh 2-class head."""
    import copy

    import transformers as T

    from fairnet_peft.data import load_digit_objects

    T.set_seed(seed)
    objects = load_digit_objects(seed, n=pre["n"], image_size=vit_config.image_size).with_format("torch")
    config = copy.deepcopy(vit_config)
    config.num_labels = 10
    args = T.TrainingArguments(**run_args(out, seed, pre["epochs"], pre["batch"], pre["batch"]),
                               learning_rate=pre["lr"], lr_scheduler_type="cosine", warmup_steps=0.1)
    trainer = quiet(T.Trainer(model=T.ViTForImageClassification(config), args=args, train_dataset=objects))
    trainer.train()
    return {k: v for k, v in trainer.model.state_dict().items() if not k.startswith("classifier.")}

