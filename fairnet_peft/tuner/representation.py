"""The representation z(x) that FairNet's prototypes and triplet loss use.

`representation_pooling='head'` (what 'auto' picks when the model has a head): `capture_head_input` puts a forward
pre-hook on the classification head (`find_head`) for one forward pass and returns, as `.z` (B, d), the tensor the
head receives, pooled the way the head pools it: a 2-D input as is (BERT pooler output, DistilBERT's
ReLU(pre_classifier), ViT's normalised [CLS]); a 3-D input to a head that pools internally (RoBERTa-style, 2-D
output) → the first token; a 3-D input to a per-token head (decoder `score`, 3-D output) → the token transformers
takes the logits from (rightmost token that is not `pad_token_id`, else the attention mask's last 1, else -1).
'cls' / 'mean' / 'last' pool the last hidden state instead (`representation_from_hidden`, the pre-'head' rule).
z stays in the autograd graph, so the triplet loss reaches the LoRA through it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .backtrack import backtrack_rows
from .config import RepresentationPooling, TokenPooling, choices, choices_text
from .detector import pool_tokens
from .gate import find_gate_state

HEAD_NAMES = ("classifier", "score")
POOLINGS = choices(RepresentationPooling)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / DataParallel / torch.compile / PeftModel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def find_head(model: nn.Module, name: Optional[str] = None) -> tuple[str, nn.Module]:
    """The classification head of `model` (a transformers classifier, or a PeftModel around one) as (name, module).

    `name` is a dotted submodule path in the base model; without it the base model's top-level `classifier` or
    `score` is taken. A head wrapped by PEFT (ModulesToSaveWrapper, a LoRA layer) is returned wrapped: its input is
    the same tensor.
    """
    base = _base_model(model)
    if name:
        try:
            return name, base.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"FairLoraConfig.representation_module={name!r} names no submodule of {type(base).__name__}. Give "
                "the dotted name of the classification head (as in `model.get_base_model().named_modules()`)."
            ) from None
    for candidate in HEAD_NAMES:
        module = base._modules.get(candidate)
        if isinstance(module, nn.Module):
            return candidate, module
    linear = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "fair_bias_detector" not in n]
    example = f", e.g. representation_module={linear[-1]!r}" if linear else ""
    raise ValueError(
        f"{type(base).__name__} has no top-level `classifier` or `score` module, so the classification head's input "
        f"cannot be captured. Set FairLoraConfig.representation_module to the head's dotted name{example}, or set "
        f"FairLoraConfig.representation_pooling to {choices_text(TokenPooling)} to use the last hidden state."
    )


def resolve_pooling(config_value: str, model: nn.Module, head_name: Optional[str] = None) -> str:
    """Map FairLoraConfig.representation_pooling to 'head', 'cls', 'mean' or 'last' for `model`.

    'auto' → 'head' when `find_head` finds a head, else the pre-'head' rule ('last' if the base model has `score`,
    else 'cls'). 'head' is checked here, so a model without a head fails before training starts.
    """
    if config_value not in POOLINGS:
        raise ValueError(f"representation_pooling={config_value!r} is not valid; choose {choices_text(RepresentationPooling)}.")
    if config_value == "auto":
        try:
            find_head(model, head_name)
            return "head"
        except ValueError:
            return "last" if hasattr(_base_model(model), "score") else "cls"
    if config_value == "head":
        find_head(model, head_name)
    return config_value


def representation_from_hidden(outputs: Any, mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """The last hidden state pooled by 'cls', 'mean' or 'last' (needs `output_hidden_states=True`); in fp32, so a
    bf16 model's mean over a long row (and its mask count past 256) keeps its digits."""
    hidden = outputs.hidden_states[-1]
    if hidden.dim() == 2:
        return hidden.float()
    if how != "mean":  # one token: no sum to lose digits in
        return pool_tokens(hidden, mask, how).float()
    return pool_tokens(hidden.float(), mask.float() if mask is not None else None, how)


def last_token_index(batch_size: int, seq_len: int, device, input_ids: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None,
                     pad_token_id: Optional[int] = None) -> torch.Tensor:
    """(B,) index of the token a per-token head's logits are read from, as transformers 5 picks it.

    With `input_ids` and a `pad_token_id`: the rightmost token that is not padding (left or right padding).
    Else with an attention mask: its rightmost 1. Else the last position.
    """
    positions = torch.arange(seq_len, device=device)
    if input_ids is not None and pad_token_id is not None:
        keep = (input_ids.to(device) != pad_token_id).long()
    elif attention_mask is not None:
        keep = attention_mask.to(device).long()
    else:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    return (keep * positions).argmax(dim=1)


def model_pad_token_id(model: nn.Module) -> Optional[int]:
    """The base model's (text config's) `pad_token_id`, None where it has none."""
    config = getattr(_base_model(model), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "pad_token_id", None)


def _gate_state(model: nn.Module):
    """FairLoRA's GateState of `model`, or None for a model without a FairLoRA adapter."""
    try:
        return find_gate_state(model)
    except ValueError:
        return None


