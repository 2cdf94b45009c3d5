"""Writes tests/fixtures/legacy_adapter/: a small FairLoRA adapter saved by main at the commit named in its
meta.json, with the logits it must reproduce. `tests/test_legacy_adapter.py` loads it, so a refactor that changes the
saved format or the forward is caught. Rerun only to add a new fixture, never to refresh this one.

    .venv/bin/python tests/scripts/make_legacy_adapter.py
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import tiny_batch, tiny_model  # noqa: E402

import fairnet_peft  # noqa: E402,F401
from fairnet_peft import FairLoraConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "legacy_adapter")


def main() -> None:
    model = get_peft_model(tiny_model("bert"), FairLoraConfig(detector_layer=1, threshold=0.33))  # gates rows 0 and 4 of tiny_batch
    torch.manual_seed(3)
    with torch.no_grad():  # every adapter tensor non-trivial, so a load that drops one changes the logits
        for name, param in model.named_parameters():
            if "fairlora_" in name:
                param.normal_(0, 0.3)
        for name, buf in model.named_buffers():
            if "fairlora_prototype" in name:
                buf.normal_(0, 1.0) if buf.dtype.is_floating_point else None
    model.eval()
    batch = tiny_batch("bert")
    with torch.no_grad():
        logits = model(**batch).logits
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in batch.items()}},
              os.path.join(OUT, "expected.safetensors"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump({"saved_by_commit": commit, "base": "tests/helpers.py tiny_model('bert', seed=0)",
                   "torch": torch.__version__, "peft": __import__("peft").__version__}, f, indent=1)


if __name__ == "__main__":
    main()
