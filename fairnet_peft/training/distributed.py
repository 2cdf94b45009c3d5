"""FSDP support around FairTrainer: refuse a silently dropped FSDP request, make the detector its own FSDP unit,
gather and save a sharded adapter.

`check_fsdp_active(args, accelerator)` runs at trainer set-up: when FSDP was asked for (TrainingArguments.fsdp or an
accelerate FSDP config, i.e. ACCELERATE_USE_FSDP=true) but accelerate did not set the job up as FSDP, it raises
instead of letting every launched process train its own unsharded copy (what accelerate 1.16 does on CPU).
`wrap_detector_as_fsdp_unit(accelerator, model)` runs right after it: under FSDP it adds the detector's class to the
wrap policy of that trainer's own FSDP plugin, so the user's launch config names only the model's block class.
`full_state_dict(model)` gathers a model whose parameters torch's FSDP2 `fully_shard` split into DTensors into one
plain state dict (CPU, on rank 0); `save_adapter(model, path)` writes the adapter from it on rank 0 only, so it
loads with `PeftModel.from_pretrained` on one process.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn


def fsdp_requested(args) -> bool:
    """True when the user asked for FSDP: `TrainingArguments.fsdp` set, or an accelerate FSDP config launched us."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_active(args, accelerator) -> None:
    """Raise a ValueError when FSDP was requested but accelerate runs this process without it."""
    if not fsdp_requested(args):
        return
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    raise ValueError(
        f"FSDP was requested (TrainingArguments.fsdp={getattr(args, 'fsdp', None)!r}, ACCELERATE_USE_FSDP="
        f"{os.environ.get('ACCELERATE_USE_FSDP')!r}) but accelerate set this process up as distributed_type={kind} "
        f"with {accelerator.num_processes} of WORLD_SIZE={world} processes, so every process would train its own "
        "unsharded copy. accelerate enables FSDP only on GPUs/accelerators, not on CPU. Launch the FSDP config on "
        "GPUs (benchmarks/gpu_run.sh --fsdp), or on CPU drop fsdp / use a multi-CPU (DDP) accelerate config."
    )


def detector_class_names(model: nn.Module) -> list[str]:
    """Class names of the FairLoRA detector networks in `model` (DetectorNet), in module order, without repeats."""
    from ..tuner.detector import FairBiasDetector

    names: list[str] = []
    for module in model.modules():
        if isinstance(module, FairBiasDetector):
            names += [type(net).__name__ for net in module.fairlora_detector.values()]
    return list(dict.fromkeys(names))


