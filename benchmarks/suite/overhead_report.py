"""The overhead benchmark's result and report: one dict of ratios, medians and memory, and the printed tables.

`build_result(args, measured, device, dtype)` turns what overhead.py measured (inference, training-step and
detector-stage times, memory, setup info, the compiled variants) into the result dict: every ratio, its goal and
whether it is met, and the setup. `print_report(result, args)` prints the tables and the goal lines; overhead.py then
prints the dict as the last line (JSON).
"""

from __future__ import annotations

import statistics

import torch

from .overhead_models import COMPILED_VARIANTS
from .overhead_timing import INFERENCE_PAIRS, STAGE_PAIRS, TRAIN_PAIRS, summary
from .overhead_training import STAGE_VARIANTS, TRAIN_VARIANTS

GOALS = {"fairlora_over_lora": 1.05, "fairlora_over_base": 1.15, "nogate_over_base": 1.03}
TRAIN_GOALS = {"train_step_over_lora": 1.2, "train_peak_mem_over_lora": 1.1,
               "train_step_over_lora_nodropout": 1.2, "train_peak_mem_over_lora_nodropout": 1.1}
STAGE_GOALS = {"detector_step_over_full_forward": 0.6}
# `--compile`: what compiling buys each path, and the compiled FairLoRA default against the compiled base
COMPILE_PAIRS = {"compiled_base_speedup": ("base", "base_compiled"),
                 "compiled_default_speedup": ("fairlora_default", "fairlora_default_compiled"),
                 "compiled_default_over_base_compiled": ("fairlora_default_compiled", "base_compiled")}


def _inference(times: dict) -> dict:
    inf = summary(times, INFERENCE_PAIRS)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def ratio(a: str, b: str) -> float:
        return round(med[a] / med[b], 4)

    return {
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


def _training(measured: dict, device: torch.device) -> dict:
    memory = measured["memory"]
    tr = summary(measured["train_times"], TRAIN_PAIRS)

    def mem_ratio(a: str, b: str, key: str = "peak") -> float:
        return round(memory[a][key] / memory[b][key], 4)

    out = dict(tr["ratios"])
    out.update(
        train_peak_mem_over_lora=mem_ratio("fairlora_all_anchors", "lora"),
        train_peak_mem_over_lora_nodropout=mem_ratio("fairlora_all_anchors", "lora_nodropout"),
        train_step_mem_over_lora=mem_ratio("fairlora_all_anchors", "lora", "step_peak"),
        train_step_mem_over_lora_nodropout=mem_ratio("fairlora_all_anchors", "lora_nodropout", "step_peak"),
        train_peak_mem_anchors10_over_lora=mem_ratio("fairlora_anchors10", "lora"),
        train_medians_ms=tr["medians_ms"], train_iqr_ms=tr["iqr_ms"], train_min_ms=tr["min_ms"],
        train_min_ratios=tr["min_ratios"], train_paired_median_ratios=tr["paired_median_ratios"],
        train_memory_bytes=memory, train_params_changed=measured["changed"],
        train_memory_method=("torch.cuda max_memory_allocated - memory_allocated before the step" if
                             device.type == "cuda" else
                             "torch.profiler profile_memory: max running sum of CPU allocator records"),
    )
    out.update(measured["train_info"])
    stage = summary(measured["stage_times"], STAGE_PAIRS)
    out.update(stage["ratios"], stage_medians_ms=stage["medians_ms"], stage_iqr_ms=stage["iqr_ms"],
               stage_min_ratios=stage["min_ratios"], stage_paired_median_ratios=stage["paired_median_ratios"])
    return out


def _compiled(measured: dict) -> dict:
    """The compiled variants: their report (compile time or error, graph breaks) and the ratios whose two variants
    both ran (`compile_pairs`); no timing of a variant that failed to compile."""
    times = measured["compiled_times"]
    pairs = {k: (a, b) for k, (a, b) in COMPILE_PAIRS.items()
             if a in times and b in times}
    out = {"compile": measured["compile_report"]}
    if times:
        comp = summary(times, pairs)
        out.update(compile_ratios=comp["ratios"], compile_medians_ms=comp["medians_ms"],
                   compile_iqr_ms=comp["iqr_ms"], compile_min_ratios=comp["min_ratios"],
                   compile_paired_median_ratios=comp["paired_median_ratios"])
    return out


def build_result(args, measured: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The benchmark's one result dict (printed as the last line, JSON)."""
    import fairnet_peft

    result = _inference(measured["times"])
    goals = dict(GOALS)
    if args.train:
        result.update(_training(measured, device))
        goals.update(TRAIN_GOALS)
        goals.update(STAGE_GOALS)
    result["goals"] = goals
    result["goals_met"] = {key: result[key] <= goal for key, goal in goals.items()}
    if args.compile:
        result.update(_compiled(measured))
    result.update({
        "model": measured["model_name"],
        "model_key": args.model,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": measured["threads_used"],
        "runs": args.runs,
        "warmup_rounds": args.warmup,
        "clock": args.clock if device.type == "cpu" else "wall (CUDA-synchronised)",
        "train": args.train,
        **measured["build_info"],
        "torch": torch.__version__,
        "fairnet_peft": fairnet_peft.__version__,
    })
    return result


def print_report(result: dict, args, device: torch.device) -> None:
    """The tables (inference, training step, detector stage, compiled) and one line per goal."""
    med = result["medians_ms"]
    clock_text = ("CUDA-synchronised wall clock" if device.type == "cuda" else
                  "wall-clock" if args.clock == "wall" else "CPU time of the calling thread")
    print(f"# {result['model']}, {result['device']}, {result['dtype']}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{result['threads']} threads, {clock_text}, median of {args.runs} runs after {args.warmup} warm-up rounds "
          f"(round-robin)")
    print(f"{'inference':<22} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'/ base':>7} {'gate rate':>9}")
    for name in med:
        rate = result["gate_rates"].get(name)
        print(f"{name:<22} {med[name]:>10.2f} {result['iqr_ms'][name]:>8.2f} {result['min_ms'][name]:>8.2f} "
              f"{med[name] / med['base']:>7.3f} {'' if rate is None else f'{rate:.2f}':>9}")
    if args.train:
        tmed = result["train_medians_ms"]
        print(f"{'training step':<22} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'/ lora':>7} {'anchors':>8} "
              f"{'state MiB':>10} {'step MiB':>9} {'peak MiB':>9}")
        for name in TRAIN_VARIANTS:
            mem = result["train_memory_bytes"][name]
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
    if args.compile:
        _print_compiled(result)
    for key, goal in result["goals"].items():
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


def _print_compiled(result: dict) -> None:
    """torch.compile table: each compiled variant against its eager twin, its graph breaks, or its error."""
    cmed = result.get("compile_medians_ms", {})
    print(f"{'torch.compile':<26} {'median ms':>10} {'/ eager':>8} {'breaks':>7} {'compile s':>10}")
    for name, eager in COMPILED_VARIANTS.items():
        entry = result["compile"][name]
        breaks = entry.get("graph_breaks", "?")
        if not entry.get("ok"):
            print(f"{name:<26} {'failed':>10} {'':>8} {breaks!s:>7} {'':>10}  {entry['error']}")
            continue
        print(f"{name:<26} {cmed[name]:>10.2f} {cmed[name] / cmed[eager]:>8.3f} {breaks!s:>7} "
              f"{entry['compile_s']:>10.1f}")
