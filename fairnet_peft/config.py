"""`FairLoraConfig`: the PEFT config of a FairLoRA adapter (FairNet, Zhou et al., NeurIPS 2025).

A FairLoRA adapter is a LoRA whose low-rank update is switched on per example by a gate. The gate comes from a small
bias detector that reads the hidden states at `detector_layer` (or from explicit group labels, see `gate.py`).
This file only holds and validates settings; values that depend on the model (target modules, layer indices,
sizes) are resolved against the model by `FairLoraModel` and written back into the config before it is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

DetectorPooling = Literal["attention", "cls", "mean", "last"]


@dataclass
class FairLoraConfig(PeftConfig):
    """Configuration of a FairLoRA adapter: a detector-gated, per-example conditional LoRA.

    Every field is documented in its `metadata["help"]`. Fields left at `None` are resolved from the model when the
    adapter is injected (see `docs/api.md`).
    """

    # ---------------------------------------------------------------- LoRA
    r: int = field(default=8, metadata={"help": "LoRA rank r (> 0). ΔW = (lora_alpha / r) · B A."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator α; the update is scaled by α / r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1). Only active in training mode."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Names (exact or suffix match) or a regex of the modules to adapt, or 'all-linear'. Default: the "
                "attention query and value projections of the model type (PEFT's LoRA mapping, with the "
                "transformers-5 names q_proj/v_proj for ViT and q_lin/v_lin for DistilBERT), restricted to "
                "`layers_to_transform`."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": (
                "Indices of the transformer blocks to adapt. Default: the blocks from `detector_layer` to the last, "
                "so every adapted layer runs after the detector's read point and inference is a single pass."
            )
        },
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Name of the ModuleList holding the blocks (e.g. 'layer', 'layers', 'h'), used with "
                "`layers_to_transform`. Default: found from the model."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Base modules (besides the adapter) to train and save, e.g. a new classifier head."},
    )
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'fairlora_only'."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: A Kaiming-uniform and B = 0, so a fresh adapter is the identity. False: B random too "
                "(for tests)."
            )
        },
    )
    # ---------------------------------------------------------------- detector
    detector_layer: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Index l of the block whose *input* the detector reads (hidden_states[l]); valid range 0..L-1 for a "
                "model with L blocks. Default: L // 2 (the middle of the stack)."
            )
        },
    )
    detector_module: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Dotted name of the module whose input the detector reads, for models whose layout is unusual. "
                "Overrides `detector_layer`. Default: block `detector_layer` of the layer stack, or for models "
                "without a layer stack the first adapted module."
            )
        },
    )
    detector_input_dim: Optional[int] = field(
        default=None,
        metadata={"help": "Feature size of the detector input. Default: the model's hidden size or the module's."},
    )
    detector_pooling: str = field(
        default="attention",
        metadata={
            "help": (
                "How the detector pools tokens/positions: 'attention' (learned attention pooling, as in the paper), "
                "'cls' (first token), 'mean' (masked mean) or 'last' (last non-padding token, for decoders). Text "
                "pooling respects the attention mask."
            )
        },
    )
    detector_hidden_sizes: list[int] = field(
        default_factory=lambda: [128, 64],
        metadata={"help": "Hidden layer sizes of the detector MLP (ReLU + dropout between layers)."},
    )
    detector_dropout: float = field(default=0.1, metadata={"help": "Dropout in the detector MLP, in [0, 1)."})
    threshold: float = field(
        default=0.5,
        metadata={
            "help": (
                "Gate threshold τ in [0, 1]: the LoRA is on for an example when its risk score is > τ (strict), so "
                "τ = 1 reproduces the base model and τ = 0 switches the LoRA on for every example."
            )
        },
    )
    # ---------------------------------------------------------------- prototypes / representation
    num_classes: Optional[int] = field(
        default=None,
        metadata={"help": "Number of task classes K for the (class × group) prototypes. Default: config.num_labels."},
    )
    representation_dim: Optional[int] = field(
        default=None,
        metadata={"help": "Size of the final representation used for prototypes. Default: config.hidden_size."},
    )
    representation_pooling: str = field(
        default="auto",
        metadata={
            "help": (
                "Which representation z(x) builds the prototypes and the triplet loss: 'head' (the tensor the "
                "classification head receives, pooled the way the head pools it; see representation.py), or the last "
                "hidden state pooled by 'cls', 'mean' or 'last'. 'auto' = 'head' where the head is found, else the "
                "last hidden state ('last' for decoder-only classifiers with a `score` head, else 'cls')."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.FAIRLORA
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value) if name != "modules_to_save" else list(value))
        if isinstance(self.layers_to_transform, (list, tuple, set)):
            self.layers_to_transform = sorted(int(i) for i in self.layers_to_transform)
        self.detector_hidden_sizes = [int(h) for h in self.detector_hidden_sizes]
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the field and its valid range for every invalid value."""

        def bad(name, value, valid):
            raise ValueError(f"FairLoraConfig.{name}={value!r} is invalid: {valid}.")

        if not isinstance(self.r, int) or self.r <= 0:
            bad("r", self.r, "the LoRA rank must be an integer > 0")
        if self.lora_alpha <= 0:
            bad("lora_alpha", self.lora_alpha, "must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if not 0.0 <= self.detector_dropout < 1.0:
            bad("detector_dropout", self.detector_dropout, "must be in [0, 1)")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= float(self.threshold) <= 1.0):
            bad("threshold", self.threshold, "τ must be in [0, 1] (gate on when risk > τ)")
        if self.detector_pooling not in ("attention", "cls", "mean", "last"):
            bad("detector_pooling", self.detector_pooling, "choose 'attention', 'cls', 'mean' or 'last'")
        if self.representation_pooling not in ("auto", "head", "cls", "mean", "last"):
            bad("representation_pooling", self.representation_pooling, "choose 'auto', 'head', 'cls', 'mean' or 'last'")
        if any(h <= 0 for h in self.detector_hidden_sizes):
            bad("detector_hidden_sizes", self.detector_hidden_sizes, "every hidden size must be > 0")
        if self.detector_layer is not None and self.detector_layer < 0:
            bad("detector_layer", self.detector_layer, "must be >= 0 (the index of a block of the model)")
        if self.bias not in ("none", "all", "fairlora_only"):
            bad("bias", self.bias, "choose 'none', 'all' or 'fairlora_only'")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
