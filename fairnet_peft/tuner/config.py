"""`FairLoraConfig`: the PEFT config of a FairLoRA adapter (FairNet, Zhou et al., NeurIPS 2025).

A FairLoRA adapter is a LoRA whose low-rank update is switched on per example by a gate. The gate comes from a small
bias detector that reads the hidden states at `detector_layer` (or from explicit group labels, see `gate.py`).
This file holds and validates settings: the types come from the field annotations (`_check_types`), the ranges from
`validate`. Values that depend on the model (target modules, layer indices, sizes) are resolved against the model by
`FairLoraModel` and written back into the config before it is saved. `from_pretrained` also compares the sizes with
the shapes in the saved weights' header (`checkpoint.py`), before anything is allocated.
"""

from __future__ import annotations

import functools
import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

# The pooling names, defined once: the config's checks and help texts, the detector and representation.py read these.
TokenPooling = Literal["cls", "mean", "last"]  # (B, T, d) → (B, d): first token, masked mean, last non-padding token
DetectorPooling = Literal["attention", TokenPooling]
RepresentationPooling = Literal["auto", "head", TokenPooling]
_POOLING_NOTES = {"attention": "learned attention pooling, as in the paper", "cls": "first token",
                  "mean": "masked mean", "last": "last non-padding token, for decoders"}


def choices(literal) -> tuple:
    """The values of a `Literal[...]` alias, e.g. `choices(DetectorPooling)` → ('attention', 'cls', 'mean', 'last')."""
    return typing.get_args(literal)


