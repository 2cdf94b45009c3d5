"""Strict loading of a saved FairLoRA adapter: sizes are checked before anything is allocated, keys and values after.

`check_config_against_weights` (from `FairLoraConfig.from_pretrained`, so before `PeftModel.from_pretrained` builds
the adapter) reads only the header of `adapter_model.safetensors` (`safetensors.safe_open`: names and shapes, no
tensor data) and compares it with the config: `r`, `num_classes`, `representation_dim`, `detector_input_dim`,
`detector_hidden_sizes`, `detector_pooling`, and the presence of the detector and prototype keys. The bounds that need
the model, not a file, are in `FairLoraModel` (model.py). `check_loaded_state_dict` runs inside PEFT's
`set_peft_model_state_dict`, before `load_state_dict`: every LoRA, detector and prototype tensor of the adapter must be
in the state dict, and finite. "No prototypes yet" is all-zero counts, never a missing key (see `FairBiasDetector`).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

import torch

from .detector import detector_shapes

WEIGHTS_NAME = "adapter_model.safetensors"
_SHOWN = 6  # keys listed in a message

_LORA = re.compile(r"(?:^|\.)fairlora_([AB])\.weight$")
_DETECTOR = re.compile(r"(?:^|\.)fair_bias_detector\.fairlora_detector\.(.+)$")
_PROTOTYPES = re.compile(r"(?:^|\.)fair_bias_detector\.fairlora_(prototypes|prototype_counts)$")
_MLP_WEIGHT = re.compile(r"^risk_mlp\.(\d+)\.weight$")


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


# ------------------------------------------------------------------------------------------ before allocation
def weights_file(model_id: str, subfolder: Optional[str] = None, hub_kwargs: Optional[dict] = None) -> Optional[str]:
    """The `adapter_model.safetensors` of a local folder or a Hub repo, or None where there is none (a folder with a
    config only, `.bin` weights, or no access to the Hub: then PEFT's own loader reports what is missing)."""
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    local = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(local):
        return local
    if os.path.isdir(folder):
        return None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model_id, WEIGHTS_NAME, subfolder=subfolder, **(hub_kwargs or {}))
    except (OSError, ValueError):  # not on the Hub, no access, offline (HTTP errors are OSErrors)
        return None


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} from the header of a safetensors file; no tensor is read."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def check_config_against_weights(config, model_id: str, subfolder: Optional[str] = None,
                                  hub_kwargs: Optional[dict] = None) -> None:
    """Compare `config` with the header of the weights saved at `model_id` (nothing to compare without a
    safetensors file)."""
    path = weights_file(model_id, subfolder, hub_kwargs)
    if path is not None:
        check_config_against_shapes(config, read_shapes(path), path)


