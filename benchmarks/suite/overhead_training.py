"""The overhead benchmark's training-step variants: FairTrainer's LoRA and detector stages against plain PEFT LoRA.

`TrainBench(args, load, vocab, device, dtype)` builds every variant's model and trainer on one shared list of batches
(the FairLoRA rows also carry their sensitive label and row index) and exposes `calls[name](round)` (one real step:
`trainer.training_step` + optimizer step), `stage_calls` (detector-stage step vs a full forward+backward of the base),
`memory()` (peak bytes of one step plus the resident state), `changed()` and `skipped_batches()`; `close()` undoes
the stage contexts. Timing is overhead_timing.py's; the models come from overhead_models.py's `loader`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Callable

import torch

from .overhead_models import low_token
from .overhead_timing import peak_step_bytes

TRAIN_VARIANTS = ("lora", "lora_nodropout", "fairlora_all_anchors", "fairlora_anchors10")
# one detector-stage step (stopped at the detector's layer) against a full forward + backward of the base
STAGE_VARIANTS = ("fairlora_detector_stage", "base_forward_backward")


def trainable_kinds(model: torch.nn.Module) -> list[str]:
    kinds = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = re.search(r"(fairlora_[AB]|lora_[AB]|classifier|score)", name)
            kinds.add(m.group(1) if m else f"other:{name}")
    return sorted(kinds)


def state_bytes(model: torch.nn.Module, optimizer) -> int:
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


class TrainBench:
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
        ids = torch.randint(low_token(vocab), vocab, (rows, seq), generator=g)
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
            "train_trainable": {name: trainable_kinds(m) for name, m in self.models.items()},
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
            step, abs_peak = peak_step_bytes(lambda: self.calls[name](0), self.device)
            state = state_bytes(self.models[name], self.trainers[name].optimizer)
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