def choices_text(literal, notes: Optional[dict] = None) -> str:
    """"'a', 'b' or 'c'" for a Literal alias (each name followed by its note in parentheses, if given)."""
    names = [repr(c) + (f" ({notes[c]})" if notes and c in notes else "") for c in choices(literal)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy ints too


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# What a value of each annotated type may be, and how an error message names it. `list[X]` accepts a list or a
# tuple; `set[X]` a set (names whose order does not matter); floats accept ints; bools are never numbers.
_SCALARS = {
    int: (_is_int, "an int"),
    float: (_is_number, "a number (int or float)"),
    bool: (lambda v: isinstance(v, bool), "True or False"),
    str: (lambda v: isinstance(v, str), "a string"),
    dict: (lambda v: isinstance(v, dict), "a dict"),
}
_CONTAINERS = {list: ((list, tuple), "a list of {}"), set: ((set, frozenset), "a set of {}")}
_PLURALS = {int: "ints", float: "numbers", str: "strings", bool: "booleans"}


def _accepts(hint, value) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin is Union:
        return any(_accepts(arg, value) for arg in args)
    if origin is Literal:  # the type of its values; membership is a range check (`validate`)
        return any(_accepts(type(arg), value) for arg in args)
    if origin in _CONTAINERS:
        return isinstance(value, _CONTAINERS[origin][0]) and all(_accepts(args[0], v) for v in value)
    if hint not in _SCALARS:  # a new field with an annotation this table does not know yet
        raise NotImplementedError(f"FairLoraConfig has no type check for the annotation {hint!r}; add it to _SCALARS.")
    return _SCALARS[hint][0](value)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        kinds = [_describe(arg) for arg in args if arg is not type(None)] + (["None"] if type(None) in args else [])
        return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
    if origin is Literal:
        return f"{_describe(type(args[0]))} ({choices_text(hint)})"
    if origin in _CONTAINERS:
        return _CONTAINERS[origin][1].format(_PLURALS[args[0]])
    return _SCALARS[hint][1]


def _is_numeric(hint) -> bool:
    """int / float, optional or not: the fields whose numpy scalars are turned into Python numbers."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    return len(args) == 1 and args[0] in (int, float)


@dataclass
class FairLoraConfig(PeftConfig):
    """Configuration of a FairLoRA adapter: a detector-gated, per-example conditional LoRA.

    Every field is documented in its `metadata["help"]`. Fields left at `None` are resolved from the model when the
    adapter is injected (see `docs/api.md`).
    """

    # ---------------------------------------------------------------- LoRA
    r: int = field(default=8, metadata={"help": "LoRA rank r (> 0). ΔW = (lora_alpha / r) · B A."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator α; the update is scaled by α / r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1). Only active in training mode."}
    )
    target_modules: Optional[Union[list[str], set[str], str]] = field(
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
    exclude_modules: Optional[Union[list[str], set[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], set[int], int]] = field(
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
    bias: Literal["none", "all", "fairlora_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'fairlora_only'."}
    )
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
    detector_pooling: DetectorPooling = field(
        default="attention",
        metadata={
            "help": (
                f"How the detector pools tokens/positions: {choices_text(DetectorPooling, _POOLING_NOTES)}. Text "
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
    adapter_strength: float = field(
        default=1.0,
        metadata={
            "help": (
                "Strength α in [0, 1] of the correction on gated rows: the update is α · (lora_alpha / r) · B A, so "
                "α = 0 is the base model and α = 1 the trained LoRA. FairTrainer chooses it (with τ) after training "
                "on held-out rows (FairTrainingArguments.threshold_selection)."
            )
        },
    )
    selection_report: Optional[dict] = field(
        default=None,
        metadata={
            "help": (
                "Written by FairTrainer, not an input: how it chose `threshold` and `adapter_strength` on held-out "
                "rows (rows, accuracy and worst-group accuracy with the adapter on and off, why the adapter is off, "
                "the searched frontier), so that a loaded adapter's model card still says it. None before a "
                "FairTrainer selection; ignored by the card once `threshold` or `adapter_strength` is changed."
            )
        },
    )
    # ---------------------------------------------------------------- prototypes / representation
    num_classes: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Number of task classes K >= 2 for the (class × group) prototypes, at most the model's num_labels. "
                "Default: config.num_labels (0 for a model without one: the prototype pass sets it from the data)."
            )
        },
    )
    representation_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Size of the representation z used for the prototypes. Default: the input width of the classification "
                "head where z is the head's input, else config.hidden_size (0 when neither is known: the prototype "
                "pass sets it)."
            )
        },
    )
    representation_pooling: RepresentationPooling = field(
        default="auto",
        metadata={
            "help": (
                "Which representation z(x) builds the prototypes and the triplet loss: 'head' (the tensor the "
                "classification head receives, pooled the way the head pools it; see representation.py), or the last "
                f"hidden state pooled by {choices_text(TokenPooling)}. 'auto' = 'head' where the head is found, else "
                "the last hidden state ('last' for decoder-only classifiers with a `score` head, else 'cls')."
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
        for name, hint in self._typed_fields().items():  # numpy scalars → Python numbers (JSON-serialisable)
            value = getattr(self, name)
            if _is_numeric(hint) and value is not None:
                setattr(self, name, int(value) if _is_int(value) else float(value))
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                setattr(self, name, set(value) if name != "modules_to_save" else list(value))
        if isinstance(self.layers_to_transform, (list, tuple, set, frozenset)):
            self.layers_to_transform = sorted(int(i) for i in self.layers_to_transform)
        elif self.layers_to_transform is not None:
            self.layers_to_transform = int(self.layers_to_transform)
        self.detector_hidden_sizes = [int(h) for h in self.detector_hidden_sizes]
        self.validate()

    def to_dict(self) -> dict:
        """PEFT's dict, with the module-name sets as sorted lists, so that `adapter_config.json` is the same bytes from
        one process to the next (a set of strings iterates in an order that follows the process's hash seed)."""
        out = super().to_dict()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out.get(name), (set, frozenset)):
                out[name] = sorted(out[name])
        return out

    @classmethod
    @functools.cache
    def _typed_fields(cls) -> dict:
        """{field: annotation} of the fields this class adds to PeftConfig, the annotations resolved to types."""
        hints = typing.get_type_hints(cls)
        inherited = {f.name for f in fields(PeftConfig)}
        return {f.name: hints[f.name] for f in fields(cls) if f.name not in inherited}

    def _check_types(self) -> None:
        """Raise a `TypeError` naming the field for a value of the wrong type (a string where a number belongs, ...).
        What each field accepts is its annotation (`_accepts`)."""
        for name, hint in self._typed_fields().items():
            value = getattr(self, name)
            if not _accepts(hint, value):
                raise TypeError(f"FairLoraConfig.{name}={value!r} has type {type(value).__name__}: expected "
                                f"{_describe(hint)}.")

    def validate(self) -> None:
        """Raise a `TypeError`/`ValueError` naming the field and its valid range for every invalid value."""
        self._check_types()

        def bad(name, value, valid):
            raise ValueError(f"FairLoraConfig.{name}={value!r} is invalid: {valid}.")

        for name, hint in self._typed_fields().items():  # Literal fields: one of the listed names
            if typing.get_origin(hint) is Literal and getattr(self, name) not in choices(hint):
                bad(name, getattr(self, name), f"choose {choices_text(hint)}")
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
        if not 0.0 <= float(self.adapter_strength) <= 1.0:
            bad("adapter_strength", self.adapter_strength, "α must be in [0, 1] (0 = base model, 1 = the trained LoRA)")
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's `from_pretrained`, then the sizes checked against the shapes in the header of the
        `adapter_model.safetensors` saved next to the config (only the header is read): a config whose `r`,
        `num_classes`, `representation_dim`, `detector_*` sizes disagree with its weights, or weights without the
        detector or the prototype keys, fail here, before `PeftModel.from_pretrained` allocates the adapter."""
        from .checkpoint import check_config_against_weights

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, FairLoraConfig):
            hub_kwargs, _, _ = cls._split_kwargs(kwargs)
            check_config_against_weights(config, pretrained_model_name_or_path, subfolder, hub_kwargs)
        return config

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