def check_config_against_shapes(config, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise a `ValueError` naming the config field, its value and the value the weights need, or the missing keys.

    Fields left None (resolved from the model later) are not compared here."""
    def mismatch(name, key, should):
        raise ValueError(
            f"FairLoraConfig.{name}={getattr(config, name)!r} in adapter_config.json does not match the adapter "
            f"weights {source}: {key} has shape {list(shapes[key])}, so {name} should be {should!r}. The config and "
            "the weights come from different adapters, or one of them was edited; save the adapter again with "
            "save_pretrained, or fix the config."
        )

    def missing(what, keys, consequence):
        raise ValueError(f"The adapter weights {source} have no {what} ({_listed(keys)} expected): {consequence}. "
                         "The file is incomplete or was written by other code; save the adapter again with "
                         "save_pretrained.")

    # LoRA: A is (r, in[, kh, kw]) and B (out, r[, 1, 1]) for every adapted module
    lora = {key: m.group(1) for key in shapes if (m := _LORA.search(key))}
    if not lora:
        missing("LoRA weights", ["<module>.fairlora_A.weight", "<module>.fairlora_B.weight"],
                "a FairLoRA adapter saves one A and one B per adapted module")
    for key, part in sorted(lora.items()):
        rank = shapes[key][0] if part == "A" else shapes[key][1]
        if rank != config.r:
            mismatch("r", key, rank)

    # prototypes (K, 2, d) and their counts (K, 2)
    found = {m.group(1): key for key in shapes if (m := _PROTOTYPES.search(key))}
    absent = [f"fair_bias_detector.fairlora_{name}" for name in ("prototypes", "prototype_counts") if name not in found]
    if absent:
        missing("prototype buffers", absent, "every FairLoRA adapter saves them (all zero, with zero counts, until the "
                "prototype pass has run), so these weights are not a complete FairLoRA adapter")
    key, counts_key = found["prototypes"], found["prototype_counts"]
    shape = shapes[key]
    if len(shape) != 3 or shape[1] != 2 or shapes[counts_key] != shape[:2]:
        raise ValueError(f"The adapter weights {source} have prototype buffers of shapes {list(shape)} and "
                         f"{list(shapes[counts_key])}; a FairLoRA adapter saves (K, 2, d) prototypes and (K, 2) counts. "
                         "The file is corrupt or was written by other code.")
    if config.num_classes is not None and config.num_classes != shape[0]:
        mismatch("num_classes", key, shape[0])
    if config.representation_dim is not None and config.representation_dim != shape[2]:
        mismatch("representation_dim", key, shape[2])

    # detector: LayerNorm(d_in) → [attention pooling] → MLP
    detector = {m.group(1): key for key in shapes if (m := _DETECTOR.search(key))}
    random_detector = "the detector would keep random weights and gate arbitrary rows"
    if "in_norm.weight" not in detector:
        expected = detector_shapes(config.detector_input_dim or 1, config.detector_hidden_sizes,
                                   config.detector_pooling)
        missing("detector weights", [f"fair_bias_detector.fairlora_detector.{k}" for k in expected], random_detector)
    input_dim = shapes[detector["in_norm.weight"]][0]
    if config.detector_input_dim is not None and config.detector_input_dim != input_dim:
        mismatch("detector_input_dim", detector["in_norm.weight"], input_dim)
    if ("pool_proj.weight" in detector) != (config.detector_pooling == "attention"):
        raise ValueError(
            f"FairLoraConfig.detector_pooling={config.detector_pooling!r} in adapter_config.json does not match the "
            f"adapter weights {source}: they {'have' if 'pool_proj.weight' in detector else 'have no'} attention-"
            f"pooling layer (fair_bias_detector.fairlora_detector.pool_proj), so detector_pooling should be "
            f"{'attention' if 'pool_proj.weight' in detector else 'one without learned weights'!r}. Save the adapter "
            "again with save_pretrained, or fix the config."
        )
    layers = sorted((int(m.group(1)), key) for sub, key in detector.items() if (m := _MLP_WEIGHT.match(sub)))
    if not layers:
        missing("detector MLP", ["fair_bias_detector.fairlora_detector.risk_mlp.<i>.weight"], random_detector)
    hidden = [shapes[key][0] for _, key in layers[:-1]]
    if hidden != list(config.detector_hidden_sizes):
        position = next((i for i, (a, b) in enumerate(zip(hidden, config.detector_hidden_sizes)) if a != b),
                        min(len(hidden), len(config.detector_hidden_sizes)))
        mismatch("detector_hidden_sizes", layers[min(position, len(layers) - 1)][1], hidden)
    expected = detector_shapes(input_dim, config.detector_hidden_sizes, config.detector_pooling)
    gone = [f"fair_bias_detector.fairlora_detector.{k}" for k in expected if k not in detector]
    if gone:
        missing("complete detector", gone, random_detector)
    for sub, shape in expected.items():
        if shapes[detector[sub]] != shape:
            raise ValueError(f"The adapter weights {source} have {detector[sub]} of shape {list(shapes[detector[sub]])}"
                             f", but the detector adapter_config.json describes needs {list(shape)}. The file is "
                             "corrupt or was written by other code.")


# ------------------------------------------------------------------------------------------ at load_state_dict
def _own_keys(model: torch.nn.Module, adapter_name: str) -> list[str]:
    """The model's state-dict keys of `adapter_name`'s LoRA, detector and prototype tensors."""
    name = re.escape(adapter_name)
    pattern = re.compile(rf"(?:^|\.)(?:fairlora_(?:A|B|detector)\.{name}\.|fairlora_prototype(?:s|_counts)\.{name}$)")
    return [key for key in model.state_dict(keep_vars=True) if pattern.search(key)]


def check_loaded_state_dict(model: torch.nn.Module, adapter_name: str, state_dict: dict,
                            checkpoint_key: Callable[[str, str], str]) -> None:
    """Every tensor `adapter_name` owns must be in `state_dict` (keyed as the model's keys) and finite.

    `checkpoint_key(model_key, adapter_name)` gives the name the key has in the file, for the messages."""
    own = _own_keys(model, adapter_name)
    absent = [key for key in own if key not in state_dict]
    if absent:
        parts = {"detector": "the detector would keep random weights and gate arbitrary rows",
                 "prototype": "the prototypes would stay empty",
                 "fairlora_": "those modules would keep a fresh LoRA"}
        why = "; ".join(text for part, text in parts.items() if any(part in key for key in absent))
        raise ValueError(
            f"The adapter weights loaded into adapter {adapter_name!r} lack {len(absent)} of its {len(own)} tensors: "
            f"{_listed(checkpoint_key(key, adapter_name) for key in absent)}. Without them {why}. The file is "
            "incomplete or belongs to another model or config (target_modules, layers_to_transform); load the "
            "adapter_model.safetensors that save_pretrained wrote for this adapter."
        )
    bad = [key for key in own if torch.is_tensor(state_dict[key]) and state_dict[key].is_floating_point()
           and not bool(torch.isfinite(state_dict[key]).all())]
    if bad:
        raise ValueError(
            f"The adapter weights loaded into adapter {adapter_name!r} hold NaN or inf values in "
            f"{_listed(checkpoint_key(key, adapter_name) for key in bad)}: the model would give NaN outputs or "
            "arbitrary gates. The adapter comes from a training run that diverged, or the file is corrupt; load a "
            "checkpoint from before the divergence."
        )
