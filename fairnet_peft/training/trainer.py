"""`FairTrainer`: FairNet's staged training as a drop-in `transformers.Trainer`.

`train()` runs, on a PeftModel whose base is already task-trained (ERM):
  0. (unlabeled setting only) a frozen-feature pass and a pseudo-labeler (LOF or the ERM error set) marks the minority;
  1. detector stage: `Trainer`'s own loop trains only the detector with the class-balanced BCE (Eq. 1) on the
     (pseudo-)labelled rows, minus a held-out slice (`detector_holdout_fraction`) whose loss stops the stage early
     and whose best detector is kept;
  2. prototype pass: frozen base, LoRA off, eval mode: the risk score, the mean-pooled detector input and the final
     representation z of every training row → per-row groups ŝ (`anchor_source`, `anchor_threshold`), detector
     TPR/FPR at τ, held-out detector AUC against a scikit-learn logistic probe on the same features, and the
     (class × group) prototypes, stored as buffers in the adapter;
  3. LoRA stage: `Trainer`'s loop runs over the anchor rows (ŝ = 1) only and trains only the LoRA, gate forced on,
     with the triplet loss against the prototypes (Eq. 2) + λ_T × the task loss, for a number of updates that does
     not depend on the number of processes (`lora_min_updates`).
Rows are tracked by a `fairnet_row` index column, so statistics are exact under shuffling and under DDP
(`gather_for_metrics` drops the padding duplicates). Stage 1-2 results are saved under
`<output_dir>/fairnet-detector-stage/final`, which is how `train(resume_from_checkpoint=...)` knows the stage.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, PeftType
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.training_args import ParallelMode

from ..tuner.detector import align_mask, as_tokens, pool_tokens
from ..tuner.gate import find_gate_state, force_gate, gate_record
from .losses import class_balanced_bce, prototype_triplet_loss
from .prototypes import anchor_weights, compute_prototypes
from .pseudo_labels import pseudo_label
from ..tuner.representation import capture_head_input, resolve_pooling
from .arguments import FairTrainingArguments
from .validation import validate_train_dataset

ROW_COLUMN = "fairnet_row"
STAGE_DIR = "fairnet-detector-stage"


MIN_HOLDOUT_PER_GROUP = 5


def holdout_rows(target: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the (pseudo-)labelled rows held out from the detector stage, stratified by group.

    Each group gives max(fraction × its rows, MIN_HOLDOUT_PER_GROUP) rows, so a small labelled minority (partial
    setting) still has a usable held-out slice. Empty when `fraction` is 0 or a group has fewer than
    3 × MIN_HOLDOUT_PER_GROUP rows (then the detector stage runs its whole budget)."""
    mask = np.zeros(len(target), dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng(seed)
    picks = []
    for group in (0, 1):
        rows = np.flatnonzero(target == group)
        if len(rows) < 3 * MIN_HOLDOUT_PER_GROUP:
            return mask
        n = max(int(round(fraction * len(rows))), MIN_HOLDOUT_PER_GROUP)
        picks.append(rng.choice(rows, size=n, replace=False))
    mask[np.concatenate(picks)] = True
    return mask


def roc_auc(target: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's ROC-AUC, NaN when only one group is present."""
    from sklearn.metrics import roc_auc_score

    known = target >= 0
    if len(np.unique(target[known])) < 2:
        return float("nan")
    return float(roc_auc_score(target[known], score[known]))


def balanced_probe():
    """The logistic probe both the detector's reference AUC and partial-setting label propagation use."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))


def probe_auc(features: np.ndarray, target: np.ndarray, fit_rows: np.ndarray, test_rows: np.ndarray,
              seed: int, max_rows: int = 20000) -> float:
    """The reference for the detector: a class-balanced `LogisticRegression` on the same frozen features (the
    mean-pooled detector input), fitted on `fit_rows` and scored by ROC-AUC on `test_rows`."""
    fit = np.flatnonzero(fit_rows)
    if len(fit) > max_rows:
        fit = np.random.default_rng(seed).choice(fit, size=max_rows, replace=False)
    if len(np.unique(target[fit])) < 2 or not test_rows.any():
        return float("nan")
    probe = balanced_probe().fit(features[fit], target[fit])
    return roc_auc(target[test_rows], probe.predict_proba(features[test_rows])[:, 1])


class _DetectorEarlyStopping(TrainerCallback):
    """Every `every` updates: the held-out class-balanced BCE; keeps the best detector, stops after `patience`
    evaluations without improvement, but not before `min_updates` (a fresh detector can sit on a plateau near 0.5 for
    a few hundred updates before it finds the group). Every process computes the same gathered loss, so all stop
    together."""

    def __init__(self, trainer: "FairTrainer", every: int, patience: int, min_updates: int):
        self.trainer, self.every, self.patience, self.min_updates = trainer, max(int(every), 1), patience, min_updates
        self.best_loss, self.best_state, self.bad, self.evaluations = float("inf"), None, 0, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return control
        loss = self.trainer._holdout_loss()
        self.evaluations += 1
        if self.best_state is None or loss < self.best_loss - max(1e-3, 0.01 * self.best_loss):  # not noise at ~0
            self.best_loss, self.bad = loss, 0
            net = self.trainer._detector.fairlora_detector[self.trainer.adapter_name]
            self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.patience and state.global_step >= self.min_updates:
                control.should_training_stop = True
        return control

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.trainer._detector.fairlora_detector[self.trainer.adapter_name].load_state_dict(self.best_state)


class FairTrainer(Trainer):
    """Runs FairNet's detector → prototype → contrastive-LoRA stages. Same constructor as `Trainer`, plus
    `adapter_name` (default: the active adapter). `trainer.label_setting` is "full", "partial" or "unlabeled"."""

    loss_is_scaled_for_ga = False  # every loss term is a per-batch mean: Trainer divides by the accumulation steps

    def __init__(self, model=None, args: Optional[FairTrainingArguments] = None, train_dataset=None, eval_dataset=None,
                 compute_metrics=None, adapter_name: Optional[str] = None, **kwargs):
        if args is None:
            args = FairTrainingArguments(output_dir="fairnet_output")
        if not isinstance(args, FairTrainingArguments):
            raise TypeError("FairTrainer needs FairTrainingArguments (a TrainingArguments subclass).")
        if not isinstance(model, PeftModel) or not any(
            c.peft_type == PeftType.FAIRLORA for c in model.peft_config.values()
        ):
            raise ValueError(
                "FairTrainer needs a PeftModel with a FairLoRA adapter: model = get_peft_model(erm_model, "
                "FairLoraConfig(task_type=...)), where erm_model is your already task-trained classifier."
            )
        self.adapter_name = adapter_name or model.active_adapter
        self.label_setting: Optional[str] = None
        self._sensitive: Optional[np.ndarray] = None
        if train_dataset is not None:
            train_dataset = self._validate_train_dataset(train_dataset, args, model)
        if eval_dataset is not None:
            eval_dataset = self._check_eval_dataset(eval_dataset, args)
        self._eval_uses_sensitive = args.eval_sensitive_labels == "use" or (
            args.eval_sensitive_labels == "auto" and self.label_setting in (None, "full")
        )
        if compute_metrics is None:
            from ..evaluation.metrics import make_compute_metrics

            tau = args.gate_threshold if args.gate_threshold is not None else model.peft_config[self.adapter_name].threshold
            compute_metrics = make_compute_metrics(threshold=float(tau), use_sensitive=self._eval_uses_sensitive)
        compute_metrics = self._with_pseudo_group_metric(compute_metrics)
        self._check_selection_metric(args)
        if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
            raise ValueError(
                f"FairTrainer does not support nn.DataParallel ({args.n_gpu} GPUs in one process): its replicas would "
                "share one gate state. Launch one process per GPU with `torchrun --nproc_per_node N` or "
                "`accelerate launch`, or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
            )
        if args.ddp_find_unused_parameters is None:
            # Every stage uses all of its trainable parameters, and the detector's loss is not reachable from the model
            # output, which DDP's unused-parameter search would wrongly mark as unused.
            args.ddp_find_unused_parameters = False
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         compute_metrics=compute_metrics, **kwargs)
        self._stage = "eval"
        self._group_hat: Optional[torch.Tensor] = None
        self._pos_weight = 1.0
        self._fair_logs: dict[str, list[float]] = defaultdict(list)
        self.skipped_batches = 0
        self.detector_stats: dict[str, float] = {}
        self._stage_log_history: list[dict] = []
        self._all_rows = self.train_dataset
        self.pseudo_labeler, self.pseudo_label_details = None, {}

    # ------------------------------------------------------------------ input validation
    def _validate_train_dataset(self, dataset, args, model):
        """Every check of validation.py before any stage trains; then the row-index column the stages track rows by."""
        config = getattr(model.get_base_model(), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        setting, sensitive, labels = validate_train_dataset(
            dataset, sensitive_column=args.sensitive_column, num_labels=getattr(config, "num_labels", None),
            vocab_size=getattr(text, "vocab_size", None) if "input_ids" in dataset.column_names else None)
        neighbours = 20 if args.lof_n_neighbors == "auto" else args.lof_n_neighbors  # 'auto' uses at least 20
        smallest = int(np.bincount(labels).min(initial=len(labels))) if len(labels) else 0
        if setting == "unlabeled" and args.pseudo_labeler in ("lof", "auto") and smallest <= neighbours:
            raise ValueError(
                f"Unlabeled setting: the smallest class has {smallest} rows but lof_n_neighbors={args.lof_n_neighbors!r} "
                f"needs more than {neighbours} per class (LOF runs within each class). Lower "
                "FairTrainingArguments.lof_n_neighbors, choose pseudo_labeler='gmm'/'kmeans'/'error_set', or add data."
            )
        self.label_setting, self._sensitive, self._labels = setting, sensitive, labels
        if ROW_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(ROW_COLUMN)
        return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))

    def _check_eval_dataset(self, dataset, args):
        datasets_ = dataset.values() if isinstance(dataset, dict) else [dataset]
        for ds in datasets_:
            names = getattr(ds, "column_names", [])
            if args.sensitive_column in names:
                values = set(np.unique(np.asarray(ds[args.sensitive_column])).tolist())
                if values - {-1, 0, 1}:
                    raise ValueError(f"eval_dataset column {args.sensitive_column!r} has values outside {{-1, 0, 1}}.")
        return dataset

    def _check_selection_metric(self, args) -> None:
        metric = args.metric_for_best_model or ""
        group_metrics = ("worst_group", "equalized_odds", "gate_rate_s", "acc_y", "detector_")
        label_free = metric.removeprefix("eval_").startswith("pseudo_")
        if not self._eval_uses_sensitive and not label_free and any(g in metric for g in group_metrics):
            raise ValueError(
                f"metric_for_best_model={metric!r} needs the eval set's sensitive labels, which the {self.label_setting} "
                "setting must not use for selection (that would leak labels the setting lacks). Use 'accuracy' or "
                "'worst_class_accuracy', or set eval_sensitive_labels='use' if your validation split really has them."
            )

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for extra in (self.args.sensitive_column, ROW_COLUMN):
            if extra not in self._signature_columns:
                self._signature_columns.append(extra)

    def _pop_extras(self, inputs: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return inputs.pop(self.args.sensitive_column, None), inputs.pop(ROW_COLUMN, None)

    # ------------------------------------------------------------------ helpers
    @property
    def _detector(self):
        return find_gate_state(self.model).detector

    @property
    def _config(self):
        return self.model.peft_config[self.adapter_name]

    def _forward_with_z(self, model, batch: dict):
        """Forward `batch`; return (outputs, z), z being the representation that prototypes and anchors share: by
        default the classification head's input (representation.py), else the pooled last hidden state."""
        cfg = self._config
        head = getattr(cfg, "representation_module", None)
        how = resolve_pooling(cfg.representation_pooling, self.model, head)
        with capture_head_input(model, batch, pooling=how, head_name=head) as cap:
            outputs = model(**batch, output_hidden_states=cap.needs_hidden_states)
        return outputs, cap.representation(outputs)

    def _set_trainable(self, what: str) -> None:
        """Freeze everything, then unfreeze the detector ('detector') or the adapter's LoRA ('lora')."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        det = self._detector
        det.set_detector_trainable(self.adapter_name, what == "detector")
        # Trainer reuses its DDP wrapper across train() calls, and DDP only reduces the parameters that were trainable
        # when it wrapped: drop the wrapper so the next stage is wrapped (and its gradients averaged) anew.
        self.model_wrapped = self.model
        if what == "lora":
            for name, p in self.model.named_parameters():
                if (".fairlora_A." in name or ".fairlora_B." in name) and f".{self.adapter_name}." in name:
                    p.requires_grad_(True)

    @contextlib.contextmanager
    def _frozen_base_without_dropout(self):
        """The base is frozen in every stage, so its dropout is switched off (p = 0, which also covers attention
        implementations that read `self.dropout.p`): anchor features then match the eval-mode prototypes."""
        saved = {m: m.p for n, m in self.model.named_modules()
                 if isinstance(m, torch.nn.Dropout) and "fairlora_" not in n}
        try:
            for module in saved:
                module.p = 0.0
            yield
        finally:
            for module, p in saved.items():
                module.p = p

    def _log_terms(self, **terms: float) -> None:
        for key, value in terms.items():
            self._fair_logs[key].append(float(value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._fair_logs:
            logs = {**logs, **{k: float(np.mean(v)) for k, v in self._fair_logs.items()}}
            self._fair_logs.clear()
        if self._stage == "lora":
            logs["skipped_batches"] = self.skipped_batches
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ losses
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sensitive, rows = self._pop_extras(inputs)
        if self._stage == "detector":
            return self._detector_loss(model, inputs, rows)
        if self._stage == "lora" and model.training:
            return self._lora_loss(model, inputs, rows)
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _detector_loss(self, model, inputs, rows):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with force_gate(model, False):
            model(**inputs)
        risk = gate_record(model, self.adapter_name).risk
        target = self._detector_target.to(risk.device)[rows.to(risk.device)]
        loss = class_balanced_bce(risk, target, self._pos_weight)
        self._log_terms(detector_loss=loss.item())
        return loss

    def _skip_batch(self, model, inputs) -> torch.Tensor:
        """Too few anchors: count the batch and return a zero loss that still ran a forward (DDP needs one)."""
        self.skipped_batches += 1
        first = {k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items() if k != "labels"}
        with force_gate(model, True, self.adapter_name):
            return model(**first).logits.sum() * 0.0

    def _lora_loss(self, model, inputs, rows):
        args = self.args
        group = self._group_hat.to(rows.device)[rows]
        anchors = (group == 1).nonzero().squeeze(1)
        if anchors.numel() < args.min_anchors_per_batch:
            return self._skip_batch(model, inputs)
        batch = rows.shape[0]
        sub = {k: v.index_select(0, anchors.to(v.device)) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
               for k, v in inputs.items()}
        labels = sub.pop("labels")
        with force_gate(model, True, self.adapter_name):
            outputs, z = self._forward_with_z(model, sub)
        weights = self._anchor_weights.to(labels.device)[labels] if args.class_balanced_anchors else None
        task = F.cross_entropy(outputs.logits.float(), labels, reduction="none")
        task = (task * weights).sum() / weights.sum().clamp_min(1e-12) if weights is not None else task.mean()
        if args.lora_objective == "task":
            self._log_terms(task_loss=task.item(), anchors_per_batch=anchors.numel())
            return task
        majority = self._detector.fairlora_prototypes[self.adapter_name][:, 0, :]
        contrastive, active = prototype_triplet_loss(
            z.float(), labels, majority, margin=args.margin, distance=args.distance,
            negative_strategy=args.negative_strategy, weights=weights,
        )
        loss = args.contrastive_weight * contrastive + args.task_loss_weight * task
        self._log_terms(contrastive_loss=contrastive.item(), task_loss=task.item(), hinge_active=active,
                        anchors_per_batch=anchors.numel())
        return loss

    # ------------------------------------------------------------------ evaluation: risk, gate and groups reach compute_metrics
    def _with_pseudo_group_metric(self, compute_metrics):
        """Add `pseudo_worst_group_accuracy` (the label-free selector of the unlabeled setting) when `evaluate` has
        pseudo-groups for the eval rows: worst accuracy over (class × pseudo-group) cells."""
        if compute_metrics is None:
            return None

        def wrapped(eval_pred):
            metrics = compute_metrics(eval_pred)
            groups = getattr(self, "_eval_pseudo_groups", None)
            preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
            labels = eval_pred.label_ids[0] if isinstance(eval_pred.label_ids, tuple) else eval_pred.label_ids
            if groups is not None and labels is not None and len(groups) == len(labels):
                from .pseudo_labels import pseudo_group_worst_accuracy

                metrics["pseudo_worst_group_accuracy"] = pseudo_group_worst_accuracy(
                    np.asarray(preds).argmax(-1), np.asarray(labels), groups)
            return metrics

        return wrapped

    def eval_pseudo_groups(self, dataset) -> np.ndarray:
        """Unlabeled setting, after `train()`: the fitted pseudo-labeler's marks for `dataset`'s rows, from the
        frozen model's features (LoRA off), in row order. Cached per dataset fingerprint."""
        if self.pseudo_labels is None:
            raise ValueError("eval_pseudo_groups needs the pseudo-labeler fitted by train() in the unlabeled setting.")
        key = getattr(dataset, "_fingerprint", id(dataset))
        cache = self.__dict__.setdefault("_pseudo_group_cache", {})
        if key not in cache:  # every process runs the pass (it gathers); the main one, which holds the labeler, marks
            rows = dataset.remove_columns([c for c in (ROW_COLUMN,) if c in dataset.column_names])
            feats = self._frozen_pass(rows.add_column(ROW_COLUMN, list(range(len(rows)))))
            marks = np.zeros(len(rows), dtype=np.int64)
            if self.pseudo_labeler is not None:
                marks = np.asarray(self.pseudo_labeler.predict(np.concatenate([feats["z"], feats["feat"]], axis=1),
                                                               feats["label"], feats["logits"]), dtype=np.int64)
            if self.accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                marks = np.asarray(broadcast_object_list([marks.tolist()])[0], dtype=np.int64)
            cache[key] = marks
        return cache[key]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluate`; the metrics are also attached to the adapter so its saved model card shows them. In
        the unlabeled setting, with a pseudo-labeler fitted by this trainer, the metrics add the label-free
        `pseudo_worst_group_accuracy` (see docs/label-settings.md)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._eval_pseudo_groups = None
        if self.pseudo_labels is not None and hasattr(dataset, "add_column") and "labels" in dataset.column_names:
            self._eval_pseudo_groups = self.eval_pseudo_groups(dataset)
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if f"{metric_key_prefix}_accuracy" in metrics and isinstance(self.model, PeftModel):
            from ..evaluation.model_card import attach_fairness_report

            detector = {f"train_{k}": self.detector_stats[k] for k in ("detector_auc", "probe_auc")
                        if k in self.detector_stats}
            attach_fairness_report(self.model, {**metrics, **detector}, split=metric_key_prefix,
                                   adapter_name=self.adapter_name)
        return metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        sensitive, _ = self._pop_extras(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            outputs = model(**inputs)
        loss = outputs.loss.detach() if labels is not None and getattr(outputs, "loss", None) is not None else None
        if prediction_loss_only:
            return loss, None, None
        record = gate_record(model, self.adapter_name)
        risk = record.risk if record.risk is not None else record.gate.float()
        preds = (outputs.logits.detach(), risk.detach().float(), record.gate.long())
        if labels is None:
            return loss, preds, None
        if sensitive is not None and self._eval_uses_sensitive:
            return loss, preds, (labels, sensitive)
        return loss, preds, labels

    # ------------------------------------------------------------------ passes over the training set
    @contextlib.contextmanager
    def _keep_last_batch(self):
        """Passes over the training rows must see every row: `dataloader_drop_last` is off inside."""
        saved = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.args.dataloader_drop_last = saved

    def _detector_read_module(self) -> torch.nn.Module:
        return self.model.get_base_model().get_submodule(self._config.detector_module)

    def _frozen_pass(self, dataset=None, *, full: bool = True) -> dict[str, np.ndarray]:
        """One eval-mode pass, LoRA off, over `dataset` (default: the training rows): row index, label, risk and, with
        `full`, the representation z, the logits and the mean-pooled detector input of every row, in row order."""
        model, dataset = self.model, self._all_rows if dataset is None else dataset
        was_training = model.training
        model.eval()
        captured: dict[str, torch.Tensor] = {}
        mask_now: list = [None]

        def capture(module, args, kwargs):
            hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            tokens = as_tokens(hidden.detach())
            captured["feat"] = pool_tokens(tokens, align_mask(mask_now[0], tokens), "mean").float()

        handle = self._detector_read_module().register_forward_pre_hook(capture, with_kwargs=True) if full else None
        out: dict[str, list] = defaultdict(list)
        try:
            with torch.no_grad(), self._keep_last_batch():
                for batch in self.get_eval_dataloader(dataset):
                    batch = self._prepare_inputs(batch)
                    _, rows = self._pop_extras(batch)
                    labels = batch.pop("labels")
                    mask_now[0] = batch.get("attention_mask")
                    with force_gate(model, False):
                        outputs, z = self._forward_with_z(model, batch) if full else (model(**batch), None)
                    step = {"row": rows, "label": labels, "risk": gate_record(model, self.adapter_name).risk.float()}
                    if full:
                        step.update(z=z.float(), logits=outputs.logits.float(), feat=captured.pop("feat"))
                    for key, value in self.accelerator.gather_for_metrics(step).items():
                        out[key].append(value.cpu())
        finally:
            if handle is not None:
                handle.remove()
            model.train(was_training)
        result = {k: torch.cat(v).numpy() for k, v in out.items()}
        order = np.argsort(result["row"], kind="stable")
        result = {k: v[order] for k, v in result.items()}
        if len(result["row"]) != len(dataset) or len(np.unique(result["row"])) != len(dataset):
            raise RuntimeError(
                f"The pass over {len(dataset)} training rows returned {len(np.unique(result['row']))} distinct rows; "
                "a custom sampler or collator dropped or repeated rows. FairTrainer needs every row once in eval passes."
            )
        if full and not np.isfinite(result["z"]).all():
            bad = result["row"][~np.isfinite(result["z"]).all(1)][:10].tolist()
            raise ValueError(f"The frozen model produced NaN/inf representations for training rows {bad}; check those inputs.")
        return result

    def _pseudo_labels(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Unlabeled setting: fit `args.pseudo_labeler` (pseudo_labels.py) on the main process, broadcast the marks.
        The fitted labeler stays on the trainer (`self.pseudo_labeler`) to mark validation rows the same way."""
        args, marks = self.args, np.zeros(len(features["z"]), dtype=np.int64)
        if self.accelerator.is_main_process:
            result = pseudo_label(
                args.pseudo_labeler, features=np.concatenate([features["z"], features["feat"]], axis=1),
                labels=features["label"], logits=features["logits"], seed=args.seed,
                **self._pseudo_knobs())
            marks, self.pseudo_labeler, self.pseudo_label_details = result.labels, result.labeler, {
                "method": result.method, **{k: v for k, v in result.details.items() if np.isscalar(v)}}
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            marks = np.asarray(broadcast_object_list([marks.tolist()])[0], dtype=np.int64)
        return marks

    def _pseudo_knobs(self) -> dict:
        args = self.args
        lof = dict(n_neighbors=args.lof_n_neighbors, contamination=args.lof_contamination)
        clusters = dict(n_clusters=args.pseudo_clusters)
        return {"lof": lof, "gmm": clusters, "kmeans": clusters, "auto": {**lof, **clusters}}.get(args.pseudo_labeler, {})

    @property
    def pseudo_labels(self) -> Optional[np.ndarray]:
        """The unlabeled setting's pseudo-labels of the training rows (1 = presumed minority), after `train()`."""
        return getattr(self, "_pseudo", None)

    def _set_detector_targets(self) -> None:
        """The detector's targets. `_labels_of_setting`: true labels (full, partial; -1 unknown) or pseudo-labels
        (unlabeled); statistics and anchors use them. `_target`: what the detector trains on; in the partial setting
        the unlabelled rows get a logistic probe's labels (`partial_label_propagation`)."""
        args = self.args
        if self.label_setting == "unlabeled":
            self._pseudo = self._pseudo_labels(self._frozen_pass())
            labels = self._pseudo
            whole = [int(k) for k in np.unique(self._labels) if (labels[self._labels == k] == 1).all()]
            if whole:
                raise ValueError(
                    f"The pseudo-labeler ({self.pseudo_label_details.get('method', self.args.pseudo_labeler)}) marked "
                    f"every row of classes {whole} as minority, so no majority prototype exists for them (an error set "
                    "is a whole class when the frozen model never predicts it: is the model task-trained?). Train the "
                    "base model first, or choose FairTrainingArguments.pseudo_labeler='lof'/'gmm'/'kmeans'.")
        else:
            labels = self._sensitive
        self._labels_of_setting = labels
        self._holdout = holdout_rows(labels, args.detector_holdout_fraction, args.seed)
        target = labels
        if self.label_setting == "partial" and args.partial_label_propagation:
            target = self._propagated_labels(self._frozen_pass(), labels, (labels >= 0) & ~self._holdout)
        known = target[target >= 0]
        self._pos_weight = float((known == 0).sum()) / max(int((known == 1).sum()), 1)
        self._detector_target = torch.as_tensor(np.where(self._holdout, -1, target))
        self._target = target

    def _propagated_labels(self, feats: dict, labels: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
        """Partial setting: a class-balanced scikit-learn LogisticRegression, fitted on the labelled rows' frozen
        features (head input z joined with the mean-pooled detector input), labels the unlabelled rows, so the
        detector also learns from them. Known labels are kept; the held-out rows stay out of the fit."""
        x = np.concatenate([feats["z"], feats["feat"]], axis=1)
        fit_rows = fit_rows & (labels >= 0)
        if len(np.unique(labels[fit_rows])) < 2:
            return labels
        probe = balanced_probe().fit(x[fit_rows], labels[fit_rows])
        unknown = labels < 0
        out = labels.copy()
        out[unknown] = probe.predict(x[unknown]).astype(np.int64)
        return out

    def _holdout_loss(self) -> float:
        """Class-balanced BCE (Eq. 1) of the current detector on the held-out rows."""
        rows = np.flatnonzero(self._holdout)
        feats = self._frozen_pass(self._all_rows.select(rows), full=False)
        risk = torch.as_tensor(feats["risk"], dtype=torch.float64)
        target = torch.as_tensor(self._target[feats["row"]])
        return float(class_balanced_bce(risk, target, self._pos_weight))

    def _prototype_pass(self) -> None:
        args, feats = self.args, self._frozen_pass()
        gated = (feats["risk"] > float(self._config.threshold)).astype(np.int64)
        detected = (feats["risk"] > self.anchor_threshold()).astype(np.int64)  # anchors: independent of the gate τ
        labelled = self._labels_of_setting
        if args.anchor_source == "labels":
            group = labelled.copy()
        elif args.anchor_source == "detector":
            group = detected
        else:
            group = np.where(labelled >= 0, labelled, detected)
        self._group_hat = torch.as_tensor(group)
        # detector statistics against the labels the setting has (pseudo-labels when unlabeled)
        known = labelled >= 0
        pos, neg = known & (labelled == 1), known & (labelled == 0)
        tpr = float(gated[pos].mean()) if pos.any() else float("nan")
        fpr = float(gated[neg].mean()) if neg.any() else float("nan")
        fit_rows = known & ~self._holdout
        self.detector_stats = {"detector_tpr": tpr, "detector_fpr": fpr,
                               "detector_tpr_over_fpr": tpr / fpr if fpr > 0 else float("inf"),
                               "gate_rate_s0": fpr, "gate_rate_s1": tpr, "anchors": int((group == 1).sum()),
                               "detector_auc": roc_auc(labelled[self._holdout], feats["risk"][self._holdout]),
                               "probe_auc": probe_auc(feats["feat"], labelled, fit_rows, self._holdout, args.seed),
                               "detector_holdout_rows": int(self._holdout.sum())}
        self._warn_if_detector_failed(feats["risk"][known], labelled[known])
        # prototypes μ_{y,g} (prototypes.py): majority prototypes from the rows the frozen model gets right
        labels, z = feats["label"], feats["z"]
        n_classes = max(int(self._config.num_classes or 0), int(labels.max()) + 1)
        correct = feats["logits"].argmax(-1) == labels if args.prototype_rows == "correct" else None
        proto, counts = compute_prototypes(z, labels, group, n_classes, correct=correct)
        self._config.num_classes, self._config.representation_dim = n_classes, int(z.shape[1])
        self._detector.set_prototypes(self.adapter_name, torch.as_tensor(proto), torch.as_tensor(counts))
        self._anchor_weights = torch.as_tensor(anchor_weights(labels, group, n_classes))
        self.log({f"prototype_stage_{k}": v for k, v in self.detector_stats.items()})

    # ------------------------------------------------------------------ stages
    def _stage_dir(self) -> str:
        return os.path.join(self.args.output_dir, STAGE_DIR)

    @contextlib.contextmanager
    def _stage_run(self, dataset, **overrides):
        """Run one `Trainer` stage on `dataset` with some arguments overridden; both are put back afterwards."""
        args, full = self.args, self.train_dataset
        saved = {k: getattr(args, k) for k in overrides}
        self.optimizer, self.lr_scheduler = None, None
        try:
            for k, v in overrides.items():
                setattr(args, k, v)
            self.train_dataset = dataset
            yield
        finally:
            for k, v in saved.items():
                setattr(args, k, v)
            self.train_dataset = full
            self.optimizer, self.lr_scheduler = None, None

    def _updates_per_epoch(self, rows: int, processes: int) -> int:
        args = self.args
        return max(math.ceil(rows / (args.per_device_train_batch_size * processes * args.gradient_accumulation_steps)), 1)

    def _run_detector_stage(self, resume: Optional[str]) -> None:
        args = self.args
        rows = np.flatnonzero(self._detector_target.numpy() >= 0)  # labelled rows minus the held-out slice
        per_epoch = self._updates_per_epoch(len(rows), max(args.world_size, 1))
        max_steps = max(2 * args.detector_min_updates, math.ceil(args.detector_epochs * per_epoch))
        stopper = _DetectorEarlyStopping(self, every=min(per_epoch, 50), patience=args.detector_patience,
                                         min_updates=args.detector_min_updates)
        self._stage = "detector"
        self._set_trainable("detector")
        if self._holdout.any():
            self.add_callback(stopper)
        try:
            with self._stage_run(self._all_rows.select(rows), max_steps=max_steps,
                                 learning_rate=args.detector_learning_rate, eval_strategy="no",
                                 load_best_model_at_end=False, output_dir=self._stage_dir(), warmup_steps=0):
                super().train(resume_from_checkpoint=resume)
        finally:
            if stopper in self.callback_handler.callbacks:
                self.remove_callback(stopper)
        stopper.restore_best()
        self._detector_updates = int(self.state.global_step)
        self._set_trainable("none")

    def _save_stage(self) -> None:
        final = os.path.join(self._stage_dir(), "final")
        if self.accelerator.is_main_process:
            self.model.save_pretrained(final, selected_adapters=[self.adapter_name])
            state = {"label_setting": self.label_setting, "pos_weight": self._pos_weight,
                     "group_hat": self._group_hat.tolist(), "detector_stats": self.detector_stats,
                     "anchor_weights": self._anchor_weights.tolist(),
                     "num_classes": self._config.num_classes, "representation_dim": self._config.representation_dim}
            with open(os.path.join(final, "fairnet_state.json"), "w") as f:
                json.dump(state, f)
        self.accelerator.wait_for_everyone()

    def _load_stage(self) -> bool:
        final = os.path.join(self._stage_dir(), "final")
        marker = os.path.join(final, "fairnet_state.json")
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            state = json.load(f)
        det = self._detector
        k, d = state["num_classes"], state["representation_dim"]
        device = det.fairlora_prototypes[self.adapter_name].device
        det.fairlora_prototypes[self.adapter_name] = torch.zeros(k, 2, d, device=device)
        det.fairlora_prototype_counts[self.adapter_name] = torch.zeros(k, 2, device=device)
        weights = load_file(os.path.join(final, "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter_name)
        self._config.num_classes, self._config.representation_dim = k, d
        self._pos_weight, self.detector_stats = state["pos_weight"], state["detector_stats"]
        self._group_hat = torch.as_tensor(state["group_hat"])
        self._anchor_weights = torch.as_tensor(state["anchor_weights"], dtype=torch.float32)
        return True

    def _enter_lora_stage(self) -> None:
        """Stage 3 set-up (after the prototype pass): the LoRA loss, only this adapter's LoRA A/B trainable, and no
        optimizer/scheduler yet, so `Trainer` builds them for the LoRA parameters. `train()` calls it inside
        `_frozen_base_without_dropout()`; benchmarks/overhead.py calls it the same way to time single LoRA-stage steps."""
        self._stage = "lora"
        self._set_trainable("lora")
        self.optimizer, self.lr_scheduler = None, None
        self.skipped_batches = 0

    def anchor_threshold(self) -> float:
        """`anchor_threshold`, with 'auto' = w₁ / (1 + w₁): a class-balanced detector's risk at which the minority
        becomes the more likely group under the labelled rows' prior (w₁ = N(s=0) / N(s=1))."""
        value = self.args.anchor_threshold
        return self._pos_weight / (1.0 + self._pos_weight) if value == "auto" else float(value)

    def anchor_rows(self) -> np.ndarray:
        """Indices of the training rows the LoRA stage trains on (ŝ = 1), after the prototype pass."""
        return np.flatnonzero(self._group_hat.numpy() == 1)

    def lora_updates(self) -> int:
        """Optimizer updates of the LoRA stage: `max_steps` if set, else max(lora_min_updates, ⌈epochs × anchors /
        (per-device batch × accumulation)⌉), counted as if on one process so N processes make the same updates."""
        args = self.args
        if args.max_steps > 0:
            return int(args.max_steps)
        per_epoch = self._updates_per_epoch(len(self.anchor_rows()), 1)
        return max(args.lora_min_updates, math.ceil(args.num_train_epochs * per_epoch))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.train_dataset is None:
            raise ValueError("FairTrainer.train() needs a train_dataset with a sensitive column.")
        args = self.args
        if args.gate_threshold is not None:
            self._config.threshold = args.gate_threshold
        with self._frozen_base_without_dropout():
            return self._train_stages(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _train_stages(self, resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs):
        args = self.args
        self._all_rows = self.train_dataset  # stages train on subsets of it; passes and row indices refer to it
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            if resume_from_checkpoint is None and os.path.isdir(self._stage_dir()):
                resume_from_checkpoint = get_last_checkpoint(self._stage_dir())
        in_detector_stage = bool(resume_from_checkpoint) and os.path.abspath(str(resume_from_checkpoint)).startswith(
            os.path.abspath(self._stage_dir()) + os.sep)
        if not (resume_from_checkpoint and not in_detector_stage and self._load_stage()):
            if resume_from_checkpoint and not in_detector_stage:
                warnings.warn("No finished detector stage found; running the detector and prototype stages first.")
            self._set_detector_targets()
            self._run_detector_stage(resume_from_checkpoint if in_detector_stage else None)
            self._prototype_pass()
            self._save_stage()
            self._stage_log_history = [{**entry, "stage": "detector"} for entry in self.state.log_history]
            resume_from_checkpoint = None if in_detector_stage else resume_from_checkpoint
        self._enter_lora_stage()
        anchors = self.anchor_rows()
        if len(anchors) < args.min_anchors_per_batch:
            raise ValueError(
                f"Only {len(anchors)} anchor rows (ŝ = 1) for the LoRA stage: nothing to correct. Check the sensitive "
                "column (1 = minority), anchor_source/anchor_threshold, or the pseudo-labeler in the unlabeled setting."
            )
        try:
            with self._stage_run(self._all_rows.select(anchors), max_steps=self.lora_updates()):
                result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                       ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._stage = "eval"
        # Trainer starts a fresh state per stage: keep the detector stage's logs in the final history too.
        self.state.log_history = self._stage_log_history + self.state.log_history
        result.metrics.update({f"train_{k}": v for k, v in self.detector_stats.items()})
        result.metrics["train_skipped_batches"] = self.skipped_batches
        result.metrics["train_lora_relative_update"] = self.lora_relative_update()
        self._warn_if_no_op(result.metrics)
        return result

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def lora_relative_update(self) -> float:
        """Mean over adapted layers of ‖(α/r)·B·A‖_F / ‖W‖_F for this adapter: ≈ 0 means the LoRA did not move."""
        ratios = []
        for module in self.model.modules():  # called outside autograd: plain tensors
            a, b = getattr(module, "fairlora_A", {}), getattr(module, "fairlora_B", {})
            if self.adapter_name not in a or self.adapter_name not in b:
                continue
            wa, wb = a[self.adapter_name].weight, b[self.adapter_name].weight
            delta = module.scaling[self.adapter_name] * (wb.reshape(wb.shape[0], -1) @ wa.reshape(wa.shape[0], -1))
            base = module.get_base_layer().weight
            ratios.append(float(delta.norm() / base.norm().clamp_min(1e-12)))
        return float(np.mean(ratios)) if ratios else 0.0

    def _warn_if_detector_failed(self, risk: np.ndarray, target: np.ndarray) -> None:
        auc = self.detector_stats.get("detector_auc", float("nan"))
        if not np.isfinite(auc):
            auc = roc_auc(target, risk)
        if np.isfinite(auc) and auc < 0.6:
            warnings.warn(
                f"The bias detector could not learn to find the minority (AUC {auc:.2f}; probe AUC "
                f"{self.detector_stats.get('probe_auc', float('nan')):.2f}): its risk stays near the class-balanced base "
                "rate 0.5, so the gate is close to random. Check the sensitive column, FairLoraConfig.detector_layer "
                "(features the group is visible in) or, without labels, FairTrainingArguments.pseudo_labeler.",
                UserWarning, stacklevel=3)

    def _warn_if_no_op(self, metrics: dict) -> None:
        rate, update = metrics.get("train_gate_rate_s1", float("nan")), metrics["train_lora_relative_update"]
        if np.isfinite(rate) and rate < 0.1:
            warnings.warn(
                f"FairNet's gate is on for only {100 * rate:.1f} % of the minority's training rows, so the adapter "
                "will rarely change a prediction. Look at the detector (train_detector_auc, detector_learning_rate, "
                "detector_layer) or lower the gate threshold (FairLoraConfig.threshold / gate_threshold).",
                UserWarning, stacklevel=3)
        if update < 1e-4:
            warnings.warn(
                f"The LoRA barely moved (relative update {update:.1e}): the adapter is close to a no-op. Raise "
                "FairTrainingArguments.learning_rate or lora_min_updates, or check that the anchors are not skipped "
                "(train_skipped_batches).", UserWarning, stacklevel=3)
