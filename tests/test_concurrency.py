"""Concurrent calls of one FairLoRA model: every forward owns its gates.

Threads (a web server's pool) and asyncio code (executors, `asyncio.to_thread`) call one tiny BERT FairLoRA model
with τ at the median risk, so each batch has gated and ungated rows. Each call's logits and its `gate_record` (read
in the calling thread) are compared with the same batch run alone. Also: `force_gate` and `stop_at_detector` stay in
their own thread/task, checkpoint recomputation in another thread replays the forward's gates, and the row-count
error names its causes.
"""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import get_peft_model
from torch import nn

from fairnet_peft import FairLoraConfig, force_gate, gate_record
from fairnet_peft.tuner.early_exit import stop_at_detector

from .helpers import CustomCheckpointed, tiny_batch, tiny_model

MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autograd": torch.enable_grad,
}


@pytest.fixture(scope="module")
def served():
    """The model (τ at the median risk of a pool of batches of 2-9 rows), the batches, every batch's serial result
    (logits, gate, risk) and the indices of the batches with gated and ungated rows."""
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    rng = random.Random(0)
    batches = [tiny_batch("bert", batch=rng.randint(2, 9), seed=100 + i) for i in range(24)]
    with torch.no_grad(), force_gate(model, False):
        risks = []
        for b in batches:
            model(**b)
            risks.append(gate_record(model).risk)
    model.peft_config["default"].threshold = float(torch.cat(risks).median())
    serial = []
    with torch.no_grad():
        for b in batches:
            logits = model(**b).logits.clone()
            rec = gate_record(model)
            serial.append((logits, rec.gate.clone(), rec.risk.clone()))
    mixed = [i for i, (_, g, _) in enumerate(serial) if 0 < int(g.sum()) < g.numel()]
    assert len(mixed) >= 5  # gated and ungated rows in the same batch
    with torch.no_grad(), force_gate(model, False):
        off = model(**batches[mixed[0]]).logits
    logits, gate, _ = serial[mixed[0]]
    assert torch.equal(off[~gate], logits[~gate]) and not torch.allclose(off[gate], logits[gate])  # LoRA on gated rows
    return model, batches, serial, mixed


