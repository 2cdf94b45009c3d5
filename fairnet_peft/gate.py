"""The gate: who decides, per example, whether a FairLoRA adapter's update is on.

One `GateState` object lives on the wrapped model (`<model>._fairlora_gate_state`) and is shared by the hooks and
the LoRA layers. Per forward pass:

1. the root pre-hook (on the wrapped model) pops `fair_gate=`, records the attention mask and batch size, and
   fixes the gate at once for adapters whose gate is known up front (forced by `force_gate`, or fully given by
   `fair_gate`);
2. the detector pre-hook (on the module whose input the detector reads) computes the risk scores from the hidden
   states and, for the other adapters, the gate `risk > τ` (rows with `fair_gate == -1`);
3. every FairLoRA layer asks `GateState.record(adapter)` and adds its update to the gated rows only;
4. the root post-hook "backtracks": if an adapted layer ran *before* the detector's read point while its gate was
   still unknown, the gated rows are run again with their gates fixed, and their outputs replace the first pass's.

The gate of a pass stays in place until the next pass starts, so activation checkpointing recomputes with the
same gate. `gate_record(model)` is the public accessor for the last pass's risk scores and gates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

STATE_ATTR = "_fairlora_gate_state"
DETECTOR_ATTR = "fair_bias_detector"

GateInput = Union[torch.Tensor, dict]


@dataclass
class GateRecord:
    """The gate of one adapter for the last forward pass.

    Attributes:
        gate: (B,) bool, True where the adapter's update was applied.
        risk: (B,) float risk scores p_s(x) from the detector, or None if the detector did not run.
        source: "detector", "fair_gate", "forced" or "mixed" (fair_gate with some rows left to the detector).
    """

    gate: torch.Tensor
    risk: Optional[torch.Tensor] = None
    source: str = "detector"
    idx: torch.Tensor = field(default=None, repr=False)
    n_on: int = 0

    @classmethod
    def build(cls, gate: torch.Tensor, risk=None, source="detector") -> "GateRecord":
        gate = gate.bool()
        idx = gate.nonzero().squeeze(1)
        return cls(gate=gate, risk=risk, source=source, idx=idx, n_on=int(idx.numel()))

    @property
    def batch_size(self) -> int:
        return int(self.gate.shape[0])

    @property
    def rate(self) -> float:
        return self.n_on / max(self.batch_size, 1)


@dataclass
class _PassContext:
    batch_size: int
    device: torch.device
    mask: Optional[torch.Tensor]
    overrides: dict  # adapter -> (B,) long tensor in {-1, 0, 1}
    forced: dict  # adapter -> bool, snapshot of GateState.forced for this pass
    pending: set  # adapters whose gate waits for the detector
    ran_before_detector: set = field(default_factory=set)


class GateState:
    """Shared per-model gate state. Plain Python object: not a module, never saved."""

    def __init__(self, detector: nn.Module):
        self.detector = detector
        self.configs: dict = {}  # adapter -> FairLoraConfig (same objects as model.peft_config)
        self.forced: dict = {}  # adapter or "*" -> bool, set by `force_gate`
        self.records: dict[str, GateRecord] = {}
        self.context: Optional[_PassContext] = None
        self.read_handles: dict = {}
        self.root_handles: list = []
        self.in_backtrack = False

    # ------------------------------------------------------------------ helpers
    def active_adapters(self) -> list[str]:
        if self.detector is None or self.detector.disable_adapters:
            return []
        return [a for a in self.detector.active_adapters if a in self.configs]

    def _forced_value(self, adapter: str) -> Optional[bool]:
        return self.forced.get(adapter, self.forced.get("*"))

    def record(self, adapter: str) -> Optional[GateRecord]:
        """The gate a LoRA layer must apply now; None means off. Marks layers that run before the detector."""
        rec = self.records.get(adapter)
        if rec is not None:
            return rec
        ctx = self.context
        if ctx is not None and adapter in ctx.pending:
            ctx.ran_before_detector.add(adapter)
        return None

    # ------------------------------------------------------------------ pass start
    def begin_pass(self, batch_size: int, device, mask, fair_gate: Optional[GateInput]) -> None:
        adapters = self.active_adapters()
        overrides = _normalise_fair_gate(fair_gate, adapters, batch_size, device)
        forced = {a: self._forced_value(a) for a in adapters}
        self.records = {}
        pending = set()
        for a in adapters:
            if forced[a] is not None:
                self.records[a] = GateRecord.build(torch.full((batch_size,), forced[a], device=device), source="forced")
            elif a in overrides and bool((overrides[a] >= 0).all()):
                self.records[a] = GateRecord.build(overrides[a] == 1, source="fair_gate")
            else:
                pending.add(a)
        self.context = _PassContext(batch_size, device, mask, overrides, forced, pending)

    # ------------------------------------------------------------------ detector
    def detect(self, adapter: str, hidden: torch.Tensor) -> None:
        ctx = self.context
        if ctx is None or adapter not in self.active_adapters() or adapter not in self.detector.fairlora_detector:
            return
        net = self.detector.fairlora_detector[adapter]
        # The detector reads frozen features: no gradient flows from the gate into the backbone.
        risk = net(hidden.detach(), ctx.mask)
        if adapter not in ctx.pending:
            self.records[adapter].risk = risk
            return
        gate = risk.detach() > float(self.configs[adapter].threshold)
        source = "detector"
        override = ctx.overrides.get(adapter)
        if override is not None:
            gate = torch.where(override >= 0, override == 1, gate)
            source = "mixed"
        self.records[adapter] = GateRecord.build(gate, risk=risk, source=source)
        ctx.pending.discard(adapter)


def _normalise_fair_gate(fair_gate, adapters, batch_size, device) -> dict:
    if fair_gate is None:
        return {}
    items = fair_gate.items() if isinstance(fair_gate, dict) else [(a, fair_gate) for a in adapters]
    out = {}
    for adapter, value in items:
        if isinstance(fair_gate, dict) and adapter not in adapters:
            raise ValueError(
                f"fair_gate names adapter {adapter!r}, which is not an active FairLoRA adapter "
                f"(active: {adapters}). Use the adapter names you passed to get_peft_model/add_adapter."
            )
        value = torch.as_tensor(value, device=device).long().reshape(-1)
        if value.numel() != batch_size:
            raise ValueError(
                f"fair_gate for adapter {adapter!r} has {value.numel()} entries but the batch has {batch_size} rows; "
                "pass one value per example: 1 (correct), 0 (do not correct) or -1 (let the detector decide)."
            )
        if bool(((value < -1) | (value > 1)).any()):
            raise ValueError("fair_gate values must be 1 (correct), 0 (do not correct) or -1 (detector decides).")
        out[adapter] = value
    return out


# ---------------------------------------------------------------------- hooks
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x", "X")


def _batch_tensor(args, kwargs) -> Optional[torch.Tensor]:
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for key in _BATCH_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value
    return None


def root_pre_hook(module: nn.Module, args, kwargs):
    """Start of a forward pass of the wrapped model: pop `fair_gate` and fix the gates that are known up front."""
    state: GateState = getattr(module, STATE_ATTR)
    fair_gate = kwargs.pop("fair_gate", None)
    if module.training and torch.is_grad_enabled():
        _refuse_reentrant_checkpointing(module)
    batch = _batch_tensor(args, kwargs)
    if batch is None:
        state.records, state.context = {}, None
        return args, kwargs
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    state.begin_pass(batch.shape[0], batch.device, mask if isinstance(mask, torch.Tensor) else None, fair_gate)
    return args, kwargs


def _refuse_reentrant_checkpointing(model: nn.Module) -> None:
    for sub in model.modules():
        func = sub.__dict__.get("_gradient_checkpointing_func")
        if getattr(sub, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "FairLoRA needs non-reentrant activation checkpointing: the per-example gate is computed once per "
                "forward and reused inside later checkpointed blocks, which reentrant checkpointing cannot replay. "
                "Call model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "(the transformers default) or set TrainingArguments(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})."
            )


def detector_pre_hook(module: nn.Module, args, kwargs, adapter_name: str):
    state: GateState = getattr(module, STATE_ATTR)
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        state.detect(adapter_name, hidden)
    return None


def root_post_hook(module: nn.Module, args, kwargs, output):
    """Backtrack: rerun the gated rows whose adapted layers ran before the detector's read point."""
    state: GateState = getattr(module, STATE_ATTR)
    ctx = state.context
    if ctx is None or state.in_backtrack or not ctx.ran_before_detector:
        return None
    rows = torch.zeros(ctx.batch_size, dtype=torch.bool, device=ctx.device)
    for adapter in ctx.ran_before_detector:
        if adapter in state.records:
            rows |= state.records[adapter].gate
    if not bool(rows.any()):
        return None
    idx = rows.nonzero().squeeze(1)
    gates = {a: rec.gate[idx].long() for a, rec in state.records.items()}
    outer_records, outer_context = state.records, state.context
    sub_args = tuple(_take_rows(a, idx, ctx.batch_size) for a in args)
    sub_kwargs = {k: _take_rows(v, idx, ctx.batch_size) for k, v in kwargs.items()}
    labels = sub_kwargs.pop("labels", None)
    state.in_backtrack = True
    try:
        sub_output = module(*sub_args, **sub_kwargs, fair_gate=gates)
    finally:
        state.in_backtrack = False
        state.records, state.context = outer_records, outer_context
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


