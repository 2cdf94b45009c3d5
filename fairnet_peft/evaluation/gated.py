"""The one gated pass: run rows through a FairLoRA model with the gate off, on, or as the detector decides, and
return per-row logits, risk scores and gates as numpy arrays.

Every place that needs "the model's outputs under a given gate" calls `gated_pass`: the τ sweep (sweep.py), the
trainer's frozen passes over the training rows and the correction selection after training (training/). Callers
supply the batches (already on the model's device) and, when rows are spread over processes, a `gather` function;
an optional `forward` replaces `model(**batch)` when a caller needs more than the logits (e.g. the head's input).

Modes, per batch and in the order given:
- "off": gate forced off for the adapter (the base model), risk recorded;
- "on": gate forced on for every row (at the adapter's current strength);
- "detector": the adapter's own gate (risk > τ), as in normal inference;
- "risk": the forward stops once the detector has scored the batch (nothing after its read point runs).
Keys: `logits_<mode>` (not for "risk"), `risk` (float32, from the first mode that ran the detector; `risk_native` is
the same scores as a torch tensor in the detector's dtype, which the gate compares with τ), `gate` (from a
"detector" mode), the `forward`'s extra keys from the first mode, and every key of the batch's `carry`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..tuner.early_exit import stop_at_detector
from ..tuner.gate import force_gate, gate_record

MODES = ("off", "on", "detector", "risk")

#: forward(model, batch) -> (logits or None, {name: tensor}) for callers that capture more than the logits
Forward = Callable[[nn.Module, dict], tuple]


def _logits(output: Any) -> torch.Tensor:
    logits = output["logits"] if hasattr(output, "keys") else (output[0] if isinstance(output, tuple) else output)
    return logits.detach().float()


def default_forward(model: nn.Module, batch: dict) -> tuple:
    return _logits(model(**batch)), {}


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str, adapter_name: str):
    if mode == "detector":
        yield None
    elif mode == "risk":
        with force_gate(model, False, adapter_names=[adapter_name]), stop_at_detector(model, adapter_name) as stop:
            yield stop
    else:
        with force_gate(model, mode == "on", adapter_names=[adapter_name]):
            yield None


def gated_step(model: nn.Module, batch: dict, modes: Sequence[str], adapter_name: str,
               forward: Optional[Forward] = None) -> dict[str, torch.Tensor]:
    """The module docstring's keys for one batch (tensors; `risk` in the detector's own dtype, gate as bool)."""
    forward = forward or default_forward
    out: dict[str, torch.Tensor] = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"gated pass mode {mode!r}: choose from {MODES}.")
        if mode == "risk":
            with _mode(model, mode, adapter_name) as stop:
                model(**batch)
            out.setdefault("risk", stop.record.risk.detach().reshape(-1))
            continue
        with _mode(model, mode, adapter_name):
            logits, extra = forward(model, batch)
        record = gate_record(model, adapter_name)
        out[f"logits_{mode}"] = logits
        if record.risk is not None:
            out.setdefault("risk", record.risk.detach().reshape(-1))
        if mode == "detector":
            out["gate"] = record.gate.detach().reshape(-1)
        for key, value in extra.items():
            out.setdefault(key, value)
    return out


def gated_pass(model: nn.Module, batches: Iterable, modes: Sequence[str], *, adapter_name: str,
               forward: Optional[Forward] = None,
               gather: Optional[Callable[[dict], dict]] = None) -> dict[str, np.ndarray]:
    """Run every batch in every mode (module docstring) in eval mode without gradients; concatenate per key.

    `batches` yields model-input dicts, or `(inputs, carry)` pairs whose `carry` tensors (row index, labels ...)
    are returned alongside. `gather` (e.g. `accelerator.gather_for_metrics`) is applied to each batch's dict."""
    was_training = model.training
    model.eval()
    collected: dict[str, list] = defaultdict(list)
    try:
        with torch.no_grad():
            for item in batches:
                inputs, carry = item if isinstance(item, tuple) else (item, {})
                step = {**gated_step(model, inputs, modes, adapter_name, forward), **carry}
                if gather is not None:
                    step = gather(step)
                for key, value in step.items():
                    collected[key].append(value.detach().cpu())
    finally:
        model.train(was_training)
    out = {key: torch.cat(values) for key, values in collected.items()}
    native = out.get("risk")
    arrays = {key: value.float().numpy() if value.is_floating_point() else value.numpy() for key, value in out.items()}
    if native is not None:  # the gate compares risk > τ in the detector's dtype: keep it for exact gates at any τ
        arrays["risk_native"] = native
    return arrays
