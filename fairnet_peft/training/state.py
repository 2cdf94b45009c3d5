"""`FairRunState`: everything one `FairTrainer.train()` computes, in one dataclass, and how it is saved.

The trainer creates it at the start of `train()`; the passes (passes.py) and stage helpers fill it; the losses,
the selection and the reports read it. Per-row arrays are indexed by the `fairnet_row` column (the training row's
position in `train_dataset`). It is written as JSON (`asdict`, arrays as lists) next to every checkpoint and into
the finished detector stage's folder, and read back on resume, so a resumed run continues with exactly the state
the interrupted one had. The detector's best weights during early stopping are tensors and go into a safetensors
file beside it (trainer.py). `run_fingerprint` identifies the run's settings, so checkpoints of another run in the
same `output_dir` are recognised and never resumed from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

STATE_FILE = "fairnet_run_state.json"
EARLY_STOPPING_WEIGHTS = "fairnet_detector_best.safetensors"
STAGES = ("start", "detector", "lora", "selection", "done")

_ARRAYS = ("class_labels", "given_groups", "groups", "detector_target", "holdout", "anchors", "anchor_weights")


@dataclass
class EarlyStoppingState:
    """The detector stage's early stopping: best held-out loss so far, evaluations without improvement, evaluations,
    whether a best detector was kept, and whether the stage stopped early."""

    best_loss: float = math.inf
    bad: int = 0
    evaluations: int = 0
    has_best: bool = False
    stopped: bool = False


@dataclass
class FairRunState:
    """What a `train()` computes. Per-row arrays follow the `fairnet_row` order; None until computed.

    Attributes:
        fingerprint: `run_fingerprint` of the run's settings.
        label_setting: "full", "partial" or "unlabeled".
        stage: the last stage reached ("start", "detector", "lora", "selection", "done").
        class_labels: task class of every training row.
        given_groups: the training data's sensitive column (1 minority, 0 majority, -1 unknown).
        groups: the groups the run uses: `given_groups`, or the pseudo-labels in the unlabeled setting.
        detector_target: what the detector trains on (`groups`, in the partial setting with the probe's labels for
            unknown rows); -1 on rows it does not train on (held out, unknown).
        holdout: rows held out from the detector stage (its early stopping and AUCs); when no eval set is given they
            also are the rows the correction is selected on, and then the LoRA stage does not train on them.
        anchors: ŝ, 1 for the LoRA stage's anchors (minority rows by `anchor_source`).
        pos_weight: w₁ = N(s=0) / N(s=1) of the detector's labelled rows (Eq. 1).
        anchor_weights: per-class weight of the anchors' loss terms (`anchor_weighting`).
        detector_stats: gate rates, anchors, held-out detector and probe AUC (prototype pass).
        pseudo_label_details: the unlabeled setting's pseudo-labeler, its knobs and scores.
        early_stopping: the detector stage's early stopping state.
        detector_updates: optimizer updates the detector stage made.
        num_classes, representation_dim: the prototypes' shape, set by the prototype pass.
        selection: the correction chosen after training (selection.py): τ, strength, the reason and the frontier.
        configured: the adapter's τ and strength before the selection (what it starts from, also in `reselect`).
        world_size: the processes the run trains on (a resumed run warns when they differ).
        lora_skipped: the LoRA stage was skipped because the detector cannot find the group (`train_lora_when_blind`):
            the LoRA is its initial draw, a no-op.
        cross_fit: with `lora_cross_fit`, what the second LoRA gave on the eval share the kept one trained on:
            {"rows": positions in the eval set, "logits": {strength: logits per row}}; empty otherwise.
    """

    fingerprint: str = ""
    label_setting: Optional[str] = None
    stage: str = "start"
    class_labels: Optional[np.ndarray] = None
    given_groups: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None
    detector_target: Optional[np.ndarray] = None
    holdout: Optional[np.ndarray] = None
    anchors: Optional[np.ndarray] = None
    pos_weight: float = 1.0
    anchor_weights: Optional[np.ndarray] = None
    detector_stats: dict = field(default_factory=dict)
    pseudo_label_details: dict = field(default_factory=dict)
    early_stopping: EarlyStoppingState = field(default_factory=EarlyStoppingState)
    detector_updates: int = 0
    num_classes: Optional[int] = None
    representation_dim: Optional[int] = None
    selection: dict = field(default_factory=dict)
    configured: dict = field(default_factory=lambda: {"threshold": 0.5, "strength": 1.0})
    world_size: Optional[int] = None
    cross_fit: dict = field(default_factory=dict)
    lora_skipped: bool = False

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for name in _ARRAYS:
            value = getattr(self, name)
            out[name] = None if value is None else np.asarray(value).tolist()
        return _finite_json(out)

    @classmethod
    def from_json(cls, data: dict) -> "FairRunState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"FairNet run state has unknown fields {unknown}: written by another fairnet_peft version?")
        values = dict(data)
        values["early_stopping"] = EarlyStoppingState(**_from_finite(values.get("early_stopping") or {}))
        for name in _ARRAYS:
            if values.get(name) is not None:
                values[name] = np.asarray(values[name], dtype=np.float32 if name == "anchor_weights" else
                                          (bool if name == "holdout" else np.int64))
        values["detector_stats"] = _from_finite(values.get("detector_stats") or {})
        return cls(**values)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, folder: str) -> Optional["FairRunState"]:
        """The state saved in `folder`, or None when there is none."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))


