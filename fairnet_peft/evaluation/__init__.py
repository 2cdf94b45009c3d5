"""Evaluation: fairness metrics, the gate-threshold sweep, plots and the model-card report.

counting.py (inputs, logits → labels, the one (group × label × prediction) count) → metrics.py (fairlearn-style
metrics and `evaluate_predictions`, the one path from model outputs to the metric dict) → sweep.py (every τ from two
passes), report.py (Markdown table and card section), model_card.py (writes the card), plots.py, bootstrap.py.
counting, metrics, bootstrap and report import no torch.
"""
