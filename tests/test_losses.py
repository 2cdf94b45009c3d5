"""Unit tests of fairnet_peft/training/losses.py on hand-computed cases.

Eq. 1 (class-balanced BCE): −1 rows are ignored, pos_weight scales the positive term only.
Eq. 2 (prototype triplet loss): 2-D prototypes on the unit circle, μ0 = (1, 0), μ1 = (0, 1), μ2 = (−1, 0), so every
distance is known in closed form: |μ0 − μ1| = √2, |μ0 − μ2| = 2 (Euclidean); 2 and 4 (squared); 1 and 2 (cosine).
"""

from __future__ import annotations

import math

import pytest
import torch

from fairnet_peft.training.losses import class_balanced_bce, pairwise_distance, prototype_triplet_loss

R2 = math.sqrt(2.0)
PROTOS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def _loss(z, labels, *, margin=0.5, protos=PROTOS, **kwargs):
    loss, active = prototype_triplet_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(labels), protos,
                                          margin=margin, **kwargs)
    return float(loss), active


# ---------------------------------------------------------------------------------------------- Eq. 1
def test_bce_hand_computed_value_with_pos_weight():
    risk = torch.tensor([0.8, 0.3, 0.6])
    target = torch.tensor([1, 0, 1])
    expected = -(3.0 * math.log(0.8) + math.log(1 - 0.3) + 3.0 * math.log(0.6)) / 3
    assert float(class_balanced_bce(risk, target, pos_weight=3.0)) == pytest.approx(expected, rel=1e-6)
    # pos_weight touches only the positive rows: on a negative-only batch it makes no difference
    neg = torch.tensor([0, 0, 0])
    assert float(class_balanced_bce(risk, neg, 1.0)) == pytest.approx(float(class_balanced_bce(risk, neg, 50.0)))
    assert float(class_balanced_bce(risk, neg, 1.0)) == pytest.approx(
        -(math.log(0.2) + math.log(0.7) + math.log(0.4)) / 3, rel=1e-6)


def test_bce_ignores_unknown_rows_and_their_risk():
    target = torch.tensor([1, -1, 0, -1])
    a = class_balanced_bce(torch.tensor([0.9, 0.01, 0.2, 0.99]), target, 2.0)
    b = class_balanced_bce(torch.tensor([0.9, 0.77, 0.2, 0.33]), target, 2.0)  # only the −1 rows' risk changed
    expected = -(2.0 * math.log(0.9) + math.log(0.8)) / 2  # the mean is over the 2 known rows, not 4
    assert float(a) == pytest.approx(expected, rel=1e-6) and float(b) == pytest.approx(expected, rel=1e-6)


def test_bce_all_unknown_is_zero_with_a_gradient_path_and_extremes_stay_finite():
    risk = torch.tensor([0.4, 0.7], requires_grad=True)
    loss = class_balanced_bce(risk, torch.tensor([-1, -1]), 5.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(2))
    # p = 0 for a positive and p = 1 for a negative: clamped, so finite (log(1e-6) ≈ −13.8)
    hard = class_balanced_bce(torch.tensor([0.0, 1.0]), torch.tensor([1, 0]), 1.0)
    assert math.isfinite(float(hard)) and float(hard) == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_bce_gradient_matches_the_closed_form():
    p = torch.tensor([0.25, 0.5], requires_grad=True)
    class_balanced_bce(p, torch.tensor([1, 0]), 4.0).backward()
    # d/dp of −(w log p)/2 is −w/(2p); of −log(1−p)/2 is 1/(2(1−p))
    assert p.grad.tolist() == pytest.approx([-4.0 / (2 * 0.25), 1.0 / (2 * 0.5)], rel=1e-5)


# ---------------------------------------------------------------------------------------------- distances
@pytest.mark.parametrize("distance, row", [("euclidean", [0.0, R2, 2.0]), ("squared_euclidean", [0.0, 2.0, 4.0]),
                                           ("cosine", [0.0, 1.0, 2.0])])
