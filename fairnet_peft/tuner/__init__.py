"""The FairLoRA PEFT method: config, conditional LoRA layer, bias detector, per-pass gate, head representation."""
