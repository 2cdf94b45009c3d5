"""`FairTrainer`: FairNet's staged training as a drop-in `transformers.Trainer`.

`train()` runs, on a PeftModel whose base is already task-trained (ERM), with the base frozen and its dropout off
(a fresh adapter's weights are first drawn again from `args.seed`, so a run is reproducible from its seed alone):
  0. the run state (`FairRunState`, state.py) is created, or read back from the checkpoint being resumed; in the
     unlabeled setting a frozen-feature pass and a pseudo-labeler (`pseudo_labeler`) mark the minority;
  1. detector stage: `Trainer`'s own loop trains only the detector with the class-balanced BCE (Eq. 1) on the
     (pseudo-)labelled rows minus a held-out slice, whose loss stops the stage early (the best detector is kept);
  2. prototype pass (passes.py): risk, the detector input and the head's input z of every training row → anchors ŝ,
     detector statistics (TPR/FPR, held-out AUC against a logistic probe) and the (class × group) prototypes,
     stored in the adapter;
  3. LoRA stage: `Trainer`'s loop over the anchor rows trains only the LoRA, gate forced on, with the triplet loss
     against the prototypes (Eq. 2) + λ_T × the task loss, for a number of updates independent of the process count;
     with `lora_rows="train+eval"` (default) the anchors also include the minority rows of a stratified half of the
     eval set (`_eval_halves`), rows the base model never fit. Skipped (the LoRA stays its no-op initial draw) when
     the detector cannot find the group: the selection then switches the adapter off whatever the LoRA learns
     (`train_lora_when_blind` trains it anyway);
     With `lora_cross_fit`, a second LoRA first trains on the other half's minority (`_run_cross_fit_stage`), is read
     on the first half, and is put back to its initial draw, so the kept LoRA trains as it would without it;
  4. selection (selection.py): on held-out rows (the eval set's other half, `selection_rows`; with `lora_cross_fit`
     every eval row, each half read through the LoRA that did not train on it), the gate threshold τ
     and the adapter strength α with the best worst-group accuracy under an accuracy floor and an EOD ceiling, or the
     adapter off when the detector cannot see the group; the choice is written into the adapter's config, so the
     saved adapter carries it.

Who owns what: this class owns the stages, the losses, evaluation and resuming; `self.run_state` holds everything the
run computes; `self.passes` (a `RowPasses`) runs the eval-mode passes. The adapter changes only through the tuner's
methods (`set_prototypes`, `set_adapter_strength`, `set_threshold`, `trainable_parameters`). Rows are tracked by a
`fairnet_row` index column, so statistics are exact under shuffling and DDP (`gather_for_metrics` drops the padding
duplicates). Resuming: every checkpoint carries the run state and the run's fingerprint; a finished stage is saved in
`<output_dir>/_fairnet-detector-stage/final` and never rerun; checkpoints of another run are never resumed from.
Public stage API for benchmarks and tests: `stage`, `prepare_detector_stage()`, `prepare_lora_stage()`,
`frozen_pass()`, `holdout_loss()`, `anchor_rows()`, `eval_split()`, `lora_updates()`, `logged_terms()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, PeftType
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, TrainOutput, enable_full_determinism
from transformers.training_args import ParallelMode

from ..data.sampling import stratified_subsample
from ..evaluation.report import selection_report
from ..tuner.early_exit import stop_at_detector
from ..tuner.gate import find_gate_state, force_gate, gate_record
from ..tuner.representation import capture_head_input, model_pad_token_id, resolve_pooling
from .arguments import FairTrainingArguments, stage_arguments
from .detector_stage import DetectorEarlyStopping, warn_if_detector_failed
from .distributed import check_fsdp_active, save_adapter, wrap_detector_as_fsdp_unit
from .losses import class_balanced_bce, prototype_triplet_loss
from .passes import ROW_COLUMN, RowPasses, anchor_threshold, detector_targets, every_row, prototype_pass
from .pseudo_labels import pseudo_group_worst_accuracy, pseudo_label
from .selection import (OFF, STRENGTHS, detector_blind, global_correction_warning, held_back_explanation,
                        mixture_weights, off_explanation, searched_strengths, select_with_arguments)
from .state import EARLY_STOPPING_WEIGHTS, FairRunState, base_model_digest, run_fingerprint
from .validation import check_eval_dataset, check_pseudo_labeler_rows, check_selection_metric, validate_train_dataset

STAGE_DIR = "_fairnet-detector-stage"  # "_": Trainer.push_to_hub skips it (it holds resumable checkpoints)
CROSS_FIT_DIR = "cross-fit"  # the second LoRA's stage (`lora_cross_fit`), inside STAGE_DIR
TRAINING_ARGS_JSON = "training_args.json"  # what _save writes in place of Trainer's pickled training_args.bin
FINAL = "final"


class FairTrainer(Trainer):
    """Runs FairNet's detector → prototype → contrastive-LoRA stages, then selects the correction. Same constructor
    as `Trainer`, plus `adapter_name` (default: the active adapter). `trainer.label_setting` is "full", "partial" or
    "unlabeled"; `trainer.run_state` is what the run computed."""

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
        _check_pad_token(model, args)
        self.adapter_name = adapter_name or model.active_adapter
        self.run_state = FairRunState()
        if train_dataset is not None:
            train_dataset = self._validate_train_dataset(_with_labels_column(train_dataset), args, model)
        if eval_dataset is not None:
            eval_dataset = _with_labels_column(eval_dataset)
            check_eval_dataset(eval_dataset, args.sensitive_column, **_model_bounds(model))
            _warn_which_eval_set(eval_dataset, args)
        self.eval_uses_sensitive = args.eval_sensitive_labels == "use" or (
            args.eval_sensitive_labels == "auto" and self.label_setting in (None, "full")
        )
        if compute_metrics is None:
            from ..metrics import make_compute_metrics

            def compute_metrics(eval_pred):  # at the adapter's τ when the metrics are computed (selection changes it)
                fixed = self.args.gate_threshold
                tau = float(fixed if fixed is not None else self.model.peft_config[self.adapter_name].threshold)
                return make_compute_metrics(threshold=tau, use_sensitive=self.eval_uses_sensitive)(eval_pred)

            compute_metrics.fairnet_inputs = True
        check_selection_metric(args.metric_for_best_model, self.eval_uses_sensitive, self.label_setting)
        if getattr(args, "torch_compile", False):
            raise ValueError(
                "FairTrainer does not train a torch.compile'd model (TrainingArguments.torch_compile=True): its stages "
                "end forwards early at the detector and switch the gate per stage, which compiled training graphs "
                "cannot follow, so nothing would be compiled. Train uncompiled, then compile the trained model for "
                "inference: model = torch.compile(model) (the default gated path compiles with no graph break).")
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
        self._stage: Optional[str] = None
        self._stage_tensors: dict = {}
        self._terms: dict[str, list] = defaultdict(list)  # loss terms as tensors, averaged when `log` runs
        self.skipped_batches = 0
        self.passes = RowPasses(self)
        self.pseudo_labeler = None
        self._pseudo_group_cache: dict = {}
        self._eval_pseudo_groups: Optional[np.ndarray] = None
        self._selection_passes: dict = {}  # the selection's passes over its held-out rows (reselect() reuses them)
        self._selection_cache: dict = {}  # those passes per set of rows (dataset fingerprint)
        self._eval_split: "dict | bool | None" = None  # the eval set's halves (False: unsplit)
        self._warned_unread_groups = self._warned_hub = False
        self._all_rows = self.train_dataset
        self._stopper: Optional[DetectorEarlyStopping] = None
        self._check_model_inputs()
        self.add_callback(_RunStateCheckpoint(self))
        check_fsdp_active(self.args, self.accelerator)  # a dropped FSDP request would train N unsharded copies
        wrap_detector_as_fsdp_unit(self.accelerator, self.model)

    # ------------------------------------------------------------------ input validation
    def _validate_train_dataset(self, dataset, args, model):
        """Every check of validation.py before any stage trains; then the row-index column the stages track rows by."""
        bounds = _model_bounds(model)
        setting, sensitive, labels = validate_train_dataset(
            dataset, sensitive_column=args.sensitive_column, num_labels=bounds["num_labels"],
            vocab_size=bounds["vocab_size"] if "input_ids" in getattr(dataset, "column_names", ()) else None)
        check_pseudo_labeler_rows(setting, labels, args.pseudo_labeler, args.lof_n_neighbors)
        _warn_if_minority_is_most(sensitive, args.sensitive_column)
        run = self.run_state
        run.label_setting, run.given_groups, run.class_labels = setting, sensitive, labels
        return _with_row_column(dataset)

    def _check_model_inputs(self) -> None:
        """Trainer keeps only the columns the model's forward takes (`remove_unused_columns`): a training set with
        none of them (text not tokenized yet) would fail deep in the collator, naming our row-index column. Say so
        now. Datasets read through a transform (`set_transform`) make their inputs on the fly and are not checked."""
        from datasets import Dataset

        data = self.train_dataset
        if not self.args.remove_unused_columns or not isinstance(data, Dataset) or data.format["type"] == "custom":
            return
        self._set_signature_columns_if_needed()
        own = {"labels", "label", "label_ids", self.args.sensitive_column, ROW_COLUMN}
        inputs = [c for c in self._signature_columns if c not in own]
        if not any(c in data.column_names for c in inputs):
            raise ValueError(
                f"train_dataset has none of the columns the model takes as input ({', '.join(inputs[:6])}, ...): its "
                f"columns are {[c for c in data.column_names if c != ROW_COLUMN]}. Tokenize the text first "
                "(dataset.map(lambda b: tokenizer(b['text'], truncation=True), batched=True)), or give an image "
                "model its pixel_values; a collator that builds the inputs itself needs "
                "FairTrainingArguments(remove_unused_columns=False).")

    def _warn_if_eval_groups_missing(self) -> None:
        """The full setting (every training row's group known) with eval rows whose group is not: the selection, and
        the choice of the eval rows the LoRA trains on (`lora_rows`), read the detector's estimate of those rows'
        groups, not labels. Say so before training."""
        eval_set, column = self._selection_eval_set(), self.args.sensitive_column
        if self.label_setting != "full" or not self.eval_uses_sensitive or eval_set is None:
            return
        given = np.asarray(eval_set[column]) if column in eval_set.column_names else np.full(len(eval_set), -1)
        unknown = int((given < 0).sum())
        if unknown:
            what = (f"eval_dataset has no {column!r} column" if column not in eval_set.column_names else
                    f"{unknown} of the {len(eval_set)} eval_dataset rows have no known group (-1)")
            warnings.warn(
                f"Every training row has a known group (the full setting), but {what}: for those rows the selection "
                "of τ and the strength (and which eval rows the LoRA trains on, lora_rows) reads the detector's "
                f"estimate of the group, as in the partial setting. Give eval_dataset the {column!r} column (1 "
                "minority, 0 majority) to select on the true groups.", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ what users and benchmarks read
    @property
    def label_setting(self) -> Optional[str]:
        return self.run_state.label_setting

    @property
    def detector_stats(self) -> dict:
        return self.run_state.detector_stats

    @property
    def pseudo_labels(self) -> Optional[np.ndarray]:
        """The unlabeled setting's pseudo-labels of the training rows (1 = presumed minority), after `train()`."""
        return self.run_state.groups if self.label_setting == "unlabeled" else None

    @property
    def pseudo_label_details(self) -> dict:
        return self.run_state.pseudo_label_details

    @property
    def stage(self) -> Optional[str]:
        """The stage being trained: "detector", "lora", or None (not training: evaluation, prediction)."""
        return self._stage

    @property
    def adapter_config(self):
        return self.model.peft_config[self.adapter_name]

    @property
    def _detector(self):
        return find_gate_state(self.model).detector

    @property
    def _tuner(self):
        return self.model.base_model

    def detector_network(self) -> torch.nn.Module:
        """The bias detector network of this trainer's adapter."""
        return self._detector.fairlora_detector[self.adapter_name]

    def anchor_threshold(self) -> float:
        """`anchor_threshold` with 'auto' resolved (passes.anchor_threshold)."""
        return anchor_threshold(self.args.anchor_threshold, self.run_state.pos_weight)

    def anchor_rows(self) -> np.ndarray:
        """Indices of the training rows the LoRA stage trains on (ŝ = 1), after the prototype pass."""
        return np.flatnonzero(self.run_state.anchors == 1)

    def eval_split(self) -> Optional[dict]:
        """After `train()` with `lora_rows` using the eval set: {"lora": positions of the eval rows in the share the
        LoRA stage drew its minority rows from, "select": positions of the rows the selection used (`selection_rows`),
        "weights": their weights (None: equal), "cross_fit": with `lora_cross_fit`, the "lora" rows the selection
        also read, through the second LoRA (None otherwise)}; None when the eval set is not split
        (`lora_rows="train"`, or no eval set). With `lora_cross_fit` the selection reads "select" and "cross_fit"."""
        halves = self._eval_halves() if self._eval_split else None
        if not halves:
            return None
        weights, cross = halves["weights"], self.run_state.cross_fit
        return {"lora": halves["lora"].copy(), "select": halves["select"].copy(),
                "weights": None if weights is None else weights.copy(),
                "cross_fit": np.asarray(cross["rows"], dtype=np.int64) if cross else None}

    def logged_terms(self) -> dict[str, int]:
        """How many values of each loss term wait for the next `log` (e.g. {"contrastive_loss": 3})."""
        return {k: len(v) for k, v in self._terms.items()}

    # ------------------------------------------------------------------ columns, batches, forwards
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for extra in (self.args.sensitive_column, ROW_COLUMN):
            if extra not in self._signature_columns:
                self._signature_columns.append(extra)

    def _pop_extras(self, inputs: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return inputs.pop(self.args.sensitive_column, None), inputs.pop(ROW_COLUMN, None)

    def eval_batches(self, dataset):
        """(model inputs, {"row", "label"}) for every batch of `dataset` (which has the `fairnet_row` column), every
        row once, on the model's device: the batches of the eval-mode passes."""
        saved = self.args
        self.args = every_row(saved)
        try:
            loader = self.get_eval_dataloader(dataset)
        finally:
            self.args = saved
        device = self._pass_device()
        for batch in loader:
            batch = self._prepare_inputs(batch)
            if device is not None:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            _, rows = self._pop_extras(batch)
            labels = batch.pop("labels")
            yield batch, {"row": rows, "label": labels}

    def _pass_device(self) -> Optional[torch.device]:
        """Where a pass's batches go when it is not `args.device`: the model's own device while `Trainer` has not
        placed it yet (FSDP and DeepSpeed place it when the first stage prepares it; the partial and unlabeled
        settings pass over the rows before that). None when the model is on `args.device`."""
        param = next((p for p in self.model.parameters() if not p.is_meta), None)
        if param is None or param.device == torch.device(self.args.device):
            return None
        return param.device

    def forward_with_representation(self, model, batch: dict):
        """Forward `batch`; return (outputs, z), z being the representation that prototypes and anchors share: by
        default the classification head's input (representation.py), else the pooled last hidden state."""
        cfg = self.adapter_config
        head = getattr(cfg, "representation_module", None)
        how = resolve_pooling(cfg.representation_pooling, self.model, head)
        with capture_head_input(model, batch, pooling=how, head_name=head) as cap:
            outputs = model(**batch, output_hidden_states=cap.needs_hidden_states)
        return outputs, cap.representation(outputs)

    def frozen_pass(self, dataset=None, *, full: bool = True) -> dict[str, np.ndarray]:
        """One eval-mode pass, LoRA off, over `dataset` (default: the training rows): row index, label and risk of
        every row and, with `full`, its z, logits and mean-pooled detector input, in row order."""
        dataset = self._all_rows if dataset is None else dataset
        return self.passes.features(dataset) if full else self.passes.risk(dataset)

    # ------------------------------------------------------------------ trainability and logging
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

    def _log_terms(self, **terms) -> None:
        """Keep loss terms as detached tensors: they become numbers only when `log` runs (no host sync per step)."""
        for key, value in terms.items():
            self._terms[key].append(value.detach() if torch.is_tensor(value) else torch.tensor(float(value)))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._terms:
            means = {k: torch.stack([v.float().to(vals[0].device) for v in vals]).mean() for k, vals in self._terms.items()}
            logs = {**logs, **{k: float(v) for k, v in means.items()}}
            self._terms.clear()
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
        target = self._stage_tensor("detector_target", risk.device)[rows.to(risk.device)]
        loss = class_balanced_bce(risk, target, self.run_state.pos_weight)
        self._log_terms(detector_loss=loss)
        return loss

    def _stage_tensor(self, name: str, device) -> torch.Tensor:
        """A run-state array as a tensor on `device`, copied once per stage (not once per step)."""
        key = (name, str(device))
        if key not in self._stage_tensors:
            self._stage_tensors[key] = torch.as_tensor(getattr(self.run_state, name)).to(device)
        return self._stage_tensors[key]

    def _skip_batch(self, model, inputs) -> torch.Tensor:
        """Too few anchors: count the batch and return a zero loss that still ran a forward (DDP needs one)."""
        self.skipped_batches += 1
        first = {k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items() if k != "labels"}
        with force_gate(model, True, self.adapter_name):
            return model(**first).logits.sum() * 0.0

    def _lora_loss(self, model, inputs, rows):
        """The LoRA stage's loss on the batch's anchors (the batch holds only anchor rows, from `anchor_rows()`)."""
        args, run = self.args, self.run_state
        if rows.shape[0] < args.min_anchors_per_batch:
            return self._skip_batch(model, inputs)
        labels = inputs.pop("labels")
        with force_gate(model, True, self.adapter_name):
            outputs, z = self.forward_with_representation(model, inputs)
        weights = self._stage_tensor("anchor_weights", labels.device)[labels]
        task = F.cross_entropy(outputs.logits.float(), labels, reduction="none",
                               label_smoothing=float(args.label_smoothing_factor))
        task = (task * weights).sum() / weights.sum().clamp_min(1e-12)
        if args.lora_objective == "task":
            self._log_terms(task_loss=task)
            return task
        majority = self._detector.fairlora_prototypes[self.adapter_name][:, 0, :]
        where = z.device  # a model split over devices (device_map="auto") reads its head on the last one
        contrastive, active = prototype_triplet_loss(
            z.float(), labels.to(where), majority.to(where), margin=args.margin, distance=args.distance,
            negative_strategy=args.negative_strategy, weights=weights.to(where),
        )
        self._log_terms(contrastive_loss=contrastive, task_loss=task, hinge_active=active)
        return args.contrastive_weight * contrastive + args.task_loss_weight * task

    # ------------------------------------------------------------------ evaluation: risk, gate and groups reach compute_metrics
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`Trainer.evaluate`; the metrics are also attached to the adapter so its saved model card shows them. In
        the unlabeled setting, with a pseudo-labeler fitted by this trainer, the metrics add the label-free
        `pseudo_worst_group_accuracy` (see docs/label-settings.md)."""
        if eval_dataset is not None:
            eval_dataset = self._checked_eval_input(eval_dataset, "eval_dataset")
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str) and isinstance(self.eval_dataset, dict):  # Trainer's call per entry of a dict
            dataset = self.eval_dataset.get(dataset)
        self._warn_if_lora_trained_on(dataset)
        self._warn_if_group_labels_unread(dataset)
        self._eval_pseudo_groups = None
        if self.pseudo_labels is not None and hasattr(dataset, "add_column") and "labels" in dataset.column_names:
            self._eval_pseudo_groups = self.eval_pseudo_groups(dataset)
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if f"{metric_key_prefix}_accuracy" in metrics and isinstance(self.model, PeftModel) and \
                self._may_replace_card_report(metrics, metric_key_prefix):
            from ..evaluation.model_card import attach_fairness_report

            keys = ("detector_auc", "probe_auc", "detector_auc_within_class", "probe_auc_within_class")
            detector = {f"train_{k}": self.detector_stats[k] for k in keys if k in self.detector_stats}
            # how τ and α were chosen comes from the adapter config's selection_report, saved with the adapter
            attach_fairness_report(self.model, {**metrics, **detector}, split=metric_key_prefix,
                                   adapter_name=self.adapter_name)
        return metrics

    def _may_replace_card_report(self, metrics: dict, prefix: str) -> bool:
        """The card shows the last evaluation, but one without group metrics (a set with no known group) does not
        replace one that has them: warn instead."""
        from ..evaluation.model_card import fairness_report

        attached = fairness_report(self.model, self.adapter_name)
        has_groups = f"{prefix}_worst_group_accuracy" in metrics
        if has_groups or attached is None or f"{attached['split']}_worst_group_accuracy" not in attached["metrics"]:
            return True
        warnings.warn(f"evaluate(metric_key_prefix={prefix!r}) gave no group metrics, so the model card keeps the "
                      f"fairness table of the {attached['split']!r} evaluation.", UserWarning, stacklevel=3)
        return False

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        """`Trainer.predict`, on a dataset checked as `eval_dataset` is (`label` renamed, groups and ids coded)."""
        return super().predict(self._checked_eval_input(test_dataset, "test_dataset"), ignore_keys=ignore_keys,
                               metric_key_prefix=metric_key_prefix)

    def _checked_eval_input(self, dataset, split: str):
        if dataset is self.eval_dataset:
            return dataset
        dataset = _with_labels_column(dataset)
        check_eval_dataset(dataset, self.args.sensitive_column, **_model_bounds(self.model), split=split)
        return dataset

    def _warn_if_group_labels_unread(self, dataset) -> None:
        """A set with known groups evaluated without them (`eval_sensitive_labels`): say so once, and how to read them."""
        from datasets import Dataset

        column = self.args.sensitive_column
        if (self.eval_uses_sensitive or self.args.eval_sensitive_labels != "auto" or self._warned_unread_groups
                or not isinstance(dataset, Dataset) or column not in dataset.column_names):
            return
        known = int((np.asarray(dataset[column]) >= 0).sum())
        if known:
            self._warned_unread_groups = True
            warnings.warn(
                f"evaluate(): {known} of these {len(dataset)} rows have a known group, but the group metrics (WGA, "
                f"EOD, per-group gate rates) are left out: the training set makes this the {self.label_setting} "
                "setting, where eval_sensitive_labels='auto' reads no eval group labels, so that no model choice "
                "uses labels the setting lacks. If these groups are real labels you may evaluate with, pass "
                "FairTrainingArguments(eval_sensitive_labels='use') (the examples' --eval-sensitive-labels use), "
                "or score predict()'s logits with "
                "fairnet_peft.metrics.", UserWarning, stacklevel=3)

    def _warn_if_lora_trained_on(self, dataset) -> None:
        """Evaluating the eval set whose half the LoRA stage trained on (`lora_rows`): say the metrics are optimistic."""
        halves = self._eval_split
        trained_on = self._selection_eval_set()
        if not halves or trained_on is None or self._stage is not None:
            return
        if dataset is trained_on or getattr(dataset, "_fingerprint", None) == getattr(trained_on, "_fingerprint", ""):
            warnings.warn(
                f"The LoRA stage trained on {len(self._lora_eval_rows())} of these {len(trained_on)} eval rows "
                f"(lora_rows={self.args.lora_rows!r}), so these metrics are optimistic. Report metrics on a test set "
                "the trainer never saw.", UserWarning, stacklevel=3)

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
        if sensitive is not None and self.eval_uses_sensitive:  # as group ids 1 / 0 / -1, whatever the column's dtype
            return loss, preds, (labels, sensitive.long())
        return loss, preds, labels

    def evaluation_loop(self, *args, **kwargs):
        """`Trainer.evaluation_loop`, with the trainer's `compute_metrics` (passed to `__init__` or set later)
        wrapped once: a user's function gets plain inputs (`_plain_eval_inputs`), and the pseudo-group metric is
        added."""
        if self.compute_metrics is not None and not getattr(self.compute_metrics, "fairnet_ready", False):
            self.compute_metrics = self._with_pseudo_group_metric(_plain_eval_inputs(self.compute_metrics))
        with self._adapter_kept_in_its_dtype():
            return super().evaluation_loop(*args, **kwargs)

    @contextlib.contextmanager
    def _adapter_kept_in_its_dtype(self):
        """`bf16_full_eval` / `fp16_full_eval` outside training: `Trainer` casts the whole model to half precision for
        the evaluation, and leaves it so. The base model stays cast (what the user asked for); the adapter's own
        tensors (LoRA, detector, prototypes) get their values and dtype back afterwards, so a later selection,
        `train()` or `save_model()` sees the adapter the selection chose, not a rounded copy."""
        args = self.args
        if not (args.fp16_full_eval or args.bf16_full_eval) or self.is_in_train:
            yield
            return
        params = [p for name, p in self.model.named_parameters() if "fairlora_" in name]
        buffers = [(module, key) for name, module in self.model.named_modules() if "fairlora_" in name
                   for key, value in module.named_buffers(recurse=False) if value is not None]
        saved = [p.data for p in params], [module._buffers[key] for module, key in buffers]
        try:
            yield
        finally:  # the values and dtype, on the device the evaluation moved them to (`Module.to` casts parameters
            # in place but replaces buffers)
            for param, data in zip(params, saved[0]):
                param.data = data.to(param.device)
            for (module, key), data in zip(buffers, saved[1]):
                module._buffers[key] = data.to(module._buffers[key].device)

    def _with_pseudo_group_metric(self, compute_metrics):
        """Add `pseudo_worst_group_accuracy` (the label-free selector of the unlabeled setting) when `evaluate` has
        pseudo-groups for the eval rows: worst accuracy over (class × pseudo-group) cells."""
        if compute_metrics is None:
            return None

        def wrapped(eval_pred):
            metrics = compute_metrics(eval_pred)
            groups = self._eval_pseudo_groups
            preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
            labels = eval_pred.label_ids[0] if isinstance(eval_pred.label_ids, tuple) else eval_pred.label_ids
            if groups is not None and labels is not None and len(groups) == len(labels):
                metrics["pseudo_worst_group_accuracy"] = pseudo_group_worst_accuracy(
                    np.asarray(preds).argmax(-1), np.asarray(labels), groups)
            return metrics

        wrapped.fairnet_ready = True
        return wrapped

    def eval_pseudo_groups(self, dataset) -> np.ndarray:
        """Unlabeled setting, after `train()`: the fitted pseudo-labeler's marks for `dataset`'s rows, from the
        frozen model's features (LoRA off), in row order. Cached per dataset fingerprint."""
        if self.pseudo_labels is None:
            raise ValueError("eval_pseudo_groups needs the pseudo-labeler fitted by train() in the unlabeled setting.")
        key = getattr(dataset, "_fingerprint", id(dataset))
        if key not in self._pseudo_group_cache:  # every process runs the pass (it gathers); the main one marks
            feats = self.frozen_pass(_with_row_column(dataset))
            labeler = self._pseudo_labeler()  # on every process: a refit after a resume gathers and broadcasts
            marks = np.zeros(len(dataset), dtype=np.int64)
            if self.accelerator.is_main_process:
                marks = np.asarray(labeler.predict(np.concatenate([feats["z"], feats["feat"]], axis=1),
                                                   feats["label"], feats["logits"]), dtype=np.int64)
            self._pseudo_group_cache[key] = self._broadcast(marks)
        return self._pseudo_group_cache[key]

    # ------------------------------------------------------------------ the setting's groups
    def _fit_pseudo_labels(self, features: dict) -> np.ndarray:
        """Fit `args.pseudo_labeler` (pseudo_labels.py) on the main process and broadcast the marks. The fitted
        labeler stays on the trainer (`self.pseudo_labeler`) to mark validation rows the same way."""
        args, marks, error = self.args, np.zeros(len(features["z"]), dtype=np.int64), ""
        if self.accelerator.is_main_process:
            try:
                result = pseudo_label(
                    args.pseudo_labeler, features=np.concatenate([features["z"], features["feat"]], axis=1),
                    labels=features["label"], logits=features["logits"], seed=args.seed,
                    **args.pseudo_labeler_knobs())
            except ValueError as err:  # raised on every process below: the others wait in the broadcast
                error = str(err)
            else:
                marks, self.pseudo_labeler = result.labels, result.labeler
                self.run_state.pseudo_label_details = {
                    "method": result.method, **{k: v for k, v in result.details.items() if _plain(v)}}
                without = result.details.get("classes_without_minority") or []
                if without:
                    self.run_state.pseudo_label_details["classes_without_minority"] = ", ".join(map(str, without))
        error = self._broadcast_object(error)
        if error:
            raise ValueError(error)
        return self._broadcast(marks)

    def _broadcast_object(self, value):
        """The main process's `value` on every process."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        return value

    def _pseudo_labeler(self):
        """The fitted pseudo-labeler (on the main process; None on the others); after a resume it is fitted again on
        the same features (it is seeded, so it marks the training rows as the interrupted run did). Every process
        calls it: only the main one holds the labeler, so whether to refit is its decision, and the refit's pass and
        broadcast then run on every process."""
        if self._broadcast_object(self.pseudo_labeler is None):
            with self.passes.caching():
                self._fit_pseudo_labels(self.frozen_pass())
        return self.pseudo_labeler

    def _broadcast(self, marks: np.ndarray) -> np.ndarray:
        return np.asarray(self._broadcast_object(marks.tolist()), dtype=np.int64)

    def _refuse_whole_class_minority(self, marks: np.ndarray) -> None:
        labels = self.run_state.class_labels
        whole = [int(k) for k in np.unique(labels) if (marks[labels == k] == 1).all()]
        if whole:
            raise ValueError(
                f"The pseudo-labeler ({self.pseudo_label_details.get('method', self.args.pseudo_labeler)}) marked "
                f"every row of classes {whole} as minority, so no majority prototype exists for them (an error set "
                "is a whole class when the frozen model never predicts it: a class with few training rows, or a base "
                "model that is not task-trained). Choose FairTrainingArguments.pseudo_labeler='auto'/'gmm'/'kmeans', "
                "or train the base model first.")

    def _set_detector_targets(self) -> None:
        """The setting's groups (true, or pseudo-labels in the unlabeled setting) and the detector stage's inputs."""
        args, run = self.args, self.run_state
        features = None
        if run.label_setting == "unlabeled":
            features = self.frozen_pass()
            run.groups = self._fit_pseudo_labels(features)
            self._refuse_whole_class_minority(run.groups)
        else:
            run.groups = run.given_groups
        if run.label_setting == "partial" and args.partial_label_propagation:
            features = self.frozen_pass()
        for key, value in detector_targets(run, setting=run.label_setting, seed=args.seed, features=features,
                                           holdout_fraction=args.detector_holdout_fraction,
                                           propagate=args.partial_label_propagation).items():
            setattr(run, key, value)

    def holdout_loss(self) -> float:
        """Class-balanced BCE (Eq. 1) of the current detector on the held-out rows (a pass stopped at the detector)."""
        run = self.run_state
        rows = np.flatnonzero(run.holdout)  # drawn from rows with a (pseudo-)label: their target is their group
        feats = self.passes.risk(self._all_rows.select(rows))
        risk = torch.as_tensor(feats["risk"], dtype=torch.float64)
        return float(class_balanced_bce(risk, torch.as_tensor(run.groups[feats["row"]]), run.pos_weight))

    # ------------------------------------------------------------------ stages
    def _stage_dir(self) -> str:
        return os.path.join(self.args.output_dir, STAGE_DIR)

    @contextlib.contextmanager
    def _stage_run(self, dataset, **overrides):
        """Run one `Trainer` stage on `dataset` with a copy of the arguments (`stage_arguments`), so the user's
        `args` object is never written to; the trainer's own arguments and dataset are put back afterwards. Each
        stage starts from the run's seed, so a stage started after a resume draws what it would have drawn."""
        args, full = self.args, self.train_dataset
        self.optimizer, self.lr_scheduler = None, None
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if args.push_to_hub:
            # no push per checkpoint: it would upload a stage's half-trained adapter and Trainer's pickled arguments;
            # the adapter goes up with save_model() / push_to_hub() after train()
            if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS) and not self._warned_hub:
                self._warned_hub = True
                warnings.warn(f"hub_strategy={args.hub_strategy.value!r}: FairTrainer pushes no checkpoint to the "
                              "Hub (they hold pickled optimizer states and a stage's half-trained adapter); the "
                              "adapter goes up when you call save_model() or push_to_hub() after train(). Keep "
                              "checkpoints for resuming on your machine.", UserWarning, stacklevel=4)
            overrides.setdefault("hub_strategy", HubStrategy.END)
        try:
            self.args = stage_arguments(args, **overrides)
            self.train_dataset = dataset
            yield
        finally:
            self.args, self.train_dataset = args, full
            self.optimizer, self.lr_scheduler = None, None

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """`Trainer._save` (what `save_model`, `push_to_hub` and every checkpoint write), with the training arguments
        as JSON (`training_args.json`) in place of Trainer's `training_args.bin`, a pickle: a folder FairTrainer saves
        holds no pickle but the optimizer, scheduler and RNG states of a checkpoint (tensors, for resuming)."""
        super()._save(output_dir, state_dict=state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(folder, TRAINING_ARGS_NAME)
        if self.args.should_save and os.path.isfile(pickled):
            with open(os.path.join(folder, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
                f.write(json.dumps(self.args.to_dict(), indent=2, sort_keys=True, default=str))
            os.remove(pickled)

    def _updates_per_epoch(self, rows: int, processes: int) -> int:
        args = self.args
        return max(math.ceil(rows / (args.per_device_train_batch_size * processes * args.gradient_accumulation_steps)), 1)

    def _enter(self, stage: Optional[str]) -> None:
        """Make `stage` ("detector", "lora" or None) the trained one: its parameters trainable, a fresh optimizer."""
        self._stage = stage
        self._stage_tensors = {}
        self._set_trainable(stage or "none")
        self.optimizer, self.lr_scheduler = None, None
        if stage == "lora":
            self.skipped_batches = 0

    def _run_detector_stage(self, resume: Optional[str]) -> None:
        args, run = self.args, self.run_state
        rows = np.flatnonzero(run.detector_target >= 0)  # labelled rows minus the held-out slice
        per_epoch = self._updates_per_epoch(len(rows), max(args.world_size, 1))
        max_steps = max(2 * args.detector_min_updates, math.ceil(args.detector_epochs * per_epoch))
        self._stopper = DetectorEarlyStopping(self, run.early_stopping, every=min(per_epoch, 50),
                                              patience=args.detector_patience, min_updates=args.detector_min_updates)
        if resume is not None:
            self._stopper.restore_snapshot(os.path.join(resume, EARLY_STOPPING_WEIGHTS))
        self._enter("detector")
        if run.holdout.any():
            self.add_callback(self._stopper)
        try:
            if not run.early_stopping.stopped:  # a resumed stage that had stopped early has nothing left to train
                with self._without_user_stoppers(), self._stage_run(
                        self._all_rows.select(rows), max_steps=max_steps, learning_rate=args.detector_learning_rate,
                        eval_strategy="no", load_best_model_at_end=False, output_dir=self._stage_dir(),
                        warmup_steps=0):
                    super().train(resume_from_checkpoint=resume)
                run.detector_updates = int(self.state.global_step)
        finally:
            if self._stopper in self.callback_handler.callbacks:
                self.remove_callback(self._stopper)
        self._stopper.restore_best()
        self._stopper = None
        self._enter(None)

    @contextlib.contextmanager
    def _without_user_stoppers(self):
        """The user's early stopping watches the LoRA stage's evaluations: a stage that evaluates nothing (the
        detector's, which its own held-out rows stop; the cross-fitting LoRA's) runs without it, as
        EarlyStoppingCallback refuses a run without evaluations."""
        user_stoppers = [cb for cb in self.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)]
        for callback in user_stoppers:
            self.remove_callback(callback)
        try:
            yield
        finally:
            for callback in user_stoppers:
                self.add_callback(callback)

    def _run_cross_fit_stage(self) -> list[dict]:
        """`lora_cross_fit`: a LoRA trained, as the kept one is, on the other eval share's minority rows (and the
        training anchors, as `lora_rows` says), then read with the gate forced on, at every strength a selection may
        search, on the share the kept LoRA will train on. Its logits go into the run state (`cross_fit`); the LoRA
        is then put back to its initial draw, so the kept LoRA trains bit for bit as without cross-fitting. Nothing
        is checkpointed: a run interrupted here redoes this stage. Returns the stage's log entries."""
        halves, config = self._eval_halves(), self.adapter_config
        rows = self._lora_dataset("other")
        if len(rows) < self.args.min_anchors_per_batch:
            raise ValueError(
                f"lora_cross_fit: only {len(rows)} anchor rows for the second LoRA. Check the sensitive column, or "
                "use lora_cross_fit=False.")
        params = self._tuner.trainable_parameters("lora", self.adapter_name)
        initial = [p.detach().clone() for p in params]
        share = np.sort(halves["lora"])
        saved_strength, logits = float(config.adapter_strength), {}
        self._enter("lora")
        try:
            with self._without_user_stoppers(), self._stage_run(
                    rows, max_steps=self.lora_updates("other"), eval_strategy="no", save_strategy="no",
                    load_best_model_at_end=False, output_dir=os.path.join(self._stage_dir(), CROSS_FIT_DIR)):
                super().train()
            history = [{**entry, "stage": "cross-fit"} for entry in self.state.log_history]
            self._enter(None)
            dataset = halves["dataset"].select(share)
            for alpha in sorted(set(STRENGTHS) | {float(self.run_state.configured["strength"])}):
                self._tuner.set_adapter_strength(self.adapter_name, alpha)
                logits[repr(float(alpha))] = self.passes.outputs(dataset, ("on",))["logits_on"].tolist()
        finally:
            self._tuner.set_adapter_strength(self.adapter_name, saved_strength)
            with torch.no_grad():
                for param, value in zip(params, initial):
                    param.copy_(value)
            self._enter(None)
        self.run_state.cross_fit = {"rows": share.tolist(), "logits": logits}
        return history

    def _run_prototype_pass(self) -> None:
        """Stage 3 (passes.prototype_pass); the prototypes go into the adapter, the rest into the run state."""
        args, run, config = self.args, self.run_state, self.adapter_config
        exclude = run.holdout if self._selects_on_holdout() else None
        feats = self.frozen_pass()
        out = prototype_pass(run, feats, args=args, threshold=float(config.threshold),
                             num_classes=config.num_classes, exclude=exclude)
        self._detector.set_prototypes(self.adapter_name, torch.as_tensor(out["prototypes"]),
                                      torch.as_tensor(out["counts"]))
        config.num_classes, config.representation_dim = out["num_classes"], out["representation_dim"]
        for key in ("anchors", "detector_stats", "anchor_weights", "num_classes", "representation_dim"):
            setattr(run, key, out[key])
        if args.force_adapter or not np.isfinite(run.detector_stats.get("detector_auc", math.nan)):
            known = run.groups >= 0  # otherwise a blind detector switches the adapter off, with its own warning
            warn_if_detector_failed(run.detector_stats, feats["risk"][known], run.groups[known])
        self.log({f"prototype_stage_{k}": v for k, v in run.detector_stats.items()})

    def lora_updates(self, share: str = "lora") -> int:
        """Optimizer updates of the LoRA stage: `max_steps` if set, else max(lora_min_updates, ⌈epochs × LoRA rows /
        (per-device batch × accumulation)⌉), counted as if on one process so N processes make the same updates.
        `share="other"`: of the cross-fitting LoRA's stage (`lora_cross_fit`)."""
        args = self.args
        if args.max_steps > 0:
            return int(args.max_steps)
        rows = len(self._lora_eval_rows(share)) + (0 if self._eval_only() else len(self.anchor_rows()))
        per_epoch = self._updates_per_epoch(rows, 1)
        return max(args.lora_min_updates, math.ceil(args.num_train_epochs * per_epoch))

    def _lora_dataset(self, share: str = "lora"):
        """The rows the LoRA stage trains on (`lora_rows`): the training anchors, and/or the minority rows of the eval
        set's LoRA half (`_eval_halves`; `share="other"`: of the other half, for `lora_cross_fit`), with the training
        rows' columns (`fairnet_row` numbers them after those)."""
        train = self._all_rows.select(self.anchor_rows())
        minority = self._lora_eval_rows(share)
        if len(minority) == 0:  # none (and `datasets` cannot add a column to 0 rows)
            return train.select([]) if self._eval_only() else train
        extra = self._eval_halves()["dataset"].select(minority)
        extra = extra.remove_columns([c for c in extra.column_names if c not in train.column_names or c == ROW_COLUMN])
        extra = extra.add_column(ROW_COLUMN, list(range(len(self._all_rows), len(self._all_rows) + len(extra))))
        if self.args.sensitive_column not in extra.column_names:
            extra = extra.add_column(self.args.sensitive_column, [-1] * len(extra))
        try:
            extra = extra.cast(train.features)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"lora_rows={self.args.lora_rows!r}: the eval rows' columns do not match the training rows' types "
                f"({err}). Prepare both sets the same way, or use lora_rows='train'.") from err
        if self.args.lora_rows == "train+eval":
            from datasets import concatenate_datasets

            extra = concatenate_datasets([train, extra])
        form = train.format  # every row is read as a training row is (its format or transform, e.g. augmentations)
        extra.set_format(form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"],
                         **form["format_kwargs"])
        return extra

    def _lora_eval_rows(self, share: str = "lora") -> np.ndarray:
        """Positions (in the eval set) of the minority rows of its LoRA share that the LoRA stage trains on
        (`share="other"`: of the other share, which the cross-fitting LoRA trains on)."""
        halves = self._eval_halves()
        if halves is None:
            return np.zeros(0, dtype=np.int64)
        rows = halves["lora"] if share == "lora" else np.setdiff1d(np.arange(len(halves["dataset"])), halves["lora"])
        return rows[halves["groups"][rows] == 1]

    def _cross_fits(self) -> bool:
        """`lora_cross_fit` with an eval set to split."""
        return bool(self.args.lora_cross_fit) and self._eval_halves() is not None

    def _eval_only(self) -> bool:
        """`lora_rows="eval"` with an eval set to split: the training anchors are left out."""
        return self.args.lora_rows == "eval" and self._eval_halves() is not None

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
        with self._frozen_base_without_dropout(), self.passes.caching():
            self._set_detector_targets()
            if stage == "lora":
                self._run_prototype_pass()
            self._enter(stage)
            try:
                yield self
            finally:
                self._enter(None)

    # ------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.train_dataset is None:
            raise ValueError("FairTrainer.train() needs a train_dataset with a sensitive column.")
        args, config = self.args, self.adapter_config
        if args.gate_threshold is not None:
            config.threshold = args.gate_threshold
        config.selection_report = None  # a previous run's choice describes another adapter
        self._all_rows = self.train_dataset  # stages train on subsets of it; passes and row indices refer to it
        self._check_eval_columns()  # before any stage trains
        self._warn_if_eval_groups_missing()
        given = self.run_state  # a new run state per train(): only what the data validation found carries over
        self.run_state = FairRunState(label_setting=given.label_setting, class_labels=given.class_labels,
                                      given_groups=given.given_groups,
                                      fingerprint=run_fingerprint(
                                          args, config, self.train_dataset,
                                          None if args.lora_rows == "train" else self._selection_eval_set(),
                                          base=self._broadcast_object(base_model_digest(self.model))),
                                      configured={"threshold": float(config.threshold),
                                                  "strength": float(config.adapter_strength)},
                                      world_size=max(int(args.world_size), 1))
        self.pseudo_labeler, self._pseudo_group_cache, self._selection_passes = None, {}, {}
        self._selection_cache = {}
        self._eval_split = None
        if (args.fp16_full_eval or args.bf16_full_eval) and not self.is_model_parallel and self.model_init is None:
            # Trainer leaves such a model where it was loaded until its own train(), i.e. the first stage: move it
            # now, as that would, so the passes before it (partial and unlabeled settings) run on args.device
            self._move_model_to_device(self.model, args.device)
        point = self._resume_point(resume_from_checkpoint)
        self._warn_if_other_world_size(point)
        if self._tuner.is_fresh(self.adapter_name):
            # get_peft_model drew the adapter's weights before Trainer set the seed: draw them from args.seed (a
            # resumed run draws them too, then loads what its checkpoint holds over them)
            self._tuner.reinitialize(self.adapter_name, args.seed)
        with self._frozen_base_without_dropout(), self.passes.caching():
            return self._train_stages(point, trial, ignore_keys_for_eval, **kwargs)

    def _train_stages(self, point: dict, trial, ignore_keys_for_eval, **kwargs):
        args, run = self.args, self.run_state
        log_history: list[dict] = []
        if point["final"] is not None:
            self._load_final(point["final"])
        else:
            if point["detector"] is not None:
                self._load_run_state(point["detector"])
            else:
                self._set_detector_targets()
            run.stage = "detector"
            self._run_detector_stage(point["detector"])
            log_history = [{**entry, "stage": "detector"} for entry in self.state.log_history]
            run.stage = "prototypes"
            self._save_final()
        if run.stage == "prototypes":
            self._run_prototype_pass()
            run.stage = "lora"
            self._save_final()
        # do no harm: a blind detector switches the adapter off in the selection, so its LoRA would train for nothing
        run.lora_skipped = bool(self._broadcast_object(
            not (args.force_adapter or args.train_lora_when_blind) and self._blind(args) is not None))
        if run.lora_skipped:
            result, lora_rows = TrainOutput(0, math.nan, {"train_lora_skipped": 1.0}), []
            self.state.log_history = log_history
        else:
            if self._cross_fits() and not run.cross_fit:  # a resumed run whose final state holds it has it already
                log_history += self._run_cross_fit_stage()
                self._save_final()
            lora_rows = self._lora_dataset()
            result = self._run_lora_stage(lora_rows, point["lora"], trial, ignore_keys_for_eval, **kwargs)
            # Trainer starts a fresh state per stage: keep the detector stage's logs in the final history too.
            self.state.log_history = log_history + self.state.log_history
        run.stage = "selection"
        result.metrics.update({f"train_{k}": v for k, v in run.detector_stats.items()})
        result.metrics["train_skipped_batches"] = self.skipped_batches
        result.metrics["train_lora_rows"] = float(len(lora_rows))  # of which from the eval set (`lora_rows`):
        result.metrics["train_lora_eval_rows"] = float(0 if run.lora_skipped else len(self._lora_eval_rows()))
        if run.cross_fit:  # the second LoRA's eval rows (`lora_cross_fit`)
            result.metrics["train_cross_fit_lora_eval_rows"] = float(len(self._lora_eval_rows("other")))
        result.metrics["train_lora_relative_update"] = self.lora_relative_update()
        result.metrics.update(self._select_correction())
        run.stage = "done"
        self._warn_if_no_op(result.metrics)
        return result

    def _run_lora_stage(self, lora_rows, resume: Optional[str], trial, ignore_keys_for_eval, **kwargs):
        """Stage 3 (module docstring): `Trainer`'s loop over `lora_rows`; returns its `TrainOutput`."""
        if len(lora_rows) < self.args.min_anchors_per_batch:
            raise ValueError(
                f"Only {len(lora_rows)} anchor rows (ŝ = 1) for the LoRA stage: nothing to correct. Check the sensitive "
                "column (1 = minority), anchor_source/anchor_threshold, the pseudo-labeler in the unlabeled setting, "
                "or lora_rows."
            )
        self._enter("lora")
        full_eval, split = self.eval_dataset, self.eval_split()
        if split is not None and not isinstance(full_eval, dict):
            # the stage's own evaluations (eval_strategy, load_best_model_at_end, early stopping) read the eval rows
            # the LoRA does not train on, the rows the selection reads: not the share it learns from
            self.eval_dataset = full_eval.select(split["select"])
        try:
            with self._stage_run(lora_rows, max_steps=self.lora_updates()):
                return super().train(resume_from_checkpoint=resume, trial=trial,
                                     ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self.eval_dataset = full_eval
            self._enter(None)

    # ------------------------------------------------------------------ selection after training
    def _selects_on_holdout(self) -> bool:
        """Without a usable eval set (one with class labels), the correction is selected on the held-out training
        rows, which the LoRA stage then does not train on."""
        return self._selection_eval_set() is None and self.run_state.holdout is not None and bool(
            self.run_state.holdout.any())

    def _selection_eval_set(self):
        dataset = self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        if dataset is None or "labels" not in getattr(dataset, "column_names", []) or len(dataset) == 0:
            return None
        return dataset

    def _check_eval_columns(self) -> None:
        """`lora_rows` trains on eval rows: they need every column of the training rows (but the group's)."""
        eval_set = self._selection_eval_set()
        if self.args.lora_rows == "train" or eval_set is None:
            return
        missing = [c for c in self._all_rows.column_names
                   if c not in eval_set.column_names and c not in (ROW_COLUMN, self.args.sensitive_column)]
        if missing:
            raise ValueError(
                f"lora_rows={self.args.lora_rows!r} trains on eval rows, but the eval set lacks the training "
                f"column(s) {missing}. Give the eval set the training set's model inputs, or use lora_rows='train'.")

    def _selection_rows(self) -> tuple:
        """(dataset with `fairnet_row`, groups per row, description, weights per row or None) the correction is
        selected on: the held-out rows, or with `lora_rows` using the eval set, the eval rows the LoRA did not train
        on (`selection_rows`), weighted to the eval set's (class × group) mix where they over-represent a cell."""
        halves = self._eval_halves()
        if halves is not None and self._reads_cross_fit():  # every row, each share through the other share's LoRA
            return (halves["dataset"], halves["groups"],
                    f"{halves['where']}, every row, each half read through the LoRA that did not train on it "
                    "(lora_cross_fit)", None)
        if halves is not None:
            rows = halves["select"]
            share = "rows" if halves["weights"] is not None else "share"
            return (halves["dataset"].select(rows), halves["groups"][rows],
                    f"{halves['where']}, the {share} the LoRA stage did not train on", halves["weights"])
        return (*self._held_out_rows(), None)

    def _eval_halves(self) -> Optional[dict]:
        """`lora_rows` 'train+eval' / 'eval' with an eval set: a seeded share (`lora_eval_fraction`) of its rows,
        stratified on (class × the selection's group), for the LoRA stage ("lora") and the rest for the selection
        ("select": the rows `selection_rows` names, with their "weights"); None otherwise. Drawn once per `train()`
        (reselect() sees the same shares; its `selection_rows` picks the rows)."""
        if self.args.lora_rows == "train" or self._selection_eval_set() is None:
            return None
        if self._eval_split is None:
            dataset, groups, where = self._held_out_rows()
            self._eval_split = False  # one eval row: nothing to split, it selects
            if len(dataset) >= 2:  # both shares keep at least one row
                labels = np.asarray(dataset["labels"], dtype=np.int64)
                size = min(max(int(round(self.args.lora_eval_fraction * len(dataset))), 1), len(dataset) - 1)
                lora = stratified_subsample(labels, np.maximum(groups, 0), size, seed=self.args.seed)
                self._eval_split = {"dataset": dataset, "groups": groups, "where": where, "lora": lora,
                                    "labels": labels}
        if not self._eval_split:
            return None
        halves = self._eval_split
        everything = np.arange(len(halves["dataset"]))
        if self.args.selection_rows == "share":
            return {**halves, "select": np.setdiff1d(everything, halves["lora"]), "weights": None}
        # every row the LoRA did not train on: the LoRA share's rows outside the minority too, weighted back
        select = np.setdiff1d(everything, halves["lora"][halves["groups"][halves["lora"]] == 1])
        return {**halves, "select": select, "weights": mixture_weights(halves["labels"], halves["groups"], select)}

    def _held_out_rows(self) -> tuple:
        args, run = self.args, self.run_state
        eval_set = self._selection_eval_set()
        if eval_set is None:
            rows = np.flatnonzero(run.holdout)
            return self._all_rows.select(rows), run.groups[rows], "held-out training rows"
        dataset = _with_row_column(eval_set)
        groups = np.full(len(dataset), -1, dtype=np.int64)
        if run.label_setting == "unlabeled":
            return dataset, self.eval_pseudo_groups(eval_set), "eval rows (pseudo-groups)"
        if args.sensitive_column in dataset.column_names and self.eval_uses_sensitive:
            groups = np.asarray(dataset[args.sensitive_column], dtype=np.int64)
        if (groups < 0).any():  # unknown groups: the detector's estimate, as for the anchors
            risk = self.passes.risk(dataset)["risk"]
            groups = np.where(groups >= 0, groups, (risk > self.anchor_threshold()).astype(np.int64))
        return dataset, groups, "eval rows"

    def reselect(self, **overrides) -> dict:
        """Choose τ and the strength again after `train()`, with these `FairTrainingArguments` fields changed (e.g.
        `max_accuracy_drop=0.01`, `threshold_selection="threshold"`), without training again: the passes over the
        held-out rows are reused. The choice is written into the adapter's config; returns the `train_selection_*`
        metrics. The trainer's own arguments are not changed. An evaluation report attached for the model card by
        `evaluate()` described the previous choice: it is dropped (with a warning) until `evaluate()` runs again."""
        if self.run_state.stage not in ("selection", "done"):
            raise ValueError("reselect() needs a finished train() of this trainer: the LoRA stage has not run yet. "
                             "For an adapter you loaded, set its gate with model.peft_config[name].threshold and "
                             "model.base_model.set_adapter_strength(name, α), or compare thresholds on labelled "
                             "rows with fairnet_peft.threshold_sweep.")
        from ..evaluation.model_card import fairness_report

        asked = stage_arguments(self.args, **overrides)
        if self.run_state.lora_skipped and (asked.force_adapter or self._blind(asked) is None):
            raise ValueError(
                f"reselect() cannot switch the adapter on here: train() skipped the LoRA stage because "
                f"{self._blind(self.args)}, so there is no trained correction to choose. Train again with "
                "FairTrainingArguments(train_lora_when_blind=True) (or force_adapter=True). Nothing was changed.")
        attached = isinstance(self.model, PeftModel) and fairness_report(self.model, self.adapter_name) is not None
        saved = self.args
        try:
            self.args = asked
            metrics = self._select_correction()
        finally:
            self.args = saved
        if attached:
            warnings.warn("reselect() changed the correction, so the evaluation attached to the model card no longer "
                          "describes the model and was dropped: call evaluate() again before save_pretrained or "
                          "push_to_hub to put the new choice's metrics in the card.", UserWarning, stacklevel=2)
        return metrics

    def _blind(self, args) -> Optional[str]:
        """Why the adapter is switched off before any selection (the detector cannot find the group), or None."""
        run = self.run_state
        return detector_blind(run.detector_stats, args.min_detector_auc, run.label_setting)

    def _select_correction(self) -> dict:
        """Stage 4 (module docstring): choose τ and the adapter strength, write them into the adapter's config,
        return the `train_selection_*` metrics. Starts from the τ and strength configured before training."""
        from ..evaluation.model_card import detach_fairness_report

        args, run, config = self.args, self.run_state, self.adapter_config
        if isinstance(self.model, PeftModel):  # a card's evaluation (e.g. per epoch) was of another τ and α
            detach_fairness_report(self.model, self.adapter_name)
        self._tuner.set_threshold(self.adapter_name, run.configured["threshold"])
        self._tuner.set_adapter_strength(self.adapter_name, run.configured["strength"])
        off_reason = None if args.force_adapter else self._blind(args)
        max_drop, max_eod = args.resolved_max_accuracy_drop(), args.resolved_max_eod_increase()
        if off_reason is None and (args.gate_threshold is not None or (
                args.threshold_selection == "none" and max_drop is None and max_eod is None
                and args.resolved_max_majority_gate_rate() is None)):
            run.selection = {"threshold": float(config.threshold), "strength": float(config.adapter_strength),
                             "selected": False}
            config.selection_report = None
            return {}
        if self._selection_eval_set() is None and not self._selects_on_holdout():
            warnings.warn(
                "No eval_dataset and too few training rows per group to hold any out (detector_holdout_fraction), "
                "so τ and the adapter strength stay as configured and nothing checks the adapter's accuracy cost. "
                "Pass an eval_dataset (class labels suffice).", UserWarning, stacklevel=3)
            return {}
        dataset, groups, where, weights = self._selection_rows()
        if off_reason is not None:
            if run.lora_skipped:
                off_reason += (", so the LoRA stage was skipped (FairTrainingArguments.train_lora_when_blind=True "
                               "trains it)")
            info = {"threshold": OFF, "strength": float(config.adapter_strength), "reason": off_reason}
            if run.label_setting == "unlabeled":  # the marks, not the sensitive column, are what it could not find
                method = run.pseudo_label_details.get("method", args.pseudo_labeler)
                advice = (f"The pseudo-labeler ({method!r}) marked {100 * float(np.mean(run.groups == 1)):.1f} % of "
                          "the training rows as the minority; if those are not your group, try another "
                          "FairTrainingArguments.pseudo_labeler, or give group labels for some rows (the partial "
                          "setting), or FairLoraConfig.detector_layer (--detector-layer in the examples)")
            else:
                advice = ("Check the sensitive column and FairLoraConfig.detector_layer (--detector-layer in the "
                          "examples), or give group labels")
            warnings.warn(
                f"FairNet switched the adapter off (τ = 1): {off_reason}. The model behaves as the base model. "
                f"{advice}; or set FairTrainingArguments(force_adapter=True) to keep the adapter on anyway.",
                UserWarning, stacklevel=3)
        else:
            info = self._search(dataset, groups, weights)
            if info["threshold"] >= OFF:  # off by τ = 1; the strength stays, so raising τ later needs nothing else
                info["strength"] = float(config.adapter_strength)
                bound = "" if args.resolved_max_majority_gate_rate() is None else " and the majority gate bound"
                info["reason"] = ("no threshold and strength beat the adapter off on the held-out rows within the "
                                  f"accuracy floor and the EOD ceiling{bound}: "
                                  f"{off_explanation(info, args.floor_standard_errors)}")
                warnings.warn(f"FairNet kept the adapter off after the selection (τ = 1, the model behaves as the "
                              f"base model): {info['reason']}. The searched frontier is in the train metrics "
                              "(train_selection_frontier) and the model card.", UserWarning, stacklevel=3)
            else:
                if info.get("held_back"):  # on, but the limits refused a fairer correction: say which and why
                    info["held_back_reason"] = held_back_explanation(info, args.floor_standard_errors)
                wide = global_correction_warning(info)
                if wide:
                    warnings.warn(wide + ".", UserWarning, stacklevel=3)
        self._tuner.set_threshold(self.adapter_name, info["threshold"])
        self._tuner.set_adapter_strength(self.adapter_name, info["strength"])
        run.selection = {**info, "rows": len(dataset), "on": where, "selected": True}
        config.selection_report = selection_report(run.selection)  # saved with the adapter, for its model card
        metrics = {f"train_selection_{k}": float(v) for k, v in info.items() if isinstance(v, (int, float))}
        metrics["train_selection_adapter_off"] = float(info["threshold"] >= OFF)
        metrics["train_selection_rows"] = float(len(dataset))
        if "frontier" in info:
            metrics["train_selection_frontier"] = info["frontier"]
        if math.isfinite(info.get("refused", {}).get("rows_needed", math.nan)):
            metrics["train_selection_rows_needed"] = info["refused"]["rows_needed"]
        if "reason" in info:
            metrics["train_selection_reason"] = info["reason"]
        if "held_back_reason" in info:
            metrics["train_selection_held_back"] = info["held_back_reason"]
            if math.isfinite(info["held_back"]["rows_needed"]):
                metrics["train_selection_held_back_rows_needed"] = info["held_back"]["rows_needed"]
        return metrics

    def _search(self, dataset, groups, weights=None) -> dict:
        args, config = self.args, self.adapter_config
        strengths = searched_strengths(args, config.adapter_strength)
        key = (getattr(dataset, "_fingerprint", None), self._reads_cross_fit())
        if key not in self._selection_cache:  # the passes over these rows, kept for reselect() (per selection_rows)
            self._selection_cache[key] = {"key": key, "off": self.passes.outputs(dataset, ("off",)), "on": {}}
        self._selection_passes = self._selection_cache[key]
        out, logits_on, saved = self._selection_passes["off"], self._selection_passes["on"], float(config.adapter_strength)
        try:
            for alpha in strengths:
                if alpha not in logits_on:
                    self._tuner.set_adapter_strength(self.adapter_name, alpha)
                    logits_on[alpha] = self._gated_logits(dataset, alpha)
        finally:
            self._tuner.set_adapter_strength(self.adapter_name, saved)
        predicted = np.unique(np.asarray(out["logits_off"]).argmax(-1))
        if len(predicted) == 1 and len(np.unique(out["label"])) > 1:
            warnings.warn(
                f"The base model predicts class {int(predicted[0])} for every one of the {len(out['label'])} held-out "
                "rows the selection reads: every other class has accuracy 0 in both groups, so worst-group accuracy "
                "is 0 whatever the adapter does and an EOD of 0 only means no row gets another class. Train the "
                "base (ERM) model further, or with class weights, before FairNet corrects it.", UserWarning,
                stacklevel=4)
        return select_with_arguments(args, out["logits_off"], logits_on, out["risk_native"], out["label"], groups,
                                     configured_tau=float(config.threshold), configured_strength=saved,
                                     weights=weights)

    def _reads_cross_fit(self) -> bool:
        """The selection reads the cross-fitted passes: the run trained the second LoRA, and the arguments still
        ask for it (`reselect(lora_cross_fit=False)` selects on the share the kept LoRA did not train on, exactly
        as a run without cross-fitting would have)."""
        return bool(self.args.lora_cross_fit and self.run_state.cross_fit)

    def _gated_logits(self, dataset, alpha: float) -> np.ndarray:
        """Logits of `dataset`'s rows with the gate forced on at the strength set (`alpha`). With cross-fitting
        (`run_state.cross_fit`, `dataset` the whole eval set) the rows the kept LoRA trained on come from the second
        LoRA's pass instead."""
        cross = self.run_state.cross_fit
        if not self._reads_cross_fit():
            return self.passes.outputs(dataset, ("on",))["logits_on"]
        saved = {float(k): v for k, v in cross["logits"].items()}
        if float(alpha) not in saved:
            raise ValueError(f"lora_cross_fit: the second LoRA was read at the strengths {sorted(saved)}, not at "
                             f"{alpha}; select among those, or train again.")
        rows = np.asarray(cross["rows"], dtype=np.int64)
        own = np.setdiff1d(np.arange(len(dataset)), rows)
        kept = self.passes.outputs(dataset.select(own), ("on",))["logits_on"]
        out = np.empty((len(dataset), kept.shape[1]), dtype=kept.dtype)
        out[own], out[rows] = kept, np.asarray(saved[float(alpha)], dtype=kept.dtype)
        return out

    # ------------------------------------------------------------------ resuming and checkpoints
    def _checkpoints(self, folder: str) -> list[str]:
        """`checkpoint-N` folders of this run (their run state has this run's fingerprint), newest first."""
        if not os.path.isdir(folder):
            return []
        found = []
        for name in os.listdir(folder):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            path = os.path.join(folder, name)
            if match and self._belongs_to_run(path):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found, reverse=True)]

    def _belongs_to_run(self, folder: str) -> bool:
        state = FairRunState.load(folder)
        return state is not None and state.fingerprint == self.run_state.fingerprint

    def _resume_point(self, resume) -> dict:
        """Where `train()` starts: {"final": finished detector stage folder or None, "detector": detector-stage
        checkpoint or None, "lora": LoRA-stage checkpoint or None}. Only this run's checkpoints count."""
        point = {"final": None, "detector": None, "lora": None}
        if not resume:
            return point
        final = os.path.join(self._stage_dir(), FINAL)
        if resume is True:
            lora, detector = self._checkpoints(self.args.output_dir), self._checkpoints(self._stage_dir())
            others = [p for p in (final,) if FairRunState.load(p) is not None and not self._belongs_to_run(p)]
            if others:
                warnings.warn(f"{others[0]} was written by another run (other settings, data or base model); it is "
                              "ignored.", UserWarning, stacklevel=4)
            point["final"] = final if self._belongs_to_run(final) else None
            point["lora"] = lora[0] if lora and point["final"] else None
            point["detector"] = detector[0] if detector and not point["final"] else None
            if not any(point.values()):
                warnings.warn(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint of this "
                              "run; training from the start.", UserWarning, stacklevel=4)
            return point
        path = os.path.abspath(str(resume))
        if not self._belongs_to_run(path):
            state = FairRunState.load(path)
            raise ValueError(
                f"Cannot resume from {resume}: "
                + ("it is not a FairTrainer checkpoint (no run state in it)." if state is None else
                   f"it was written by another run (fingerprint {state.fingerprint}, this run {self.run_state.fingerprint}:"
                   " other training arguments, adapter config, training data or base model).")
                + " Resume with the settings that wrote it, call train() without resume_from_checkpoint to start "
                  "afresh, or use another output_dir.")
        in_stage = path.startswith(os.path.abspath(self._stage_dir()) + os.sep)
        point["detector" if in_stage else "lora"] = path
        if not in_stage:
            if not self._belongs_to_run(final):
                raise ValueError(f"Cannot resume the LoRA stage from {resume}: the finished detector stage "
                                 f"({final}) of this run is missing.")
            point["final"] = final
        return point

    def _warn_if_other_world_size(self, point: dict) -> None:
        """Resuming on another number of processes: allowed (as in `Trainer`), but each LoRA update then sees another
        number of anchors, so the result equals neither uninterrupted run. Say so."""
        found = next((p for p in (point["lora"], point["detector"], point["final"]) if p), None)
        saved = FairRunState.load(found) if found else None
        now = self.run_state.world_size
        if saved is not None and saved.world_size is not None and saved.world_size != now:
            warnings.warn(
                f"Resuming from {found}, written by a run on {saved.world_size} process(es), on {now}. The run "
                "continues, but an update's batch spans every process, so from here on each update sees other rows "
                f"than before: the result equals neither an uninterrupted {saved.world_size}- nor {now}-process run. "
                f"Resume on {saved.world_size} process(es) to reproduce that run.", UserWarning, stacklevel=3)

    def _load_run_state(self, folder: str) -> None:
        saved = FairRunState.load(folder)
        given, labels = self.run_state.given_groups, self.run_state.class_labels
        if not (np.array_equal(saved.given_groups, given) and np.array_equal(saved.class_labels, labels)):
            raise ValueError(f"The run state in {folder} does not match the training data's labels or groups.")
        world_size = self.run_state.world_size  # this run's, not the checkpoint's
        for field in dataclasses.fields(saved):  # in place: every holder of the run state sees the loaded one
            setattr(self.run_state, field.name, getattr(saved, field.name))
        self.run_state.world_size = world_size

    def _save_final(self) -> None:
        final = os.path.join(self._stage_dir(), FINAL)
        save_adapter(self.model, final, self.adapter_name)  # every rank: FSDP gathers the shards, rank 0 writes
        if self.accelerator.is_main_process:
            self.run_state.save(final)
        self.accelerator.wait_for_everyone()

    def _load_final(self, final: str) -> None:
        self._load_run_state(final)
        run = self.run_state
        if run.num_classes is not None:  # shapes to load into
            self._detector.set_prototypes(self.adapter_name, torch.zeros(run.num_classes, 2, run.representation_dim),
                                          torch.zeros(run.num_classes, 2))
            config = self.adapter_config
            config.num_classes, config.representation_dim = run.num_classes, run.representation_dim
        weights = load_file(os.path.join(final, "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter_name)

    # ------------------------------------------------------------------ diagnostics
    def lora_relative_update(self) -> float:
        """Mean over adapted layers of ‖(α/r)·B·A‖_F / ‖W‖_F for this adapter: ≈ 0 means the LoRA did not move."""
        return self._tuner.lora_relative_update(self.adapter_name)

    def _warn_if_no_op(self, metrics: dict) -> None:
        if self.run_state.lora_skipped:  # the adapter is off, and the warning that switched it off says why
            return
        rate, update = metrics.get("train_gate_rate_s1", float("nan")), metrics["train_lora_relative_update"]
        if np.isfinite(rate) and rate < 0.1 and not metrics.get("train_selection_adapter_off"):
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


class _RunStateCheckpoint(TrainerCallback):
    """Writes the run state (and the detector's early-stopping snapshot) into every checkpoint the stages save."""

    def __init__(self, trainer: FairTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.stage is None or not trainer.accelerator.is_main_process:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if trainer.stage == "detector":
            trainer.run_state.detector_updates = int(state.global_step)
            if trainer._stopper is not None:
                trainer._stopper.save_snapshot(os.path.join(folder, EARLY_STOPPING_WEIGHTS))
        trainer.run_state.save(folder)  # last: a checkpoint without it is not resumed from
        return control


def _plain_eval_inputs(compute_metrics):
    """A user's `compute_metrics` gets what `Trainer` gives one: `EvalPrediction(predictions=logits,
    label_ids=labels)`. FairTrainer's evaluation produces `(logits, risk, gate)` and `(labels, sensitive)`; only a
    function marked `fairnet_inputs = True` (`metrics.make_compute_metrics`) receives those tuples."""
    if compute_metrics is None or getattr(compute_metrics, "fairnet_inputs", False):
        return compute_metrics
    from transformers import EvalPrediction

    @functools.wraps(compute_metrics)
    def plain(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        return compute_metrics(EvalPrediction(predictions=preds[0] if isinstance(preds, tuple) else preds,
                                              label_ids=labels[0] if isinstance(labels, tuple) else labels,
                                              inputs=getattr(eval_pred, "inputs", None)))

    return plain


def _with_labels_column(dataset):
    """A dataset (or each of a dict's) whose class column is `label` with `labels` renamed: the LoRA stage trains on
    training and eval rows together, and the selection reads `labels` (Trainer's collators rename it the same way)."""
    if isinstance(dataset, dict):
        return type(dataset)({k: _with_labels_column(v) for k, v in dataset.items()})
    names = getattr(dataset, "column_names", None) or []
    if "label" in names and "labels" not in names and hasattr(dataset, "rename_column"):
        return dataset.rename_column("label", "labels")
    return dataset


def _warn_which_eval_set(dataset, args) -> None:
    """A dict of eval sets: the first is the one the LoRA stage trains on (half of it) and the selection reads; say
    which, so a test split placed first is not silently trained on. An eval set the selection cannot read (no class
    labels, or no rows): say that the held-out training rows select instead."""
    first = next(iter(dataset.values()), None) if isinstance(dataset, dict) else dataset
    names = getattr(first, "column_names", None)
    if names is not None and ("labels" not in names or len(first) == 0):
        what = "has no rows" if len(first) == 0 else f"has no class labels (no 'labels' or 'label' column: {names[:8]})"
        warnings.warn(
            f"eval_dataset {what}, so FairTrainer can neither select τ and the adapter strength on it nor train its "
            "LoRA on it: it holds out some training rows for that instead (detector_holdout_fraction), and "
            "evaluate() reports no accuracy. Give the eval set its class labels to select on it.",
            UserWarning, stacklevel=3)
    if isinstance(dataset, dict) and len(dataset) > 1 and args.lora_rows != "train":
        first = next(iter(dataset))
        warnings.warn(
            f"eval_dataset is a dict: FairTrainer trains its LoRA on half of eval_dataset[{first!r}] (lora_rows="
            f"{args.lora_rows!r}) and selects τ and the strength on the other half; the other entries are only "
            "evaluated. Put your validation split first and keep the test split out of eval_dataset.",
            UserWarning, stacklevel=3)


def _model_bounds(model) -> dict:
    """The base model's `num_labels` and (text) `vocab_size`, the bounds the datasets' labels and token ids must keep
    (None where the config has none)."""
    config = getattr(model.get_base_model(), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"num_labels": getattr(config, "num_labels", None), "vocab_size": getattr(text, "vocab_size", None)}


def _warn_if_minority_is_most(sensitive: np.ndarray, column: str) -> None:
    """FairNet corrects the group coded 1: its detector looks for those rows and its LoRA pulls them toward the
    group-0 prototypes of their class. A 1 on most rows is more often a swapped coding than a minority."""
    known = sensitive[sensitive >= 0]
    share = float((known == 1).mean()) if len(known) else 0.0
    if share > 0.5:
        warnings.warn(
            f"The group coded 1 in {column!r} is {share:.0%} of the training rows with a known group. FairNet corrects "
            "the group coded 1 (its detector looks for those rows; its LoRA pulls them toward the other group's "
            "behaviour), so 1 should mark the group that fares worse, usually the minority. If 1 marks your majority, "
            "recode the column: fairnet_peft.data.encode_sensitive(values, minority_value=...), or 1 - value.",
            UserWarning, stacklevel=4)


def _check_pad_token(model, args) -> None:
    """A decoder classifier (a per-token `score` head: Llama, GPT-2, Mistral, ...) reads each row's last token that is
    not padding, and transformers refuses batches of more than one row without `pad_token_id`. The detector stage
    stops before the head, so without this check the failure would come after it, in words that do not name the
    fix."""
    base = model.get_base_model()
    batch = max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
    if isinstance(getattr(base, "score", None), torch.nn.Module) and model_pad_token_id(model) is None and batch > 1:
        raise ValueError(
            f"The base model ({type(base).__name__}) has no pad_token_id: its head reads each row's last "
            "non-padding token, and transformers cannot find it in a batch of more than one row. Set it before "
            "get_peft_model: model.config.pad_token_id = tokenizer.pad_token_id (for a tokenizer without one: "
            "tokenizer.pad_token = tokenizer.eos_token first).")


def _with_row_column(dataset):
    """`dataset` with the `fairnet_row` column (0..n-1), replacing one it has."""
    if ROW_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(ROW_COLUMN)
    return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))


def _plain(value) -> bool:
    """A detail worth keeping in the run state: a scalar, or a dict of scalars (e.g. auto's per-labeler scores)."""
    return np.isscalar(value) or (isinstance(value, dict) and all(np.isscalar(v) for v in value.values()))