def test_pairwise_distance_on_the_unit_circle_and_normalises_inputs(distance, row):
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # lengths 3 and 0.5: only the direction counts
    dist = pairwise_distance(z, PROTOS * 7.0, distance)
    assert dist.shape == (2, 3)
    assert dist[0].tolist() == pytest.approx(row, abs=1e-5)
    assert dist[1].tolist() == pytest.approx([row[1], row[0], row[1]], abs=1e-5)


def test_unknown_distance_and_strategy_are_refused():
    with pytest.raises(ValueError, match="distance='manhattan'"):
        _loss([[1.0, 0.0]], [1], distance="manhattan")
    with pytest.raises(ValueError, match="negative_strategy='hardest'"):
        _loss([[1.0, 0.0]], [1], negative_strategy="hardest")


# ---------------------------------------------------------------------------------------------- Eq. 2
@pytest.mark.parametrize("distance, pos, near", [("euclidean", R2, 0.0), ("squared_euclidean", 2.0, 0.0),
                                                 ("cosine", 1.0, 0.0)])
def test_nearest_negative_each_distance(distance, pos, near):
    # z on μ0 with label 1: positive μ1, nearest other-class prototype μ0 (distance 0), not μ2
    loss, active = _loss([[1.0, 0.0]], [1], margin=0.5, distance=distance)
    assert loss == pytest.approx(pos - near + 0.5, abs=1e-5) and active == 1.0


def test_all_negatives_average_the_hinges_and_drop_inactive_ones():
    # pos = √2; negatives μ0 (0) and μ2 (2): hinges [√2 + m]_+ and [√2 − 2 + m]_+
    loss, active = _loss([[1.0, 0.0]], [1], margin=0.5, negative_strategy="all")
    assert loss == pytest.approx((R2 + 0.5 + 0.0) / 2, abs=1e-5) and active == 1.0
    loss, _ = _loss([[1.0, 0.0]], [1], margin=1.0, negative_strategy="all")
    assert loss == pytest.approx((R2 + 1.0 + (R2 - 2.0 + 1.0)) / 2, abs=1e-5)
    # with two classes "all" and "nearest" agree
    two = PROTOS[:2]
    for z, y in (([[0.6, 0.8]], [0]), ([[-0.3, 1.0]], [1])):
        assert _loss(z, y, protos=two, negative_strategy="all")[0] == pytest.approx(
            _loss(z, y, protos=two, negative_strategy="nearest")[0], abs=1e-6)


def test_random_negative_is_another_class_and_reproducible_with_a_seeded_generator():
    z = torch.tensor([[1.0, 0.0]] * 64)
    labels = torch.ones(64, dtype=torch.long)
    # per anchor the hinge is √2 − 0 + m (negative μ0) or √2 − 2 + m (negative μ2), never the anchor's own class
    margin = 1.0
    h0, h2 = R2 + margin, R2 - 2.0 + margin

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        loss, active = prototype_triplet_loss(z, labels, PROTOS, margin=margin, negative_strategy="random", generator=g)
        return float(loss), active

    loss, active = run(0)
    frac0 = (loss - h2) / (h0 - h2)  # the loss is the mean of the two hinge values: solve for the share of μ0
    assert 0.2 < frac0 < 0.8, frac0  # both other classes are drawn (64 draws from a fair coin)
    assert frac0 * 64 == pytest.approx(round(frac0 * 64), abs=1e-3)  # a whole number of anchors drew μ0
    assert active == 1.0  # both hinges are positive at m = 1
    assert run(0) == (loss, active) and run(1) != (loss, active)
    # a single anchor: exactly one of the two hinge values, and over seeds both occur
    values = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        one, _ = prototype_triplet_loss(z[:1], labels[:1], PROTOS, margin=margin, negative_strategy="random",
                                        generator=g)
        values.add(round(float(one), 5))
    assert values == {round(h0, 5), round(h2, 5)}


