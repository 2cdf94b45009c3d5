"""FSDP on this CPU-only machine (torch 2.13 CPU, accelerate 1.16, gloo).

What was tried for real: `accelerate launch --config_file examples/accelerate_fsdp.yaml` with 2 CPU processes. accelerate
enables FSDP only on GPUs/accelerators: each process comes up as distributed_type=NO with 1 process, i.e. two
independent unsharded runs. FairTrainer refuses that with a clear error (distributed.check_fsdp_active). So FairTrainer
under FSDP runs only on GPUs (benchmarks/gpu_run.sh --fsdp). What does run on CPU, and is tested here: torch's own FSDP2
(`fully_shard`) around a FairLoRA model, 2 gloo processes: the gate and detector work on sharded parameters, a
detector step and a LoRA step (FairNet's two losses) end with the same adapter as one process, and the gathered adapter
saved from rank 0 loads on one process with equal logits. The detector must be its own FSDP unit (its loss does not
pass through the root module's output, so the root's backward hooks never reduce its gradients and, left in the root
unit, it silently stays untrained); examples/accelerate_fsdp.yaml wraps `DetectorNet` for that. Run as `python tests/test_fsdp.py OUT` it is that worker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model

from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, force_gate, gate_record
from fairnet_peft.training.distributed import check_fsdp_active, fsdp_requested, save_adapter
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


if __name__ == "__main__":
    _worker(sys.argv[1])
