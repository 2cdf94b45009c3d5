"""Label-free selection in the unlabeled setting: does a selector computed without any sensitive
label rank the τ candidates like the true validation worst-group accuracy does?

For each seed: ERM on the synthetic spurious text task (tiny BERT), then FairNet with default arguments and no group
label anywhere. On validation, every τ candidate (a 0.1 grid and the τ gating 5 … 95 % of the rows,
`sweep.gate_rate_thresholds`) gets three numbers: the true WGA (validation group labels, for the report only), the
pseudo-group WGA (`pseudo_worst_group_accuracy`: the validation rows marked by the pseudo-labeler fitted on training)
and the worst-class accuracy (the earlier label-free selector). Reported: Spearman's ρ of each selector with the true
WGA across the candidates, and the test WGA of the τ each selector picks.

    .venv/bin/python benchmarks/selector.py --seeds 0,1,2        # ~2 min per seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers as T  # noqa: E402
from peft import get_peft_model  # noqa: E402

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments  # noqa: E402
from fairnet_peft.data import make_synthetic_text  # noqa: E402
from fairnet_peft.evaluation.sweep import collect_sweep_scores  # noqa: E402
from suite.selection import selector_ranks  # noqa: E402

QUIET = dict(report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)


def erm_model(data, seed: int, out: str):
    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    model = T.BertForSequenceClassification(cfg)
    args = T.TrainingArguments(out, num_train_epochs=3, learning_rate=1e-3, per_device_train_batch_size=32, seed=seed,
                               **QUIET)
    T.Trainer(model=model, args=args, train_dataset=data["train"].remove_columns("sensitive")).train()
    return model


def run_seed(seed: int, out: str) -> dict:
    data = make_synthetic_text(seed=seed, n_train=2000, n_val=600, n_test=2000)
    model = get_peft_model(erm_model(data, seed, os.path.join(out, f"erm{seed}")), FairLoraConfig(task_type="SEQ_CLS"))
    train = data["train"].remove_columns("sensitive").add_column("sensitive", [-1] * len(data["train"]))
    args = FairTrainingArguments(os.path.join(out, f"fair{seed}"), num_train_epochs=3, per_device_train_batch_size=32,
                                 seed=seed, **QUIET)
    trainer = FairTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    val, test = data["validation"], data["test"]
    groups = trainer.eval_pseudo_groups(val.remove_columns("sensitive"))
    result = selector_ranks(collect_sweep_scores(model, val), groups, collect_sweep_scores(model, test))
    return {"seed": seed, **result}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/selector")
    a = parser.parse_args(argv)
    T.logging.set_verbosity_error()
    results = [run_seed(int(seed), a.out) for seed in a.seeds.split(",")]
    print("| seed | candidates | ρ pseudo-group WGA | ρ worst-class acc | τ / test WGA (pseudo-group) | τ / test WGA (worst-class) |")
    print("|---|---:|---:|---:|---|---|")
    for r in results:
        p, w = r["pseudo"], r["worst_class"]
        print(f"| {r['seed']} | {r['candidates']} | {p['rho']:.2f} | {w['rho']:.2f} | {p['tau']:.3f} / "
              f"{100 * p['test_wga']:.1f} | {w['tau']:.3f} / {100 * w['test_wga']:.1f} |")
    return results


if __name__ == "__main__":
    main()
