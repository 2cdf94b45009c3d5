"""Run FairTrainer's statistics stages on the synthetic task and dump them as JSON (used 1-process and under torchrun).

The detector learning rate is 0, so the (seeded) detector is identical in every run and the dumped statistics must
agree exactly between a 1-process and a 2-process run: prototypes, class weight, pseudo-labels, detector rates.
"""

import json
import sys

import numpy as np
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft.data import make_synthetic_text

T.logging.set_verbosity_error()


class CrashAfterLora(T.TrainerCallback):
    """Raise when the LoRA stage ends, before the selection: what a killed process leaves to resume from."""

    def __init__(self, holder):
        self.holder = holder

    def on_train_end(self, args, state, control, **kwargs):
        if self.holder[0].stage == "lora":
            raise RuntimeError("crash after the LoRA stage")


class CountSteps(T.TrainerCallback):
    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def main(out_path: str, setting: str) -> None:
    """`setting` full or unlabeled; "unlabeled-resumed": the unlabeled run crashes after its LoRA stage and a fresh
    trainer resumes it (every rank then fits the pseudo-labeler again before the selection's passes)."""
    resumed = setting.endswith("-resumed")
    setting = setting.removesuffix("-resumed")
    data = make_synthetic_text(seed=0, n_train=301, n_val=50, n_test=50)  # odd size: uneven shards
    train = data["train"]
    if setting == "unlabeled":
        train = train.remove_columns("sensitive").add_column("sensitive", [-1] * len(train))
    if resumed:
        holder = [None]
        try:
            build(out_path, train, data, save=True, holder=holder).train()
        except RuntimeError as err:
            assert "crash after the LoRA stage" in str(err), err
        else:
            raise AssertionError("the run did not crash after its LoRA stage")
    trainer = build(out_path, train, data, save=resumed)
    steps = CountSteps()
    trainer.add_callback(steps)
    metrics = trainer.train(resume_from_checkpoint=True if resumed else None).metrics
    model = trainer.model
    det = model.base_model.model.fair_bias_detector
    result = {
        "world_size": trainer.accelerator.num_processes,
        "anchor_threshold": trainer.anchor_threshold(),
        "prototypes": det.fairlora_prototypes["default"].tolist(),
        "counts": det.fairlora_prototype_counts["default"].tolist(),
        "detector_stats": trainer.detector_stats,
        "anchor_rows": trainer.anchor_rows().tolist(),
        "pseudo": np.asarray(trainer.pseudo_labels if trainer.pseudo_labels is not None else []).tolist(),
        "selection": {k: v for k, v in metrics.items() if k.startswith("train_selection_") and isinstance(v, float)},
        "steps": steps.count,  # optimizer steps this trainer ran (none after a crash past the LoRA stage)
    }
    lora = {k: v.tolist() for k, v in model.state_dict().items() if "fairlora_B" in k}
    config = model.peft_config["default"]
    lora["threshold"] = [config.threshold, config.adapter_strength]  # every rank took the selection's decision
    with open(f"{out_path}.rank{trainer.accelerator.process_index}", "w") as f:
        json.dump(lora, f)  # every rank: the LoRA after the LoRA stage must be identical across ranks
    if trainer.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)


def build(out_path: str, train, data, save: bool, holder=None) -> FairTrainer:
    """The seeded model and trainer; with `save`, checkpoints every step into a folder beside `out_path`."""
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS", threshold=0.5))
    saving = dict(save_strategy="steps", save_steps=1) if save else dict(save_strategy="no")
    args = FairTrainingArguments(
        f"{out_path}.run" if save else "/tmp/fair_stats_unused", report_to=[], **saving, disable_tqdm=True,
        detector_epochs=1, detector_learning_rate=0.0, num_train_epochs=1, max_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=16, per_device_eval_batch_size=16, seed=0, use_cpu=True,
        pseudo_labeler="lof",  # the model is untrained: its error set is a whole class, which `auto` would fall back to
        max_accuracy_drop=0.0,  # the selection's accuracy floor: its passes gather the 50 eval rows over ranks
        force_adapter=True,  # the untrained detector would switch the adapter off before any selection pass
    )
    trainer = FairTrainer(model=model, args=args, train_dataset=train, eval_dataset=data["validation"])
    if holder is not None:
        holder[0] = trainer
        trainer.add_callback(CrashAfterLora(holder))
    return trainer


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
