"""Two-stage training (detector, then LoRA) and what it computes: arguments, losses, prototypes, pseudo-labels."""
