"""The gate: who decides, per example, whether a FairLoRA adapter's update is on.

One `GateState` object lives on the wrapped model (`<model>._fairlora_gate_state`) and is shared by the hooks and
the LoRA layers. A gate exists only inside a live pass of the wrapped (root) model:

1. the root pre-hook opens a pass: it pops `fair_gate=`, finds the batch (contract below) and fixes the gate at once
   for adapters whose gate is known up front (forced by `force_gate`, or fully given by `fair_gate`);
2. the detector pre-hook (on the module whose input the detector reads) moves the hidden states and mask to the
   detector's device, computes the risk scores and, for the other adapters, the gate `risk > τ`;
3. every FairLoRA layer asks `GateState.record(adapter, rows)` and adds its update to the gated rows only;
4. the root post-hook "backtracks" (backtrack.py: reruns the gated rows if an adapted layer ran *before* the detector's read point
   while its gate was still unknown), then closes the pass and publishes only its `GateRecord`s (small (B,) tensors,
   no hidden states, inputs or masks) for `gate_record(model)`.

Outside a live pass — a direct call of an inner module such as `model.bert(ids)` — every layer runs as the base
model (no gate, never the last pass's). Non-reentrant activation checkpointing recomputes blocks during backward,
after the pass closed: the checkpoint functions are wrapped so that each recomputation replays the gates its block
saw in the forward (torch's `context_fn`). `nn.DataParallel` replicas are refused (use torchrun/accelerate).

Concurrency: every forward owns its gates. The live passes and the last published records are held per thread
(`_ThreadGates`, a `threading.local`), and `force_gate` overrides per context (`contextvars`, an immutable mapping),
so calls from several threads, or asyncio code running the model in executors, never see each other's gates; no lock
is taken in a forward. `gate_record(model)` returns the calling thread's last completed pass. A `force_gate` block
applies to the forwards of its own thread or asyncio task, and to `asyncio.to_thread` calls made inside it (they copy
the context); not to `loop.run_in_executor` calls or other threads. A checkpoint recomputation (possibly in an
autograd worker thread) replays the view its block pushed, not the forward thread's state.

torch.compile: under `torch.compiler.is_compiling()` the gate stays a device tensor (no `nonzero`, no `.item()`) and
the layers add a masked update (layer.py); the per-thread stacks are only mutated, never rebound, so the compiled
code keeps one set of guards for every thread. Reading a `force_gate` override needs a graph break, taken only while
some `force_gate` block is open (`GateState.forcing`).

Batch contract (`_batch_tensor`): B is dim 0 of the first positional tensor argument, else of the first of the
keywords input_ids, inputs_embeds, pixel_values, input_values, input_features, x, X, else of any other tensor
keyword; no tensor → the pass has no gate. `fair_gate` must have B entries. The `attention_mask` keyword (or the
second positional tensor) reaches the detector only when it indexes the same positions as the batch: (B, T) with
integer ids, or with (B, T, d) embeddings; pixel masks over raw samples are not used (the detector pools every
position), and an audio model's per-sample mask becomes its frame mask (model.py `frame_mask_pre_hook`). Inside a
pass a uniform gate (all rows on or off) applies to any input layout; a mixed gate needs the layer's input to keep
the batch in dim 0 and raises otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .backtrack import rerun_gated_rows

STATE_ATTR = "_fairlora_gate_state"
DETECTOR_ATTR = "fair_bias_detector"

GateInput = Union[torch.Tensor, dict]


@dataclass
class GateRecord:
    """The gate of one adapter for one forward pass.

    Attributes:
        gate: (B,) bool, True where the adapter's update was applied.
        risk: (B,) float risk scores p_s(x) from the detector, or None if the detector did not run.
        source: "detector", "fair_gate", "forced" or "mixed" (fair_gate with some rows left to the detector).
        uniform: True / False when every row is known to be on / off without reading the gate (forced gates), else
            None. `idx`, `n_on` and `rate` read the gate (one device→host sync, cached), so a compiled forward never
            asks for them.
    """

    gate: torch.Tensor
    risk: Optional[torch.Tensor] = None
    source: str = "detector"
    uniform: Optional[bool] = None
    _idx: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, gate: torch.Tensor, risk=None, source="detector", uniform: Optional[bool] = None) -> "GateRecord":
        return cls(gate=gate.bool(), risk=risk, source=source, uniform=uniform)

    @property
    def idx(self) -> torch.Tensor:
        """(n_on,) indices of the gated rows (computed once: `nonzero` waits for the device)."""
        if self._idx is None:
            self._idx = self.gate.nonzero().squeeze(1)
        return self._idx

    @property
    def n_on(self) -> int:
        if self.uniform is not None:
            return self.batch_size if self.uniform else 0
        return int(self.idx.numel())

    @property
    def batch_size(self) -> int:
        return int(self.gate.shape[0])

    @property
    def rate(self) -> float:
        return self.n_on / max(self.batch_size, 1)


@dataclass
class _Pass:
    """One live forward pass of the wrapped model (or a read-only view of one, replayed by checkpointing)."""

    batch_size: int
    device: Optional[torch.device] = None
    mask: Optional[torch.Tensor] = None
    overrides: dict = field(default_factory=dict)  # adapter -> (B,) long tensor in {-1, 0, 1}
    pending: set = field(default_factory=set)  # adapters whose gate waits for the detector
    records: dict = field(default_factory=dict)  # adapter -> GateRecord of this pass
    ran_before_detector: set = field(default_factory=set)
    backtrack: bool = False  # the nested pass that reruns the gated rows
    backtrack_running: bool = False  # this pass is rerunning its gated rows now
    replay: bool = False  # a checkpoint recomputation: read-only, the detector does not run

    def view(self) -> "_Pass":
        """The gates as they stand now, without the batch's tensors: what a checkpointed block must replay."""
        return _Pass(self.batch_size, records=dict(self.records), replay=True)


