"""Passes over rows with the base frozen, and what the trainer computes from them; `FairTrainer` holds one
`RowPasses` (composition, not a mixin).

A pass is `evaluation.gated.gated_pass` over the trainer's eval dataloader (every row once, gathered over
processes, returned in row order by the `fairnet_row` column): `features` (LoRA off: risk, the head's input z,
logits and the mean-pooled detector input "feat"), `risk` (stopped at the detector's layer) and `outputs` (any gate
modes, e.g. off / on at a strength, for the selection). z, logits and feat depend on the frozen base only, so inside
`caching()` (held by `train()` and the `prepare_*_stage()` helpers) they are computed once per dataset; outside it
every pass recomputes, so a base changed between calls is never served stale features.

The functions below the class turn pass results into `FairRunState` fields (state.py): detector targets, anchors,
detector statistics and prototypes. They take the state and arrays and return values; the trainer writes them.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..evaluation.gated import gated_pass
from ..tuner.detector import align_mask, as_tokens, pool_tokens
from .arguments import stage_arguments
from .detector_stage import detector_statistics, holdout_rows, propagated_labels
from .prototypes import anchor_weights, compute_prototypes
from .state import FairRunState

ROW_COLUMN = "fairnet_row"
FEATURES = ("z", "logits", "feat")


class RowPasses:
    """Eval-mode passes of one `FairTrainer` over datasets that carry the `fairnet_row` column."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._cache: Optional[dict] = None

    @contextlib.contextmanager
    def caching(self):
        """Inside the block, the base features of a dataset are computed by its first full pass only (a nested block
        shares the outer one's cache)."""
        if self._cache is not None:
            yield
            return
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None

    # ------------------------------------------------------------------ the passes
    def features(self, dataset) -> dict[str, np.ndarray]:
        """row, label, risk, z, logits and feat of every row of `dataset`, LoRA off, in row order."""
        key = getattr(dataset, "_fingerprint", None)
        cached = self._cache.get(key) if self._cache is not None and key is not None else None
        if cached is not None:
            return {**self.risk(dataset), **cached}
        result = self._run(dataset, ("off",), forward=self._features_forward)
        result["logits"] = result.pop("logits_off")
        if self._cache is not None and key is not None:
            self._cache[key] = {k: result[k] for k in FEATURES}
        return result

    def risk(self, dataset) -> dict[str, np.ndarray]:
        """row, label and risk of every row; on one process the forward stops at the detector's layer. Under
        DDP/FSDP the whole model runs (the gate off), as in the detector stage: a forward ended by an exception would
        skip the wrapper's own end-of-forward bookkeeping (FSDP2 would keep the read block unsharded)."""
        if self.trainer.accelerator.num_processes > 1:
            result = self._run(dataset, ("off",))
            result.pop("logits_off")
            return result
        return self._run(dataset, ("risk",))

    def outputs(self, dataset, modes) -> dict[str, np.ndarray]:
        """row, label, risk and `logits_<mode>` for the gate modes of `evaluation.gated` (e.g. ("off", "on"))."""
        return self._run(dataset, modes)

    def _run(self, dataset, modes, forward=None) -> dict[str, np.ndarray]:
        trainer = self.trainer
        # the training's mixed precision, also before the first stage prepares the model (which is what adds it)
        with trainer.accelerator.autocast():
            result = gated_pass(trainer.model, trainer.eval_batches(dataset), modes, adapter_name=trainer.adapter_name,
                                forward=forward, gather=self._gather)
        native = result.pop("risk_native", None)
        order = np.argsort(result["row"], kind="stable")
        result = {k: v[order] for k, v in result.items()}
        if native is not None:
            result["risk_native"] = native[torch.as_tensor(order)]
        return _checked(result, dataset)

    def _gather(self, step: dict) -> dict:
        """One batch's tensors from every process (`gather_for_metrics`), sent to the accelerator's device first:
        NCCL gathers device tensors only, and a pass before FSDP or DeepSpeed places the model runs on the CPU."""
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            step = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in step.items()}
        return accelerator.gather_for_metrics(step)

    def _features_forward(self, model, batch: dict) -> tuple:
        trainer, captured = self.trainer, {}

        def capture(module, args, kwargs):
            if "feat" in captured:  # a read module run again in the pass (shared weights): the gate read the first
                return
            hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            tokens = as_tokens(hidden.detach())
            # pooled in fp32: a bf16 sum of a long row's tokens (and its mask count past 256) loses digits
            tokens = tokens.float()
            captured["feat"] = pool_tokens(tokens, align_mask(batch.get("attention_mask"), tokens), "mean")

        read = model.get_base_model().get_submodule(trainer.adapter_config.detector_module)
        handle = read.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            outputs, z = trainer.forward_with_representation(model, batch)
        finally:
            handle.remove()
        return outputs.logits.detach().float(), {"z": z.detach().float(), "feat": captured["feat"]}


