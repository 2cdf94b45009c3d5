"""The bias detector: attention pooling + MLP + sigmoid → a per-example risk score p_s(x) ∈ [0, 1].

`DetectorNet` is the network of one adapter. `FairBiasDetector` is the container that lives in the model tree at
`<model>.fair_bias_detector`; it is a PEFT tuner layer, so PEFT's own machinery (set/delete adapter, requires_grad,
dtype casts, state dict) handles the detectors and the prototype buffers of every FairLoRA adapter. The detector is
frozen by default (via PEFT's `frozen_peft_weight_names`); `FairTrainer` unfreezes it for its detector stage.
`pool_tokens` is shared with the trainer, which pools the final representation the same way. Precision: the
detector always computes in fp32 (autocast off, inputs upcast), so its risk and the gate `risk > τ` do not depend on
whether the base runs in bf16 or under `bf16=True` autocast.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import TokenPooling, choices_text


class FairTunerLayer(BaseTunerLayer):
    """Marker base class of every FairLoRA tuner layer (the LoRA layers and the detector container)."""


def init_(weight: torch.Tensor, init, generator: Optional[torch.Generator] = None, **kwargs) -> None:
    """`init(weight, **kwargs)` in place; with a CPU `generator`, drawn in fp32 on the CPU and copied, so the values
    do not depend on the weight's device or dtype. Meta weights are left alone."""
    if weight.is_meta:
        return
    if generator is None:
        init(weight, **kwargs)
        return
    draw = torch.empty(weight.shape, dtype=torch.float32)
    init(draw, generator=generator, **kwargs)
    weight.copy_(draw)


def as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """View a hidden tensor as tokens (B, T, d): (B, d) → (B, 1, d); (B, C, H, W) → (B, H·W, C)."""
    if hidden.dim() == 2:
        return hidden.unsqueeze(1)
    if hidden.dim() == 3:
        return hidden
    if hidden.dim() == 4:
        return hidden.flatten(2).transpose(1, 2)
    raise ValueError(f"The detector cannot read a hidden tensor of shape {tuple(hidden.shape)}; expected 2-4 dims.")