def test_margin_switches_the_hinge_on_and_off():
    # z on μ1 with label 1: pos = 0, nearest negative √2: hinge [m − √2]_+
    for margin, expected in ((0.5, 0.0), (1.4, 0.0), (1.5, 1.5 - R2), (3.0, 3.0 - R2)):
        loss, active = _loss([[0.0, 1.0]], [1], margin=margin)
        assert loss == pytest.approx(expected, abs=1e-5), margin
        assert active == (1.0 if expected > 1e-6 else 0.0)
    # two anchors, one active one not: the active fraction is 1/2
    loss, active = _loss([[0.0, 1.0], [1.0, 0.0]], [1, 1], margin=0.5)
    assert active == 0.5 and loss == pytest.approx((0.0 + R2 + 0.5) / 2, abs=1e-5)


def test_anchor_weights_give_a_weighted_mean():
    z, y = [[0.0, 1.0], [1.0, 0.0]], [1, 1]  # hinges 0 and √2 + 0.5 at m = 0.5
    h = [0.0, R2 + 0.5]
    for w in ([1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [0.0, 2.0]):
        loss, _ = _loss(z, y, weights=torch.tensor(w))
        assert loss == pytest.approx((w[0] * h[0] + w[1] * h[1]) / sum(w), abs=1e-5), w
    # scale-free: weights 2·w give the same loss; equal weights equal the unweighted mean
    assert _loss(z, y, weights=torch.tensor([6.0, 2.0]))[0] == pytest.approx(_loss(z, y, weights=torch.tensor([3.0, 1.0]))[0])
    assert _loss(z, y, weights=torch.tensor([4.0, 4.0]))[0] == pytest.approx(_loss(z, y)[0], abs=1e-6)


def test_fewer_than_two_classes_is_refused():
    with pytest.raises(ValueError, match="at least two classes"):
        _loss([[1.0, 0.0]], [0], protos=PROTOS[:1])


def test_no_anchors_gives_zero_with_a_gradient_path():
    z = torch.zeros(0, 2, requires_grad=True)
    loss, active = prototype_triplet_loss(z, torch.zeros(0, dtype=torch.long), PROTOS, margin=0.5)
    assert float(loss.detach()) == 0.0 and active == 0.0 and loss.requires_grad
    loss.backward()


@pytest.mark.parametrize("strategy", ["nearest", "all", "random"])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_gradient_reaches_the_anchor_and_pulls_it_towards_its_prototype(strategy, distance):
    z = torch.tensor([[1.0, 0.2], [0.3, 1.0]], requires_grad=True)
    protos = PROTOS.clone().requires_grad_(True)  # the prototypes are buffers: they get a gradient but are not trained
    g = torch.Generator().manual_seed(0)
    # m = 4.5 exceeds every distance (at most 4), so every hinge is active whichever negative is drawn
    loss, _ = prototype_triplet_loss(z, torch.tensor([1, 0]), protos, margin=4.5, distance=distance,
                                     negative_strategy=strategy, generator=g)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        stepped = z - 0.05 * z.grad
    g = torch.Generator().manual_seed(0)
    after, _ = prototype_triplet_loss(stepped, torch.tensor([1, 0]), protos.detach(), margin=4.5, distance=distance,
                                      negative_strategy=strategy, generator=g)
    assert float(after.detach()) < float(loss.detach())


def test_gradient_is_zero_for_an_inactive_hinge_and_finite_at_zero_distance():
    z = torch.tensor([[0.0, 1.0]], requires_grad=True)  # on its own prototype: pos distance 0 (sqrt's kink)
    loss, active = prototype_triplet_loss(z, torch.tensor([1]), PROTOS, margin=0.5)
    loss.backward()
    assert active == 0.0 and torch.equal(z.grad, torch.zeros(1, 2))
    z = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, _ = prototype_triplet_loss(z, torch.tensor([1]), PROTOS, margin=3.0)  # active, pos distance still 0
    loss.backward()
    assert torch.isfinite(z.grad).all()
