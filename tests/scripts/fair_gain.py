"""FairNet with default FairTrainingArguments on the synthetic task, from a saved ERM model; dumps test ACC/WGA as JSON.

Run once as one process and once under `torchrun --nproc_per_node 2` by tests/test_trainer_distributed.py: the
gain must survive scaling out (the LoRA stage's update count does not depend on the number of processes). 100 epochs
(≈ 400 LoRA updates): at 3 (the 200-update minimum) this toy's LoRA loss leaves its plateau only after 100-190
updates, and late or never for some initialisations (seen for 3 of 24 in 2 processes, whose global batch is twice as
large), so the test would measure where the plateau ends, not whether the gain survives.
Usage: fair_gain.py ERM_DIR OUT_JSON
"""

import json
import sys

import numpy as np
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft import metrics as M
from fairnet_peft.data import make_synthetic_text

T.logging.set_verbosity_error()


def main(erm_dir: str, out_path: str) -> None:
    data = make_synthetic_text(seed=0, n_train=1200, n_val=50, n_test=600)
    model = get_peft_model(T.BertForSequenceClassification.from_pretrained(erm_dir), FairLoraConfig(task_type="SEQ_CLS"))
    args = FairTrainingArguments(out_path + ".run", num_train_epochs=100, per_device_train_batch_size=32,
                                 report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True)
    trainer = FairTrainer(model=model, args=args, train_dataset=data["train"])
    metrics = trainer.train().metrics
    if trainer.accelerator.is_main_process:
        test = data["test"]
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(test["input_ids"]), attention_mask=torch.tensor(test["attention_mask"])).logits
        y, s, pred = np.array(test["labels"]), np.array(test["sensitive"]), logits.argmax(-1).numpy()
        with open(out_path, "w") as f:
            json.dump({"world_size": trainer.accelerator.num_processes, "lora_updates": trainer.state.global_step,
                       "accuracy": M.accuracy(y, pred), "wga": M.worst_group_accuracy(y, pred, sensitive_features=s),
                       "detector_auc": metrics["train_detector_auc"],
                       "selection": {k: v for k, v in metrics.items() if k.startswith("train_selection_")
                                     and not isinstance(v, (list, dict))}}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
