"""FairTrainer under 2-process torchrun (gloo, CPU) equals a 1-process run (resuming: tests/test_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as T

from fairnet_peft.data import make_synthetic_text

T.logging.set_verbosity_error()
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fair_stats.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["full", "unlabeled"])
def test_two_process_statistics_equal_one_process(tmp_path, setting):
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, SCRIPT, str(single), setting], check=True, env=_env(), timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + [SCRIPT, str(double), setting], env=_env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["anchor_threshold"] == pytest.approx(two["anchor_threshold"])  # w1 / (1 + w1): the class weight
    np.testing.assert_allclose(one["prototypes"], two["prototypes"], rtol=1e-5, atol=1e-6)
    assert one["counts"] == two["counts"]
    assert one["anchor_rows"] == two["anchor_rows"]
    assert one["pseudo"] == two["pseudo"]
    for key, value in one["detector_stats"].items():
        assert value == pytest.approx(two["detector_stats"][key]), key
    # the selection ran on the eval rows gathered from both ranks: the base model's accuracy is the same number
    assert one["selection"]["train_selection_accuracy_off"] == pytest.approx(two["selection"]["train_selection_accuracy_off"])
    assert two["selection"]["train_selection_accuracy"] >= two["selection"]["train_selection_accuracy_off"] - 1e-9
    # DDP averaged the LoRA gradients: both ranks end the LoRA stage with the same, trained adapter
    rank0, rank1 = (json.loads((tmp_path / f"two.json.rank{r}").read_text()) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert any(np.abs(np.asarray(v)).sum() > 0 for k, v in rank0.items() if k != "threshold")
    for key in rank0:
        np.testing.assert_allclose(rank0[key], rank1[key], rtol=1e-5, atol=1e-7)
    if setting == "unlabeled":  # crashed after the LoRA stage and resumed on 2 processes: the same selection
        resumed = tmp_path / "resumed.json"
        proc = subprocess.run(torchrun + [SCRIPT, str(resumed), "unlabeled-resumed"], env=_env(), timeout=300,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = json.loads(resumed.read_text())
        assert again["steps"] == 0 and two["steps"] > 0  # nothing retrained: the selection's refit came from resuming
        assert again["pseudo"] == two["pseudo"] and again["selection"] == pytest.approx(two["selection"])
        np.testing.assert_allclose(json.loads((tmp_path / "resumed.json.rank1").read_text())["threshold"],
                                   rank1["threshold"])


GAIN_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fair_gain.py")


def _erm_model(path, data):
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    model = T.BertForSequenceClassification(cfg)
    args = T.TrainingArguments(str(path / "erm_run"), num_train_epochs=3, learning_rate=1e-3, per_device_train_batch_size=32,
                               report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True)
    T.Trainer(model=model, args=args, train_dataset=data["train"].remove_columns("sensitive")).train()
    model.save_pretrained(str(path / "erm"))
    return str(path / "erm")


@pytest.mark.slow
def test_default_gain_survives_two_processes(tmp_path):
    """Defaults only (epochs and batch size set): the 2-process run makes the same number of LoRA updates as the
    1-process run and keeps its worst-group gain within noise (600 test rows; the worst cell has 90). Once flaky (WGA
    0.00-0.87 over seven runs): get_peft_model drew the adapter from an unseeded RNG, and this toy's LoRA stage at 3
    epochs sat on a loss plateau whose end depended on that draw; see scripts/fair_gain.py."""
    data = make_synthetic_text(seed=0, n_train=1200, n_val=50, n_test=600)
    erm_dir = _erm_model(tmp_path, data)
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, GAIN_SCRIPT, erm_dir, str(single)], check=True, env=_env(), timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + [GAIN_SCRIPT, erm_dir, str(double)], env=_env(), timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["lora_updates"] == two["lora_updates"]
    model = T.BertForSequenceClassification.from_pretrained(erm_dir).eval()
    test = data["test"]
    with torch.no_grad():
        pred = model(input_ids=torch.tensor(test["input_ids"]),
                     attention_mask=torch.tensor(test["attention_mask"])).logits.argmax(-1).numpy()
    y, s = np.array(test["labels"]), np.array(test["sensitive"])
    erm_wga = min((pred[(y == a) & (s == b)] == a).mean() for a in (0, 1) for b in (0, 1))
    print(f"ERM WGA {erm_wga:.3f}; 1 process {one}; 2 processes {two}")
    assert one["wga"] >= erm_wga + 0.3 and two["wga"] >= erm_wga + 0.3
    # within noise: the 1-process run alone ranges 0.844-0.956 over seeds 0-2 (2 processes: 0.844-0.956), so 0.15;
    # one worst-cell row is 1.1 points. Both runs are reproducible: the adapter is drawn from args.seed.
    assert abs(one["wga"] - two["wga"]) <= 0.15
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.03