def align_mask(mask: Optional[torch.Tensor], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Return a (B, T) {0,1} mask matching `tokens`, or None when there is no usable 2-D attention mask."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != tokens.shape[0]:
        return None
    if mask.shape[1] != tokens.shape[1]:
        if mask.shape[1] < tokens.shape[1]:
            return None
        mask = mask[:, -tokens.shape[1] :]  # decoders with a cache: the mask covers past + current tokens
    return mask.to(tokens.dtype)


def pool_tokens(tokens: torch.Tensor, mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """Pool (B, T, d) tokens to (B, d) with 'cls' (first token), 'mean' (masked) or 'last' (last non-padding)."""
    if how == "cls":
        return tokens[:, 0]
    if how == "mean":
        if mask is None:
            return tokens.mean(dim=1)
        weights = mask.unsqueeze(-1)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "last":
        if mask is None:
            return tokens[:, -1]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        last = (mask.long() * positions).argmax(dim=1)  # works for left and right padding
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    raise ValueError(f"Unknown pooling {how!r}; choose {choices_text(TokenPooling)}.")


class DetectorNet(nn.Module):
    """LayerNorm → pooling → MLP (ReLU, dropout) → logit. `forward` returns the risk score sigmoid(logit), shape (B,).

    Attention pooling (paper, Sec. 3.2): e_i = vᵀ tanh(W h_i + b), α = softmax(e) over non-padding tokens,
    h_pool = Σ_i α_i h_i. The output layer is Xavier-initialised with gain 0.1 and a zero bias, so a fresh detector
    scores every example ≈ 0.5.
    """

    # Submodule names are deliberately unusual ("in_norm", "pool_energy", "risk_mlp") so that suffix matching of
    # `modules_to_save=["classifier", "score", "norm"]` never wraps detector internals.
    def __init__(self, input_dim: int, hidden_sizes: list[int], dropout: float, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.in_norm = nn.LayerNorm(input_dim)
        if pooling == "attention":
            attn_dim = hidden_sizes[0] if hidden_sizes else input_dim
            self.pool_proj = nn.Linear(input_dim, attn_dim)
            self.pool_energy = nn.Linear(attn_dim, 1, bias=False)
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.risk_mlp = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh weights; from `generator` (a CPU one) when given, else from the global RNG."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_(module.weight, nn.init.xavier_uniform_, generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init_(self.risk_mlp[-1].weight, nn.init.xavier_uniform_, generator, gain=0.1)

    def logits(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) fp32 logits, always computed in fp32: autocast is off inside, bf16/fp16 hidden states are upcast, and
        half-precision detector weights (a model cast after wrapping, or the bf16 copies FSDP mixed precision gathers)
        are upcast for the computation only. Functional ops on upcast views of the weights, not a second call of this
        module (`functional_call` would run FSDP's forward hooks twice and crash the sharded backward)."""
        dtype = torch.promote_types(self.in_norm.weight.dtype, torch.float32)

        def cast(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if p is None else p.to(dtype)

        with torch.autocast(device_type=hidden.device.type, enabled=False):
            tokens = as_tokens(hidden).to(dtype)
            if tokens.shape[-1] != self.in_norm.normalized_shape[0]:
                raise ValueError(
                    f"FairLoraConfig.detector_input_dim={self.in_norm.normalized_shape[0]} does not match the width "
                    f"{tokens.shape[-1]} of the hidden state the detector reads (shape {tuple(hidden.shape)}). Set "
                    f"detector_input_dim={tokens.shape[-1]} or leave it None to infer it from the model."
                )
            mask = align_mask(mask, tokens)
            norm = self.in_norm
            tokens = F.layer_norm(tokens, norm.normalized_shape, cast(norm.weight), cast(norm.bias), norm.eps)
            if self.pooling == "attention":
                energy = torch.tanh(F.linear(tokens, cast(self.pool_proj.weight), cast(self.pool_proj.bias)))
                scores = F.linear(energy, cast(self.pool_energy.weight)).squeeze(-1)
                if mask is not None:
                    scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
                alpha = torch.softmax(scores, dim=1).unsqueeze(-1)
                x = (alpha * tokens).sum(dim=1)
            else:
                x = pool_tokens(tokens, mask, self.pooling)
            for layer in self.risk_mlp:
                x = F.linear(x, cast(layer.weight), cast(layer.bias)) if isinstance(layer, nn.Linear) else layer(x)
            return x.squeeze(-1)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The risk score sigmoid(logit), (B,) fp32."""
        return torch.sigmoid(self.logits(hidden, mask))


def detector_shapes(input_dim: int, hidden_sizes: list[int], pooling: str) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the `DetectorNet` these settings build, from a copy on the meta device (no memory
    is allocated, whatever the sizes): what a saved detector must contain, and how big it is."""
    with torch.device("meta"):
        net = DetectorNet(input_dim, list(hidden_sizes), 0.0, pooling)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def detector_size(input_dim: int, hidden_sizes: list[int], pooling: str) -> int:
    """Number of values (parameters) of the `DetectorNet` these settings build, without building it."""
    return sum(math.prod(shape) for shape in detector_shapes(input_dim, hidden_sizes, pooling).values())


class FairBiasDetector(nn.Module, FairTunerLayer):
    """Container of the per-adapter detectors and prototype buffers, attached at `<model>.fair_bias_detector`.

    Keys in the adapter checkpoint: `fair_bias_detector.fairlora_detector.<params>`,
    `fair_bias_detector.fairlora_prototypes` ((K, 2, d) per-(class × group) mean representations) and
    `fair_bias_detector.fairlora_prototype_counts` ((K, 2) row counts). "No prototypes yet" is all-zero counts, never a
    missing key: a fresh adapter saves both buffers zero-filled (K = 0 or d = 0 where the model declares neither
    num_labels nor a representation width) until the prototype pass sets them.
    """

    adapter_layer_names = ("fairlora_detector",)
    other_param_names = ("fairlora_prototypes", "fairlora_prototype_counts")

    def __init__(self) -> None:
        super().__init__()
        self.fairlora_detector = nn.ModuleDict()
        self.fairlora_prototypes = BufferDict(persistent=True)
        self.fairlora_prototype_counts = BufferDict(persistent=True)
        self.frozen_peft_weight_names = {}
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = 0
        self.out_features = 1

    # BaseTunerLayer reads these from `base_layer`; the detector wraps no base layer.
    def get_base_layer(self) -> nn.Module:
        return self

    @property
    def weight(self):  # pragma: no cover - only here so PEFT helpers that probe `.weight` do not recurse
        raise AttributeError("FairBiasDetector has no base weight")

    @property
    def bias(self):  # pragma: no cover
        raise AttributeError("FairBiasDetector has no base bias")

    def update_layer(self, adapter_name: str, config, num_classes: int, representation_dim: int, device, dtype):
        self.in_features = config.detector_input_dim
        net = DetectorNet(config.detector_input_dim, config.detector_hidden_sizes, config.detector_dropout,
                          config.detector_pooling)
        if not any(p.is_meta for p in net.parameters()):  # low_cpu_mem_usage: stays on meta, loaded with assign=True
            net = net.to(device=device, dtype=dtype)
        self.fairlora_detector[adapter_name] = net
        self.fairlora_prototypes[adapter_name] = torch.zeros(num_classes, 2, representation_dim, device=device)
        self.fairlora_prototype_counts[adapter_name] = torch.zeros(num_classes, 2, device=device)
        self.set_detector_trainable(adapter_name, False)

    def set_prototypes(self, adapter_name: str, prototypes: torch.Tensor, counts: torch.Tensor) -> None:
        """Store the (K, 2, d) prototypes and (K, 2) row counts of `adapter_name` (on the device of its buffers)."""
        if prototypes.dim() != 3 or prototypes.shape[1] != 2 or counts.shape != prototypes.shape[:2]:
            raise ValueError(f"prototypes must be (K, 2, d) and counts (K, 2); got {tuple(prototypes.shape)} and "
                             f"{tuple(counts.shape)}.")
        device = self.fairlora_prototypes[adapter_name].device
        self.fairlora_prototypes[adapter_name] = prototypes.to(device=device, dtype=torch.float32)
        self.fairlora_prototype_counts[adapter_name] = counts.to(device=device, dtype=torch.float32)

    def set_detector_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Freeze (default) or unfreeze the detector of `adapter_name`; PEFT's adapter switching keeps the choice."""
        if trainable:
            self.frozen_peft_weight_names.pop(adapter_name, None)
        else:
            self.frozen_peft_weight_names[adapter_name] = ("fairlora_detector",)
        if adapter_name in self.fairlora_detector:
            self.fairlora_detector[adapter_name].requires_grad_(trainable)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        if device is None:
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)

    def merge(self, *args, **kwargs) -> None:
        return None  # nothing to merge: the detector only gates

    def unmerge(self) -> None:
        return None

    def forward(self, x=None, *args, **kwargs):
        """Identity. The detectors run from the gate hooks (gate.py); this only matters when the wrapped model is an
        `nn.Sequential`, which calls every child in order, including this container."""
        return x
