"""The overhead benchmark's clocks and memory probes: round-robin timing, summaries, peak memory of one step.

`time_round_robin(calls, runs, warmup)` times {variant: call(round)} with the order rotated every round (machine drift
spreads evenly; CUDA calls are bracketed by a synchronize); `summary(times, pairs)` turns the per-run times into
medians, IQRs, minima and the ratios named in INFERENCE_PAIRS / TRAIN_PAIRS / STAGE_PAIRS (plus their ratio-of-minima
and median-per-round views); `peak_step_bytes(fn, device)` measures the live-tensor peak of one training step.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable, Optional

import torch


def time_round_robin(calls: dict, runs: int, warmup: int, clock=time.perf_counter, sync: Optional[Callable] = None,
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


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summary(times: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "ratios": {k: round(med[a] / med[b], 4) for k, (a, b) in pairs.items()},
        "medians_ms": {name: round(v, 3) for name, v in med.items()},
        "iqr_ms": {name: round(quantile(ts, 0.75) - quantile(ts, 0.25), 3) for name, ts in times.items()},
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


def peak_step_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, Optional[int]]:
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
