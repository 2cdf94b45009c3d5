"""torch.compile of a FairLoRA PeftModel on its default inference path (the detector gates some rows).

The compiled forward must trace as one graph like the base model (`torch._dynamo.explain`: no more graph breaks, as
many graphs), give the eager logits and gate record, and keep per-thread gates when the compiled model is called
from several threads. Forced gates (`force_gate`) cost a graph break (the block is read outside the graph) and stay
correct.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model

from fairnet_peft import FairLoraConfig, force_gate, gate_record

from .helpers import tiny_batch, tiny_model


@pytest.fixture(scope="module")
def gated():
    """Tiny BERT FairLoRA with τ at the median risk of the batch, and its eager logits and record."""
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    batch = tiny_batch("bert")
    with torch.no_grad(), force_gate(model, False):
        model(**batch)
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())
    with torch.no_grad():
        logits = model(**batch).logits
    record = gate_record(model)
    assert 0 < record.n_on < 6
    return model, batch, logits, record


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_forward_has_no_more_graph_breaks_than_the_base_model(gated):
    model, batch, _, record = gated
    with torch.no_grad():
        base = torch._dynamo.explain(tiny_model("bert"))(**batch)
        torch._dynamo.reset()
        fair = torch._dynamo.explain(model)(**batch)
    reasons = [r.reason.splitlines()[0] for r in fair.break_reasons]
    assert fair.graph_break_count <= base.graph_break_count, reasons
    assert fair.graph_count == base.graph_count >= 1  # traced, not skipped
    assert fair.op_count > base.op_count  # the detector and the LoRA updates are in the graph
    assert torch.equal(gate_record(model).gate, record.gate)  # the traced pass published its record


def test_compiled_logits_and_record_equal_eager(gated):
    model, batch, logits, record = gated
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(**batch).logits
    torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    rec = gate_record(model)
    assert torch.equal(rec.gate, record.gate) and rec.source == "detector"
    torch.testing.assert_close(rec.risk, record.risk, rtol=1e-5, atol=1e-6)


def test_compiled_model_called_from_threads_keeps_each_calls_gates(gated):
    model, _, _, _ = gated
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing and side effects; no code generation
    batches = [tiny_batch("bert", seed=10 + n) for n in range(4)]  # one shape: one compilation
    serial = []
    with torch.no_grad():
        for b in batches:
            serial.append((model(**b).logits, gate_record(model).gate))
        compiled(**batches[0])  # compile once before the threads start
    assert len({tuple(g.tolist()) for _, g in serial}) > 1  # the calls differ in their gates
    bad, errors = [], []

    def worker(t):
        try:
            for k in range(12):
                i = (t + k) % len(batches)
                with torch.no_grad():
                    out = compiled(**batches[i]).logits
                if not (torch.allclose(out, serial[i][0], atol=1e-6) and torch.equal(gate_record(model).gate,
                                                                                    serial[i][1])):
                    bad.append((t, i))
        except Exception as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors and not bad


def test_compiled_forward_under_force_gate_and_after_it(gated):
    model, batch, logits, record = gated
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        with force_gate(model, True):
            out = compiled(**batch).logits
            ref = model(**batch).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert not torch.allclose(out, logits)
        assert gate_record(model).source == "forced" and bool(gate_record(model).gate.all())
        after = compiled(**batch).logits  # the block is closed: the detector gates again
    torch.testing.assert_close(after, logits, rtol=0, atol=1e-6)
    assert torch.equal(gate_record(model).gate, record.gate)
