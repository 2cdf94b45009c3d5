"""One default at a time on the synthetic spurious text task (docs/method.md §7): ERM (tiny BERT), then FairNet with
the default arguments plus the overrides given, per seed; prints test ACC, WGA and the four (label × group) cells.

    .venv/bin/python benchmarks/ablations.py --setting full --config '{"target_modules": ["query", "value"]}'
    .venv/bin/python benchmarks/ablations.py --setting partial --args '{"anchor_threshold": 0.5}'

`--args` overrides FairTrainingArguments fields, `--config` FairLoraConfig fields (JSON); without them the row is the
defaults. Partial and unlabeled hide group labels with `fairnet_peft.data.hide_group_labels` (partial: a seeded 10 %
of the train rows keep theirs), as benchmarks/defaults.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from peft import get_peft_model  # noqa: E402

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments  # noqa: E402
from fairnet_peft import metrics as M  # noqa: E402
from fairnet_peft.data import hide_group_labels, make_synthetic_text  # noqa: E402
from suite.config import LABEL_FRACTION  # noqa: E402
from selector import QUIET, erm_model  # noqa: E402


def scores(model, split) -> dict:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(split["input_ids"]), attention_mask=torch.tensor(split["attention_mask"])).logits
    y, s, pred = np.array(split["labels"]), np.array(split["sensitive"]), logits.argmax(-1).numpy()
    cells = {f"y{a}s{b}": round(float((pred[(y == a) & (s == b)] == a).mean()), 3) for a in (0, 1) for b in (0, 1)}
    return dict(acc=M.accuracy(y, pred), wga=M.worst_group_accuracy(y, pred, sensitive_features=s), **cells)


def run_seed(seed: int, setting: str, fair_args: dict, lora_config: dict, out: str) -> dict:
    data = make_synthetic_text(seed=seed, n_train=2000, n_val=600, n_test=1000)
    erm = erm_model(data, seed, os.path.join(out, f"erm{seed}"))
    result = {"seed": seed, "erm": scores(erm, data["test"])}
    train = hide_group_labels(data, setting, fraction=LABEL_FRACTION, seed=seed)["train"]
    model = get_peft_model(erm, FairLoraConfig(task_type="SEQ_CLS", **lora_config))
    args = FairTrainingArguments(os.path.join(out, f"fair{seed}"), num_train_epochs=3, per_device_train_batch_size=32,
                                 seed=seed, **QUIET, **fair_args)
    FairTrainer(model=model, args=args, train_dataset=train).train()
    result["fairnet"] = scores(model, data["test"])
    return result


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=("full", "partial", "unlabeled"), default="full")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--args", default="{}", help="FairTrainingArguments overrides (JSON)")
    p.add_argument("--config", default="{}", help="FairLoraConfig overrides (JSON)")
    p.add_argument("--out", default="runs/ablations")
    a = p.parse_args(argv)
    T.logging.set_verbosity_error()
    fair_args, lora_config = json.loads(a.args), json.loads(a.config)
    results = [run_seed(int(x), a.setting, fair_args, lora_config, a.out) for x in a.seeds.split(",")]
    print(f"setting={a.setting} args={fair_args} config={lora_config}")
    for r in results:
        e, f = r["erm"], r["fairnet"]
        print(f"seed {r['seed']}: ERM ACC {e['acc']:.3f} WGA {e['wga']:.3f} | FairNet ACC {f['acc']:.3f} "
              f"WGA {f['wga']:.3f} cells {({k: v for k, v in f.items() if k.startswith('y')})}")
    return results


if __name__ == "__main__":
    main()