def _in_backward() -> bool:
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _ThreadGates(threading.local):
    """One thread's gates: its live passes (innermost last) and a box holding its last published records. Both are
    created per thread by `__init__` and only mutated afterwards (compiled code guards on them, see the docstring)."""

    def __init__(self):
        self.passes: list[_Pass] = []
        # {"records": {adapter: GateRecord}}: this thread's last completed root pass. The key is always there, so
        # compiled code that writes it sees the same dict layout in every thread (no recompilation per thread)
        self.published: dict = {"records": {}}


_NO_FORCE: Mapping = types.MappingProxyType({})
# GateState -> immutable {adapter or "*": bool}: the `force_gate` blocks open in the current context
_FORCED: contextvars.ContextVar = contextvars.ContextVar("fairlora_force_gate", default=_NO_FORCE)


class GateState:
    """Per-model gate state. Plain Python object: not a module, never saved. Shared by the hooks and layers of one
    model; everything a forward writes lives in the calling thread's `_ThreadGates`."""

    def __init__(self, detector: nn.Module):
        self.detector = detector
        self.configs: dict = {}  # adapter -> FairLoraConfig (same objects as model.peft_config)
        self.read_handles: dict = {}
        self.root_handles: list = []
        self._local = _ThreadGates()
        # the last records published by any thread: only for recomputations by checkpoint functions FairLoRA could not
        # wrap, which on a GPU run in an autograd worker thread that has no records of its own (see `record`)
        self._last_records: dict = {}
        self.forcing = False  # some force_gate block is open (in any thread); read by compiled code instead of _FORCED
        self._force_blocks = 0
        self._force_lock = threading.Lock()  # force_gate entry/exit only, never in a forward

    def __getstate__(self) -> dict:
        """What `copy.deepcopy(model)` copies: the detector, configs and hook handles; a copy starts with no live pass,
        no published record and no force_gate block (the thread-local part and the lock cannot be copied)."""
        skip = ("_local", "_last_records", "forcing", "_force_blocks", "_force_lock")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self._last_records = _ThreadGates(), {}
        self.forcing, self._force_blocks, self._force_lock = False, 0, threading.Lock()

    # ------------------------------------------------------------------ helpers
    def active_adapters(self) -> list[str]:
        if self.detector is None or self.detector.disable_adapters:
            return []
        return [a for a in self.detector.active_adapters if a in self.configs]

    @property
    def passes(self) -> list[_Pass]:
        """The calling thread's live passes, innermost last; empty between forwards."""
        return self._local.passes

    @property
    def records(self) -> dict:
        """The calling thread's last published records ({} before its first completed pass)."""
        return self._local.published["records"]

    @property
    def live(self) -> Optional[_Pass]:
        passes = self._local.passes
        return passes[-1] if passes else None

    def forced(self) -> Optional[dict]:
        """{adapter or "*": bool} of the force_gate blocks open in the calling context; None when there is none."""
        if torch.compiler.is_compiling():
            # ContextVar.get does not trace: read it outside the graph, and only while some block is open somewhere
            return _forced_outside_graph(self) if self.forcing else None
        return _forced_in_context(self)

    def record(self, adapter: str, rows: int) -> Optional[GateRecord]:
        """The gate a LoRA layer whose input has `rows` rows must apply now; None means off (base behaviour).

        Inside a live root pass of the calling thread: that pass's gate (None while the detector has not run yet,
        which marks the adapter for backtracking). Outside one (a direct call of an inner module): None, except during
        backward, where a recomputation by a checkpoint function that FairLoRA did not wrap gets the last pass's gate
        if its batch size matches: this thread's last pass (CPU backward runs in the forward's thread), else, in an
        autograd worker thread, the model's last published pass (exact when one thread trains the model).
        """
        live = self.live
        if live is None:
            if _in_backward():
                records = self.records or self._last_records
                if records and all(r.batch_size == rows for r in records.values()):
                    return records.get(adapter)
            return None
        rec = live.records.get(adapter)
        if rec is None and not live.replay and adapter in live.pending:
            live.ran_before_detector.add(adapter)
        return rec

    # ------------------------------------------------------------------ pass start and end
    def open_pass(self) -> _Pass:
        """Push an empty pass (no gate) on the calling thread's stack; `begin_pass` fills it once the batch is known."""
        passes = self._local.passes
        if not passes:
            self._local.published["records"] = {}  # a failed forward publishes nothing: gate_record raises, not stale
        passes.append(_Pass(batch_size=0))
        return passes[-1]

    def close_pass(self, publish: bool) -> None:
        passes = self._local.passes
        done = passes.pop() if passes else None
        if publish and done is not None and not passes and not done.replay:
            self._local.published["records"] = done.records
            self._last_records = done.records

    def begin_pass(self, batch_size: int, device, mask, fair_gate: Optional[GateInput], backtrack=False) -> None:
        adapters = self.active_adapters()
        overrides = _normalise_fair_gate(fair_gate, adapters, batch_size, device)
        forced_map = self.forced()
        live = self.live
        live.batch_size, live.device, live.mask, live.overrides, live.backtrack = (
            batch_size, device, mask, overrides, backtrack)
        for a in adapters:
            forced = forced_map.get(a, forced_map.get("*")) if forced_map else None
            if forced is not None:
                live.records[a] = GateRecord.build(torch.full((batch_size,), forced, device=device), source="forced",
                                                   uniform=forced)
            elif a in overrides and bool((overrides[a] >= 0).all()):
                live.records[a] = GateRecord.build(overrides[a] == 1, source="fair_gate")
            else:
                if a in overrides and not bool((overrides[a] >= 0).any()):
                    del overrides[a]  # every row -1: the detector decides them all, and the record says "detector"
                live.pending.add(a)

    @contextlib.contextmanager
    def replaying(self, view: _Pass) -> Iterator[None]:
        """Make `view` the live pass of the recomputing thread while a checkpointed block is recomputed in backward."""
        passes = self._local.passes
        passes.append(view)
        try:
            yield
        finally:
            passes.remove(view)

    # ------------------------------------------------------------------ detector
    def detect(self, adapter: str, hidden: torch.Tensor) -> None:
        live = self.live
        if live is None or live.replay or live.device is None or adapter not in self.active_adapters() \
                or adapter not in self.detector.fairlora_detector:
            return
        done = live.records.get(adapter)
        if adapter not in live.pending and done is not None and done.risk is not None:
            return  # the read module runs again in this pass (weights shared across depth, e.g. ALBERT): the
            # first read decided the gate
        net = self.detector.fairlora_detector[adapter]
        # Model parallelism: the detector may sit on another device than the block it reads; its dtype cast happens
        # inside DetectorNet. The detector reads frozen features: no gradient flows from the gate into the backbone.
        where = _device_of(net, hidden.device)
        mask = live.mask.to(where) if live.mask is not None else None
        risk = net(hidden.detach().to(where), mask).to(live.device)
        if adapter not in live.pending:
            live.records[adapter].risk = risk
            return
        tau = float(self.configs[adapter].threshold)
        if not 0.0 <= tau <= 1.0:  # the config is checked when built; a value set on it later is checked here
            raise ValueError(f"peft_config[{adapter!r}].threshold = {tau!r}: τ must be in [0, 1] (the gate is on "
                             "when risk > τ; 1 turns the adapter off).")
        gate = risk.detach() > tau
        source = "detector"
        override = live.overrides.get(adapter)
        if override is not None:
            gate = torch.where(override >= 0, override == 1, gate)
            source = "mixed"
        live.records[adapter] = GateRecord.build(gate, risk=risk, source=source)
        live.pending.discard(adapter)


