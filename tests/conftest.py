"""Shared fixtures: the synthetic spurious-correlation task and one ERM model trained on it (tiny BERT), built once
per test session and used by the trainer tests. Tests that need a trained model or a benchmark run (the fixtures in
END_TO_END_FIXTURES) are end-to-end runs: they get the `slow` marker here, so `make test-fast` skips them and
`make test` runs them.

`make test` runs the suite in 2 pytest-xdist workers (`-n`): each worker gets an equal share of the cores as torch
threads, and the controller fetches PEFT's generic tests once before the workers collect them (so they all see the
same files and collect the same tests)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T

from fairnet_peft.data import make_synthetic_text

# fixtures that train a model or run a benchmark end to end (module- or session-scoped, tens of seconds each)
END_TO_END_FIXTURES = {"erm_dir", "synthetic_erm_dir", "uninterrupted", "tiny", "tiny_report"}

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:  # an xdist worker: its share of the cores, not all of them (2 workers x 2 threads thrash 2 cores)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_configure(config):
    """On the xdist controller: fetch PEFT's suite before the workers import `test_peft_generic` (each would
    otherwise download it at once, and a worker that saw a half-written folder would collect other tests). A failed
    fetch is left to `test_peft_suite_available`, which fails with the reason."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from .peft_suite_fetch import PeftSuiteUnavailable, ensure_peft_suite

    try:
        ensure_peft_suite()
    except PeftSuiteUnavailable:
        pass


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synthetic_data():
    return make_synthetic_text(seed=0, n_train=1200, n_val=300, n_test=600)


@pytest.fixture(scope="session")
def synthetic_erm_dir(synthetic_data, tmp_path_factory):
    """ERM (3 epochs, lr 1e-3, batch 32, seed 0) saved once: the FairNet starting point of the trainer tests."""
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    model = T.BertForSequenceClassification(cfg)
    args = T.TrainingArguments(str(tmp_path_factory.mktemp("erm")), num_train_epochs=3, learning_rate=1e-3,
                               per_device_train_batch_size=32, report_to=[], save_strategy="no", disable_tqdm=True,
                               seed=0, dataloader_num_workers=0, use_cpu=True)
    T.Trainer(model=model, args=args, train_dataset=synthetic_data["train"].remove_columns("sensitive")).train()
    path = str(tmp_path_factory.mktemp("erm_model"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(synthetic_data):
    """Short name used by the trainer tests."""
    return synthetic_data


@pytest.fixture(scope="module")
def erm_dir(synthetic_erm_dir):
    """The ERM model, the FairNet starting point of the trainer tests."""
    return synthetic_erm_dir
