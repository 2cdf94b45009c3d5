"""What one trained FairNet model's correction does, per strength, read from its saved selection passes (no
training; `suite/replay.py` writes them, `defaults.py` and `quality.py` save them under `<out>/passes/`).

For each passes file and each adapter strength α, two lines:

- validation (the rows the selection sees), gate `risk > τ` at the configured τ: rows whose prediction flips, the
  paired accuracy change with its standard error and the bound the floor uses at FairTrainingArguments' defaults
  (`paired_change`: the change minus 2 standard errors; with `floor_admits_harmless=True`, not the default, the change
  itself where no row goes from right to wrong), and, in the
  adapter-off model's worst (class × group) cell, the mean gain in log-likelihood over its standard error (t);
- test, the adapter gated on the true minority (the oracle gate): the ACC and WGA change against the adapter off, and
  the minority's per-class accuracy off → on.

    .venv/bin/python benchmarks/inspect_passes.py runs/quality/passes/text-s1-full.npz [more.npz ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fairnet_peft import FairTrainingArguments  # noqa: E402
from fairnet_peft import metrics as M  # noqa: E402
from fairnet_peft.training.selection import STRENGTHS, _log_likelihood, paired_change  # noqa: E402
from suite.replay import load  # noqa: E402


_FIELDS = FairTrainingArguments.__dataclass_fields__


def inspect(data: dict, floor_standard_errors: float = _FIELDS["floor_standard_errors"].default,
            floor_admits_harmless: bool = _FIELDS["floor_admits_harmless"].default) -> list[dict]:
    """One dict per strength α: {"strength", "val_flipped", "val_broken" (flips to wrong), "val_rows", "val_change",
    "val_se", "val_bound" (the floor's, at FairTrainingArguments' defaults),
    "val_worst_cell_t", "test_d_acc", "test_d_wga", "test_minority_class_acc": {class: (off, on)}}."""
    labels, groups, risk = data["val_labels"], data["val_groups"], data["val_risk"]
    off = data["val_logits_off"].argmax(-1)
    gate = risk > risk.dtype.type(data["header"]["configured_tau"])
    known = groups >= 0
    cells = np.where(known, labels * (int(groups[known].max()) + 1) + groups, -1)
    ll_off = _log_likelihood(data["val_logits_off"], labels)
    worst = max(np.unique(cells[known]), key=lambda c: -ll_off[cells == c].mean())
    y, s = data["test_labels"], data["test_sensitive"]
    test_off = data["test_logits_off"].argmax(-1)
    rows = []
    for alpha in STRENGTHS:
        pred = np.where(gate, data[f"val_logits_on_{alpha:g}"].argmax(-1), off)
        change, se = paired_change(pred, off, labels, data.get("val_weights"))
        broken = int(((pred != labels) & (off == labels)).sum())
        ll = np.where(gate, _log_likelihood(data[f"val_logits_on_{alpha:g}"], labels), ll_off)
        gain = (ll - ll_off)[cells == worst]
        spread = gain.std(ddof=1) / math.sqrt(len(gain)) if len(gain) > 1 else math.nan
        t = gain.mean() / spread if spread > 0 else math.nan
        oracle = np.where(s == 1, data[f"test_logits_on_{alpha:g}"].argmax(-1), test_off)
        rows.append({
            "strength": alpha, "val_flipped": int((pred != off).sum()), "val_broken": broken, "val_rows": len(labels),
            "val_change": change, "val_se": se,
            "val_bound": change - (0.0 if floor_admits_harmless and not broken else floor_standard_errors * se),
            "val_worst_cell_t": float(t),
            "test_d_acc": M.accuracy(y, oracle) - M.accuracy(y, test_off),
            "test_d_wga": (M.worst_group_accuracy(y, oracle, sensitive_features=s)
                           - M.worst_group_accuracy(y, test_off, sensitive_features=s)),
            "test_minority_class_acc": {int(c): (float((test_off[(s == 1) & (y == c)] == c).mean()),
                                                 float((oracle[(s == 1) & (y == c)] == c).mean()))
                                        for c in np.unique(y[s == 1])}})
    return rows


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="passes files (.npz)")
    a = p.parse_args(argv)
    out = []
    for path in a.paths:
        rows = inspect(load(path))
        print(f"{os.path.basename(path)} (validation: gate at the configured τ; test: the minority gated)")
        for r in rows:
            cls = ", ".join(f"class {c} {100 * o:.1f} → {100 * n:.1f}"
                            for c, (o, n) in r["test_minority_class_acc"].items())
            print(f"  α={r['strength']:g}  val: {r['val_flipped']} of {r['val_rows']} flipped ({r['val_broken']} to "
                  f"wrong), change {100 * r['val_change']:+.2f} ± {100 * r['val_se']:.2f}, floor's bound "
                  f"{100 * r['val_bound']:+.2f}; "
                  f"off-worst cell t {r['val_worst_cell_t']:+.2f}")
            print(f"          test: ΔACC {100 * r['test_d_acc']:+.1f} ΔWGA {100 * r['test_d_wga']:+.1f}; "
                  f"minority {cls}")
        out.append(rows)
    return out


if __name__ == "__main__":
    main()