def _finite_json(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings, read back by `_from_finite`."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (np.floating, np.integer)):
        return _finite_json(value.item())
    return value


def _from_finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _from_finite(v) for k, v in value.items()}
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


# Arguments that do not change what a run computes (where it writes, how it reports, how it resumes, and on which
# device: a run checkpointed on a CPU machine resumes on a GPU one, as Trainer's own checkpoints do).
_NOT_IN_FINGERPRINT = {
    "use_cpu", "no_cuda", "use_mps_device",
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "report_to", "run_name", "disable_tqdm", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "save_safetensors", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "resume_from_checkpoint", "overwrite_output_dir", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
    "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "local_rank", "ddp_backend", "ddp_timeout", "log_level", "log_level_replica",
    "include_num_input_tokens_seen", "print_config", "project", "trackio_space_id",
}


def run_fingerprint(args, adapter_config, dataset, eval_dataset=None, base: str = "") -> str:
    """A short hash of what determines a run's result: the training arguments (except where it writes, logs and
    checkpoints), the adapter's configuration as given, the training data (its datasets fingerprint and size), with
    the eval data when the LoRA stage trains on some of its rows (`eval_dataset`), and the base model (`base`:
    `base_model_digest`)."""
    fields = {}
    for f in dataclasses.fields(args):
        if f.name in _NOT_IN_FINGERPRINT or f.name.startswith("_") or f.name.startswith("hub_"):
            continue
        fields[f.name] = _plain(getattr(args, f.name, None))
    config = {k: _plain(v) for k, v in sorted(adapter_config.to_dict().items())
              if k not in ("threshold", "adapter_strength", "selection_report", "num_classes", "representation_dim",
                           "runtime_config", "revision", "base_model_name_or_path", "inference_mode")}
    data = {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset),
            "columns": sorted(getattr(dataset, "column_names", []) or [])}
    if eval_dataset is not None:
        data["eval"] = {"fingerprint": getattr(eval_dataset, "_fingerprint", None), "rows": len(eval_dataset)}
    blob = json.dumps({"args": fields, "adapter": config, "data": data, "base": base}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _saved_tensors(model):
    """(name, tensor) of the model's parameters and persistent buffers: what its state dict holds. Buffers count
    because some bases keep their weights there (GPTQ/AWQ `QuantLinear`: packed `qweight`, `scales`; BatchNorm
    statistics); non-persistent ones (rotary frequencies, position ids) are derived from the config."""
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in skip:
                yield f"{module_name}.{name}" if module_name else name, buffer


def base_model_digest(model, samples: int = 64) -> str:
    """A hash of the base model's own weights, parameters and persistent buffers (the adapter's `fairlora_` tensors
    left out): each one's name, shape, dtype and `samples` values at an even stride. A checkpoint written on another
    base (an ERM model trained again, another seed, another quantized export) then belongs to another run. Sharded
    or not-yet-loaded weights (DTensor, DeepSpeed ZeRO-3, meta) count by name and shape only; the trainer uses the
    main process's digest on every process."""
    digest = hashlib.sha256()
    for name, weight in _saved_tensors(model):
        if "fairlora_" in name:
            continue
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype};".encode())
        if hasattr(weight, "to_local") or hasattr(weight, "ds_numel") or weight.is_meta:
            continue
        try:
            flat = weight.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // samples)][:samples]
            sample = (sample.float() if sample.is_floating_point() else sample.double()).cpu().numpy()  # ints: exact
        except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass without strided views
            continue
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set)):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "value"):  # enums
        return _plain(value.value)
    return str(value)
