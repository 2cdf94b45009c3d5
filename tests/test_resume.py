"""Resuming FairTrainer equals the uninterrupted run at every point, and one output folder never mixes two runs.

The matrix crashes a run (a callback raises, as a killed process would stop) at every stage boundary and inside
each stage, then a fresh trainer (as a new process would build it) resumes with `resume_from_checkpoint=True`; the
adapter (LoRA, detector, prototypes), τ, the strength and the train metrics must equal the uninterrupted run's."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers as T
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
from fairnet_peft.data import make_synthetic_text
from fairnet_peft.training.state import STATE_FILE, base_model_digest

from .helpers import install_fake_hub

T.logging.set_verbosity_error()


class Crash(Exception):
    """What the test callbacks raise: a crash at a chosen point."""


class CrashAt(T.TrainerCallback):
    """Raise at `event` ("save", "step", "train_end") when the trainer is in `stage` at `step` (any step: None)."""

    def __init__(self, holder, stage, event, step=None):
        self.holder, self.stage, self.event, self.step = holder, stage, event, step

    def _maybe(self, event, state):
        trainer = self.holder[0]
        if event == self.event and trainer.stage == self.stage and self.step in (None, state.global_step):
            raise Crash(f"crash at {self.stage} {event} step {state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        self._maybe("save", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe("step", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe("train_end", state)


def _run(out_dir, callbacks=(), resume=None, base_seed=0, **overrides):
    data = make_synthetic_text(seed=0, n_train=192, n_val=48, n_test=8)
    torch.manual_seed(base_seed)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS"))
    settings = dict(report_to=[], disable_tqdm=True, save_strategy="steps", save_steps=3, detector_epochs=20,
                    detector_learning_rate=1e-2, detector_min_updates=0, detector_patience=1, num_train_epochs=2,
                    lora_min_updates=10, learning_rate=1e-2, per_device_train_batch_size=32, seed=0, logging_steps=3,
                    use_cpu=True, dataloader_num_workers=0, force_adapter=True, max_accuracy_drop="none")
    settings.update(overrides)
    holder = [None]
    trainer = FairTrainer(model=model, args=FairTrainingArguments(str(out_dir), **settings),
                          train_dataset=data["train"], eval_dataset=data["validation"])
    holder[0] = trainer
    for make in callbacks:
        trainer.add_callback(make(holder))
    metrics = trainer.train(resume_from_checkpoint=resume).metrics
    return trainer, metrics


def _adapter(trainer):
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "fairlora_" in k}
    config = trainer.model.peft_config["default"]
    return state, (config.threshold, config.adapter_strength)


def _numbers(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, float) and k.startswith("train_")
            and k not in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer, metrics = _run(tmp_path_factory.mktemp("straight"))
    stopping = trainer.run_state.early_stopping
    # the detector stage does stop early in this setup, well before its budget of 20 epochs (6 updates each)
    assert stopping.stopped and stopping.evaluations >= 3 and trainer.run_state.detector_updates < 60
    return _adapter(trainer), _numbers(metrics), trainer.run_state.detector_updates


CRASHES = {
    # inside the detector stage, after its first early-stopping checks, at a checkpoint
    "detector, mid-stage": lambda h: CrashAt(h, "detector", "save", 9),
    # the detector stage has ended (early stop), nothing of the prototype pass saved yet
    "detector, end": lambda h: CrashAt(h, "detector", "train_end"),
    # the finished detector stage saved; the LoRA stage crashes before its first checkpoint
    "lora, before first checkpoint": lambda h: CrashAt(h, "lora", "step", 2),
    # the LoRA stage crashes after a checkpoint
    "lora, after a checkpoint": lambda h: CrashAt(h, "lora", "save", 6),
    # the LoRA stage has ended; the selection after it has not run
    "lora, end": lambda h: CrashAt(h, "lora", "train_end"),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, where):
    (reference, config), numbers, detector_updates = uninterrupted
    with pytest.raises(Crash):
        _run(tmp_path, callbacks=[CRASHES[where]])
    trainer, metrics = _run(tmp_path, resume=True)
    resumed, resumed_config = _adapter(trainer)
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    assert resumed_config == config
    assert trainer.run_state.detector_updates == detector_updates  # the detector stage did not run longer
    got = _numbers(metrics)
    assert got.keys() == numbers.keys()
    for key, value in numbers.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


@pytest.mark.parametrize("where", ["in the second LoRA's stage", "in the kept LoRA's stage"])
def test_a_cross_fitted_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch, where):
    """lora_cross_fit: a crash in the second LoRA's stage redoes that stage; a crash after it never does (its logits
    are in the saved run state). Either way the result is the uninterrupted run's."""
    reference, numbers = _run(tmp_path / "straight", lora_cross_fit=True)
    (weights, config), numbers = _adapter(reference), _numbers(numbers)
    assert reference.run_state.cross_fit and numbers["train_selection_rows"] == 48  # every eval row selects
    # the second LoRA's stage saves no checkpoint: the first "lora" save is the kept LoRA's
    second = where.startswith("in the second")
    crash = (lambda h: CrashAt(h, "lora", "step", 2)) if second else (lambda h: CrashAt(h, "lora", "save", 6))
    with pytest.raises(Crash):
        _run(tmp_path / "run", callbacks=[crash], lora_cross_fit=True)
    calls = []
    original = FairTrainer._run_cross_fit_stage
    monkeypatch.setattr(FairTrainer, "_run_cross_fit_stage", lambda self: calls.append(1) or original(self))
    trainer, metrics = _run(tmp_path / "run", resume=True, lora_cross_fit=True)
    assert len(calls) == (1 if second else 0)
    resumed, resumed_config = _adapter(trainer)
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], rtol=0, atol=1e-6, msg=key)
    assert resumed_config == config
    got = _numbers(metrics)
    for key, value in numbers.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


