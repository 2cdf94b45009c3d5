"""Passes over the training rows with the base frozen and the LoRA off: features, pseudo-labels, detector targets,
held-out detector loss and prototypes. A mixin of `FairTrainer` (trainer.py), which owns the stages.

What a pass returns is a dict of numpy arrays in row order (the `fairnet_row` column), gathered over processes:
`row`, `label`, `risk`, and for a "features" pass also `z` (the head's input), `logits` and `feat` (the mean-pooled
detector input). z, logits and feat depend on the frozen base only, so within one `train()` they are computed once
per dataset and cached (keyed by the dataset's fingerprint; N × (2d + K) floats, no per-token tensor); later passes
then only need the risk, which a forward stopped at the detector's layer gives (`stop_at_detector`). The cache
lives only inside `caching_features()`, which `train()` and the `prepare_*_stage()` helpers hold: outside it every
pass recomputes, so a base changed between calls is never served stale features.

State this mixin sets on the trainer: `_labels_of_setting`, `_target`, `_holdout`, `_pos_weight`,
`_detector_target` (detector targets), `_group_hat`, `_anchor_weights`, `detector_stats` (prototype pass), `_pseudo`,
`pseudo_labeler`, `pseudo_label_details` (unlabeled setting).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Optional

import numpy as np
import torch

from ..tuner.detector import align_mask, as_tokens, pool_tokens
from ..tuner.early_exit import stop_at_detector
from ..tuner.gate import force_gate, gate_record
from .arguments import stage_arguments
from .detector_stage import detector_statistics, holdout_rows, propagated_labels, warn_if_detector_failed
from .losses import class_balanced_bce
from .prototypes import anchor_weights, compute_prototypes
from .pseudo_labels import pseudo_group_worst_accuracy, pseudo_label

ROW_COLUMN = "fairnet_row"
FEATURES = ("z", "logits", "feat")



def _plain(value) -> bool:
    """A detail worth keeping on the trainer: a scalar, or a dict of scalars (e.g. auto's per-labeler scores)."""
    return np.isscalar(value) or (isinstance(value, dict) and all(np.isscalar(v) for v in value.values()))

class TrainingPasses:
    """Frozen-model passes of `FairTrainer`; see the module docstring."""

    # ------------------------------------------------------------------ one pass
    @contextlib.contextmanager
    def _every_row(self):
        """Passes must see every row: `dataloader_drop_last` is off inside (a copy of the arguments, never the user's)."""
        saved = self.args
        self.args = stage_arguments(saved, dataloader_drop_last=False)
        try:
            yield
        finally:
            self.args = saved

    @contextlib.contextmanager
    def caching_features(self):
        """Inside the block, the base features of a dataset are computed by its first full pass only."""
        self._feature_cache = {}
        try:
            yield
        finally:
            self._feature_cache = None

    def detector_network(self) -> torch.nn.Module:
        """The bias detector network of this trainer's adapter."""
        return self._detector.fairlora_detector[self.adapter_name]

    def frozen_pass(self, dataset=None, *, full: bool = True) -> dict[str, np.ndarray]:
        """One eval-mode pass, LoRA off, over `dataset` (default: the training rows, which carry the `fairnet_row`
        column): row index, label and risk of every row and, with `full`, its z, logits and mean-pooled detector
        input, in row order. Without `full` (or with those features cached) the forward stops at the detector."""
        dataset = self._all_rows if dataset is None else dataset
        key, cache = getattr(dataset, "_fingerprint", None), getattr(self, "_feature_cache", None)
        cached = cache.get(key) if full and cache is not None else None
        result = self._run_pass(dataset, features=full and cached is None)
        if cached is not None:
            result.update(cached)
        elif full and cache is not None and key is not None:
            cache[key] = {k: result[k] for k in FEATURES}
        return result

    def _run_pass(self, dataset, *, features: bool) -> dict[str, np.ndarray]:
        model = self.model
        was_training = model.training
        model.eval()
        out: dict[str, list] = defaultdict(list)
        try:
            with torch.no_grad(), self._every_row():
                for batch in self.get_eval_dataloader(dataset):
                    batch = self._prepare_inputs(batch)
                    _, rows = self._pop_extras(batch)
                    labels = batch.pop("labels")
                    step = {"row": rows, "label": labels,
                            **(self._features_step(batch) if features else {"risk": self._risk_step(batch)})}
                    for k, v in self.accelerator.gather_for_metrics(step).items():
                        out[k].append(v.cpu())
        finally:
            model.train(was_training)
        result = {k: torch.cat(v).numpy() for k, v in out.items()}
        order = np.argsort(result["row"], kind="stable")
        return self._checked({k: v[order] for k, v in result.items()}, dataset)

    def _risk_step(self, batch: dict) -> torch.Tensor:
        with force_gate(self.model, False), stop_at_detector(self.model, self.adapter_name) as stop:
            self.model(**batch)
        return stop.record.risk.float()

    def _features_step(self, batch: dict) -> dict[str, torch.Tensor]:
        captured = {}

        def capture(module, args, kwargs):
            hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            tokens = as_tokens(hidden.detach())
            captured["feat"] = pool_tokens(tokens, align_mask(batch.get("attention_mask"), tokens), "mean").float()

        read = self.model.get_base_model().get_submodule(self._config.detector_module)
        handle = read.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with force_gate(self.model, False):
                outputs, z = self._forward_with_z(self.model, batch)
        finally:
            handle.remove()
        return {"risk": gate_record(self.model, self.adapter_name).risk.float(), "z": z.float(),
                "logits": outputs.logits.float(), "feat": captured["feat"]}

    @staticmethod
    def _checked(result: dict, dataset) -> dict:
        if len(result["row"]) != len(dataset) or len(np.unique(result["row"])) != len(dataset):
            raise RuntimeError(
                f"The pass over {len(dataset)} training rows returned {len(np.unique(result['row']))} distinct rows; "
                "a custom sampler or collator dropped or repeated rows. FairTrainer needs every row once in eval passes.")
        if "z" in result and not np.isfinite(result["z"]).all():
            bad = result["row"][~np.isfinite(result["z"]).all(1)][:10].tolist()
            raise ValueError(f"The frozen model produced NaN/inf representations for training rows {bad}; check those inputs.")
        return result

    # ------------------------------------------------------------------ unlabeled setting: pseudo-labels
    def _fit_pseudo_labeler(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Fit `args.pseudo_labeler` (pseudo_labels.py) on the main process and broadcast the marks. The fitted
        labeler stays on the trainer (`self.pseudo_labeler`) to mark validation rows the same way."""
        args, marks = self.args, np.zeros(len(features["z"]), dtype=np.int64)
        if self.accelerator.is_main_process:
            result = pseudo_label(
                args.pseudo_labeler, features=np.concatenate([features["z"], features["feat"]], axis=1),
                labels=features["label"], logits=features["logits"], seed=args.seed, **self._pseudo_knobs())
            marks, self.pseudo_labeler, self.pseudo_label_details = result.labels, result.labeler, {
                "method": result.method, **{k: v for k, v in result.details.items() if _plain(v)}}
        return self._broadcast(marks)

    def _broadcast(self, marks: np.ndarray) -> np.ndarray:
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
            feats = self.frozen_pass(rows.add_column(ROW_COLUMN, list(range(len(rows)))))
            marks = np.zeros(len(rows), dtype=np.int64)
            if self.pseudo_labeler is not None:
                marks = np.asarray(self.pseudo_labeler.predict(np.concatenate([feats["z"], feats["feat"]], axis=1),
                                                               feats["label"], feats["logits"]), dtype=np.int64)
            cache[key] = self._broadcast(marks)
        return cache[key]

    # ------------------------------------------------------------------ detector targets and held-out loss
    def _set_detector_targets(self) -> None:
        """`_labels_of_setting`: true labels (full, partial; -1 unknown) or pseudo-labels (unlabeled); statistics
        and anchors use them. `_target`: what the detector trains on; in the partial setting the unlabelled rows get
        a logistic probe's labels (`partial_label_propagation`)."""
        args = self.args
        labels = self._sensitive
        if self.label_setting == "unlabeled":
            labels = self._pseudo = self._fit_pseudo_labeler(self.frozen_pass())
            self._refuse_whole_class_minority(labels)
        self._labels_of_setting = labels
        self._holdout = holdout_rows(labels, args.detector_holdout_fraction, args.seed)
        target = labels
        if self.label_setting == "partial" and args.partial_label_propagation:
            feats = self.frozen_pass()
            target = propagated_labels(np.concatenate([feats["z"], feats["feat"]], axis=1), labels,
                                       (labels >= 0) & ~self._holdout)
        known = target[target >= 0]
        self._pos_weight = float((known == 0).sum()) / max(int((known == 1).sum()), 1)
        self._detector_target = torch.as_tensor(np.where(self._holdout, -1, target))
        self._target = target

    def _refuse_whole_class_minority(self, marks: np.ndarray) -> None:
        whole = [int(k) for k in np.unique(self._labels) if (marks[self._labels == k] == 1).all()]
        if whole:
            raise ValueError(
                f"The pseudo-labeler ({self.pseudo_label_details.get('method', self.args.pseudo_labeler)}) marked "
                f"every row of classes {whole} as minority, so no majority prototype exists for them (an error set "
                "is a whole class when the frozen model never predicts it: is the model task-trained?). Train the "
                "base model first, or choose FairTrainingArguments.pseudo_labeler='lof'/'gmm'/'kmeans'.")

    def holdout_loss(self) -> float:
        """Class-balanced BCE (Eq. 1) of the current detector on the held-out rows (a pass stopped at the detector)."""
        feats = self.frozen_pass(self._all_rows.select(np.flatnonzero(self._holdout)), full=False)
        risk = torch.as_tensor(feats["risk"], dtype=torch.float64)
        return float(class_balanced_bce(risk, torch.as_tensor(self._target[feats["row"]]), self._pos_weight))

    # ------------------------------------------------------------------ prototype pass
    def anchor_threshold(self) -> float:
        """`anchor_threshold`, with 'auto' = w₁ / (1 + w₁): a class-balanced detector's risk at which the minority
        becomes the more likely group under the labelled rows' prior (w₁ = N(s=0) / N(s=1))."""
        value = self.args.anchor_threshold
        return self._pos_weight / (1.0 + self._pos_weight) if value == "auto" else float(value)

    def anchor_rows(self) -> np.ndarray:
        """Indices of the training rows the LoRA stage trains on (ŝ = 1), after the prototype pass."""
        return np.flatnonzero(self._group_hat.numpy() == 1)

    def _anchor_groups(self, risk: np.ndarray) -> np.ndarray:
        detected = (risk > self.anchor_threshold()).astype(np.int64)  # anchors: independent of the gate τ
        labelled, source = self._labels_of_setting, self.args.anchor_source
        if source == "labels":
            return labelled.copy()
        return detected if source == "detector" else np.where(labelled >= 0, labelled, detected)

    def _prototype_pass(self) -> None:
        """Risk, groups ŝ, detector statistics and the (class × group) prototypes (prototypes.py), which go into the
        adapter through `set_prototypes`; `num_classes` and `representation_dim` are set here, once."""
        args, feats = self.args, self.frozen_pass()
        group = self._anchor_groups(feats["risk"])
        self._group_hat = torch.as_tensor(group)
        labelled = self._labels_of_setting
        gated = (feats["risk"] > float(self._config.threshold)).astype(np.int64)
        self.detector_stats = detector_statistics(feats["risk"], feats["feat"], labelled, gated, group,
                                                  self._holdout, args.seed)
        known = labelled >= 0
        warn_if_detector_failed(self.detector_stats, feats["risk"][known], labelled[known])
        labels, z = feats["label"], feats["z"]
        n_classes = max(int(self._config.num_classes or 0), int(labels.max()) + 1)
        correct = feats["logits"].argmax(-1) == labels if args.prototype_rows == "correct" else None
        proto, counts = compute_prototypes(z, labels, group, n_classes, correct=correct)
        self._config.num_classes, self._config.representation_dim = n_classes, int(z.shape[1])
        self._detector.set_prototypes(self.adapter_name, torch.as_tensor(proto), torch.as_tensor(counts))
        self._anchor_weights = torch.as_tensor(anchor_weights(labels, group, n_classes))
        self.log({f"prototype_stage_{k}": v for k, v in self.detector_stats.items()})