# ---------------------------------------------------------------------- public API
def find_gate_state(model: nn.Module) -> GateState:
    """Locate the `GateState` of a PeftModel, a FairLoraModel tuner or a transformers model with FairLoRA layers."""
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTR)
        if isinstance(state, GateState) and module.__dict__.get("_fairlora_is_root", False):
            return state
    raise ValueError(
        "This model has no FairLoRA adapter. Wrap it first: get_peft_model(model, FairLoraConfig(...)), and "
        "`import fairnet_peft` before loading a saved FairLoRA adapter."
    )


def gate_record(model: nn.Module, adapter_name: Optional[str] = None) -> GateRecord:
    """Risk scores and gate decisions of the last forward pass for `adapter_name` (default: the first active one).

    Example:
        >>> out = model(**batch)
        >>> rec = fairnet_peft.gate_record(model)
        >>> rec.risk, rec.gate, rec.rate     # (B,) scores, (B,) bools, fraction of rows corrected
    """
    state = find_gate_state(model)
    if adapter_name is None:
        active = state.active_adapters() or list(state.configs)
        adapter_name = active[0] if active else None
    if adapter_name not in state.records:
        raise ValueError(
            f"No gate recorded for adapter {adapter_name!r}: run a forward pass first (with the adapter active and "
            "adapters enabled)."
        )
    return state.records[adapter_name]


@contextlib.contextmanager
def force_gate(model: nn.Module, on: bool, adapter_names: Optional[Union[str, list[str]]] = None) -> Iterator[None]:
    """Force the gate of every example on (`on=True`) or off (`on=False`) inside the block, for the whole model.

    The detector still runs and records its risk scores, so `gate_record(model).risk` is available. Used by the
    trainer (LoRA forced on for anchors, off for the frozen base features) and by the ablations.
    """
    state = find_gate_state(model)
    keys = ["*"] if adapter_names is None else ([adapter_names] if isinstance(adapter_names, str) else adapter_names)
    saved = dict(state.forced)
    try:
        for key in keys:
            state.forced[key] = bool(on)
        yield
    finally:
        state.forced = saved