def _forced_in_context(state: GateState) -> Optional[dict]:
    """The force_gate overrides of `state` in the calling context (a plain dict: compiled code reads it)."""
    forced = _FORCED.get().get(state)
    return dict(forced) if forced else None


_forced_outside_graph = torch.compiler.disable(_forced_in_context)  # a graph break: only while a block is open


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default


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
        out[adapter] = _gate_values(value, adapter, batch_size, device)
    return out


def _gate_values(value, adapter: str, batch_size: int, device) -> torch.Tensor:
    """fair_gate of one adapter as a (B,) long tensor in {-1, 0, 1}; floats must be exactly -1, 0 or 1."""
    try:
        tensor = torch.as_tensor(value, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"fair_gate for adapter {adapter!r} must be a tensor, list or number of 1/0/-1 values, got "
            f"{type(value).__name__}: {err}"
        ) from None
    if tensor.numel() != batch_size:
        raise ValueError(
            f"fair_gate for adapter {adapter!r} has {tensor.numel()} entries but the batch has {batch_size} rows; "
            "pass one value per example: 1 (correct), 0 (do not correct) or -1 (let the detector decide); for one "
            "value for every row, use force_gate(model, True / False)."
        )
    if tensor.is_floating_point() or tensor.is_complex():
        exact = (tensor == -1) | (tensor == 0) | (tensor == 1)
        if not bool(exact.all()):
            bad = tensor[~exact][:3].tolist()
            raise ValueError(
                f"fair_gate values must be 1 (correct), 0 (do not correct) or -1 (detector decides); got non-integer "
                f"values {bad} for adapter {adapter!r}. A gate is not a weight: round or threshold it yourself, e.g. "
                "fair_gate=(p > 0.5).long()."
            )
        tensor = tensor.real if tensor.is_complex() else tensor
    tensor = tensor.long()
    if bool(((tensor < -1) | (tensor > 1)).any()):
        raise ValueError("fair_gate values must be 1 (correct), 0 (do not correct) or -1 (detector decides).")
    return tensor