class HeadCapture:
    """What `capture_head_input` yields. After the forward, `.z` is the head's pooled input, shape (B, d).

    `representation(outputs)` returns z for any pooling: `.z` for 'head', the pooled last hidden state of
    `outputs` otherwise. `needs_hidden_states` says whether the forward must get `output_hidden_states=True`.
    """

    def __init__(self, model: nn.Module, pooling: str, head_name: Optional[str], input_ids, attention_mask,
                 pad_token_id, head_dropout: bool = True):
        self.model = model
        self.pooling = resolve_pooling(pooling, model, head_name)
        self.head_name, self.head = find_head(model, head_name) if self.pooling == "head" else (None, None)
        self.input_ids, self.attention_mask, self.pad_token_id = input_ids, attention_mask, pad_token_id
        self.gate_state = _gate_state(model) if self.head is not None else None
        self.calls: list[dict] = []  # one per head call: input, output rank, whether it was FairLoRA's rerun
        self._handles: list = []
        self.head_dropout = head_dropout
        self._paused_dropouts: list[nn.Module] = []

    @property
    def needs_hidden_states(self) -> bool:
        return self.pooling != "head"

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        if self.head is None:
            return
        if not self.head_dropout:  # the top-level dropout between the pooled features and the head (BERT, DistilBERT)
            self._paused_dropouts = [m for m in _base_model(self.model).children()
                                     if isinstance(m, nn.Dropout) and m.training]
            for m in self._paused_dropouts:
                m.eval()
        self._handles = [self.head.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         self.head.register_forward_hook(self._post_hook)]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for m in self._paused_dropouts:
            m.train()
        self._handles, self._paused_dropouts = [], []

    def _pre_hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not torch.is_tensor(x):
            raise TypeError(f"The head `{self.head_name}` was called without a tensor input; set "
                            "FairLoraConfig.representation_module to the module that receives the features.")
        passes = getattr(self.gate_state, "passes", [])
        rows = backtrack_rows(passes[-2]) if len(passes) > 1 and passes[-1].backtrack else None  # a FairLoRA rerun
        self.calls.append({"x": x, "out_dim": None, "rerun": rows is not None, "rows": rows})

    def _post_hook(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.calls[-1]["out_dim"] = out.dim() if torch.is_tensor(out) else None

    # ------------------------------------------------------------------ pooling
    def _pool(self, call: dict, rows: Optional[torch.Tensor]) -> torch.Tensor:
        x = call["x"]
        if x.dim() == 2:
            return x
        if x.dim() > 3:  # a pooled feature map (B, C, 1, 1) that the head flattens
            return x.flatten(1)
        if call["out_dim"] == 2:  # the head pools internally: RoBERTa-style first token
            return x[:, 0]
        ids, mask = self.input_ids, self.attention_mask
        if rows is not None:
            ids = ids.index_select(0, rows.to(ids.device)) if ids is not None else None
            mask = mask.index_select(0, rows.to(mask.device)) if mask is not None else None
        last = last_token_index(x.shape[0], x.shape[1], x.device, ids, mask, self.pad_token_id)
        return x[torch.arange(x.shape[0], device=x.device), last]

    @property
    def z(self) -> torch.Tensor:
        if self.pooling != "head":
            raise ValueError(f"representation_pooling is {self.pooling!r}: call .representation(outputs) (with "
                             "output_hidden_states=True) instead of .z, which exists only for 'head'.")
        if not self.calls:
            raise RuntimeError(f"The head `{self.head_name}` did not run inside `capture_head_input`: run the "
                               "model's forward inside the `with` block.")
        first = [c for c in self.calls if not c["rerun"]]
        reruns = [c for c in self.calls if c["rerun"]]
        if len(first) != 1:
            raise RuntimeError(f"The head `{self.head_name}` ran {len(first)} times in one capture; capture one "
                               "forward pass per `with` block.")
        z = self._pool(first[0], None)
        if reruns:  # FairLoRA's gate reran the gated rows: their head input replaces the first pass's
            rows = reruns[-1]["rows"]
            z = z.index_copy(0, rows.to(z.device), self._pool(reruns[-1], rows).to(z.dtype))
        return z

    def representation(self, outputs: Any = None) -> torch.Tensor:
        if self.pooling == "head":
            return self.z
        if outputs is None or getattr(outputs, "hidden_states", None) is None:
            raise ValueError(f"representation_pooling={self.pooling!r} pools the last hidden state: run the forward "
                             "with output_hidden_states=True and pass its outputs.")
        return representation_from_hidden(outputs, self.attention_mask, self.pooling)

    def __enter__(self) -> "HeadCapture":
        self._attach()
        return self

    def __exit__(self, *exc) -> None:
        self._detach()


def capture_head_input(model: nn.Module, batch: Optional[dict] = None, *, pooling: str = "head",
                       head_name: Optional[str] = None, attention_mask: Optional[torch.Tensor] = None,
                       input_ids: Optional[torch.Tensor] = None, pad_token_id: Optional[int] = None,
                       head_dropout: bool = True) -> HeadCapture:
    """Context manager capturing the head's input during one forward: `with capture_head_input(model, batch) as cap:
    out = model(**batch)`, then `cap.z` (or `cap.representation(out)` for any pooling).

    `batch` supplies `input_ids` / `attention_mask` unless given explicitly; `pad_token_id` defaults to the base
    model's config. `pooling` is a FairLoraConfig.representation_pooling value ('auto' resolved by `resolve_pooling`);
    `head_name` is FairLoraConfig.representation_module (default: `classifier` or `score`). In train mode the head
    of BERT / DistilBERT reads dropout(features); `head_dropout=False` switches the base model's top-level dropout
    off for this forward (the prototypes, built in eval mode, never see it).

    A training-time helper: the hook it registers on the head sees every forward of `model` while the block is open,
    so do not run the model from other threads inside it (serving needs no capture; the gate state is per thread).
    """
    batch = batch or {}
    ids = input_ids if input_ids is not None else batch.get("input_ids")
    mask = attention_mask if attention_mask is not None else batch.get("attention_mask")
    pad = pad_token_id if pad_token_id is not None else model_pad_token_id(model)
    return HeadCapture(model, pooling, head_name, ids, mask, pad, head_dropout)
