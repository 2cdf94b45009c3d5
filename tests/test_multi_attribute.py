"""One FairLoRA adapter per sensitive attribute, end to end (docs/api.md, "Several sensitive attributes").

A numpy-built token task with two binary sensitive attributes s1 and s2, each marked by its own token (2/3 and 8/9).
A shared spurious token agrees with the label on the majority and disagrees on either attribute's minority, so a
briefly trained ERM BERT gets both minorities wrong. `FairTrainer` trains adapter "a1" on s1; then "a2" is added and
trained on s2 while "a1" is inactive; finally both are activated, and their gated updates sum. Checked: each adapter
alone raises its own attribute's worst-group accuracy (WGA), the second stage leaves "a1" untouched, and both
together keep both gains within `TOLERANCE`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft import metrics as M

T.logging.set_verbosity_error()

PAD, CLS = 0, 1
MARKER = {"s1": (2, 3), "s2": (8, 9)}  # index == attribute value (1 = minority)
SPURIOUS, CORE, FILLER_START, VOCAB, SEQ_LEN = (4, 5), (6, 7), 10, 32, 12
MIN_GAIN = 0.10     # each adapter must raise its own attribute's WGA over ERM by at least this much
TOLERANCE = 0.05    # both adapters together may lose at most this much of either adapter's WGA


def make_two_attribute_task(seed: int, n: int, minority_fraction: float) -> Dataset:
    """Rows [CLS, shuffled(marker s1, marker s2, spurious, core, 1..6 fillers)], padded. `minority_fraction` of the
    rows are s1-minority and as many s2-minority (disjoint); labels are balanced within each of the three groups.
    The spurious token equals the label on the majority and its opposite on either minority; the core token
    equals the label with probability 0.85 everywhere."""
    rng = np.random.default_rng(seed)
    n_min = int(round(n * minority_fraction))
    group = np.repeat([0, 1, 2], [n - 2 * n_min, n_min, n_min])  # 0 majority, 1 s1-minority, 2 s2-minority
    labels = np.concatenate([rng.permutation(np.arange(c) % 2) for c in np.bincount(group, minlength=3)])
    order = rng.permutation(n)
    group, labels = group[order], labels[order]
    s1, s2 = (group == 1).astype(np.int64), (group == 2).astype(np.int64)
    spur = np.where(group == 0, labels, 1 - labels)
    core = np.where(rng.random(n) < 0.85, labels, 1 - labels)
    ids = np.zeros((n, SEQ_LEN), np.int64)
    for i in range(n):
        content = [MARKER["s1"][s1[i]], MARKER["s2"][s2[i]], SPURIOUS[spur[i]], CORE[core[i]]]
        content += list(rng.integers(FILLER_START, VOCAB, size=rng.integers(1, SEQ_LEN - 5 + 1)))
        row = [CLS] + list(rng.permutation(content))
        ids[i, :len(row)] = row
    return Dataset.from_dict({"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int64),
                              "labels": labels.astype(np.int64), "s1": s1, "s2": s2})


def wga(model, split: Dataset, attribute: str) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(split["input_ids"]),
                       attention_mask=torch.tensor(split["attention_mask"])).logits
    pred = logits.argmax(-1).numpy()
    return M.worst_group_accuracy(np.array(split["labels"]), pred, sensitive_features=np.array(split[attribute]))


def fair_args(path, attribute: str) -> FairTrainingArguments:
    return FairTrainingArguments(str(path), sensitive_column=attribute, num_train_epochs=6,
                                 per_device_train_batch_size=64, seed=0, report_to=[], save_strategy="no",
                                 disable_tqdm=True)


def lora_weights(model, adapter: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n and "fairlora_" in n}


@pytest.mark.slow
def test_one_adapter_per_attribute_each_raises_its_wga_and_both_keep_both_gains(tmp_path):
    train = make_two_attribute_task(0, 1200, 0.05)
    # held-out rows for the selection after training (as the README asks): without them it would select on 10 % of
    # the training rows, 6 per minority, and a different machine's float rounding was enough to keep "a1" off
    val = make_two_attribute_task(1, 600, 0.2)
    test = make_two_attribute_task(2, 3000, 0.2)

    torch.manual_seed(0)
    erm = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_labels=2))
    T.Trainer(model=erm, train_dataset=train.remove_columns(["s1", "s2"]), args=T.TrainingArguments(
        str(tmp_path / "erm"), num_train_epochs=3, learning_rate=1e-3, per_device_train_batch_size=32, seed=0,
        report_to=[], save_strategy="no", disable_tqdm=True)).train()
    base = {a: wga(erm, test, a) for a in ("s1", "s2")}

    # No task_type: with task_type="SEQ_CLS" PEFT gives every adapter its own copy of the classifier
    # (modules_to_save), and a ModulesToSaveWrapper accepts only one active adapter, so set_adapter(["a1", "a2"])
    # raises. FairTrainer never trains the head, so the adapters need no copy of it.
    model = get_peft_model(erm, FairLoraConfig(), adapter_name="a1")
    FairTrainer(model=model, args=fair_args(tmp_path / "a1", "s1"), train_dataset=train, eval_dataset=val,
                adapter_name="a1").train()
    only_a1 = {a: wga(model, test, a) for a in ("s1", "s2")}
    a1_weights = lora_weights(model, "a1")

    model.add_adapter("a2", FairLoraConfig())
    model.set_adapter("a2")
    FairTrainer(model=model, args=fair_args(tmp_path / "a2", "s2"), train_dataset=train, eval_dataset=val,
                adapter_name="a2").train()
    only_a2 = {a: wga(model, test, a) for a in ("s1", "s2")}
    for name, weight in lora_weights(model, "a1").items():  # the second stage never touched the first adapter
        torch.testing.assert_close(weight, a1_weights[name], rtol=0, atol=0, msg=name)

    model.base_model.set_adapter(["a1", "a2"])
    both = {a: wga(model, test, a) for a in ("s1", "s2")}
    print(f"WGA s1/s2: ERM {base} | a1 {only_a1} | a2 {only_a2} | a1+a2 {both}")

    assert only_a1["s1"] >= base["s1"] + MIN_GAIN, (base, only_a1)
    assert only_a2["s2"] >= base["s2"] + MIN_GAIN, (base, only_a2)
    assert both["s1"] >= only_a1["s1"] - TOLERANCE, (only_a1, both)
    assert both["s2"] >= only_a2["s2"] - TOLERANCE, (only_a2, both)