# ---------------------------------------------------------------------- hooks
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x", "X")


def _batch_tensor(args, kwargs) -> Optional[torch.Tensor]:
    """The tensor whose dim 0 is the batch (see the module docstring for the contract)."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value
    for key in _BATCH_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].dim() > 0:
            return kwargs[key]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value
    return None


def _token_mask(batch: torch.Tensor, args, kwargs) -> Optional[torch.Tensor]:
    """The attention mask, if it indexes the same token positions as `batch` (ids, or (B, T, d) embeddings)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch.shape[0]:
        return None
    if batch.is_floating_point() and not (batch.dim() == 3 and mask.shape[1] == batch.shape[1]):
        return None  # pixel/audio masks count raw samples, not the positions the detector reads
    return mask


def root_pre_hook(module: nn.Module, args, kwargs):
    """Start of a forward pass of the wrapped model: pop `fair_gate` and fix the gates that are known up front."""
    state: GateState = getattr(module, STATE_ATTR)
    state.open_pass()  # first, so that root_post_hook (always called) closes exactly this pass
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "FairLoRA does not support torch.nn.DataParallel: its replicas would share one gate state and the bias "
            "detector would stay on the first GPU. Launch with `torchrun --nproc_per_node N train.py` or "
            "`accelerate launch train.py` (DistributedDataParallel), or use one GPU (CUDA_VISIBLE_DEVICES=0)."
        )
    fair_gate = kwargs.pop("fair_gate", None)
    if module.training and torch.is_grad_enabled():
        _prepare_checkpointing(module, state)
    batch = _batch_tensor(args, kwargs)
    if batch is None:
        return args, kwargs  # no batch tensor: the pass runs with no gate
    outer = state.passes[-2] if len(state.passes) > 1 else None
    backtrack = outer is not None and outer.backtrack_running
    state.begin_pass(batch.shape[0], batch.device, _token_mask(batch, args, kwargs), fair_gate, backtrack)
    return args, kwargs


