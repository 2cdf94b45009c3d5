"""Conditional LoRA layers: y = W x + g(x) · (α / r) · B A x, with a hard per-example gate g(x) ∈ {0, 1}.

The gate covers every token/position of an example (batch row); it comes from the model's `GateState` (gate.py).
The LoRA math lives in `FairLoraLayer.lora_delta` only; `forward` picks the rows: no row gated → no LoRA compute
at all (while autograd is on, a zero-weighted term keeps a trainable LoRA in the graph), every row gated → one dense
update (identical to PEFT LoRA), some rows → the update is computed for the gated rows only and added with
`index_add` (in windowed attention, e.g. Swin, the rows of every window of a gated example; in OPT's MLP, which
flattens the tokens to (B·T, d), the rows of every token of one; where the model feeds (T, B, d), as Longformer's
self-attention and XLNet's feed-forward do, `sequence_first` gates dim 1). Counting the gated rows
reads the gate once per pass (a device→host sync). Under torch.compile the gate is not read: the update is computed
for every row and added through the gate as a 0/1 mask (`_add_masked`), one graph with no sync. Outside a forward of
the wrapped model (e.g. `model.bert(ids)`) the layer is the base layer.
Supported bases (`ADAPTABLE`): `nn.Linear`, GPT-2 style `Conv1D`, `nn.Conv1d` (SqueezeBERT), `nn.Conv2d`.
Merging is refused: the gate depends on the input, so no single merged weight exists.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .detector import FairTunerLayer, init_
from .gate import STATE_ATTR

MERGE_REFUSED = (
    "FairLoRA adapters cannot be merged: the update is switched on per example by the bias detector, so no single "
    "merged weight reproduces the model. Keep the adapter unmerged (inference is still a single pass), or, to get a "
    "plain always-on LoRA (the τ = 0 ablation), copy fairlora_A/fairlora_B into a peft LoraConfig model and merge that."
)


#: The module types FairLoRA can wrap: each has rows (examples) first in its input.
ADAPTABLE = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)
#: A wrapped convolution's public geometry, copied onto its FairLoRA layer (plain attributes: no lookup on the hot
#: path).
_CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode")


class FairLoraLayer(nn.Module, FairTunerLayer):
    adapter_layer_names = ("fairlora_A", "fairlora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "fairlora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, gate_state) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.fairlora_dropout = nn.ModuleDict()
        self.fairlora_A = nn.ModuleDict()
        self.fairlora_B = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.windowed = False  # set by the tuner inside windowed-attention blocks (rows = B · windows)
        self.sequence_first = False  # set by the tuner where the model feeds (T, B, d) (Longformer, XLNet)
        self.__dict__[STATE_ATTR] = gate_state
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # Conv1d / Conv2d, with its geometry for model code that reads it (MobileNet's padding reads the stride)
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            for name in _CONV_GEOMETRY:
                setattr(self, name, getattr(base_layer, name))
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------ construction
    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        base = self.get_base_layer()
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):  # A sees the base's receptive field, B mixes per position
            conv = type(base)
            a = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            return a, conv(r, base.out_channels, 1, bias=False)
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=False)

    def update_layer(self, adapter_name: str, config) -> None:
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / config.r * getattr(config, "adapter_strength", 1.0)
        self.fairlora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.fairlora_A[adapter_name], self.fairlora_B[adapter_name] = self._make_pair(config.r)
        self.reset_lora_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_weights: bool,
                              generator: Optional[torch.Generator] = None) -> None:
        """A from Kaiming-uniform, B zero (B Kaiming-uniform too when `init_weights` is False); from `generator`
        (a CPU one) when given, else from the global RNG."""
        a, b = self.fairlora_A[adapter_name], self.fairlora_B[adapter_name]
        if a.weight.device.type == "meta":  # low_cpu_mem_usage: loaded later with assign=True
            return
        init_(a.weight, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(b.weight)
        else:
            init_(b.weight, nn.init.kaiming_uniform_, generator, a=math.sqrt(5))

    # ------------------------------------------------------------------ math (the one place)
    def lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """(α / r) · B A dropout(x), in the adapter's dtype."""
        return self.fairlora_B[adapter_name](self._lora_hidden(x, adapter_name)) * self.scaling[adapter_name]

    def _lora_hidden(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.fairlora_A[adapter_name]
        return a(self.fairlora_dropout[adapter_name](self._cast_input_dtype(x, a.weight.dtype)))

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str, idx=None) -> torch.Tensor:
        """result + gate · ΔW x, for all rows (idx None) or the rows in idx. Without autograd the update is fused
        into `result` in place (addmm_/index_add_), which saves two full-size temporaries per adapted module."""
        if idx is not None:
            x = x.index_select(0, idx)
        b = self.fairlora_B[adapter_name]
        fused = (not torch.is_grad_enabled() and isinstance(b, nn.Linear) and result.dtype == b.weight.dtype
                 and result.is_contiguous())
        if not fused:
            delta = self.lora_delta(x, adapter_name).to(result.dtype)
            return result + delta if idx is None else result.index_add(0, idx, delta)
        hidden, scale = self._lora_hidden(x, adapter_name), self.scaling[adapter_name]
        if idx is None:
            result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), b.weight.t(), alpha=scale)
            return result
        return result.index_add_(0, idx, b(hidden), alpha=scale)

    def _add_masked(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str, mask: torch.Tensor) -> torch.Tensor:
        """result + gate · ΔW x with the gate as a (rows,) 0/1 mask: no gather and no host sync (the compiled path)."""
        delta = self.lora_delta(x, adapter_name).to(result.dtype)
        return result + delta * mask.to(result.dtype).view(-1, *([1] * (result.dim() - 1)))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if self.sequence_first and x.dim() == 3:  # (T, B, d): gate the batch dim as dim 0, then lay it back
            return self._gate_rows(result.transpose(0, 1), x.transpose(0, 1)).transpose(0, 1)
        return self._gate_rows(result, x)

    def _gate_rows(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` (the base layer's output for `x`, rows first) plus the update on the gated rows."""
        state = self.__dict__[STATE_ATTR]
        for adapter in self.active_adapters:
            if adapter not in self.fairlora_A:
                continue
            record = state.record(adapter, x.shape[0])
            if record is None:
                result = self._keep_in_graph(result, adapter)
                continue
            uniform = record.uniform
            if uniform is None and torch.compiler.is_compiling():
                mask = self._row_mask(record, x.shape[0])
                if mask is not None:
                    result = self._add_masked(result, x, adapter, mask)
                    continue
            if uniform is None:  # eager: count the gated rows (one sync per pass, cached on the record)
                n_on = record.n_on
                uniform = True if n_on == record.batch_size else False if n_on == 0 else None
            if uniform is False:
                result = self._keep_in_graph(result, adapter)  # dynamic cost: no gated row, no LoRA compute
            elif uniform:  # every row gated: right for any layout of dim 0 (e.g. B·T tokens)
                result = self._add_delta(result, x, adapter)
            else:
                result = self._add_delta(result, x, adapter, self._gated_rows(record, x.shape[0]).to(x.device))
        return result

    def _row_mask(self, record, rows: int) -> Optional[torch.Tensor]:
        """The gate per input row as a (rows,) bool tensor, or None when the layout is not per example (then the
        caller reads the gate as the eager path does, since only a uniform gate can apply)."""
        if rows == record.batch_size:
            return record.gate
        if self.windowed and rows % record.batch_size == 0:
            return record.gate.repeat_interleave(rows // record.batch_size)
        return None

    def _gated_rows(self, record, rows: int) -> torch.Tensor:
        """Indices of the input rows of the gated examples: `record.idx`, or in a windowed-attention block (Swin:
        `windowed`, B·nW windows, example-major as `window_partition` lays them out) every window of a gated example."""
        if rows == record.batch_size:
            return record.idx
        if self.windowed and rows % record.batch_size == 0:
            per_example = rows // record.batch_size
            offsets = torch.arange(per_example, device=record.idx.device)
            return (record.idx.unsqueeze(1) * per_example + offsets).reshape(-1)
        raise RuntimeError(
            f"FairLoRA layer ({type(self.get_base_layer()).__name__} {self.in_features}→{self.out_features}) got an "
            f"input with {rows} rows, but this forward's gate has {record.batch_size} (one per example) and gates "
            "only some of them, so it cannot tell which rows belong to which example. Possible causes:\n"
            "  - the module folds the batch into another dim (windowed attention, a custom layer that reshapes its "
            "input, tokens flattened to (B·T, d)) or reads an input shared by the whole batch (a position table): "
            "exclude it from FairLoraConfig.target_modules (or exclude_modules); if its rows are example-major (B·k "
            "rows, k consecutive rows per example), set `windowed = True` on this layer instead;\n"
            "  - it is a mixture-of-experts router or routed expert (its rows are the tokens routed to it): leave it "
            "out of target_modules (the default targets do);\n"
            "  - an inner module of the wrapped model is called on another batch while a forward of the wrapped "
            "model runs in the same thread (a hook or custom forward calling a submodule on other inputs): run that "
            "call outside the forward, or through the wrapped model.\n"
            "Forwards running in other threads at the same time do not cause this: each thread has its own gates."
        )

    def _keep_in_graph(self, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """With autograd on and a trainable adapter, tie its weights to the output with a zero factor: a batch with no
        gated row then gives the LoRA zero gradients instead of a loss that does not require grad (and DDP sees
        every trainable parameter used). The output values are unchanged."""
        a, b = self.fairlora_A[adapter_name].weight, self.fairlora_B[adapter_name].weight
        if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
            return result
        zero = (a.sum() + b.sum()).mul(0.0).to(device=result.device, dtype=result.dtype)
        return result + zero

    # ------------------------------------------------------------------ merging is refused
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "fairlora." + super().__repr__()


def dispatch(target: nn.Module, adapter_name: str, config, gate_state) -> FairLoraLayer:
    base = target.get_base_layer() if isinstance(target, FairTunerLayer) else target
    if isinstance(base, ADAPTABLE):
        return FairLoraLayer(target, adapter_name, config, gate_state)
    raise ValueError(
        f"FairLoRA cannot adapt {type(base).__name__} modules; supported are torch.nn.Linear, transformers Conv1D, "
        "torch.nn.Conv1d and torch.nn.Conv2d. Change FairLoraConfig.target_modules to name only such modules."
    )
