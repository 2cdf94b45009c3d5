"""Evaluation: fairness metrics, the gate-threshold sweep, plots and the model-card report."""
