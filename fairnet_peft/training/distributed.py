"""FSDP support around FairTrainer: refuse a silently dropped FSDP request, gather and save a sharded adapter.

`check_fsdp_active(args, accelerator)` runs at trainer set-up: when FSDP was asked for (TrainingArguments.fsdp or an
accelerate FSDP config, i.e. ACCELERATE_USE_FSDP=true) but accelerate did not set the job up as FSDP, it raises
instead of letting every launched process train its own unsharded copy (what accelerate 1.16 does on CPU).
`full_state_dict(model)` gathers a model whose parameters torch's FSDP2 `fully_shard` split into DTensors into one
plain state dict (CPU, on rank 0); `save_adapter(model, path)` writes the adapter from it on rank 0 only, so it
loads with `PeftModel.from_pretrained` on one process.
"""

from __future__ import annotations

import os
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