def _prepare_checkpointing(model: nn.Module, state: GateState) -> None:
    """Refuse reentrant checkpointing; wrap each non-reentrant checkpoint function so recomputation sees the gate."""
    for sub in model.modules():
        func = sub.__dict__.get("_gradient_checkpointing_func")
        if func is None or not getattr(sub, "gradient_checkpointing", False):
            continue
        inner = func.inner if isinstance(func, _GateCheckpoint) else func
        keywords = getattr(inner, "keywords", None)
        if keywords is not None and keywords.get("use_reentrant", True) is not False:  # torch's default: reentrant
            raise ValueError(
                "FairLoRA needs non-reentrant activation checkpointing: the per-example gate is computed once per "
                "forward and reused inside later checkpointed blocks, which reentrant checkpointing cannot replay. "
                "Call model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False}) "
                "(the transformers default) or set TrainingArguments(activation_checkpointing_kwargs="
                "{'use_reentrant': False})."
            )
        if (not isinstance(func, _GateCheckpoint) or func.state is not state) and _accepts_context_fn(inner):
            sub._gradient_checkpointing_func = _GateCheckpoint(inner, state)


def _accepts_context_fn(func) -> bool:
    """True for torch's checkpoint (and wrappers passing **kwargs on to it); others are left alone and their
    recomputation falls back to the last pass's gate (GateState.record)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "context_fn" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _GateCheckpoint:
    """A module's `_gradient_checkpointing_func` (torch's non-reentrant checkpoint), plus a recompute context that
    replays the gates this block saw in its forward. Recomputation runs during backward, after the root forward has
    returned and its pass is closed; torch's `context_fn` is the hook that checkpointing itself replays."""

    def __init__(self, inner, state: GateState):
        self.inner, self.state = inner, state

    def __call__(self, function, *args, **kwargs):
        live = self.state.live
        if live is None:
            return self.inner(function, *args, **kwargs)
        view, state = live.view(), self.state
        user_fn = kwargs.pop("context_fn", None) or getattr(self.inner, "keywords", {}).get("context_fn")

        def context_fn():
            forward_ctx, recompute_ctx = user_fn() if user_fn is not None else (contextlib.nullcontext(),
                                                                                contextlib.nullcontext())
            return forward_ctx, _both(recompute_ctx, state.replaying(view))

        return self.inner(function, *args, context_fn=context_fn, **kwargs)


@contextlib.contextmanager
def _both(first, second) -> Iterator[None]:
    with first, second:
        yield


def release_checkpointing(model: nn.Module) -> None:
    """Put back the checkpoint functions that `_prepare_checkpointing` wrapped (used when FairLoRA is unloaded)."""
    for sub in model.modules():
        func = sub.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _GateCheckpoint):
            sub._gradient_checkpointing_func = func.inner