def test_a_finished_detector_stage_is_never_rerun(tmp_path, monkeypatch):
    with pytest.raises(Crash):
        _run(tmp_path, callbacks=[lambda h: CrashAt(h, "lora", "step", 2)])
    calls = []
    monkeypatch.setattr(FairTrainer, "_run_detector_stage", lambda self, resume: calls.append(resume))
    _run(tmp_path, resume=True)
    assert calls == []


def test_another_runs_checkpoints_are_never_resumed_from(tmp_path):
    """Run 1 (another learning rate) finished in the folder; run 2 crashes early; resuming run 2 must not hand back
    run 1's adapter but equal run 2 uninterrupted. An explicit path to run 1's checkpoint is refused."""
    _run(tmp_path, learning_rate=3e-2)
    first = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert first
    saved = tmp_path / "run1" / first[-1]  # a copy: run 2 writes checkpoints of the same names into the folder
    shutil.copytree(tmp_path / first[-1], saved)
    with pytest.raises(Crash):
        _run(tmp_path, callbacks=[lambda h: CrashAt(h, "detector", "save", 3)])
    with pytest.warns(UserWarning, match="another run"):
        trainer, _ = _run(tmp_path, resume=True)
    straight, _ = _run(tmp_path / "straight")
    resumed, reference = _adapter(trainer)[0], _adapter(straight)[0]
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="written by another run"):
        _run(tmp_path / "other", resume=str(saved))
    with pytest.raises(ValueError, match="not a FairTrainer checkpoint"):
        os.makedirs(tmp_path / "plain" / "checkpoint-1")
        _run(tmp_path / "plain", resume=str(tmp_path / "plain" / "checkpoint-1"))


def test_checkpoints_written_on_another_base_model_belong_to_another_run(tmp_path):
    """The same settings and data on another base (an ERM model trained again): its checkpoints are not resumed from."""
    with pytest.raises(Crash):
        _run(tmp_path, callbacks=[lambda h: CrashAt(h, "lora", "step", 2)])  # the detector stage of base 0 finished
    with pytest.warns(UserWarning, match=r"written by another run \(other settings, data or base model\)"):
        trainer, _ = _run(tmp_path, resume=True, base_seed=1)
    assert trainer.run_state.detector_updates > 0  # the detector stage ran again, on base 1


