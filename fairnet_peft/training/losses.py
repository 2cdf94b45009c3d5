"""FairNet's two losses.

Eq. 1, class-balanced BCE for the detector: L_D = −mean_i [ w1·s_i·log p_i + (1 − s_i)·log(1 − p_i) ],
with w1 = N_{s=0} / N_{s=1} from the whole training set (not per batch), over rows with a known (or pseudo) label.

Eq. 2, triplet loss of an anchor (a minority row, LoRA on) against the majority prototypes:
L_C = [ D(z_a, μ_{y_a,0}) − D(z_a, μ_{y',0}) + m ]_+ averaged over anchors, where the negative prototype μ_{y',0} is
the nearest other-class majority prototype ("nearest", any number of classes), every other class ("all": mean of
the hinges) or a random other class ("random"). Features and prototypes are L2-normalised first; D is the
Euclidean ("euclidean"), squared Euclidean ("squared_euclidean") or cosine (1 − cos, "cosine") distance.

Both losses compute in fp32 with autocast off (`_fp32`): under `bf16=True` a risk of 0.998 would round to 1 and the
anchor-prototype matmul would run in bf16, whose ~3 significant digits swamp the margin between two distances.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _fp32(*tensors: torch.Tensor):
    """`tensors` as fp32 (fp64 stays fp64), plus a context with autocast off on their device."""
    cast = tuple(t.float() if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
    device = tensors[0].device.type if tensors else "cpu"
    return cast, torch.autocast(device_type=device, enabled=False)


def class_balanced_bce(risk: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Eq. 1 on the rows whose target is 0 or 1 (rows with −1 are ignored); 0 with a grad path if none remain.
    Masked, not indexed: no data-dependent shape, so no host sync in a training step."""
    (risk,), no_autocast = _fp32(risk)
    with no_autocast:
        known = (target >= 0).to(risk.dtype)
        p = risk.clamp(1e-6, 1 - 1e-6)
        s = target.clamp_min(0).to(p.dtype)
        per_row = -(pos_weight * s * torch.log(p) + (1 - s) * torch.log(1 - p))
        return (per_row * known).sum() / known.sum().clamp_min(1.0)


def pairwise_distance(z: torch.Tensor, protos: torch.Tensor, distance: str) -> torch.Tensor:
    """Distances (A, P) in fp32 between L2-normalised anchors z (A, d) and prototypes (P, d)."""
    (z, protos), no_autocast = _fp32(z, protos)
    with no_autocast:
        z, protos = F.normalize(z, dim=-1), F.normalize(protos.to(z.dtype), dim=-1)
        if distance == "cosine":
            return 1.0 - z @ protos.T
        sq = (z.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
        if distance == "squared_euclidean":
            return sq
        if distance == "euclidean":
            return sq.clamp_min(1e-12).sqrt()
    raise ValueError(f"distance={distance!r}: choose 'euclidean', 'squared_euclidean' or 'cosine'.")


def prototype_triplet_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    majority_prototypes: torch.Tensor,
    *,
    margin: float,
    distance: str = "euclidean",
    negative_strategy: str = "nearest",
    weights: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2. Returns (loss, fraction of anchors whose hinge is active, a detached 0-dim tensor: reading it is left
    to the caller, so a training step makes no host sync).

    Args:
        z: (A, d) anchor representations computed with the LoRA on.
        labels: (A,) class of each anchor.
        majority_prototypes: (K, d) μ_{k,0}, the majority-group prototype of every class.
        weights: optional (A,) anchor weights (class-balanced anchors); the loss is their weighted mean of the hinges.
    With no anchors (A = 0) the loss is 0 with a gradient path (not the NaN of an empty mean).
    """
    n_classes = majority_prototypes.shape[0]
    if n_classes < 2:
        raise ValueError("The triplet loss needs at least two classes (a negative prototype of another class).")
    if z.shape[0] == 0:
        return z.sum() * 0.0, z.new_zeros(())
    dist = pairwise_distance(z, majority_prototypes, distance)  # (A, K), fp32
    pos = dist.gather(1, labels.view(-1, 1)).squeeze(1)
    other = torch.ones_like(dist, dtype=torch.bool).scatter_(1, labels.view(-1, 1), False)
    if negative_strategy == "nearest":
        neg = dist.masked_fill(~other, float("inf")).min(dim=1).values
        hinge = F.relu(pos - neg + margin)
    elif negative_strategy == "all":
        per = F.relu(pos.unsqueeze(1) - dist + margin) * other
        hinge = per.sum(1) / other.sum(1)
    elif negative_strategy == "random":
        where = generator.device if generator is not None else "cpu"  # a generator draws on its own device
        offset = torch.randint(1, n_classes, labels.shape, generator=generator, device=where).to(labels.device)
        neg = dist.gather(1, ((labels + offset) % n_classes).view(-1, 1)).squeeze(1)
        hinge = F.relu(pos - neg + margin)
    else:
        raise ValueError(f"negative_strategy={negative_strategy!r}: choose 'nearest', 'all' or 'random'.")
    active = (hinge.detach() > 0).float().mean()
    if weights is not None:
        w = weights.to(hinge.dtype)
        return (hinge * w).sum() / w.sum().clamp_min(1e-12), active
    return hinge.mean(), active
