"""`FairTrainer`: FairNet's staged training as a drop-in `transformers.Trainer`.

`train()` runs, on a PeftModel whose base is already task-trained (ERM):
  0. (unlabeled setting only) a frozen-feature pass and a pseudo-labeler (`pseudo_labeler`, pseudo_labels.py) marks
     the minority;
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

Who owns what: this class owns the stages (`stage`, the per-stage copy of the arguments made by
`stage_arguments`, never by writing into the user's `args`), the losses and evaluation; the passes over the
training rows live in passes.py (a mixin), the detector stage's pure helpers in detector_stage.py, and the adapter's
state is changed only through the tuner's public methods (`trainable_parameters`, `set_prototypes`).
The public stage API for benchmarks and tests: `stage`, `prepare_detector_stage()`, `prepare_lora_stage()`,
`frozen_pass()`, `holdout_loss()`, `anchor_rows()`, `lora_updates()`.
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
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.training_args import ParallelMode

from ..tuner.early_exit import stop_at_detector
from ..tuner.gate import find_gate_state, force_gate, gate_record
from ..tuner.representation import capture_head_input, resolve_pooling
from .arguments import FairTrainingArguments, stage_arguments
from .detector_stage import DetectorEarlyStopping
from .distributed import check_fsdp_active, save_adapter
from .guard import apply_accuracy_guard
from .losses import class_balanced_bce, prototype_triplet_loss
from .passes import ROW_COLUMN, TrainingPasses
from .validation import (check_eval_dataset, check_pseudo_labeler_rows, check_selection_metric,
                         check_threshold_selection, validate_train_dataset)

STAGE_DIR = "fairnet-detector-stage"


class FairTrainer(TrainingPasses, Trainer):
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
            check_eval_dataset(eval_dataset, args.sensitive_column)
        self._eval_uses_sensitive = args.eval_sensitive_labels == "use" or (
            args.eval_sensitive_labels == "auto" and self.label_setting in (None, "full")
        )
        if compute_metrics is None:
            from ..metrics import make_compute_metrics

            tau = args.gate_threshold if args.gate_threshold is not None else model.peft_config[self.adapter_name].threshold
            compute_metrics = make_compute_metrics(threshold=float(tau), use_sensitive=self._eval_uses_sensitive)
        compute_metrics = self._with_pseudo_group_metric(compute_metrics)
        check_selection_metric(args.metric_for_best_model, self._eval_uses_sensitive, self.label_setting)
        check_threshold_selection(args.threshold_selection, self.label_setting)
        if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
            raise ValueError(
                f"FairTrainer does not support nn.DataParallel ({args.n_gpu} GPUs in one process): its replicas would "
                "share one gate state. Launch one process per GPU with `torchrun --nproc_per_node N` or "
                "`accelerate launch`, or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
            )
        if args.ddp_find_unused_parameters is None:
            # Every stage uses all of its trainable parameters, and the detector's loss is not reachable from the model
            # output, which DDP's unused-parameter search would wrongly mark as unused.
            args = stage_arguments(args, ddp_find_unused_parameters=False)
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
        self._feature_cache: Optional[dict] = None  # base features, only inside caching_features() (passes.py)
        check_fsdp_active(self.args, self.accelerator)  # a dropped FSDP request would train N unsharded copies

    # ------------------------------------------------------------------ input validation
    def _validate_train_dataset(self, dataset, args, model):
        """Every check of validation.py before any stage trains; then the row-index column the stages track rows by."""
        config = getattr(model.get_base_model(), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        setting, sensitive, labels = validate_train_dataset(
            dataset, sensitive_column=args.sensitive_column, num_labels=getattr(config, "num_labels", None),
            vocab_size=getattr(text, "vocab_size", None) if "input_ids" in dataset.column_names else None)
        check_pseudo_labeler_rows(setting, labels, args.pseudo_labeler, args.lof_n_neighbors)
        self.label_setting, self._sensitive, self._labels = setting, sensitive, labels
        if ROW_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(ROW_COLUMN)
        return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))

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

    @property
    def _tuner(self):
        return self.model.base_model

    @property
    def stage(self) -> Optional[str]:
        """The stage being trained: "detector", "lora", or None (not training: evaluation, prediction)."""
        return None if self._stage == "eval" else self._stage

    def _set_trainable(self, what: str) -> None:
        """Freeze everything, then unfreeze the detector ('detector') or the adapter's LoRA ('lora')."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._detector.set_detector_trainable(self.adapter_name, what == "detector")
        # Trainer reuses its DDP wrapper across train() calls, and DDP only reduces the parameters that were trainable
        # when it wrapped: drop the wrapper so the next stage is wrapped (and its gradients averaged) anew.
        self.model_wrapped = self.model
        if what == "lora":
            for p in self._tuner.trainable_parameters("lora", self.adapter_name):
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
        """Eq. 1 on the batch. On one process the forward stops at the detector's layer (`stop_at_detector`): the base
        is frozen and the detector reads detached features, so nothing after it counts. Under DDP/FSDP the wrapper's
        gradient bookkeeping needs a complete forward, so the whole model runs."""
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.accelerator.num_processes == 1:
            with force_gate(self.model, False), stop_at_detector(self.model, self.adapter_name) as stop:
                self.model(**inputs)
            risk = stop.record.risk
        else:
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

    # ------------------------------------------------------------------ stages
    def _stage_dir(self) -> str:
        return os.path.join(self.args.output_dir, STAGE_DIR)

    @contextlib.contextmanager
    def _stage_run(self, dataset, **overrides):
        """Run one `Trainer` stage on `dataset` with a copy of the arguments (`stage_arguments`), so the user's
        `args` object is never written to; the trainer's own arguments and dataset are put back afterwards."""
        args, full = self.args, self.train_dataset
        self.optimizer, self.lr_scheduler = None, None
        try:
            self.args = stage_arguments(args, **overrides)
            self.train_dataset = dataset
            yield
        finally:
            self.args, self.train_dataset = args, full
            self.optimizer, self.lr_scheduler = None, None

    def _updates_per_epoch(self, rows: int, processes: int) -> int:
        args = self.args
        return max(math.ceil(rows / (args.per_device_train_batch_size * processes * args.gradient_accumulation_steps)), 1)

    def _run_detector_stage(self, resume: Optional[str]) -> None:
        args = self.args
        rows = np.flatnonzero(self._detector_target.numpy() >= 0)  # labelled rows minus the held-out slice
        per_epoch = self._updates_per_epoch(len(rows), max(args.world_size, 1))
        max_steps = max(2 * args.detector_min_updates, math.ceil(args.detector_epochs * per_epoch))
        stopper = DetectorEarlyStopping(self, every=min(per_epoch, 50), patience=args.detector_patience,
                                        min_updates=args.detector_min_updates)
        self._enter_detector_stage()
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
        self._stage = "eval"
        self._set_trainable("none")

    def _save_stage(self) -> None:
        final = os.path.join(self._stage_dir(), "final")
        save_adapter(self.model, final, self.adapter_name)  # every rank: FSDP gathers the shards, rank 0 writes
        if self.accelerator.is_main_process:
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
        k, d = state["num_classes"], state["representation_dim"]
        self._detector.set_prototypes(self.adapter_name, torch.zeros(k, 2, d), torch.zeros(k, 2))  # shapes to load into
        weights = load_file(os.path.join(final, "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter_name)
        self._config.num_classes, self._config.representation_dim = k, d
        self._pos_weight, self.detector_stats = state["pos_weight"], state["detector_stats"]
        self._group_hat = torch.as_tensor(state["group_hat"])
        self._anchor_weights = torch.as_tensor(state["anchor_weights"], dtype=torch.float32)
        return True

    def _enter_lora_stage(self) -> None:
        """Stage 3 set-up (after the prototype pass): the LoRA loss, only this adapter's LoRA A/B trainable, and no
        optimizer/scheduler yet, so `Trainer` builds them for the LoRA parameters."""
        self._stage = "lora"
        self._set_trainable("lora")
        self.optimizer, self.lr_scheduler = None, None
        self.skipped_batches = 0

    def _enter_detector_stage(self) -> None:
        self._stage = "detector"
        self._set_trainable("detector")
        self.optimizer, self.lr_scheduler = None, None

    def prepare_detector_stage(self):
        """Context manager: the detector stage set up as `train()` does it (detector targets from the setting's
        labels, only the detector trainable, base frozen without dropout), without running it, for benchmarks and
        tests that time or inspect single steps (`trainer.training_step(...)`). On exit `stage` is None again."""
        return self._prepared_stage("detector")

    def prepare_lora_stage(self):
        """Context manager: the LoRA stage set up as `train()` does it from the current detector (targets, prototype
        pass, only the LoRA trainable, base frozen without dropout), without training the detector first."""
        return self._prepared_stage("lora")

    @contextlib.contextmanager
    def _prepared_stage(self, stage: str):
        self._all_rows = self.train_dataset
        with self._frozen_base_without_dropout(), self.caching_features():
            self._set_detector_targets()
            if stage == "lora":
                self._prototype_pass()
                self._enter_lora_stage()
            else:
                self._enter_detector_stage()
            try:
                yield self
            finally:
                self._stage = "eval"
                self._set_trainable("none")

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
        with self._frozen_base_without_dropout(), self.caching_features():
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
        result.metrics.update(apply_accuracy_guard(self))
        self._warn_if_no_op(result.metrics)
        return result

    # ------------------------------------------------------------------ diagnostics
    def lora_relative_update(self) -> float:
        """Mean over adapted layers of ‖(α/r)·B·A‖_F / ‖W‖_F for this adapter: ≈ 0 means the LoRA did not move."""
        return self._tuner.lora_relative_update(self.adapter_name)

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
