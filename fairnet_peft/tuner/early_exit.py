"""Early exit: end a forward of the wrapped model as soon as the bias detector has scored the batch.

The detector stage and its held-out loss need only the detector's risk; the base is frozen and the detector reads
detached features, so the blocks after its read point would compute nothing that counts. `stop_at_detector` puts a
pre-hook on the read module, after the detector's own (gate.py), that keeps the pass's `GateRecord` and raises
`DetectorReached`; the context manager catches it. The root post-hook (always called) closes the pass without
publishing it, so `gate_record` never sees a half pass. The hook is on a module every thread runs: it acts only on
the forwards of the context (thread or asyncio task) that opened the block (`_OPEN_STOPS`, a context variable).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from torch import nn

from .gate import GateState, find_gate_state


class DetectorReached(Exception):
    """Raised inside a forward run under `stop_at_detector` once the detector has scored the batch."""


_OPEN_STOPS: contextvars.ContextVar = contextvars.ContextVar("fairlora_stop_at_detector", default=frozenset())


class _DetectorStop:
    """The pre-hook `stop_at_detector` puts on the detector's read module, after the detector's own: it keeps the
    outermost pass's record for the adapter and ends the forward."""

    def __init__(self, state: GateState, adapter_name: str):
        self.state, self.adapter_name, self.record = state, adapter_name, None

    def __call__(self, module, args, kwargs):
        if self not in _OPEN_STOPS.get():
            return None  # a forward of another thread or task: it runs to the end
        live = self.state.live
        record = live.records.get(self.adapter_name) if live is not None and len(self.state.passes) == 1 else None
        if record is not None and record.risk is not None:
            self.record = record
            raise DetectorReached
        return None


@contextlib.contextmanager
def stop_at_detector(model: nn.Module, adapter_name: str) -> Iterator[_DetectorStop]:
    """Inside the block, a forward of `model` ends as soon as `adapter_name`'s detector has scored the batch: the
    blocks after its read point do not run. The `GateRecord` (gate and risk, with the detector's autograd graph) is
    then `stop.record`; the forward returns nothing and publishes no record for `gate_record`.

    For passes that need only the risk: the detector stage and its held-out loss (the base is frozen, the detector
    reads detached features). The wrapped model must be the module the hook sees run, not a distributed wrapper whose
    bookkeeping needs its forward to complete (DistributedDataParallel, FSDP): call the inner model there.
    """
    state = find_gate_state(model)
    config = state.configs[adapter_name]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stop = _DetectorStop(state, adapter_name)
    handle = base.get_submodule(config.detector_module).register_forward_pre_hook(stop, with_kwargs=True)
    token = _OPEN_STOPS.set(_OPEN_STOPS.get() | {stop})
    try:
        yield stop
    except DetectorReached:
        pass
    finally:
        handle.remove()
        try:
            _OPEN_STOPS.reset(token)
        except ValueError:  # left in another context than it was entered in
            _OPEN_STOPS.set(_OPEN_STOPS.get() - {stop})
    if stop.record is None:
        raise RuntimeError(
            f"stop_at_detector: no forward of the model reached the detector of adapter {adapter_name!r} inside the "
            "block (is the adapter active, with adapters enabled?).")