def wrap_detector_as_fsdp_unit(accelerator, model: nn.Module) -> None:
    """Under FSDP2, add the detector's class to the transformer-wrap class names of `accelerator`'s FSDP plugin.

    The detector's loss (Eq. 1) reaches its weights through the gate's risk, not through the model's output, so FSDP's
    root-unit backward hooks never reduce its gradients: left in the root unit it silently stays untrained (see
    tests/test_fsdp.py). As its own unit its forward carries the hooks. Only this plugin is changed: the user's
    arguments and any other Trainer in the script (the ERM model has no detector, and naming DetectorNet in the launch
    config makes accelerate fail there) keep their own. No-op without FSDP or without a detector.

    The block classes stay the user's choice (`fsdp_transformer_layer_cls_to_wrap`, else the model's
    `_no_split_modules`, as accelerate does); NO_WRAP becomes "wrap the detector only". A size-based or custom policy
    and FSDP1 are refused: neither can make the detector its own unit here, and it would train silently wrong."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    names = detector_class_names(model)
    if plugin is None or not names:
        return
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if int(getattr(plugin, "fsdp_version", 1)) != 2:
        raise ValueError(
            f"FairTrainer runs FSDP as FSDP2 only (got fsdp_version={plugin.fsdp_version}): set `fsdp_version: 2` in "
            "the accelerate config (examples/accelerate_fsdp.yaml) or fsdp_config={'version': 2} in the arguments.")
    policy = plugin.auto_wrap_policy
    policy = policy.func if isinstance(policy, functools.partial) else policy
    if policy is None:  # NO_WRAP: everything in the root unit, so only the detector gets a unit of its own
        blocks: list[str] = []
    elif policy is transformer_auto_wrap_policy:
        blocks = plugin.transformer_cls_names_to_wrap
        if blocks is None:  # accelerate's default: the _no_split_modules this model instantiates (a set in some
            # transformers versions, so sorted: the same order under every hash seed)
            present = {type(m).__name__ for m in model.modules()}
            blocks = sorted(n for n in (getattr(model, "_no_split_modules", None) or []) if n in present)
    else:
        raise ValueError(
            f"FairTrainer under FSDP needs fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP (or NO_WRAP), not {policy!r}: "
            f"the detector ({', '.join(names)}) must be its own FSDP unit, or its gradients are never reduced and it "
            "stays untrained. Set TRANSFORMER_BASED_WRAP with your model's block class in "
            "fsdp_transformer_layer_cls_to_wrap; FairTrainer adds the detector itself.")
    plugin.transformer_cls_names_to_wrap = list(dict.fromkeys([*blocks, *names]))  # a new list: nothing shared changes
    plugin.auto_wrap_policy = transformer_auto_wrap_policy  # accelerate builds the policy from the names at prepare
    if getattr(plugin, "mixed_precision_policy", None) is not None:
        model.register_forward_pre_hook(_GradientDtypes(model))


class _GradientDtypes:
    """Forward pre-hook: under FSDP2 mixed precision, keep each unit's gradient dtypes right when stages change.

    FSDP2 fixes a unit's original and reduce dtypes at its first forward from the parameters trainable *then*; a
    unit with none (the detector during a frozen pass, the LoRA blocks during the detector stage) gets no cast back,
    and its bf16 gradients later cannot be assigned to the fp32 parameters ("attempting to assign a gradient with
    dtype BFloat16 to a tensor with grad_dtype Float"). FairTrainer's stages change which parameters train, so
    when that set changed since the last forward, each unit recomputes them (FSDP2's own `_init_mp_dtypes`)."""

    def __init__(self, model: nn.Module):
        self.model, self.trainable = model, None

    def __call__(self, module, args):
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable == self.trainable:
            return
        self.trainable = trainable
        from torch.distributed.fsdp import FSDPModule

        for unit in self.model.modules():
            if not isinstance(unit, FSDPModule):
                continue
            state = unit._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
            for group in groups:
                if group is None:
                    continue
                if not hasattr(group, "_init_mp_dtypes"):  # another torch: FSDP2's own error will name the problem
                    warnings.warn("fairnet_peft: this torch's FSDP2 has no _init_mp_dtypes; gradient dtypes are not "
                                  "refreshed between FairTrainer's stages", stacklevel=2)
                    return
                group._init_mp_dtypes()


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of `model` is a DTensor (torch FSDP2 `fully_shard`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of `model` as plain CPU tensors. Sharded (FSDP2) parameters are gathered, a collective
    that every rank must call; the full dict then lands on rank 0 and the other ranks get {}."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter(model: nn.Module, path: str, adapter_name: Optional[str] = None) -> None:
    """Save the PEFT adapter of a possibly FSDP2-sharded `model` to `path`, gathered to full tensors, from rank 0.

    Every rank must call it (the gather is a collective). The folder is what `model.save_pretrained` writes
    unsharded: `PeftModel.from_pretrained(base, path)` loads it on a single process."""
    state = full_state_dict(model) if is_sharded(model) else None  # unsharded: PEFT reads the adapter's own tensors
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        adapters = [adapter_name] if adapter_name else None
        model.save_pretrained(path, state_dict=state, selected_adapters=adapters)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
