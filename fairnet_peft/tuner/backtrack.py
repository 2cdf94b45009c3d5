"""Backtracking: when an adapted layer ran before the detector's read point (its gate was not known yet), the
root post-hook (gate.py) reruns the rows that turned out gated, with their gates given up front (`fair_gate`), and
merges them into the pass's output; the loss is recomputed for classification heads.

`ctx` is gate.py's live `_Pass` of the calling thread (batch size, device, records, the adapters that ran before the
detector); the rerun is a nested pass on the same thread. Picking the rows reads the gate on the host (`nonzero`),
so under torch.compile a backtracking model takes graph breaks here; the default layers (from the detector's block
on) never backtrack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def backtrack_rows(ctx) -> torch.Tensor:
    """Indices of the rows a pass reruns: those gated for an adapter whose layers ran before the detector."""
    rows = torch.zeros(ctx.batch_size, dtype=torch.bool, device=ctx.device)
    for adapter in ctx.ran_before_detector:
        if adapter in ctx.records:
            rows |= ctx.records[adapter].gate.to(ctx.device)
    return rows.nonzero().squeeze(1)


def rerun_gated_rows(module: nn.Module, ctx, args, kwargs, output):
    """Rerun the gated rows whose adapted layers ran before the detector's read point (the live pass `ctx`) and merge
    them into `output`; None if nothing to redo."""
    if ctx is None or ctx.backtrack or not ctx.ran_before_detector:
        return None
    idx = backtrack_rows(ctx)
    if not idx.numel():
        return None
    gates = {a: rec.gate[idx.to(rec.gate.device)].long() for a, rec in ctx.records.items()}
    sub_args = tuple(_take_rows(a, idx, ctx.batch_size) for a in args)
    sub_kwargs = {k: _take_rows(v, idx, ctx.batch_size) for k, v in kwargs.items()}
    labels = sub_kwargs.pop("labels", None)
    ctx.backtrack_running = True
    try:
        sub_output = module(*sub_args, **sub_kwargs, fair_gate=gates)
    finally:
        ctx.backtrack_running = False
    merged = _merge_rows(output, sub_output, idx, ctx.batch_size)
    if labels is not None and getattr(output, "loss", None) is not None:
        merged["loss"] = _classification_loss(module, merged, kwargs["labels"])
    return merged


def _take_rows(value: Any, idx: torch.Tensor, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.index_select(0, idx.to(value.device))
    return value


def _merge_rows(full: Any, part: Any, idx: torch.Tensor, batch_size: int) -> Any:
    if isinstance(full, torch.Tensor):
        if full.dim() > 0 and full.shape[0] == batch_size and isinstance(part, torch.Tensor):
            return full.index_copy(0, idx.to(full.device), part.to(full.dtype))
        return full
    if isinstance(full, tuple) and not hasattr(full, "keys"):
        return type(full)(_merge_rows(f, p, idx, batch_size) for f, p in zip(full, part))
    if hasattr(full, "keys"):  # transformers ModelOutput (an OrderedDict) or a plain dict
        merged = full.__class__(**{k: _merge_rows(full[k], part[k] if k in part else None, idx, batch_size)
                                   for k in full.keys()})
        return merged
    return full


def _classification_loss(module: nn.Module, output, labels: torch.Tensor) -> torch.Tensor:
    logits = output["logits"]
    config = getattr(module, "config", None)
    if logits.dim() != 2 or config is None:
        raise ValueError(
            "FairLoRA backtracking (adapted layers before the detector's read point) can recompute the loss only for "
            "classification heads. Compute the loss from `logits` yourself, or adapt only layers after the detector "
            "(the default `layers_to_transform`)."
        )
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    return ForSequenceClassificationLoss(labels, logits, config)
