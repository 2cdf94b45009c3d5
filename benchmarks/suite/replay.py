"""The selection after training, replayed offline on saved passes: measure a selection rule on every trained model
of a run in seconds, without training again.

Data flow: the default-settings suite (`fairnet_defaults`) trains one model per task × seed × setting and, after its
own selection, `dump_passes` writes one `.npz` per model: the held-out passes the selection used (logits with the
gate off, logits with the gate forced on at each strength α, the detector's risk, labels, the setting's groups) and
the same passes on the test rows (with the true group), plus a JSON header (configured τ and α, detector statistics,
the run's choice). A row's output depends only on its own gate, so for any (τ, α) the model's test predictions are
`on[α]` where risk > τ and `off` elsewhere: `replay` redoes the selection with `FairTrainingArguments` overrides
(the same `select_with_arguments` the trainer calls) and returns the test predictions of the model the trainer would
have handed back. `benchmarks/reselect.py` is the command line; the suite's own `selection_variants` (computed with
`FairTrainer.reselect` on the live model) are what the tests check it against.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np

from fairnet_peft import FairTrainingArguments
from fairnet_peft.training.selection import OFF, STRENGTHS, detector_blind, select_with_arguments

FORMAT = 1


def dump_passes(trainer, test, path: str, erm_pred: Optional[np.ndarray] = None) -> Optional[str]:
    """Write `path` (.npz) for this finished FairTrainer run; `test` is the test split as the trainer's collator takes
    it, with `sensitive`. The held-out passes are computed here when the do-no-harm check skipped them (the adapter is
    forced on for that one search, then the trainer's own choice is restored). None when the run did not select."""
    from fairnet_peft.training.trainer import _with_row_column

    run, config = trainer.run_state, trainer.adapter_config
    if run.stage != "done" or not run.selection.get("selected"):
        return None
    chosen = (float(config.threshold), float(config.adapter_strength))
    held = trainer._selection_passes
    if "off" not in held or set(STRENGTHS) - set(held["on"]):
        trainer.reselect(force_adapter=True, threshold_selection="auto")
        trainer.reselect()
        held = trainer._selection_passes
    _, groups, where = trainer._selection_rows()
    arrays = {"val_logits_off": held["off"]["logits_off"], "val_risk": _risk(held["off"]["risk_native"]),
              "val_labels": held["off"]["label"], "val_groups": np.asarray(groups)}
    arrays.update({f"val_logits_on_{a:g}": held["on"][a] for a in STRENGTHS})
    rows = _with_row_column(test)
    off = trainer.passes.outputs(rows, ("off",))
    arrays.update(test_logits_off=off["logits_off"], test_risk=_risk(off["risk_native"]), test_labels=off["label"],
                  test_sensitive=np.asarray(test["sensitive"])[off["row"]])
    try:
        for alpha in STRENGTHS:
            trainer._tuner.set_adapter_strength(trainer.adapter_name, alpha)
            arrays[f"test_logits_on_{alpha:g}"] = trainer.passes.outputs(rows, ("on",))["logits_on"]
    finally:
        trainer._tuner.set_adapter_strength(trainer.adapter_name, chosen[1])
    if erm_pred is not None:
        arrays["test_erm_pred"] = np.asarray(erm_pred)[off["row"]]
    header = {"format": FORMAT, "configured_tau": run.configured["threshold"],
              "configured_strength": run.configured["strength"], "label_setting": run.label_setting,
              "selected_on": where, "detector_stats": {k: v for k, v in run.detector_stats.items()
                                                       if isinstance(v, (int, float))},
              "chosen_tau": chosen[0], "chosen_strength": chosen[1]}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez_compressed(path, header=np.array(json.dumps(header)), **arrays)
    return path


def _risk(native) -> np.ndarray:
    """The risk as float32 numpy. A float32 detector (CPU) is replayed exactly; a bf16/fp16 one compares τ in its
    own dtype in the model, so a τ between two representable values may gate a row differently here."""
    return native.float().numpy()


def load(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    data["header"] = json.loads(str(data["header"]))
    if data["header"].get("format") != FORMAT:
        raise ValueError(f"{path}: passes format {data['header'].get('format')!r}, this code reads {FORMAT}")
    return data


def selection_arguments(overrides: dict):
    with tempfile.TemporaryDirectory() as tmp:  # FairTrainingArguments validates the overrides; nothing is written
        return FairTrainingArguments(tmp, report_to=[], use_cpu=True, **overrides)


def replay(data: dict, overrides: Optional[dict] = None, args=None) -> dict:
    """The selection under the default `FairTrainingArguments` with `overrides` (or `args`), on one saved run:
    {"threshold", "strength", "test_pred", "selection"} (the test predictions of the model it would hand back)."""
    args = args if args is not None else selection_arguments(overrides or {})
    head = data["header"]
    on = {a: data[f"val_logits_on_{a:g}"] for a in STRENGTHS}
    reason = None if args.force_adapter else detector_blind(head["detector_stats"], args.min_detector_auc)
    if reason is None:
        info = select_with_arguments(args, data["val_logits_off"], on, data["val_risk"], data["val_labels"],
                                     data["val_groups"], configured_tau=head["configured_tau"],
                                     configured_strength=head["configured_strength"])
    else:
        info = {"threshold": OFF, "strength": head["configured_strength"], "reason": reason}
    tau, alpha = float(info["threshold"]), float(info["strength"])
    pred = data["test_logits_off"].argmax(-1)
    if tau < OFF:
        gate = data["test_risk"] > data["test_risk"].dtype.type(tau)
        pred = np.where(gate, data[f"test_logits_on_{alpha:g}"].argmax(-1), pred)
    return {"threshold": tau, "strength": alpha, "test_pred": pred, "selection": info}
