"""Prototype math of FairNet's stage 3, arrays in and arrays out (no model, no trainer state).

`compute_prototypes` turns the frozen representations z of the training rows, their class and their group estimate
ŝ into the (class × group) means μ_{y,s} that the triplet loss (losses.py) pulls the anchors toward. By default a
majority prototype averages only the majority rows that the frozen model classifies correctly: with a weak or
imbalanced ERM model the plain mean of a class can sit on the wrong side of the head's decision boundary, and
anchors pulled there stay misclassified (docs/method.md §7). `anchor_weights` gives the inverse-class-frequency
weights of the anchors (`anchor_weighting`). FairTrainer calls both and stores the result in the adapter.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def compute_prototypes(z: np.ndarray, labels: np.ndarray, group: np.ndarray, n_classes: int, *,
                       correct: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per (class k, group g) mean of `z`: returns `(prototypes (K, 2, d) float32, counts (K, 2) float32)`.

    `correct` (bool per row, optional): majority prototypes (g = 0) average only the correctly classified rows of
    their cell, falling back to the whole cell when none is correct. `counts` are the rows behind each prototype.
    Raises ValueError when a class has no majority row (the triplet loss needs μ_(y,0) for every class)."""
    z, labels, group = np.asarray(z, dtype=np.float64), np.asarray(labels), np.asarray(group)
    protos = np.zeros((n_classes, 2, z.shape[1]), dtype=np.float64)
    counts = np.zeros((n_classes, 2), dtype=np.float64)
    for g in (0, 1):
        for k in range(n_classes):
            cell = (labels == k) & (group == g)
            if g == 0 and correct is not None and (cell & correct).any():
                cell = cell & correct
            counts[k, g] = cell.sum()
            if cell.any():
                protos[k, g] = z[cell].mean(0)
    missing = [k for k in range(n_classes) if counts[k, 0] == 0]
    if missing:
        raise ValueError(f"No majority-group rows of classes {missing}: the triplet loss needs μ_(y,0) for every class. "
                         "Check the sensitive column (0 = majority) or anchor_source.")
    return protos.astype(np.float32), counts.astype(np.float32)


def anchor_weights(labels: np.ndarray, group: np.ndarray, n_classes: int, how: str = "class_balanced") -> np.ndarray:
    """Per-class weight of the anchors (ŝ = 1) in the LoRA loss, normalised so the anchors' mean weight is 1; 0 for
    classes with no anchor.

    - "class_balanced": N_anchors / (K_present × N_anchors(k)): every class present among the anchors weighs the same,
      so the loss pulls the minority toward balanced accuracy over classes;
    - "majority_prior": P(y = k | ŝ = 0) / P(y = k | ŝ = 1): the anchors' class mix re-weighted to the majority
      group's, so the minority is pulled toward the majority's behaviour (its class prior), not past it;
    - "none": 1 for every class."""
    labels, group = np.asarray(labels), np.asarray(group)
    anchors = np.bincount(labels[group == 1], minlength=n_classes).astype(np.float64)
    present = anchors > 0
    if how == "none":
        weights = present.astype(np.float64)
    elif how == "class_balanced":
        weights = np.where(present, 1.0 / np.maximum(anchors, 1), 0.0)
    elif how == "majority_prior":
        majority = np.bincount(labels[group == 0], minlength=n_classes).astype(np.float64)
        prior = majority / max(majority.sum(), 1.0)
        weights = np.where(present, prior / np.maximum(anchors / anchors.sum(), 1e-12), 0.0)
    else:
        raise ValueError(f"anchor_weighting={how!r}: choose 'class_balanced', 'majority_prior' or 'none'.")
    mean = (weights * anchors).sum() / max(anchors.sum(), 1.0)
    return (weights / mean if mean > 0 else weights).astype(np.float32)
