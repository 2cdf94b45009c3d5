"""`FairLoraConfig`: the PEFT config of a FairLoRA adapter (FairNet, Zhou et al., NeurIPS 2025).

A FairLoRA adapter is a LoRA whose low-rank update is switched on per example by a gate. The gate comes from a small
bias detector that reads the hidden states at `detector_layer` (or from explicit group labels, see `gate.py`).
This file only holds and validates settings; values that depend on the model (target modules, layer indices,
sizes) are resolved against the model by `FairLoraModel` and written back into the config before it is saved.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

DetectorPooling = Literal["attention", "cls", "mean", "last"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy ints too


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_names(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v))


_CHECKS = {
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "names": _is_names,
    "name_list": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
    "ints": lambda v: _is_int(v) or (isinstance(v, (list, tuple, set)) and all(_is_int(x) for x in v)),
    "int_list": lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) for x in v),
}
_KIND_TEXT = {
    "int": "an int", "number": "a number (int or float)", "bool": "True or False", "str": "a string",
    "names": "a module name / regex string or a list of names", "name_list": "a list of module names",
    "ints": "an int or a list of ints", "int_list": "a list of ints",
}
# (field, kind, None allowed)
_TYPED_FIELDS = (
    ("r", "int", False), ("lora_alpha", "number", False), ("lora_dropout", "number", False),
    ("target_modules", "names", True), ("exclude_modules", "names", True), ("layers_to_transform", "ints", True),
    ("layers_pattern", "names", True), ("modules_to_save", "name_list", True), ("bias", "str", False),
    ("init_weights", "bool", False), ("detector_layer", "int", True), ("detector_module", "str", True),
    ("detector_input_dim", "int", True), ("detector_pooling", "str", False), ("detector_hidden_sizes", "int_list", False),
    ("detector_dropout", "number", False), ("threshold", "number", False), ("num_classes", "int", True),
    ("representation_dim", "int", True), ("representation_pooling", "str", False),
    ("representation_module", "str", True),
)


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
                "Names (exact or suffix match) or a regex of the modules to adapt, or 'all-linear'. Default: every "
                "linear layer (attention and MLP) of the blocks in `layers_to_transform`; for models without a layer "
                "stack, the attention query and value projections of the model type (PEFT's LoRA mapping). The "
                "paper adapts query/value only; docs/method.md says why the default adapts the whole block."
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
        metadata={"help": "Number of task classes K >= 2 for the (class × group) prototypes. Default: config.num_labels."},
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

    representation_module: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Dotted name (in the base model) of the classification head whose input is z(x) when "
                "representation_pooling is 'head'/'auto'. Default: the model's top-level `classifier` or `score`."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.FAIRLORA
        self._check_types()  # before the normalisation below, which would turn e.g. 1.5 into 1 or "abc" into a crash
        for name, kind, _ in _TYPED_FIELDS:  # numpy scalars → Python numbers (JSON-serialisable)
            value = getattr(self, name)
            if kind in ("int", "number") and value is not None:
                setattr(self, name, int(value) if _is_int(value) else float(value))
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, set(value) if name != "modules_to_save" else list(value))
        if isinstance(self.layers_to_transform, (list, tuple, set)):
            self.layers_to_transform = sorted(int(i) for i in self.layers_to_transform)
        elif self.layers_to_transform is not None:
            self.layers_to_transform = int(self.layers_to_transform)
        self.detector_hidden_sizes = [int(h) for h in self.detector_hidden_sizes]
        self.validate()

    def _check_types(self) -> None:
        """Raise a `TypeError` naming the field for a value of the wrong type (a string where a number belongs, ...)."""
        for name, kind, optional in _TYPED_FIELDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _CHECKS[kind](value):
                allowed = _KIND_TEXT[kind] + (" or None" if optional else "")
                raise TypeError(f"FairLoraConfig.{name}={value!r} has type {type(value).__name__}: expected {allowed}.")

    def validate(self) -> None:
        """Raise a `TypeError`/`ValueError` naming the field and its valid range for every invalid value."""
        self._check_types()

        def bad(name, value, valid):
            raise ValueError(f"FairLoraConfig.{name}={value!r} is invalid: {valid}.")

        if self.r <= 0:
            bad("r", self.r, "the LoRA rank must be an integer > 0")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            bad("lora_alpha", self.lora_alpha, "must be a finite number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if not 0.0 <= self.detector_dropout < 1.0:
            bad("detector_dropout", self.detector_dropout, "must be in [0, 1)")
        if not 0.0 <= float(self.threshold) <= 1.0:
            bad("threshold", self.threshold, "τ must be in [0, 1] (gate on when risk > τ)")
        if self.detector_pooling not in ("attention", "cls", "mean", "last"):
            bad("detector_pooling", self.detector_pooling, "choose 'attention', 'cls', 'mean' or 'last'")
        if self.representation_pooling not in ("auto", "head", "cls", "mean", "last"):
            bad("representation_pooling", self.representation_pooling, "choose 'auto', 'head', 'cls', 'mean' or 'last'")
        if any(h <= 0 for h in self.detector_hidden_sizes):
            bad("detector_hidden_sizes", self.detector_hidden_sizes, "every hidden size must be > 0")
        if self.detector_layer is not None and self.detector_layer < 0:
            bad("detector_layer", self.detector_layer, "must be >= 0 (the index of a block of the model)")
        for name in ("detector_module", "representation_module"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                bad(name, value, "name a module of the model, or leave it None")
        if self.detector_input_dim is not None and self.detector_input_dim <= 0:
            bad("detector_input_dim", self.detector_input_dim, "must be > 0 (the detector's input feature size)")
        if self.num_classes is not None and (self.num_classes < 0 or self.num_classes == 1):
            bad("num_classes", self.num_classes, "needs >= 2 classes (0 or None: taken from the model or the data)")
        if self.representation_dim is not None and self.representation_dim < 0:
            bad("representation_dim", self.representation_dim, "must be > 0 (0 or None: taken from the model)")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and (not layers or any(i < 0 for i in layers)):
            bad("layers_to_transform", self.layers_to_transform, "block indices must be >= 0 (and at least one)")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not value and name != "exclude_modules":
                bad(name, value, "name at least one module, or leave it None for the default")
        if self.bias not in ("none", "all", "fairlora_only"):
            bad("bias", self.bias, "choose 'none', 'all' or 'fairlora_only'")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
