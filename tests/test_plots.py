"""Tests for fairnet_peft.evaluation.plots: PNGs of the right size that actually show the data."""

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from fairnet_peft import metrics as M
from fairnet_peft.evaluation import plots


def _rgb(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size, np.asarray(img.convert("RGB")).astype(int)


def _has_colour(pixels, colour, min_pixels=50):
    """At least `min_pixels` pixels within a small distance of matplotlib colour `colour`."""
    target = np.array(to_rgb(colour)) * 255
    return int((np.abs(pixels - target).max(axis=2) <= 6).sum()) >= min_pixels


def _not_blank(pixels):
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def _results(seed=0):
    rng = np.random.default_rng(seed)
    y, s = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    erm = np.where(rng.random(400) < np.where(s == 1, 0.6, 0.9), y, 1 - y)
    fair = np.where(rng.random(400) < 0.85, y, 1 - y)
    return {
        "ERM": M.group_accuracies(y, erm, sensitive_features=s),
        "FairNet": M.group_accuracies(y, fair, sensitive_features=s),
    }


def test_plot_group_accuracies(tmp_path):
    out = plots.plot_group_accuracies(_results(), tmp_path / "nested" / "groups.png")
    assert out == tmp_path / "nested" / "groups.png" and out.is_file()
    size, px = _rgb(out)
    assert size == (680, 450)  # 4 cells x 2 models: 0.6 * 8 + 2 inches wide at 100 dpi
    _not_blank(px)
    assert _has_colour(px, "C0", 2000) and _has_colour(px, "C1", 2000)  # one bar colour per model
    assert not _has_colour(px, "C2")  # no third model


def test_plot_group_accuracies_accepts_flat_metrics_and_missing_cells(tmp_path):
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 3, 300), rng.integers(0, 2, 300)
    flat = {f"eval_{k}": v for k, v in M.fairness_summary(y, y, sensitive_features=s).items()}
    partial = {"y=0,s=0": {"accuracy": 0.5, "count": 10}}
    out = plots.plot_group_accuracies({"a": flat, "b": partial, "c": _results()["ERM"]}, tmp_path / "g.png")
    size, px = _rgb(out)
    assert size[1] == 450 and size[0] > 680  # 6 cells x 3 models is wider
    _not_blank(px)
    assert _has_colour(px, "C0", 2000) and _has_colour(px, "C1", 200) and _has_colour(px, "C2", 2000)
    with pytest.raises(ValueError):
        plots.plot_group_accuracies({}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.plot_group_accuracies({"a": {"eval_loss": 0.1}}, tmp_path / "x.png")


def test_cells_are_labelled_with_class_names_and_counts(tmp_path):
    results = _results()
    per_model = {name: plots._cell_accuracies(r) for name, r in results.items()}
    cells = sorted(per_model["ERM"])
    labels = plots._cell_labels(cells, per_model, ["<=50K", ">50K"])
    counts = [results["ERM"][c]["count"] for c in cells]
    assert labels == [f"y={name},s={g}\nn={n}" for (name, g), n in
                      zip([("<=50K", 0), ("<=50K", 1), (">50K", 0), (">50K", 1)], counts)]
    assert plots._cell_labels(cells, per_model, None)[0] == f"y=0,s=0\nn={counts[0]}"  # no names: the ids
    out = plots.plot_group_accuracies(results, tmp_path / "named.png", class_names=["<=50K", ">50K"])
    assert _rgb(out)[0] == (680, 450)


def test_plot_threshold_sweep(tmp_path):
    taus = np.linspace(0, 1, 11)[::-1]  # unsorted input is fine
    sweep = [dict(threshold=t, accuracy=0.9 - 0.02 * t, worst_group_accuracy=0.6 + 0.2 * t,
                  tpr=1 - t, fpr=(1 - t) ** 2) for t in taus]
    out = plots.plot_threshold_sweep(sweep, str(tmp_path / "sweep.png"), chosen_threshold=0.5)
    assert out.is_file()
    size, px = _rgb(out)
    assert size == (650, 600)
    _not_blank(px)
    for colour in ("C0", "C3", "C2", "C1"):  # ACC, WGA, TPR, FPR lines
        assert _has_colour(px, colour, 100), colour
    # the panels are stacked: ACC/WGA colours only in the top half, TPR/FPR only in the bottom half
    top, bottom = px[:300], px[300:]
    assert _has_colour(top, "C3", 100) and not _has_colour(bottom, "C3", 20)
    assert _has_colour(bottom, "C2", 100) and not _has_colour(top, "C2", 20)


def test_plot_threshold_sweep_validates(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_threshold_sweep([], tmp_path / "s.png")
    with pytest.raises(ValueError, match="fpr"):
        plots.plot_threshold_sweep([dict(threshold=0.5, accuracy=0.9, worst_group_accuracy=0.7, tpr=0.8)],
                                   tmp_path / "s.png")
