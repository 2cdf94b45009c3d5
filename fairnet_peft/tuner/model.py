"""`FairLoraModel`: the PEFT tuner that injects FairLoRA into a model.

`inject_adapter` resolves the model-dependent settings (layer stack, detector read point, default target modules
and layers, sizes) and writes them into the config, lets PEFT wrap the target modules (`_create_and_replace` →
`layer.dispatch`), then attaches the detector container at `<model>.fair_bias_detector` and the gate hooks
(gate.py). Everything per model lives on the wrapped model, not on this tuner, so transformers' own
`model.load_adapter(...)` (which injects through a throw-away tuner) gets the same behaviour as `PeftModel`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _remove_adapter_name_from_state_dict_key
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checkpoint import check_loaded_state_dict
from .config import FairLoraConfig
from .detector import FairBiasDetector, FairTunerLayer, as_tokens, detector_size
from .gate import (DETECTOR_ATTR, STATE_ATTR, GateState, detector_pre_hook, release_checkpointing, root_post_hook,
                   root_pre_hook)
from .layer import ADAPTABLE, MERGE_REFUSED, FairLoraLayer, dispatch
from .representation import find_head, resolve_pooling

_STACK_NAMES = ("layer", "layers", "h", "block", "blocks", "stages")
# Attention query/value projections by naming family, tried in order when the model type is not in PEFT's mapping
# or its names changed (transformers 5 ViT uses q_proj/v_proj where PEFT's mapping still says query/value).
_QV_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("c_attn",), ("qkv",))


def find_layer_stack(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """The longest outermost ModuleList of same-type blocks named like a layer stack ('layer', 'layers', 'h',
    'blocks', 'stages'). Outermost: in hierarchical models (Swin `encoder.layers[i].blocks`, ConvNeXt
    `encoder.stages[i].layers`) the stages are the stack, whatever the depth of one stage."""
    found = []
    mixed = _MIXED_STAGES.get(getattr(getattr(model, "config", None), "model_type", None))
    for name, module in model.named_modules():
        if mixed and isinstance(module, nn.ModuleList) and (name == mixed or name.endswith("." + mixed)):
            return name, module
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if name.rpartition(".")[2] not in _STACK_NAMES or len({type(m) for m in module}) != 1:
            continue
        if isinstance(module[0], (nn.ModuleList, nn.ModuleDict)):  # stages held as lists (PVT, PoolFormer): a list
            continue  # is never called, so its input cannot be read; no block stack here
        if not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return max(found, key=lambda item: len(item[1]), default=None)


#: model_type → its stack of stages of more than one block type (the same-type rule would pick a list inside a stage,
#: whose input is not one row per example: MobileViT's transformer reads unfolded patches).
_MIXED_STAGES = {"mobilevit": "encoder.layer"}


def declared_width(module: Optional[nn.Module], descend: bool = True) -> Optional[int]:
    """The input width a module declares (in_features, in_channels, nx, embed_dim, hidden_size, a norm's
    normalized_shape), else (`descend`) that of its first descendant that declares one: a block's first projection
    or norm, which reads the block's input (Swin/ConvNeXt stages, whose widths differ from config.hidden_size)."""
    subs = [] if module is None else (module.modules() if descend else [module])
    for sub in subs:
        if isinstance(sub, FairTunerLayer) and hasattr(sub, "base_layer"):
            sub = sub.get_base_layer()
        shape = getattr(sub, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and len(shape) == 1 and int(shape[0]) > 0:
            return int(shape[0])
        for attr in ("in_features", "in_channels", "nx", "embed_dim", "hidden_size"):
            value = getattr(sub, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class _Probed(Exception):
    """Stops the probe's forward once the read module has been reached."""


def _probe_inputs(model: nn.Module) -> Optional[dict]:
    """The smallest input of the model's main kind (four token ids, or one image of its configured size) on its
    device, or None when its weights are not materialised or its input kind is another."""
    params = list(model.parameters())
    if not params or any(p.is_meta for p in params):
        return None
    config, device = getattr(model, "config", None), params[0].device
    kind = getattr(model, "main_input_name", "input_ids")
    if kind == "input_ids":
        vocab = int(getattr(config, "vocab_size", None) or 5)
        ids = torch.arange(1, 5, device=device).clamp_max(max(vocab - 1, 0)).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    vision = getattr(config, "vision_config", None) or config
    size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
    if kind == "pixel_values" and size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        return {"pixel_values": torch.zeros(1, int(channels), int(height), int(width), device=device, dtype=dtype)}
    return None


def probe_read_width(model: nn.Module, module_name: str) -> Optional[int]:
    """The width of the hidden state module `module_name` reads, measured: one forward of `_probe_inputs` in eval
    mode without autograd, stopped at that module. None when the model cannot run such an input (the caller then
    keeps the width the module declares)."""
    inputs = _probe_inputs(model)
    if inputs is None:
        return None
    seen: dict = {}

    def stop(module, args, kwargs):
        hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        if torch.is_tensor(hidden) and 2 <= hidden.dim() <= 4:
            seen["width"] = int(as_tokens(hidden).shape[-1])
        raise _Probed

    handle = model.get_submodule(module_name).register_forward_pre_hook(stop, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    except _Probed:
        pass
    except Exception:  # noqa: BLE001 - any input this model rejects: no measurement
        return None
    finally:
        handle.remove()
        model.train(was_training)
    return seen.get("width")


def _adaptable_leaves(model: nn.Module) -> list[str]:
    """Leaf names of the modules FairLoRA can adapt (`layer.ADAPTABLE`), in model order, for messages."""
    names = [k.rpartition(".")[2] for k, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    return list(dict.fromkeys(names))


def _check_rank(config: FairLoraConfig, target: nn.Module, key: str) -> None:
    """`r` may not exceed the larger width of a module it adapts (A is r × in, B is out × r): the update B·A has rank
    at most min(in, out) anyway, and a larger r only allocates memory. Checked before the module's A and B exist."""
    base = target.get_base_layer() if isinstance(target, FairTunerLayer) else target
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        width_in = base.in_channels * math.prod(base.kernel_size)
        width_out = base.out_channels
    elif isinstance(base, Conv1D):
        width_in, width_out = base.weight.shape
    elif isinstance(base, nn.Linear):
        width_in, width_out = base.in_features, base.out_features
    else:
        return  # not adaptable: `layer.dispatch` says so
    if config.r > max(width_in, width_out):
        raise ValueError(
            f"FairLoraConfig.r={config.r} is larger than the module {key!r} it adapts ({width_in} inputs, "
            f"{width_out} outputs): the update B·A has rank at most {min(width_in, width_out)}, so a larger r only "
            f"allocates memory. Use r <= {max(width_in, width_out)} (LoRA ranks are usually 4-64), or leave this "
            "module out of target_modules."
        )


def _batch_shared_inputs(model: nn.Module) -> set[str]:
    """Leaf names of modules that read a table shared by the whole batch rather than one row per example, which a
    per-example gate cannot split: DeBERTa's relative-position projections (v1 `pos_proj` / `pos_q_proj`, v2
    `pos_key_proj` / `pos_query_proj`; with `share_att_key`, as DeBERTa-v3 sets it, the query and key projections
    read that table too) and Swin-v2's continuous position-bias MLP. The default targets leave them out."""
    # Swin-v2's MLP is `cpb_mlp` before transformers 5, `continuous_position_bias_mlp` since
    names = {"pos_proj", "pos_q_proj", "pos_key_proj", "pos_query_proj", "cpb_mlp.0", "cpb_mlp.2",
             "continuous_position_bias_mlp.0", "continuous_position_bias_mlp.2"}
    config = getattr(model, "config", None)
    if getattr(config, "share_att_key", False) and getattr(config, "relative_attention", False):
        names |= {"query_proj", "key_proj"}
    return names


#: (model_type, leaf name) of modules whose model flattens the tokens to a (B·T, d) input, example-major: OPT's MLP.
#: Named per model, not inferred from a 2-D input: a mixture-of-experts layer's experts also get 2-D inputs, whose
#: rows are the tokens routed to them, in no per-example order.
_FLATTENED_TOKENS = {("opt", "fc1"), ("opt", "fc2")}
#: model_type → the name of the submodules whose input is the image unfolded into B · patch_area rows, example-major
#: (MobileViT's transformer).
_UNFOLDED_PATCHES = {"mobilevit": "transformer"}
#: model_type → (why the default read point, a block's input, cannot work there; the leaf name of a module whose
#: input is (B, T, d), which the error names instead; what else to set). XLNet feeds its blocks (T, B, d);
#: SqueezeBERT's encoder calls its blocks' `forward` directly, so no hook on a block runs, and feeds them (B, d, T).
_UNREADABLE_BLOCKS = {
    "xlnet": ("runs its blocks sequence first (their input is (T, B, d)), so the detector cannot read a block's "
              "input per example", "sequence_summary", ", and the layers to adapt, e.g. target_modules=['layer_1', "
              "'layer_2'] (the feed-forward layers; its attention weights are not nn.Linear modules)"),
    "squeezebert": ("calls its blocks' forward method directly, which runs no hook, so the detector never sees a "
                    "block's input (which is (B, d, T), channels first)", "pooler", ""),
}
#: (model_type, leaf name) of modules whose model feeds them (T, B, d), sequence first: Longformer's (and LED's
#: encoder's) self-attention projections, XLNet's feed-forward. Their layer gates dim 1 (`sequence_first`).
_SEQUENCE_FIRST = ({(kind, name) for kind in ("longformer", "led")
                    for name in ("query", "key", "value", "query_global", "key_global", "value_global")}
                   | {("xlnet", "layer_1"), ("xlnet", "layer_2")})


def _example_major_rows(model: nn.Module, key: str) -> bool:
    """Whether module `key`'s input rows are B · k, k consecutive rows per example (the layer's `windowed`): inside a
    windowed-attention block (`_in_windowed_block`), a module its model feeds flattened tokens (`_FLATTENED_TOKENS`)
    or unfolded patches (`_UNFOLDED_PATCHES`), or a module of a mixture-of-experts block outside its routing
    (`moe_role` "shared": such a block flattens its (B, T, d) input to B · T token rows, example-major, as Qwen2-MoE
    does for its shared expert; a module there that gets the (B, T, d) tensor itself has B rows, which needs no
    flag)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ((model_type, key.rpartition(".")[2]) in _FLATTENED_TOKENS or _in_windowed_block(model, key)
            or moe_role(model, key) == "shared" or _UNFOLDED_PATCHES.get(model_type) in key.split("."))


#: A mixture-of-experts block is a module with an `experts` or a `router` child (Mixtral, Qwen2-MoE, DeepSeek,
#: Phi-MoE, HunYuan; JetMoE's MLP has only the router, its experts being the block's own parameters).
_MOE_EXPERTS = "experts"
#: Path components, below such a block, of the module that scores the experts (Phi-MoE `router`, HunYuan `gate.wg`,
#: JetMoE `router.layer`, Mixtral-style `gate`).
_MOE_ROUTERS = {"gate", "router"}


def moe_role(model: nn.Module, key: str) -> Optional[str]:
    """Where module `key` sits in a mixture-of-experts block (its nearest ancestor with an `experts` or `router`
    child): "routed" for the routed experts and the router (their rows are the tokens routed to an expert, or every
    token to be routed, in no order a per-example gate can follow), "shared" for the block's other modules (a shared
    expert and its gate), None outside such a block. The default targets leave the "routed" ones out."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        ancestor = model.get_submodule(".".join(parts[:i]))
        children = getattr(ancestor, "_modules", {})
        if any(isinstance(children.get(name), nn.Module) for name in (_MOE_EXPERTS, "router")):
            below = parts[i:]
            return "routed" if below[0] == _MOE_EXPERTS or _MOE_ROUTERS & set(below) else "shared"
    return None


def _distinct_suffix(key: str, others: list[str]) -> str:
    """The shortest dotted suffix of `key` that names it as a target (PEFT matches a name against a key's end) and
    matches none of `others`: the leaf name (a bare ModuleList index keeps its parent's name: 'experts.0'), longer
    only where a leaf name is shared with a module left out (a router, or a wrapper module named like the layer it
    holds: PVT-v2's `dwconv.dwconv`)."""
    parts = key.split(".")
    start = 2 if parts[-1].isdigit() and len(parts) > 1 else 1
    for n in range(start, len(parts) + 1):
        name = ".".join(parts[-n:])
        if not any(other == name or other.endswith("." + name) for other in others):
            return name
    return key


def _in_windowed_block(model: nn.Module, key: str) -> bool:
    """Whether module `key` sits inside a windowed-attention block (an ancestor with a `window_size`, as Swin's
    layers and attention): its input rows are then B · windows, not B."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if getattr(model.get_submodule(".".join(parts[:i])), "window_size", None) is not None:
            return True
    return False


def frame_mask_pre_hook(module: nn.Module, args, kwargs):
    """Audio encoders (Wav2Vec2-style `input_values` with a per-sample `attention_mask`): give the detector the mask
    of the downsampled frames it reads, as the model computes it (`_get_feature_vector_attention_mask`). Runs after
    gate.root_pre_hook, which drops masks over raw samples."""
    state, mask = module.__dict__.get(STATE_ATTR), kwargs.get("attention_mask")
    values = kwargs.get("input_values", args[0] if args else None)
    live = state.live if state is not None else None
    if live is None or live.mask is not None or not torch.is_tensor(mask) or not torch.is_tensor(values):
        return None
    if mask.dim() != 2 or values.dim() != 2 or mask.shape != values.shape:
        return None
    frames = int(module._get_feat_extract_output_lengths(values.shape[-1]))
    live.mask = module._get_feature_vector_attention_mask(frames, mask).long()
    return None


def _model_config(model: nn.Module) -> dict:
    """model_type, hidden_size and num_labels of a transformers model (attribute aliases resolved), else {}."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_labels": getattr(config, "num_labels", None),
    }


class FairLoraModel(BaseTuner):
    """PEFT tuner for `FairLoraConfig`. Created by `get_peft_model`; users do not instantiate it directly."""

    prefix: str = "fairlora_"
    tuner_layer_cls = FairTunerLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ injection
    def _gate_state(self, model: nn.Module) -> GateState:
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            state = GateState(None)  # the detector container is attached after PEFT's first injection
            model.__dict__[STATE_ATTR] = state
            model.__dict__["_fairlora_is_root"] = True
            state.root_handles = [
                model.register_forward_pre_hook(root_pre_hook, with_kwargs=True),
                model.register_forward_hook(root_post_hook, with_kwargs=True, always_call=True),
            ]
            if callable(getattr(model, "_get_feature_vector_attention_mask", None)):  # after root_pre_hook
                state.root_handles.append(model.register_forward_pre_hook(frame_mask_pre_hook, with_kwargs=True))
        return state

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """PEFT calls this on every module after loading an adapter with `low_cpu_mem_usage=True` (the weights are
        assigned where they were loaded, `infer_device()`: the GPU when there is one). The LoRA layers follow their
        base layer; the detector container has no base layer, so the tuner moves it (detector and prototypes) to the
        device of the module the detector reads."""
        state = self.model.__dict__.get(STATE_ATTR)
        config = self.peft_config.get(adapter_name)
        if state is None or state.detector is None or config is None or config.detector_module is None:
            return
        if device is None:
            read = self.model.get_submodule(config.detector_module)
            device = next((p.device for p in read.parameters() if p.device.type != "meta"), None)
        state.detector._move_adapter_to_device_of_base_layer(adapter_name, device)

    def _prepare_adapter_config(self, peft_config: FairLoraConfig, model_config: dict) -> FairLoraConfig:
        return peft_config  # resolved against the model itself in `_resolve_config`

    def _resolve_config(self, model: nn.Module, config: FairLoraConfig) -> None:
        model_config = _model_config(model)
        stack = find_layer_stack(model)
        module_names = dict(model.named_modules())
        if config.detector_module is None and stack is not None:
            n_layers = len(stack[1])
            layer = n_layers // 2 if config.detector_layer is None else config.detector_layer
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"FairLoraConfig.detector_layer={layer} is out of range: this model has {n_layers} blocks in "
                    f"'{stack[0]}', so the valid range is 0..{n_layers - 1} (the detector reads the input of that block)."
                )
            config.detector_layer = layer
            config.detector_module = f"{stack[0]}.{layer}"
            if config.layers_to_transform is None and config.target_modules != "all-linear":
                config.layers_to_transform = list(range(layer, n_layers))
            if config.layers_to_transform is not None and config.layers_pattern is None:
                config.layers_pattern = stack[0].rpartition(".")[2]
        elif config.detector_module is not None and config.detector_module not in module_names:
            raise ValueError(
                f"FairLoraConfig.detector_module={config.detector_module!r} is not a module of this model. Name the "
                "module whose input the detector should read, e.g. one block of the layer stack "
                f"({', '.join(list(module_names)[1:6])}, ...)."
            )
        if config.detector_module == f"{stack[0] if stack else ''}.{config.detector_layer}" and \
                model_config.get("model_type") in _UNREADABLE_BLOCKS:
            why, leaf, extra = _UNREADABLE_BLOCKS[model_config["model_type"]]
            read = next((name for name in module_names if name.rpartition(".")[2] == leaf), leaf)
            raise ValueError(
                f"FairLoraConfig.detector_module: {model_config['model_type']} {why}. Name a module whose input is "
                f"(B, T, d), e.g. detector_module={read!r} (near the head: the gate then backtracks, two passes per "
                f"forward){extra}.")
        self._check_layer_selection(model, config, stack)
        if config.target_modules is None:
            config.target_modules = self._default_targets(model, config, model_config.get("model_type"))
        else:
            self._check_target_names(model, config)
            self._check_targets_match(model, config)
        if config.detector_input_dim is None and config.detector_module is not None:
            config.detector_input_dim = self._infer_detector_width(model, config)
        elif config.detector_input_dim is None and model_config.get("hidden_size"):
            config.detector_input_dim = model_config["hidden_size"]
        if config.num_classes is None:
            num_labels = int(model_config.get("num_labels") or 0)
            if num_labels == 1:
                raise ValueError(
                    "FairLoraConfig.num_classes: the model has config.num_labels=1 (a regression or single-logit "
                    "head), but FairNet needs >= 2 classes (each class is contrasted with prototypes of the other "
                    "classes); regression heads are not supported. Build the model with num_labels >= 2 (e.g. 2 "
                    "for a binary task) or set num_classes >= 2."
                )
            config.num_classes = num_labels
        if config.representation_dim is None:
            config.representation_dim = self._representation_width(model, config) or int(model_config.get("hidden_size") or 0)

    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        if key == DETECTOR_ATTR or key.startswith(DETECTOR_ATTR + ".") or f".{DETECTOR_ATTR}." in key:
            return False  # never adapt the detector itself (e.g. with target_modules="all-linear")
        return BaseTuner._check_target_module_exists(peft_config, key)

    def _matching_keys(self, model: nn.Module, config: FairLoraConfig) -> list[str]:
        return [key for key, _ in model.named_modules() if key and self._check_target_module_exists(config, key)]

    @staticmethod
    def _block_linear_names(model: nn.Module, config: FairLoraConfig) -> set[str]:
        """Leaf names of every module of `layer.ADAPTABLE` (nn.Linear, Conv1D, Conv1d, Conv2d) inside the adapted
        blocks (e.g. BERT: query, key, value, dense; Llama: q_proj … down_proj; ConvNeXt: dwconv, pwconv1, pwconv2,
        downsampling_layer.1; SqueezeBERT: the Conv1d layers). Empty without a layer stack."""
        stack = find_layer_stack(model)
        if stack is None or config.layers_to_transform is None:
            return set()
        kept, left_out = [], []
        for i in config.layers_to_transform:
            if not 0 <= i < len(stack[1]):
                continue
            prefix = f"{stack[0]}.{i}."
            wrapped: list[str] = []  # tuner layers of an earlier adapter: count the layer itself, not its insides
            for name, module in stack[1][i].named_modules():
                if not name or any(name.startswith(w + ".") for w in wrapped):
                    continue
                if isinstance(module, BaseTunerLayer):
                    wrapped.append(name)
                    module = module.get_base_layer()
                adaptable = isinstance(module, ADAPTABLE) and moe_role(model, prefix + name) != "routed"
                (kept if adaptable else left_out).append(prefix + name)
        return {_distinct_suffix(key, left_out) for key in kept}

    @staticmethod
    def _check_layer_selection(model: nn.Module, config: FairLoraConfig, stack) -> None:
        """An unknown `layers_pattern` or a `layers_to_transform` index past the end of the stack selects nothing
        (PEFT ignores it silently): name the field, the stacks found and the valid range."""
        lists = {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
        pattern = config.layers_pattern
        patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
        if patterns:
            lists = {name: n for name, n in lists.items()
                     if any(re.fullmatch(rf"(?:.*\.)?{p}", name) for p in patterns)}
            if not lists:
                found = sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                                if isinstance(m, nn.ModuleList) and len(m)})
                raise ValueError(
                    f"FairLoraConfig.layers_pattern={pattern!r} names no layer stack (nn.ModuleList) of this model; "
                    f"the stacks found are {found}. Use one of them, or leave layers_pattern=None to find it "
                    "automatically."
                )
        elif stack is not None:
            lists = {stack[0]: len(stack[1])}
        indices = config.layers_to_transform
        indices = [indices] if isinstance(indices, int) else list(indices or [])
        if not indices or not lists:
            return
        n_layers = max(lists.values())
        outside = [i for i in indices if not 0 <= i < n_layers]
        if outside:
            raise ValueError(
                f"FairLoraConfig.layers_to_transform={config.layers_to_transform!r} has block indices {outside} "
                f"outside the layer stack ({', '.join(sorted(lists))}: {n_layers} blocks): the valid range is "
                f"0..{n_layers - 1}."
            )

    @staticmethod
    def _check_target_names(model: nn.Module, config: FairLoraConfig) -> None:
        """Every name in an explicit list of target_modules must name some module of the model (exact key or
        suffix; before layers_to_transform / exclude_modules narrow the choice): catches misspelt names."""
        if isinstance(config.target_modules, str) or not config.target_modules:
            return
        keys = [key for key, _ in model.named_modules() if key]
        missing = sorted(name for name in config.target_modules
                         if not any(key == name or key.endswith(f".{name}") for key in keys))
        if missing:
            leaves = sorted({key.rpartition(".")[2] for key, m in model.named_modules()
                             if isinstance(m, ADAPTABLE)})[:12]
            raise ValueError(
                f"FairLoraConfig.target_modules={sorted(config.target_modules)}: {missing} matches no module of "
                f"this model (misspelt?). Module names of linear layers in this model: {leaves}."
            )

    def _fail_if_excluded(self, model: nn.Module, config: FairLoraConfig) -> None:
        """No module matched: if `exclude_modules` is what removed every match, say so."""
        if not config.exclude_modules:
            return
        excluded = config.exclude_modules
        config.exclude_modules = None
        try:
            matched = self._matching_keys(model, config)
        finally:
            config.exclude_modules = excluded
        if matched:
            raise ValueError(
                f"FairLoraConfig.exclude_modules={sorted(excluded) if isinstance(excluded, set) else excluded!r} "
                f"excludes every target module ({matched[:6]}{', ...' if len(matched) > 6 else ''}): nothing is left "
                "to adapt. Exclude fewer modules, or widen target_modules."
            )

    def _default_targets(self, model: nn.Module, config: FairLoraConfig, model_type: Optional[str]) -> set[str]:
        """Every linear layer of the adapted blocks, else the first q/v naming family that matches, without the
        modules that read a batch-shared table (`_batch_shared_inputs`); when nothing matches, blame exclude_modules
        if it removed every match, else target_modules."""
        candidates = []
        shared = _batch_shared_inputs(model)
        block_linear = self._block_linear_names(model, config)
        if block_linear:
            candidates.append(tuple(sorted(block_linear)))
        if model_type in self.target_module_mapping:
            candidates.append(tuple(self.target_module_mapping[model_type]))
        candidates.extend(_QV_CANDIDATES)
        candidates = [kept for kept in (tuple(n for n in names if n not in shared) for names in candidates) if kept]
        for names in candidates:
            config.target_modules = set(names)
            if self._matching_keys(model, config):
                return set(names)
        try:
            for names in candidates:
                config.target_modules = set(names)
                self._fail_if_excluded(model, config)
        finally:
            config.target_modules = None
        raise ValueError(
            f"FairLoraConfig.target_modules: could not find the attention query/value projections of model type "
            f"{model_type!r} (tried {[list(c) for c in candidates]}) and found no layer stack (a ModuleList named "
            f"{'/'.join(_STACK_NAMES)}). Pass target_modules=[...] with the names of the nn.Linear/Conv modules to "
            f"adapt, e.g. target_modules={_adaptable_leaves(model)[:3]}, or target_modules='all-linear'."
        )

    def _check_targets_match(self, model: nn.Module, config: FairLoraConfig) -> None:
        if config.target_modules == "all-linear" or self._matching_keys(model, config):
            return
        self._fail_if_excluded(model, config)
        linear = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"FairLoraConfig.target_modules={sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r} "
            f"matches no module of this model (layers_to_transform={config.layers_to_transform}). Valid targets are "
            f"nn.Linear/Conv1D/Conv1d/Conv2d module names (suffix match) such as {linear}, or 'all-linear'."
        )

    @staticmethod
    def _read_width(model: nn.Module, config: FairLoraConfig) -> Optional[int]:
        """Width of the hidden state the detector reads: the read module's declared input width; for a block of the
        layer stack, its first projection's or norm's (stage widths of hierarchical models), else config.hidden_size.
        None when unknown (then checked at the first forward, in DetectorNet.logits)."""
        module = model.get_submodule(config.detector_module)
        width = declared_width(module, descend=False)
        stack = find_layer_stack(model)
        if width is None and stack is not None and config.detector_module.rpartition(".")[0] == stack[0]:
            hidden_size = _model_config(model).get("hidden_size")
            width = declared_width(module) or hidden_size
            if hidden_size is not None and width != hidden_size:  # a stage width, or a first module that reads
                width = probe_read_width(model, config.detector_module) or width  # something else (MobileBERT)
        return width

    @staticmethod
    def _representation_width(model: nn.Module, config: FairLoraConfig) -> Optional[int]:
        """Width of z when z is the classification head's input (the head's input width: e.g. Wav2Vec2's
        classifier_proj_size, DINOv2's 2 × hidden_size); None for hidden-state poolings ('auto' without a head)."""
        if resolve_pooling(config.representation_pooling, model, config.representation_module) != "head":
            return None  # an explicit 'head' without a head fails here, naming representation_module
        return declared_width(find_head(model, config.representation_module)[1])

    @classmethod
    def _infer_detector_width(cls, model: nn.Module, config: FairLoraConfig) -> int:
        width = (cls._read_width(model, config) or _model_config(model).get("hidden_size")
                 or declared_width(model.get_submodule(config.detector_module)))
        if width is not None:
            return int(width)
        raise ValueError(
            "FairLoraConfig.detector_input_dim could not be inferred (the model has no config.hidden_size and the "
            f"detector module {config.detector_module!r} declares no input width). Set detector_input_dim to the "
            "feature size of that module's input, e.g. detector_input_dim=768."
        )

    @classmethod
    def _check_detector_width(cls, model: nn.Module, config: FairLoraConfig) -> None:
        """detector_input_dim must equal the width of the hidden state the detector reads (`_read_width`)."""
        width = cls._read_width(model, config)
        if width is not None and int(width) != config.detector_input_dim:
            raise ValueError(
                f"FairLoraConfig.detector_input_dim={config.detector_input_dim} does not match the width {width} of "
                f"the hidden state the detector reads (input of {config.detector_module!r}). Set "
                f"detector_input_dim={width} or leave it None to infer it."
            )

    @staticmethod
    def _check_sizes(model: nn.Module, config: FairLoraConfig) -> None:
        """Bounds on the sizes that need the model but no file, checked before the adapter is built (an adapter
        config from anywhere, e.g. transformers' `load_adapter`, cannot make it allocate gigabytes): `num_classes` at
        most the model's `num_labels`; the detector and the prototypes no bigger than the base model itself (or
        2**20 values, for toy models). Runs after `_check_detector_width` (which bounds `detector_input_dim` by the
        width the detector reads) and before the detector and the prototypes are built; `r` is bounded per module,
        before its A and B exist, in `_check_rank`."""
        num_labels = _model_config(model).get("num_labels")
        if isinstance(num_labels, int) and num_labels >= 2 and config.num_classes > num_labels:
            raise ValueError(
                f"FairLoraConfig.num_classes={config.num_classes} is more than the model's num_labels={num_labels}: "
                f"the prototypes hold one row per class the model predicts, so num_classes must be at most "
                f"{num_labels}. Leave num_classes None to take num_labels, or load the adapter onto the model it was "
                "trained with."
            )
        limit = max(sum(p.numel() for p in model.parameters()), 2**20)
        size = detector_size(config.detector_input_dim, config.detector_hidden_sizes, config.detector_pooling)
        if size > limit:
            raise ValueError(
                f"FairLoraConfig.detector_hidden_sizes={config.detector_hidden_sizes} with detector_input_dim="
                f"{config.detector_input_dim} makes a detector of {size:,} parameters, more than the {limit:,} of the "
                "model it reads. The detector is a small MLP (default [128, 64]); use smaller hidden sizes."
            )
        prototypes = config.num_classes * 2 * ((config.representation_dim or 0) + 1)  # (K, 2, d) + (K, 2) counts
        if prototypes > limit:
            raise ValueError(
                f"FairLoraConfig.num_classes={config.num_classes} with representation_dim={config.representation_dim} "
                f"makes {prototypes:,} prototype values, more than the {limit:,} parameters of the model. Set "
                "num_classes to the number of task classes and representation_dim to the width of z (or leave both "
                "None to take them from the model)."
            )

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config: FairLoraConfig = self.peft_config[adapter_name]
        self._resolve_config(model, config)
        state = self._gate_state(model)
        state.configs[adapter_name] = config
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if config.detector_module is None:  # no layer stack: read the input of the first adapted module
            config.detector_module = next(k for k, _ in model.named_modules() if k in set(self.targeted_module_names))
        if config.detector_input_dim is None:
            config.detector_input_dim = self._infer_detector_width(model, config)
        self._check_detector_width(model, config)
        self._check_sizes(model, config)
        if state.detector is None:
            state.detector = FairBiasDetector()
            setattr(model, DETECTOR_ATTR, state.detector)
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        dtype = next((p.dtype for n, p in model.named_parameters()
                      if p.is_floating_point() and self.prefix not in n and p.device.type != "meta"), None)
        state.detector.update_layer(adapter_name, config, config.num_classes, config.representation_dim, device, dtype)
        state.detector.set_adapter(self.active_adapters)
        read_module = model.get_submodule(config.detector_module)
        read_module.__dict__[STATE_ATTR] = state
        old = state.read_handles.pop(adapter_name, None)
        if old is not None:
            old.remove()
        state.read_handles[adapter_name] = read_module.register_forward_pre_hook(
            functools.partial(detector_pre_hook, adapter_name=adapter_name), with_kwargs=True
        )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        _check_rank(config, target, current_key)
        state = self._gate_state(self.model)
        if isinstance(target, FairTunerLayer) and hasattr(target, "fairlora_A"):
            target.update_layer(adapter_name, config)
            return
        new_module = dispatch(target, adapter_name, config, state)
        new_module.windowed = _example_major_rows(self.model, current_key)
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        new_module.sequence_first = (model_type, current_key.rpartition(".")[2]) in _SEQUENCE_FIRST
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ adapter management
    def delete_adapter(self, adapter_name: str) -> None:
        state = self.model.__dict__.get(STATE_ATTR)
        super().delete_adapter(adapter_name)
        if state is not None:
            handle = state.read_handles.pop(adapter_name, None)
            if handle is not None:
                handle.remove()
            state.configs.pop(adapter_name, None)
            state.records.pop(adapter_name, None)

    # ------------------------------------------------------------------ what a trainer reads and trains
    def set_threshold(self, adapter_name: str, threshold: float) -> None:
        """Set the gate threshold τ of `adapter_name` (its config, which `save_pretrained` writes)."""
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold!r}: τ must be in [0, 1].")
        self.peft_config[adapter_name].threshold = float(threshold)

    def set_adapter_strength(self, adapter_name: str, strength: float) -> None:
        """Set the correction strength α of `adapter_name`: its config and the scaling α · lora_alpha / r of every
        FairLoRA layer. Changes the model for every caller: not for use while other threads run it."""
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"adapter_strength={strength!r}: must be in [0, 1].")
        config = self.peft_config[adapter_name]
        config.adapter_strength = float(strength)
        for layer in self.lora_layers(adapter_name):
            layer.scaling[adapter_name] = config.lora_alpha / config.r * float(strength)

    def reinitialize(self, adapter_name: str, seed: int) -> None:
        """Draw the initial weights of `adapter_name` (its detector and every LoRA pair) again, from a generator of
        their own seeded with `seed`: the same seed gives the same adapter whatever the global RNG did before."""
        generator = torch.Generator().manual_seed(int(seed))
        self._gate_state(self.model).detector.fairlora_detector[adapter_name].reset_parameters(generator)
        init_weights = self.peft_config[adapter_name].init_weights
        for layer in self.lora_layers(adapter_name):
            layer.reset_lora_parameters(adapter_name, init_weights, generator)

    def is_fresh(self, adapter_name: str) -> bool:
        """True while `adapter_name` has never been trained: no prototypes yet and (with the zero-B init) every
        LoRA B still zero."""
        detector = self._gate_state(self.model).detector
        if bool(detector.fairlora_prototype_counts[adapter_name].any()):
            return False
        return not self.peft_config[adapter_name].init_weights or not any(
            bool(layer.fairlora_B[adapter_name].weight.any()) for layer in self.lora_layers(adapter_name))

    def lora_layers(self, adapter_name: str) -> list[FairLoraLayer]:
        """The adapted layers that hold a LoRA for `adapter_name`."""
        return [m for m in self.model.modules() if isinstance(m, FairLoraLayer) and adapter_name in m.fairlora_A]

    def trainable_parameters(self, part: str, adapter_name: str) -> list[nn.Parameter]:
        """The parameters of one training stage of `adapter_name`: 'detector' (the bias detector) or 'lora' (every
        adapted layer's A and B)."""
        if part == "detector":
            return list(self._gate_state(self.model).detector.fairlora_detector[adapter_name].parameters())
        if part == "lora":
            return [p for layer in self.lora_layers(adapter_name)
                    for p in (*layer.fairlora_A[adapter_name].parameters(), *layer.fairlora_B[adapter_name].parameters())]
        raise ValueError(f"trainable_parameters: part={part!r}; use 'detector' or 'lora'.")

    @torch.no_grad()
    def lora_relative_update(self, adapter_name: str) -> float:
        """Mean over adapted layers of ‖(α/r)·B·A‖_F / ‖W‖_F: ≈ 0 means the LoRA has not moved from its zero start.
        Layers whose base weight is not floating point (a quantized base, e.g. bitsandbytes 4/8-bit) have no ‖W‖ to
        read and are skipped; nan when every layer is."""
        ratios, quantized = [], 0
        for layer in self.lora_layers(adapter_name):
            if not layer.get_base_layer().weight.is_floating_point():
                quantized += 1
                continue
            wa, wb = layer.fairlora_A[adapter_name].weight, layer.fairlora_B[adapter_name].weight
            delta = layer.scaling[adapter_name] * (wb.reshape(wb.shape[0], -1) @ wa.reshape(wa.shape[0], -1))
            ratios.append(float(delta.norm() / layer.get_base_layer().weight.norm().clamp_min(1e-12)))
        return sum(ratios) / len(ratios) if ratios else math.nan if quantized else 0.0

    def _check_merge_allowed(self):
        raise ValueError(MERGE_REFUSED)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(MERGE_REFUSED)
        state = self.model.__dict__.pop(STATE_ATTR, None)
        self.model.__dict__.pop("_fairlora_is_root", None)
        if state is not None:
            for handle in list(state.read_handles.values()) + state.root_handles:
                handle.remove()
            for module in self.model.modules():
                module.__dict__.pop(STATE_ATTR, None)
            release_checkpointing(self.model)
        if hasattr(self.model, DETECTOR_ATTR):
            delattr(self.model, DETECTOR_ATTR)
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    # ------------------------------------------------------------------ checkpoint keys
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> dict:
        """PEFT's remapping (checkpoint keys → model keys), then the strict check: every LoRA, detector and
        prototype tensor of the adapter present and finite (checkpoint.py). Runs inside `set_peft_model_state_dict`,
        so `PeftModel.from_pretrained`, `load_adapter`, resuming and the trainer's stage reload all pass through it."""
        remapped = super()._remap_adapter_state_dict_for_load(model=model, config=config, adapter_name=adapter_name,
                                                             state_dict=state_dict)
        check_loaded_state_dict(model, adapter_name, remapped, cls._remove_adapter_name_from_key)
        return remapped

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".fairlora_detector.{adapter_name}."
        if marker in key:  # nested detector parameters: fairlora_detector.<adapter>.mlp.0.weight
            return key.replace(marker, ".fairlora_detector.", 1)
        return _remove_adapter_name_from_state_dict_key(key, adapter_name)
