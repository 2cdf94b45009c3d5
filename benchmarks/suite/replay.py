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
from fairnet_peft.training.arguments import stage_arguments
from fairnet_peft.training.selection import OFF, STRENGTHS, detector_blind, select_with_arguments

FORMAT = 2


def dump_passes(trainer, test, path: str, erm_pred: Optional[np.ndarray] = None) -> Optional[str]:
    """Write `path` (.npz) for this finished FairTrainer run; `test` is the test split as the trainer's collator takes
    it, with `sensitive`. The held-out passes cover every row the LoRA did not train on (`selection_rows="untrained"`,
    with a mask of the rows 'share' reads), at every strength even where the do-no-harm check skipped them: the
    adapter is forced on for that one search, then the trainer's own choice is restored. None when the run did not
    select."""
    from fairnet_peft.training.trainer import _with_row_column

    run, config = trainer.run_state, trainer.adapter_config
    if run.stage != "done" or not run.selection.get("selected"):
        return None
    chosen = (float(config.threshold), float(config.adapter_strength))
    # the passes at every strength (the do-no-harm check may have skipped them) over every held-out row the LoRA did
    # not train on, so that either `selection_rows` replays; then the run's own choice is restored
    cross = trainer._reads_cross_fit()  # lora_cross_fit: the selection reads every eval row whatever selection_rows says
    rows_rule = "untrained" if trainer.eval_split() is not None and not cross else trainer.args.selection_rows
    trainer.reselect(force_adapter=True, threshold_selection="auto", selection_rows=rows_rule)
    held, saved = trainer._selection_passes, trainer.args
    trainer.args = stage_arguments(saved, selection_rows=rows_rule)
    try:
        _, groups, where, weights = trainer._selection_rows()
        split = trainer.eval_split()
    finally:
        trainer.args = saved
    trainer.reselect()
    share = (np.ones(len(groups), dtype=bool) if split is None or cross  # the rows selection_rows='share' reads
             else ~np.isin(split["select"], split["lora"]))
    arrays = {"val_logits_off": held["off"]["logits_off"], "val_risk": _risk(held["off"]["risk_native"]),
              "val_labels": held["off"]["label"], "val_groups": np.asarray(groups),
              "val_weights": np.ones(len(groups)) if weights is None else np.asarray(weights), "val_share": share}
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
              "selected_on": where, "selection_rows": "cross-fit" if cross else rows_rule,
              "detector_stats": {k: v for k, v in run.detector_stats.items() if isinstance(v, (int, float))},
              "chosen_tau": chosen[0], "chosen_strength": chosen[1]}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez_compressed(path, header=np.array(json.dumps(header)), **arrays)
    return path


def _selection_rows(data: dict, selection_rows: str) -> tuple:
    """(row mask, weights or None) of the saved held-out rows that `selection_rows` reads. Passes saved by a run with
    'share' hold only the share: 'untrained' cannot be replayed on them."""
    share = data["val_share"]
    if selection_rows == "share":
        return share, None
    if data["header"]["selection_rows"] != "untrained":
        raise ValueError("selection_rows='untrained' needs passes saved by a run that selected on every untrained "
                         f"row; these were saved with selection_rows={data['header']['selection_rows']!r}")
    weights = data["val_weights"]
    return np.ones(len(share), dtype=bool), None if np.all(weights == 1.0) else weights


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
    reason = None if args.force_adapter else detector_blind(head["detector_stats"], args.min_detector_auc,
                                                                head.get("label_setting"))
    if reason is None:
        rows, weights = _selection_rows(data, args.selection_rows)
        info = select_with_arguments(args, data["val_logits_off"][rows], {a: v[rows] for a, v in on.items()},
                                     data["val_risk"][rows], data["val_labels"][rows], data["val_groups"][rows],
                                     configured_tau=head["configured_tau"],
                                     configured_strength=head["configured_strength"], weights=weights)
    else:
        info = {"threshold": OFF, "strength": head["configured_strength"], "reason": reason}
    tau, alpha = float(info["threshold"]), float(info["strength"])
    pred = data["test_logits_off"].argmax(-1)
    if tau < OFF:
        gate = data["test_risk"] > data["test_risk"].dtype.type(tau)
        pred = np.where(gate, data[f"test_logits_on_{alpha:g}"].argmax(-1), pred)
    return {"threshold": tau, "strength": alpha, "test_pred": pred, "selection": info}
