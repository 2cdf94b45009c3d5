"""Every sequence- and image-classification family transformers registers, at FairLoRA's defaults: does a mixed gate
work, row by row?

For each model type in transformers' `MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES` and
`MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`, a tiny seeded model is built from its config (random weights, no
download; the sizes below, or the config's own where a size does not apply), wrapped with
`get_peft_model(model, FairLoraConfig(task_type=..., init_weights=False))` and run on four rows (text: one padded)
with the gate forced on, off and mixed. A row passes when the mixed batch gives each row what the forced batch gives
it, and what the row gives alone; the detector must give one risk per row.

Per model type one line: OK, FAIL (with the error, or what differed) or SKIP (the tiny base model itself does not
build or run: a config this scan cannot size, a missing optional library). FAIL is ours to fix or to refuse with an
error that says what to set; SKIP says nothing about FairLoRA.

    python benchmarks/family_scan.py [--kind text|vision|all] [MODEL_TYPE ...]
"""

from __future__ import annotations

import argparse
import signal
import time
import warnings

import torch
import transformers as T
from peft import get_peft_model
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

import fairnet_peft  # noqa: F401  (registers FAIRLORA)
from fairnet_peft import FairLoraConfig, gate_record

TEXT_SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, num_labels=2, pad_token_id=0, max_position_embeddings=64,
                  n_embd=32, n_layer=2, n_head=4, d_model=32, num_layers=2, num_heads=4, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, d_ff=64, d_kv=8, d_inner=64, embedding_size=32, type_vocab_size=2,
                  eos_token_id=2, bos_token_id=1, decoder_start_token_id=0, num_local_experts=4, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                  attention_window=4, intra_bottleneck_size=32, true_hidden_size=32)
IMAGE_SIZE = 64
TIMEOUT_S = 60


class _TimedOut(Exception):
    pass


def _alarm(*_):
    raise _TimedOut


def _config(model_type: str, text: bool):
    config = T.AutoConfig.for_model(model_type)
    sizes = TEXT_SIZES if text else dict(image_size=IMAGE_SIZE, num_labels=2)
    for key, value in sizes.items():
        if text or hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    return config


def _inputs(config, text: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    if text:
        ids = torch.randint(3, 100, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        ids[:, -1] = 2  # an end-of-sequence token for the encoder-decoder heads that pool it
        ids[1, 6], ids[1, 7:], mask[1, 7:] = 2, 0, 0  # row 1 right-padded
        return {"input_ids": ids, "attention_mask": mask}
    size = config.image_size if isinstance(getattr(config, "image_size", None), int) else IMAGE_SIZE
    return {"pixel_values": torch.randn(4, getattr(config, "num_channels", 3), size, size, generator=g)}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of a batch against a single row (relative to the logits' scale)."""
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(scale, 1e-6))


def scan_one(model_type: str, text: bool) -> tuple[str, str]:
    """("OK" | "FAIL" | "SKIP", detail) for one model type."""
    auto = T.AutoModelForSequenceClassification if text else T.AutoModelForImageClassification
    try:
        config = _config(model_type, text)
        torch.manual_seed(0)
        base = auto.from_config(config).eval()
        batch = _inputs(config, text)
        with torch.no_grad():
            logits = base(**batch).logits
        if torch.equal(logits, logits[:1].expand_as(logits)):
            return "SKIP", "the random base gives every row the same logits (nothing to compare)"
    except _TimedOut:
        raise
    except BaseException as err:  # noqa: BLE001 - the base model itself: nothing to say about FairLoRA
        return "SKIP", f"{type(err).__name__}: {str(err)[:100]}"
    try:
        model = get_peft_model(base, FairLoraConfig(task_type="SEQ_CLS" if text else None, init_weights=False)).eval()
        gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
        with torch.no_grad():
            on, off, mixed = (model(**batch, fair_gate=g).logits for g in (torch.ones(4), torch.zeros(4), gate))
            problems = [what for what, ok in (
                ("a gated row differs from the forced-on batch", _close(mixed[gate == 1], on[gate == 1])),
                ("an ungated row differs from the forced-off batch", _close(mixed[gate == 0], off[gate == 0])),
                ("the adapter changes no output", not torch.equal(on, off)))
                if not ok]
            for row in (0, 2, 3):  # row 1 is padded: its positions differ alone
                alone = model(**{k: v[row:row + 1] for k, v in batch.items()}, fair_gate=gate[row:row + 1]).logits
                if not _close(alone[0], mixed[row]):
                    problems.append(f"row {row} alone differs from its row in the mixed batch")
            model(**batch)
            risk = gate_record(model).risk
            if risk is None or tuple(risk.shape) != (4,):
                problems.append(f"the detector gave risk of shape {None if risk is None else tuple(risk.shape)}")
    except _TimedOut:
        raise
    except BaseException as err:  # noqa: BLE001 - any failure is the finding
        return "FAIL", f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return ("FAIL", "; ".join(problems)) if problems else ("OK", "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("text", "vision", "all"), default="all")
    p.add_argument("model_types", nargs="*", help="only these model types (default: every registered one)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    T.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    kinds = {"text": [True], "vision": [False], "all": [True, False]}[a.kind]
    counts: dict[str, int] = {}
    for text in kinds:
        names = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if text else MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        for model_type in sorted(names):
            if a.model_types and model_type not in a.model_types:
                continue
            start = time.time()
            signal.alarm(TIMEOUT_S)
            try:
                status, detail = scan_one(model_type, text)
            except _TimedOut:
                status, detail = "SKIP", f"over {TIMEOUT_S} s"
            finally:
                signal.alarm(0)
            counts[status] = counts.get(status, 0) + 1
            print(f"{'text' if text else 'vision':6s} {model_type:24s} {status:4s} {time.time() - start:5.1f}s {detail}",
                  flush=True)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
