"""benchmarks/overhead.py runs end to end on a tiny model and ends with one JSON line (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "overhead.py")


def _load():
    spec = importlib.util.spec_from_file_location("fairnet_overhead_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_quick_tiny_prints_json_last(capsys):
    bench = _load()
    threads = torch.get_num_threads()
    result = bench.main(["--quick", "--tiny", "--batch-size", "10", "--seq-len", "12"])
    assert torch.get_num_threads() == threads  # the thread setting is restored
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(result))
    for key in ("fairlora_over_lora", "fairlora_over_base", "nogate_over_base", "gate10_over_base", "medians_ms"):
        assert key in last, key
    assert set(last["medians_ms"]) == set(bench.VARIANTS)
    assert all(v > 0 for v in last["medians_ms"].values())
    assert last["gate_rates"]["fairlora_all"] == 1.0 and last["gate_rates"]["fairlora_nogate"] == 0.0
    assert last["gate_rates"]["fairlora_gate10"] == 0.1
    assert last["adapted_modules"] == 4  # query/value of blocks 2-3 of the 4-block tiny BERT, for LoRA and FairLoRA
