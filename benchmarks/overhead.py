"""Overhead of FairLoRA vs the base model and plain PEFT LoRA: inference, training step, memory, torch.compile.

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

With ``--compile`` (off by default): ``base_compiled`` and ``fairlora_default_compiled``, ``torch.compile`` of the
same modules on the same batch (``--compile-mode``), timed round-robin with their eager twins in a separate round;
the JSON's ``compile`` entry has, per variant, the compile time or the error (a failed compile is reported and the
run goes on), and ``torch._dynamo.explain``'s graph and graph-break counts with the first break reasons;
``compile_ratios`` has ``compiled_base_speedup``, ``compiled_default_speedup`` and
``compiled_default_over_base_compiled``.

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
    python benchmarks/overhead.py --device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128 --compile

The pieces live in benchmarks/suite/: overhead_models.py (the models, the inference and compiled variants),
overhead_training.py (the training-step variants), overhead_timing.py (clocks, memory probe, summaries) and
overhead_report.py (the result dict and the printed tables); this file parses the options and runs them in order.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Optional

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(BENCH_DIR), BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# the variant and goal names are re-exported: callers of this CLI (tests/test_overhead.py) read them here
from suite.overhead_models import (COMPILED_VARIANTS, DTYPES, MODELS, VARIANTS, add_compiled,  # noqa: E402,F401
                                   build_inference, loader)
from suite.overhead_report import GOALS, STAGE_GOALS, TRAIN_GOALS, build_result, print_report  # noqa: E402,F401
from suite.overhead_timing import time_round_robin  # noqa: E402
from suite.overhead_training import STAGE_VARIANTS, TRAIN_VARIANTS, TrainBench  # noqa: E402,F401


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
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
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the base and of FairLoRA's default path (a failed compile is "
                        "reported in the JSON, not raised)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of --compile (default: default)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of --compile (default inductor; 'eager' only traces, for tests)")
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


def measure(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Every timing and memory measurement of the run, in order: inference, compiled inference, training steps
    (peak memory after them), detector stage. The torch thread count is restored afterwards."""
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    measured: dict = {}
    bench = None
    try:
        load, measured["model_name"], vocab = loader(args.model, args.seed)
        calls, measured["build_info"], compile_inputs = build_inference(args, load, vocab, device, dtype)
        measured["times"] = time_round_robin(calls, args.runs, args.warmup, clock, sync)
        if args.compile:
            compiled = {name: calls[name] for name in dict.fromkeys(COMPILED_VARIANTS.values())}
            measured["compile_report"] = add_compiled(compiled, compile_inputs, args.compile_mode,
                                                      sync or (lambda: None), args.compile_backend)
            ran = any(name in compiled for name in COMPILED_VARIANTS)
            measured["compiled_times"] = time_round_robin(compiled, args.runs, args.warmup, clock, sync) if ran else {}
            del compiled
        del calls, compile_inputs
        gc.collect()
        if args.train:
            bench = TrainBench(args, load, vocab, device, dtype)
            measured["train_times"] = time_round_robin(bench.calls, args.runs, args.warmup, clock, sync, grad=True)
            measured["memory"] = bench.memory()
            measured["changed"] = bench.changed()
            skipped = bench.skipped_batches()
            if skipped:
                raise RuntimeError(f"FairTrainer skipped {skipped} benchmark batches (too few anchors)")
            measured["train_info"] = bench.info
            measured["stage_times"] = time_round_robin(bench.stage_calls, args.runs, args.warmup, clock, sync,
                                                       grad=True)
        measured["threads_used"] = torch.get_num_threads()
    finally:
        if bench is not None:
            bench.close()
        torch.set_num_threads(threads_before)
    return measured


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    result = build_result(args, measure(args, device, dtype), device, dtype)
    print_report(result, args, device)
    sys.stdout.flush()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
