"""benchmarks/overhead.py runs end to end on a tiny model and ends with one JSON line (no timing assertions).

The CLI is thin: the models and variants, the training steps, the clocks and the report live in
benchmarks/suite/overhead_*.py; these tests drive them through the CLI's `main` and the names it imports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "overhead.py")


def _load():
    spec = importlib.util.spec_from_file_location("fairnet_overhead_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_quick_tiny_prints_json_last(capsys):
    bench = _load()
    threads = torch.get_num_threads()
    result = bench.main(["--quick", "--tiny", "--batch-size", "10", "--seq-len", "12"])
    assert torch.get_num_threads() == threads  # the thread setting is restored
    lines = capsys.readouterr().out.strip().splitlines()
    load, _, _ = bench.loader("tiny", 0)
    base_params = sum(p.numel() for p in load().parameters())  # the tiny base model every variant wraps
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(result))
    for key in ("fairlora_over_lora", "fairlora_over_base", "nogate_over_base", "gate10_over_base", "medians_ms"):
        assert key in last, key
    assert set(last["medians_ms"]) == set(bench.VARIANTS)
    assert all(v > 0 for v in last["medians_ms"].values())
    assert last["gate_rates"]["fairlora_all"] == 1.0 and last["gate_rates"]["fairlora_nogate"] == 0.0
    assert last["gate_rates"]["fairlora_gate10"] == 0.1
    # every linear layer (query, key, value, attention output, intermediate, output) of blocks 2-3 of the 4-block tiny
    # BERT: FairLoRA's default targets, mirrored by the plain LoRA it is compared with
    assert last["adapted_modules"] == 12
    assert last["model_key"] == "tiny" and last["device"] == "cpu" and last["dtype"] == "float32"

    # inference at 0 %, 10 % and 100 % of the rows gated: each ratio is its variant's median over the base median,
    # recomputed here from the medians (rounded to 0.001 ms, the ratios to 1e-4), for the variant whose measured gate
    # rate is 0 %, 10 % and 100 % (checked above)
    med = last["medians_ms"]
    for key, variant in (("gate0_over_base", "fairlora_nogate"), ("gate10_over_base", "fairlora_gate10"),
                         ("gate100_over_base", "fairlora_all"), ("fairlora_over_lora", "fairlora_all")):
        a, b = med[variant], med["lora" if key.endswith("_lora") else "base"]
        tol = 0.0005 / b + 0.0005 * a / b**2 + 0.00005  # rounding of both medians and of the ratio
        assert abs(last[key] - a / b) <= tol, (key, last[key], a / b)
    # the training step and its peak memory, FairTrainer's LoRA stage vs a plain PEFT LoRA Trainer
    for key in ("gate0_over_base", "gate10_over_base", "gate100_over_base", "train_step_over_lora",
                "train_step_over_lora_nodropout", "train_step_anchors10_over_lora", "train_peak_mem_over_lora",
                "train_peak_mem_over_lora_nodropout", "train_step_mem_over_lora", "train_step_mem_over_lora_nodropout"):
        assert _positive(last[key]), (key, last.get(key))
    assert set(last["train_medians_ms"]) == set(bench.TRAIN_VARIANTS)
    assert all(_positive(v) for v in last["train_medians_ms"].values())
    for variant, mem in last["train_memory_bytes"].items():
        assert all(_positive(mem[k]) for k in ("state", "step_peak", "peak")), (variant, mem)
        # lower bounds from parameter counts, independent of the memory probes: the resident state holds every
        # float32 parameter and Adam's two moments of each trainable one; a step allocates at least the gradients
        trainable = last["train_trainable_parameters"][variant]
        assert mem["state"] >= 4 * (base_params + 2 * trainable), (variant, mem, base_params, trainable)
        assert mem["step_peak"] >= 4 * trainable, (variant, mem, trainable)
    # FairLoRA's state adds its adapter, detector and prototypes to the same base: more bytes than the base alone
    fair_extra = last["train_memory_bytes"]["fairlora_all_anchors"]["state"] - 4 * base_params
    assert fair_extra >= 4 * 3 * last["train_trainable_parameters"]["fairlora_all_anchors"]
    assert set(last["goals_met"]) == set(bench.GOALS) | set(bench.TRAIN_GOALS) | set(bench.STAGE_GOALS)
    assert "compile" not in last  # torch.compile only with --compile
    # a detector-stage step (stopped at the detector's layer) over a whole forward + backward of the base
    stage = last["stage_medians_ms"]
    assert set(stage) == set(bench.STAGE_VARIANTS) and all(_positive(v) for v in stage.values())
    a, b = stage["fairlora_detector_stage"], stage["base_forward_backward"]
    assert abs(last["detector_step_over_full_forward"] - a / b) <= 0.0005 / b + 0.0005 * a / b**2 + 0.00005
    assert all(isinstance(v, bool) for v in last["goals_met"].values())
    # every variant's steps were real steps: each of its trainable tensors changed, and only its LoRA is trained
    for variant, changed in last["train_params_changed"].items():
        assert changed["changed_tensors"] == changed["trainable_tensors"] > 0, (variant, changed)
    assert last["train_trainable"]["fairlora_all_anchors"] == ["fairlora_A", "fairlora_B"]
    assert last["train_trainable"]["fairlora_anchors10"] == ["fairlora_A", "fairlora_B"]
    assert last["train_trainable"]["lora"] == ["classifier", "lora_A", "lora_B"]  # PEFT's SEQ_CLS head is trained
    assert last["train_anchor_rows"] == {"lora": 0, "lora_nodropout": 0, "fairlora_all_anchors": 10,
                                         "fairlora_anchors10": 2}


def test_overhead_no_train_skips_the_training_part(capsys):
    bench = _load()
    last = bench.main(["--tiny", "--runs", "1", "--warmup", "0", "--batch-size", "4", "--seq-len", "8", "--no-train"])
    assert "train_step_over_lora" not in last and set(last["goals_met"]) == set(bench.GOALS)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train"] is False


def test_each_training_variant_steps_its_own_lora_only():
    bench = _load()
    args = bench.parse_args(["--tiny", "--batch-size", "10", "--seq-len", "12", "--train-batches", "2"])
    load, _, vocab = bench.loader(args.model, args.seed)
    tb = bench.TrainBench(args, load, vocab, torch.device("cpu"), torch.float32)
    try:
        fair = tb.models["fairlora_all_anchors"]
        dropouts = [m for n, m in fair.named_modules() if isinstance(m, torch.nn.Dropout) and "fairlora_" not in n]
        assert dropouts and all(m.p == 0.0 for m in dropouts)  # FairTrainer's frozen base runs without dropout
        for name in bench.TRAIN_VARIANTS:
            trainer = tb.trainers[name]
            before = {v: {k: t.clone() for k, t in m.state_dict().items()} for v, m in tb.models.items()}
            trainable = {n for n, p in tb.models[name].named_parameters() if p.requires_grad}
            tb.calls[name](0)
            tb.calls[name](1)  # LoRA B starts at 0, so A only moves from the second step on
            for variant, model in tb.models.items():
                for key, value in model.state_dict().items():
                    moved = not torch.equal(value, before[variant][key])
                    assert moved == (variant == name and key in trainable), (name, variant, key)
            if name.startswith("fairlora"):
                assert trainer.stage == "lora" and trainer.logged_terms()["contrastive_loss"] > 0  # it ran
                assert all(".fairlora_A.default." in n or ".fairlora_B.default." in n for n in trainable)
        assert tb.skipped_batches() == 0
    finally:
        tb.close()
    assert all(m.p == 0.1 for m in dropouts)  # close() leaves FairTrainer's no-dropout context


def test_cuda_options_give_clear_errors(capsys, monkeypatch):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--tiny"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused even where CUDA exists
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--clock", "cpu", "--threads", "1", "--tiny"])
    err = capsys.readouterr().err
    assert "--clock cpu" in err and "use --clock wall" in err and "--device cuda" in err
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--model", "minilm"])
    assert "alias of --model tiny" in capsys.readouterr().err


_COMPILE_ARGS = ["--tiny", "--runs", "2", "--warmup", "1", "--batch-size", "6", "--seq-len", "8", "--no-train",
                 "--threads", "1", "--compile", "--compile-backend", "eager"]


@pytest.mark.slow  # dynamo traces the whole model four times (explain + compile, base and FairLoRA): about 45 s
def test_compile_variants_are_timed_with_their_eager_twins_and_report_graph_breaks(capsys):
    """--compile (dynamo's eager backend: the real graph capture of the base and of FairLoRA's default path, no code
    generation): both compiled variants ran, their ratios are their medians' ratios, and explain's counts are there."""
    bench = _load()
    last = bench.main(_COMPILE_ARGS)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(last))
    report = last["compile"]
    assert set(report) == set(bench.COMPILED_VARIANTS) == {"base_compiled", "fairlora_default_compiled"}
    for name, entry in report.items():
        assert entry["ok"] is True and entry["backend"] == "eager" and entry["compile_s"] >= 0, (name, entry)
        assert entry["graphs"] >= 1 and entry["graph_breaks"] >= 0 and isinstance(entry["break_reasons"], list)
    med = last["compile_medians_ms"]
    assert set(med) == {"base", "fairlora_default", "base_compiled", "fairlora_default_compiled"}
    for key, (a, b) in {"compiled_base_speedup": ("base", "base_compiled"),
                        "compiled_default_speedup": ("fairlora_default", "fairlora_default_compiled"),
                        "compiled_default_over_base_compiled": ("fairlora_default_compiled", "base_compiled")}.items():
        ratio = last["compile_ratios"][key]
        assert abs(ratio - med[a] / med[b]) <= 0.0005 / med[b] + 0.0005 * med[a] / med[b] ** 2 + 0.00005, key
    assert "torch.compile" in out and "fairlora_default_compiled" in out and "failed" not in out
    assert set(last["medians_ms"]) == set(bench.VARIANTS)  # the eager table is unchanged


def test_a_failed_compile_is_reported_and_the_run_goes_on(capsys, monkeypatch):
    """A compile that raises (here: FairLoRA's, on its first call) leaves its variant out of the timing, puts the
    error in the JSON and the table, and the other compiled variant is still timed. (The base's "compile" returns the
    module itself and explain is stubbed: this checks the run's handling, not dynamo.)"""
    bench = _load()
    import suite.overhead_models as models

    def compile_that_fails_on_fairlora(module, **kwargs):
        if type(module).__name__ == "PeftModelForSequenceClassification":
            def broken(**batch):
                raise RuntimeError("dynamo could not trace the gate\nsecond line")
            return broken
        return module

    monkeypatch.setattr(torch, "compile", compile_that_fails_on_fairlora)
    monkeypatch.setattr(models, "graph_breaks", lambda module, batch: {"graphs": 1, "graph_breaks": 0,
                                                                       "break_reasons": []})
    last = bench.main(_COMPILE_ARGS)
    out = capsys.readouterr().out
    failed = last["compile"]["fairlora_default_compiled"]
    assert failed["ok"] is False and failed["error"].startswith("RuntimeError: dynamo could not trace the gate")
    assert "second line" not in failed["error"]
    assert last["compile"]["base_compiled"]["ok"] is True
    assert set(last["compile_medians_ms"]) == {"base", "fairlora_default", "base_compiled"}
    assert set(last["compile_ratios"]) == {"compiled_base_speedup"}
    assert any(line.startswith("fairlora_default_compiled") and "failed" in line and "RuntimeError" in line
               for line in out.splitlines())
    assert json.loads(out.strip().splitlines()[-1])["compile"]["fairlora_default_compiled"]["ok"] is False
