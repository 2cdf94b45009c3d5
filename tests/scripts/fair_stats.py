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


def main(out_path: str, setting: str) -> None:
    data = make_synthetic_text(seed=0, n_train=301, n_val=50, n_test=50)  # odd size: uneven shards
    train = data["train"]
    if setting == "unlabeled":
        train = train.remove_columns("sensitive").add_column("sensitive", [-1] * len(train))
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS", threshold=0.5))
    args = FairTrainingArguments(
        "/tmp/fair_stats_unused", report_to=[], save_strategy="no", disable_tqdm=True, detector_epochs=1,
        detector_learning_rate=0.0, num_train_epochs=1, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, seed=0, use_cpu=True,
        pseudo_labeler="lof",  # the model is untrained: its error set is a whole class, which `auto` would fall back to
        max_accuracy_drop=0.0,  # the selection's accuracy floor: its passes gather the 50 eval rows over ranks
        force_adapter=True,  # the untrained detector would switch the adapter off before any selection pass
    )
    trainer = FairTrainer(model=model, args=args, train_dataset=train, eval_dataset=data["validation"])
    metrics = trainer.train().metrics
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
    }
    lora = {k: v.tolist() for k, v in model.state_dict().items() if "fairlora_B" in k}
    config = model.peft_config["default"]
    lora["threshold"] = [config.threshold, config.adapter_strength]  # every rank took the selection's decision
    with open(f"{out_path}.rank{trainer.accelerator.process_index}", "w") as f:
        json.dump(lora, f)  # every rank: the LoRA after the LoRA stage must be identical across ranks
    if trainer.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
