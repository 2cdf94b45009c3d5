"""What a finished `examples/train_text.py` run's adapter could give, read with labels the selection never sees: a
ceiling, not a method.

Data flow: the run's `metrics.json` (the example's arguments and ERM folder) → the same splits, loaded as the example
loads them → the saved adapter on its ERM model, with the gate forced off and forced on at each strength α → per α,
the minority gated by its true group and every row gated: ACC / WGA / EOD on the test split, and on the validation
split the paired accuracy change the selection's floor judges (fixed and broken rows, change ± standard error; half
of the validation minority trained the LoRA under the default `lora_rows`, so it is optimistic).

    .venv/bin/python benchmarks/example_ceiling.py /work/runs/s14/outside/compas/full/seed0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), os.path.join(os.path.dirname(BENCH), "examples")]

STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def _splits(args: dict):
    """The run's validation and test splits, loaded as `train_text.load_data` loads them."""
    import train_text

    ds, _ = train_text.load_data(argparse.Namespace(**args))
    return ds["validation"], ds["test"]


def _logits(model, enc, on: bool, batch: int = 128) -> np.ndarray:
    from fairnet_peft import force_gate

    out = []
    with torch.no_grad(), force_gate(model, on):
        for i in range(0, len(enc["input_ids"]), batch):
            out.append(model(**{k: v[i:i + batch] for k, v in enc.items()}).logits.float().numpy())
    return np.concatenate(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="an --output-dir of examples/train_text.py (metrics.json, adapter/)")
    a = p.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fairnet_peft import metrics as M
    from fairnet_peft.training.selection import paired_change

    with open(os.path.join(a.run, "metrics.json"), encoding="utf-8") as f:
        run = json.load(f)
    if run.get("fairnet_train", {}).get("train_lora_skipped"):
        sys.exit(f"{a.run}: this run skipped its LoRA stage (its detector could not find the group), so its adapter "
                 "holds no correction to read. Run the example again with --train-lora-when-blind.")
    tokenizer = AutoTokenizer.from_pretrained(run["erm_dir"])
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(run["erm_dir"]),
                                      os.path.join(a.run, "adapter")).eval()
    validation, test = _splits(run["args"])

    def scores(y, s, pred):
        return (f"ACC {100 * M.accuracy(y, pred):.1f} / WGA {100 * M.worst_group_accuracy(y, pred, sensitive_features=s):.1f}"
                f" / EOD {100 * M.equalized_odds_difference(y, pred, sensitive_features=s):.1f}")

    for name, split in (("test", test), ("validation", validation)):
        enc = tokenizer(list(split["text"]), truncation=True, max_length=run["args"]["max_length"], padding=True,
                        return_tensors="pt")
        y, s = np.asarray(split["labels"]), np.asarray(split["sensitive"])
        model.base_model.set_adapter_strength(model.active_adapter, 1.0)
        off = _logits(model, enc, False).argmax(-1)
        print(f"{name}: adapter off: {scores(y, s, off)}")
        for alpha in STRENGTHS:
            model.base_model.set_adapter_strength(model.active_adapter, alpha)
            on = _logits(model, enc, True).argmax(-1)
            gated = np.where(s == 1, on, off)
            line = f"{name}: α {alpha:g}: minority gated {scores(y, s, gated)}; every row {scores(y, s, on)}"
            if name == "validation":
                change, se = paired_change(gated, off, y)
                fixed, broken = int(((gated == y) & (off != y)).sum()), int(((gated != y) & (off == y)).sum())
                line += f"; minority gated: {fixed} fixed, {broken} broken, change {100 * change:+.2f} ± {100 * se:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
