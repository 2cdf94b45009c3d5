"""Evaluation: what the public metrics (`fairnet_peft.metrics`) are built on, and what presents them.

counting.py (inputs, logits → labels, the one (group × label × prediction) count) → `fairnet_peft.metrics`
(fairlearn-style metrics and `evaluate_predictions`, the one path from model outputs to the metric dict) → sweep.py
(every τ from two passes), report.py (Markdown table and card section), model_card.py (writes the card), plots.py,
bootstrap.py. counting, bootstrap and report (and `fairnet_peft.metrics`) import no torch.
"""