def detector_pre_hook(module: nn.Module, args, kwargs, adapter_name: str):
    state: GateState = getattr(module, STATE_ATTR)
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        state.detect(adapter_name, hidden)
    return None


def _warn_if_detector_missed(state: GateState, live: Optional[_Pass]) -> None:
    """A pass that ends with an adapter still waiting for its gate ran no read of its detector: the adapter was off
    for every row, silently, unless this says so (a model that calls its blocks' `forward` directly runs no hook)."""
    if live is None or not live.pending or live.replay or live.device is None:
        return
    reads = {a: config.detector_module for a, config in state.configs.items() if a in live.pending}
    warnings.warn(
        f"FairLoRA: the bias detector of adapter(s) {sorted(reads)} did not run in this forward: its read module "
        f"({', '.join(sorted({str(m) for m in reads.values()}))}) was not called through its __call__, so the adapter "
        "was off for every row. If the model calls that module's forward method directly, or skips it for these "
        "inputs, set FairLoraConfig.detector_module to a module every forward calls (e.g. the head's input module; "
        "the gate then backtracks).", RuntimeWarning, stacklevel=2)


def root_post_hook(module: nn.Module, args, kwargs, output):
    """End of a pass: backtrack if needed, then close the pass and publish its gates. Registered with
    `always_call=True`, so a forward that raises closes its pass too (`output` is then None: nothing is published)."""
    state: GateState = getattr(module, STATE_ATTR)
    merged = None
    try:
        if output is not None:
            _warn_if_detector_missed(state, state.live)
            merged = rerun_gated_rows(module, state.live, args, kwargs, output)
    finally:
        state.close_pass(publish=output is not None)
    return merged


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
    """Risk scores and gate decisions of the calling thread's last completed forward pass of `model` for
    `adapter_name` (default: the first active one).

    Each thread has its own last pass: read the record in the thread that ran the forward (with asyncio, inside the
    function given to `asyncio.to_thread` / `run_in_executor`, not in the coroutine). A forward that raised, or one
    ended by `stop_at_detector`, publishes nothing.

    Example:
        >>> out = model(**batch)
        >>> rec = fairnet_peft.gate_record(model)
        >>> rec.risk, rec.gate, rec.rate     # (B,) scores, (B,) bools, fraction of rows corrected
    """
    state = find_gate_state(model)
    if adapter_name is None:
        active = state.active_adapters() or list(state.configs)
        adapter_name = active[0] if active else None
    records = state.records
    if adapter_name not in records or adapter_name not in state.configs:
        raise ValueError(
            f"No gate recorded for adapter {adapter_name!r} in this thread: run a forward pass first, in the same "
            "thread (with the adapter active and adapters enabled)."
        )
    return records[adapter_name]


@contextlib.contextmanager
def force_gate(model: nn.Module, on: bool, adapter_names: Optional[Union[str, list[str]]] = None) -> Iterator[None]:
    """Force the gate of every example on (`on=True`) or off (`on=False`) inside the block, for the whole model.

    The detector still runs and records its risk scores, so `gate_record(model).risk` is available. Used by the
    trainer (LoRA forced on for anchors, off for the frozen base features) and by the ablations. The block applies to
    the forwards of the calling thread or asyncio task (and to `asyncio.to_thread` calls made inside it, which copy
    the context); forwards running in other threads at the same time keep their own gates.
    """
    state = find_gate_state(model)
    keys = ["*"] if adapter_names is None else ([adapter_names] if isinstance(adapter_names, str) else adapter_names)
    outer = _FORCED.get()
    mine = dict(outer.get(state, _NO_FORCE))
    mine.update({key: bool(on) for key in keys})
    token = _FORCED.set(types.MappingProxyType({**outer, state: types.MappingProxyType(mine)}))
    with state._force_lock:
        state._force_blocks += 1
        state.forcing = True
    try:
        yield
    finally:
        with state._force_lock:
            state._force_blocks -= 1
            state.forcing = state._force_blocks > 0
        try:
            _FORCED.reset(token)
        except ValueError:  # the block was left in another context than it was entered in: restore its value there
            _FORCED.set(outer)
