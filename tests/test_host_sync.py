"""A training step of either stage makes no device→host sync in fairnet_peft's own code: the loss terms are kept as
tensors and logged at `logging_steps`, the per-stage arrays are copied to the device once, the losses are masked
rather than indexed by data. Counted on CPU by intercepting the Tensor methods that force a sync (`item`, `tolist`,
`__bool__`, `__float__`, `__int__`, `nonzero`) when fairnet_peft code calls them."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft.data import make_synthetic_text
from .helpers import TINY_RUN_FILTERS  # noqa: E402

# tiny sizes trigger FairTrainer's small-data diagnostics by design (asserted in test_selection.py)
pytestmark = [pytest.mark.filterwarnings(f) for f in TINY_RUN_FILTERS]

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


class SyncCounter:
    """Inside the block, every call of a syncing Tensor method made from a fairnet_peft file is recorded."""

    def __init__(self):
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, __name=name, __original=original, **kwargs):
                caller = sys._getframe(1).f_code
                if "fairnet_peft" in caller.co_filename:
                    self.calls.append(f"{__name} in {caller.co_filename.rsplit('fairnet_peft', 1)[1]}:{caller.co_name}")
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    T.logging.set_verbosity_error()
    data = make_synthetic_text(seed=0, n_train=128, n_val=16, n_test=8)
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS", threshold=0.0))
    args = FairTrainingArguments(str(tmp_path_factory.mktemp("sync")), report_to=[], save_strategy="no",
                                 disable_tqdm=True, use_cpu=True, per_device_train_batch_size=32, seed=0,
                                 dataloader_num_workers=0)
    return FairTrainer(model=model, args=args, train_dataset=data["train"])


@pytest.mark.parametrize("stage", ["detector", "lora"])
def test_a_training_step_makes_no_host_sync_in_fairnet_code(trainer, stage):
    prepare = trainer.prepare_detector_stage if stage == "detector" else trainer.prepare_lora_stage
    with prepare():
        rows = trainer.anchor_rows() if stage == "lora" else range(len(trainer.train_dataset))
        loader = trainer.get_train_dataloader() if stage == "detector" else None
        batch = next(iter(loader)) if loader is not None else trainer.data_collator(
            [trainer.train_dataset[int(i)] for i in list(rows)[:8]])
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(batch))  # warm-up: the per-stage device copies are made once
        with SyncCounter() as counter:
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
        assert trainer.logged_terms(), "the step logged its loss terms"
    assert counter.calls == []
    assert torch.isfinite(loss.detach())


def test_the_counter_sees_a_sync_in_fairnet_code():
    from fairnet_peft.tuner.gate import GateRecord

    with SyncCounter() as counter:
        GateRecord.build(torch.tensor([True, False, True])).idx  # gathering gated rows waits for the device
    assert any(call.startswith("nonzero") for call in counter.calls)