def _run_all(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"


def _matches(out, rec, expected) -> bool:
    logits, gate, risk = expected
    return (out.shape == logits.shape and torch.allclose(out, logits, rtol=0, atol=1e-6)
            and torch.equal(rec.gate, gate) and torch.allclose(rec.risk, risk, rtol=0, atol=1e-6))


def test_a_thousand_concurrent_calls_equal_serial_calls(served):
    model, batches, serial, mixed = served
    threads, per_thread = 8, 126  # 1,008 calls, 42 per grad mode per thread
    barrier = threading.Barrier(threads, timeout=60)
    results = [[] for _ in range(threads)]

    def worker(t):
        order = random.Random(t)
        barrier.wait()  # start together
        for k in range(per_thread):
            i, mode = order.randrange(len(batches)), list(MODES)[k % 3]
            try:
                with MODES[mode]():
                    out = model(**batches[i]).logits
                rec = gate_record(model)
                results[t].append(("ok" if _matches(out.detach(), rec, serial[i]) else "mismatch", mode, i))
            except Exception as err:  # counted, not raised: the test reports every failure at once
                results[t].append((f"{type(err).__name__}: {err}"[:200], mode, i))

    _run_all([threading.Thread(target=worker, args=(t,)) for t in range(threads)])
    calls = [r for rs in results for r in rs]
    assert len(calls) == threads * per_thread >= 1000
    assert {mode for _, mode, _ in calls} == set(MODES)
    assert len({batches[i]["input_ids"].shape[0] for _, _, i in calls}) >= 5  # mixed batch sizes
    bad = [c for c in calls if c[0] != "ok"]
    assert not bad, f"{len(bad)} of {len(calls)} calls differ from serial calls or raised, e.g. {bad[:3]}"


def test_gate_record_in_each_thread_is_that_threads_call(served):
    """All threads finish their call before any reads its record: each still gets its own."""
    model, batches, serial, mixed = served
    threads = 8
    done = threading.Barrier(threads, timeout=60)
    got = {}

    def worker(t):
        try:
            with torch.no_grad():
                out = model(**batches[t]).logits
        except Exception as err:
            got[t] = repr(err)
        done.wait()  # every other thread has run its forward since
        if t not in got:
            try:
                got[t] = _matches(out, gate_record(model), serial[t])
            except Exception as err:
                got[t] = repr(err)

    _run_all([threading.Thread(target=worker, args=(t,)) for t in range(threads)])
    assert got == {t: True for t in range(threads)}
    with pytest.raises(ValueError, match="No gate recorded.*in this thread"):  # a fresh thread has no last pass
        with ThreadPoolExecutor(1) as ex:
            ex.submit(gate_record, model).result()


def test_force_gate_in_one_thread_does_not_affect_another(served):
    model, batches, serial, mixed = served
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def forcing():
        with force_gate(model, True):
            entered.set()
            checked.wait(timeout=30)
            with torch.no_grad():
                model(**batches[1])
            seen["forcing"] = gate_record(model)

    def plain():
        entered.wait(timeout=30)
        try:
            with torch.no_grad():
                out = model(**batches[mixed[0]]).logits
            seen["plain"] = _matches(out, gate_record(model), serial[mixed[0]]), gate_record(model).source
        finally:
            checked.set()

    _run_all([threading.Thread(target=forcing), threading.Thread(target=plain)])
    assert seen["plain"] == (True, "detector")
    assert seen["forcing"].source == "forced" and bool(seen["forcing"].gate.all())


def test_asyncio_executors_give_serial_results_and_force_gate_stays_in_its_task(served):
    model, batches, serial, mixed = served

    def call(i):
        with torch.no_grad():
            out = model(**batches[i]).logits
        rec = gate_record(model)  # read in the worker thread that ran the forward
        return i, out, rec

    async def via_executor(loop, pool, idx):
        return [await loop.run_in_executor(pool, call, i) for i in idx]

    async def via_to_thread(idx):
        return [await asyncio.to_thread(call, i) for i in idx]

    async def forced_task(entered, released):
        with force_gate(model, False):
            entered.set()
            await asyncio.wait_for(released.wait(), timeout=120)  # other tasks run their calls while this block is open
            _, out, rec = await asyncio.to_thread(call, mixed[2])  # to_thread copies the context: forced here
        return out, rec

    async def main():
        loop = asyncio.get_running_loop()
        entered, released = asyncio.Event(), asyncio.Event()
        forced = asyncio.create_task(forced_task(entered, released))
        await entered.wait()
        try:
            with ThreadPoolExecutor(4) as pool:
                rng = random.Random(0)
                jobs = [via_executor(loop, pool, [rng.randrange(len(batches)) for _ in range(12)]) for _ in range(4)]
                jobs += [via_to_thread([rng.randrange(len(batches)) for _ in range(12)]) for _ in range(4)]
                runs = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            released.set()
        return runs, await forced

    runs, (forced_out, forced_rec) = asyncio.run(main())
    failed = [run for run in runs if isinstance(run, BaseException)]
    assert not failed, f"{len(failed)} of {len(runs)} coroutines raised, e.g. {failed[0]!r}"
    calls = [c for run in runs for c in run]
    assert len(calls) == 96
    bad = [i for i, out, rec in calls if not _matches(out, rec, serial[i])]
    assert not bad, f"{len(bad)} of {len(calls)} calls differ from serial calls"
    assert forced_rec.source == "forced" and not forced_rec.gate.any()
    with torch.no_grad(), force_gate(model, False):
        torch.testing.assert_close(forced_out, model(**batches[mixed[2]]).logits, rtol=0, atol=0)
    assert not torch.allclose(forced_out, serial[mixed[2]][0])


def test_stop_at_detector_in_one_thread_lets_other_threads_run_to_the_end(served):
    model, batches, serial, mixed = served
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def stopping():
        with torch.no_grad(), force_gate(model, False), stop_at_detector(model, "default") as stop:
            entered.set()
            checked.wait(timeout=30)
            model(**batches[4])
        seen["stop"] = stop.record

    def plain():
        entered.wait(timeout=30)
        try:
            with torch.no_grad():
                out = model(**batches[mixed[1]]).logits
            seen["plain"] = _matches(out, gate_record(model), serial[mixed[1]])
        except Exception as err:
            seen["plain"] = repr(err)
        checked.set()

    _run_all([threading.Thread(target=stopping), threading.Thread(target=plain)])
    assert seen["plain"] is True
    torch.testing.assert_close(seen["stop"].risk, serial[4][2], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- backward in another thread
def _run_in_thread(fn):
    out = {}
    _run_all([threading.Thread(target=lambda: out.setdefault("value", fn()))])
    return out["value"]


def test_checkpoint_recompute_in_another_thread_replays_the_forwards_gates():
    """The forward runs in one thread and the backward (with its checkpoint recomputation) in another, as autograd's
    device threads do on a GPU: the gradients equal a plain forward + backward."""
    batch, labels = tiny_batch("bert"), torch.tensor([0, 1, 0, 1, 0, 1])
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(task_type="SEQ_CLS", init_weights=False))
    with torch.no_grad(), force_gate(model, False):
        model.eval()(**batch)
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model(**batch, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert 0 < int(gate_record(model).gate.sum()) < 6
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss = _run_in_thread(lambda: model(**batch, labels=labels).loss)
    loss.backward()  # this thread has no pass and no record of its own
    assert any("fairlora_B" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7)


def test_custom_checkpoint_recompute_in_another_thread_uses_the_forwards_gate():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for use_checkpoint in (False, True):
        model = get_peft_model(CustomCheckpointed(use_checkpoint), FairLoraConfig(target_modules=["mid"],
                                                                             init_weights=False)).train()
        out = _run_in_thread(lambda: model(x, fair_gate=torch.tensor([1, 0, 1, 0])))
        out.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("fairlora_B" in k for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- the row-count error
class _Folding(nn.Module):
    """Folds the batch into the rows of `mid` ((B, T, d) → (B·T, d)), as a custom reshaping layer does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        b, t, d = h.shape
        h = self.mid(h.reshape(b * t, d)).reshape(b, t, d)
        return self.out(h.mean(1))


def test_row_count_error_names_the_folded_layout_and_the_inner_call():
    model = get_peft_model(_Folding(), FairLoraConfig(target_modules=["mid"], init_weights=False))
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        model(x, fair_gate=torch.ones(4))  # a uniform gate applies to any layout
        with pytest.raises(RuntimeError) as err:
            model(x, fair_gate=torch.tensor([1, 0, 1, 0]))
    message = str(err.value)
    assert "12 rows" in message and "gate has 4" in message
    assert "folds the batch" in message and "target_modules" in message and "windowed = True" in message
    assert "inner module" in message and "another batch" in message
    for layer in model.modules():
        if hasattr(layer, "windowed"):
            layer.windowed = True  # rows are example-major: 3 consecutive rows per example
    with torch.no_grad():
        mixed = model(x, fair_gate=torch.tensor([1, 0, 1, 0]))
        on, off = model(x, fair_gate=torch.ones(4)), model(x, fair_gate=torch.zeros(4))
    torch.testing.assert_close(mixed, torch.where(torch.tensor([1, 0, 1, 0]).bool()[:, None], on, off))