def _checked(result: dict, dataset) -> dict:
    rows = result["row"]
    if len(rows) != len(dataset) or len(np.unique(rows)) != len(dataset):
        raise RuntimeError(
            f"The pass over {len(dataset)} rows returned {len(np.unique(rows))} distinct rows; a custom sampler or "
            "collator dropped or repeated rows. FairTrainer needs every row once in eval passes.")
    if "z" in result and not np.isfinite(result["z"]).all():
        bad = rows[~np.isfinite(result["z"]).all(1)][:10].tolist()
        raise ValueError(f"The frozen model produced NaN/inf representations for rows {bad}; check those inputs.")
    return result


def every_row(args):
    """A copy of the arguments with `dataloader_drop_last` off: passes must see every row."""
    return stage_arguments(args, dataloader_drop_last=False)


# ---------------------------------------------------------------------- from passes to run state
def detector_targets(run: FairRunState, *, setting: str, holdout_fraction: float, seed: int,
                     propagate: bool, features: Optional[dict]) -> dict:
    """The detector stage's inputs from the setting's groups (`run.groups`): the held-out rows, what the detector
    trains on (the partial setting's unknown rows labelled by the logistic probe when `propagate`), and w₁."""
    groups = run.groups
    holdout = holdout_rows(groups, holdout_fraction, seed)
    target = groups
    if setting == "partial" and propagate:
        target = propagated_labels(np.concatenate([features["z"], features["feat"]], axis=1), groups,
                                   (groups >= 0) & ~holdout)
    known = target[target >= 0]
    pos_weight = float((known == 0).sum()) / max(int((known == 1).sum()), 1)
    return {"holdout": holdout, "detector_target": np.where(holdout, -1, target), "pos_weight": pos_weight}


def anchor_threshold(value, pos_weight: float) -> float:
    """`anchor_threshold`, with 'auto' = w₁ / (1 + w₁): a class-balanced detector's risk at which the minority
    becomes the more likely group under the labelled rows' prior (w₁ = N(s=0) / N(s=1))."""
    return pos_weight / (1.0 + pos_weight) if value == "auto" else float(value)


def estimated_groups(groups: np.ndarray, risk: np.ndarray, threshold: float, source: str) -> np.ndarray:
    """ŝ per row from the known (or pseudo-) groups and the detector's risk (`anchor_source`): 'labels' keeps the
    groups, 'detector' uses risk > threshold, 'union' the groups where known and the detector elsewhere."""
    detected = (np.asarray(risk) > threshold).astype(np.int64)
    if source == "labels":
        return groups.copy()
    return detected if source == "detector" else np.where(groups >= 0, groups, detected)


def prototype_pass(run: FairRunState, feats: dict, *, args, threshold: float, num_classes: Optional[int],
                   exclude: Optional[np.ndarray] = None) -> dict:
    """Anchors ŝ, detector statistics, the (class × group) prototypes and the anchor weights from one features pass
    over the training rows. `exclude` (bool per row): rows the LoRA stage must not train on (the selection's)."""
    risk, labels, z = feats["risk"], feats["label"], feats["z"]
    group = estimated_groups(run.groups, risk, anchor_threshold(args.anchor_threshold, run.pos_weight),
                             args.anchor_source)
    gated = (risk > threshold).astype(np.int64)
    stats = detector_statistics(risk, feats["feat"], run.groups, gated, group, run.holdout, args.seed, labels)
    n_classes = max(int(num_classes or 0), int(labels.max()) + 1)
    correct = feats["logits"].argmax(-1) == labels if args.prototype_rows == "correct" else None
    prototypes, counts = compute_prototypes(z, labels, group, n_classes, correct=correct)
    anchors = np.where(exclude, 0, group) if exclude is not None else group
    stats["anchors"] = int((anchors == 1).sum())
    return {"anchors": anchors, "detector_stats": stats, "prototypes": prototypes, "counts": counts,
            "num_classes": n_classes, "representation_dim": int(z.shape[1]),
            "anchor_weights": anchor_weights(labels, group, n_classes, args.anchor_weighting)}