def test_the_base_model_digest_reads_the_base_weights_only():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS"))
    digest = base_model_digest(model)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "fairlora_" in name:
                weight.add_(1.0)  # the adapter trains: not part of the base
    assert base_model_digest(model) == digest
    with torch.no_grad():
        model.get_base_model().bert.embeddings.word_embeddings.weight[0, 0] += 1.0  # a sampled value of the base
    assert base_model_digest(model) != digest


def test_the_base_model_digest_reads_weights_kept_in_buffers():
    """GPTQ/AWQ-style layers keep their weights in persistent buffers (packed int32 `qweight`): a base exported
    again must give another digest, while the adapter's prototype buffers and non-persistent buffers (derived from
    the config) do not count."""
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    base = T.BertForSequenceClassification(cfg)
    packed = base.bert.encoder.layer[1].output
    packed.register_buffer("qweight", torch.randint(0, 2**31 - 1, (8, 64), dtype=torch.int32))
    packed.register_buffer("derived", torch.arange(64.0), persistent=False)
    model = get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS"))
    digest = base_model_digest(model)
    prototypes = [b for name, b in model.named_buffers() if "fairlora_prototypes" in name]
    assert prototypes
    with torch.no_grad():
        for buffer in prototypes:
            buffer.add_(1.0)  # the prototype pass fills them: not part of the base
        packed.derived.add_(1.0)
    assert base_model_digest(model) == digest
    packed.qweight[0, 0] ^= 1  # one bit of a packed weight (float32 would not tell these apart)
    assert base_model_digest(model) != digest


def test_resuming_on_another_number_of_processes_continues_with_a_warning(tmp_path):
    with pytest.raises(Crash):
        _run(tmp_path, callbacks=[CRASHES["lora, after a checkpoint"]])
    for folder in [tmp_path / "_fairnet-detector-stage" / "final",
                   *(tmp_path / p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))]:
        state = json.loads((folder / STATE_FILE).read_text())
        assert state["world_size"] == 1
        (folder / STATE_FILE).write_text(json.dumps({**state, "world_size": 2}))  # as if written on 2 processes
    with pytest.warns(UserWarning, match=r"written by a run on 2 process\(es\), on 1\. The run continues"):
        trainer, _ = _run(tmp_path, resume=True)
    assert trainer.run_state.world_size == 1 and trainer.run_state.stage == "done"


def test_checkpoints_save_model_and_push_to_hub_write_no_pickle(tmp_path, monkeypatch):
    """Trainer writes its arguments with torch.save (a pickle); FairTrainer writes them as JSON, in every checkpoint
    and in what save_model writes; trainer.push_to_hub uploads no checkpoint (the stage folder's included)."""
    trainer, _ = _run(tmp_path / "run")
    checkpoints = [p for p in (tmp_path / "run").rglob("checkpoint-*") if p.is_dir()]
    assert checkpoints and not list((tmp_path / "run").rglob("training_args.bin"))
    for folder in checkpoints:
        assert json.loads((folder / "training_args.json").read_text())["seed"] == 0
    trainer.save_model(str(tmp_path / "saved"))
    written = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "training_args.json" in written and "adapter_model.safetensors" in written
    assert all(name.endswith((".safetensors", ".json", ".md")) for name in written), written
    api = install_fake_hub(monkeypatch, str(tmp_path / "hub"))
    trainer.args.hub_model_id = "me/fairnet"
    trainer.push_to_hub()
    pushed = api.commits[-1][1]
    assert "adapter_model.safetensors" in pushed and "training_args.json" in pushed
    assert all(name.endswith((".safetensors", ".json", ".md")) for name in pushed), pushed
