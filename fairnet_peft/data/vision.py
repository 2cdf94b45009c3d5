"""The image datasets: scikit-learn digits composed onto scikit-learn sample photos (no downloads).

``load_digits_backgrounds`` makes the background the group (a rare 'flower' background, mostly with label 0 in
train); ``load_waterbirds_style`` makes the background a spurious attribute of balanced labels (Waterbirds' four
groups). Both follow one recipe (``_compose_splits``): disjoint digit pools per split → rows drawn per (label,
background) cell → shuffled → each row drawn onto a random photo crop → ``pixel_values`` float32 (3, S, S) in
[-1, 1].
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np
from datasets import Array3D, Dataset, DatasetDict, DatasetInfo, Features, Value
from sklearn.model_selection import train_test_split
from tqdm import tqdm

SPLITS = ("train", "validation", "test")
#: compose(rng, digit_index, background) -> one image (H, W, 3) in [0, 1]
Composer = Callable[[np.random.Generator, int, int], np.ndarray]

DIGITS_DESCRIPTION = (
    "scikit-learn digits (8x8, upscaled) pasted on random crops of scikit-learn sample photos. "
    "labels: 1 = digit >= 5. sensitive: 1 = rare 'flower.jpg' background, 0 = common 'china.jpg' "
    "background. Train: the rare background occurs mostly with label 0 (the cell label=1 x "
    "flower is tiny, like CelebA's blond males); validation/test: the 4 label x background cells "
    "are equal. Digit images are disjoint across splits. pixel_values: float32 (3, S, S) in [-1, 1]."
)

WATERBIRDS_DESCRIPTION = (
    "Waterbirds-style task from scikit-learn digits on scikit-learn sample photos. The object sets the "
    "label: labels = 1 for digits 5-9 ('waterbirds'), 0 for digits 0-4 ('landbirds'). The background "
    "is the spurious attribute: background = 0 for 'china.jpg' crops ('land'), 1 for 'flower.jpg' "
    "crops ('water'). Train: labels balanced and a fraction train_correlation of rows has "
    "background == labels; validation/test: the 4 (labels, background) cells are equal. "
    "sensitive = 1 when the background disagrees with the label (Waterbirds' minority groups "
    "'landbird on water' and 'waterbird on land'), 0 otherwise. Digit images are disjoint across "
    "splits and augmented (scale, shift, colour, background crop and flip). pixel_values: float32 "
    "(3, S, S) in [-1, 1]."
)


# ----------------------------------------------------------------------------- cell counts
def _split_counts_train(n: int, minority_fraction: float, train_correlation: float) -> Dict[tuple, int]:
    """digits: rows per (label, background); the flower background is rare and mostly label 0."""
    n_min = int(round(n * minority_fraction))
    n_min_pos = int(round(n_min * (1.0 - train_correlation)))
    n_maj = n - n_min
    n_maj_pos = n_maj // 2
    return {(0, 0): n_maj - n_maj_pos, (1, 0): n_maj_pos, (0, 1): n_min - n_min_pos, (1, 1): n_min_pos}


def _split_counts_balanced(n: int) -> Dict[tuple, int]:
    """Rows per (label, background): the four cells equal (the remainder goes to the first cells)."""
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    return {c: n // 4 + (1 if i < n % 4 else 0) for i, c in enumerate(cells)}


def _waterbirds_counts(n: int, aligned_fraction: float) -> Dict[tuple, int]:
    """Rows per (label, background) cell: labels balanced, `aligned_fraction` with background == label."""
    out = {}
    for y, n_y in ((0, n - n // 2), (1, n // 2)):
        n_aligned = int(round(n_y * aligned_fraction))
        out[(y, y)] = n_aligned
        out[(y, 1 - y)] = n_y - n_aligned
    return out


# ----------------------------------------------------------------------------- image parts
def _photo_backgrounds(image_size: int) -> list:
    """The two sample photos, shorter side rescaled to 3 * image_size, dimmed to 70 %, float in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = []
    for name in ("china.jpg", "flower.jpg"):  # index == background type
        photo = Image.fromarray(load_sample_image(name))
        w, h = photo.size
        scale = 3 * image_size / min(w, h)
        photo = photo.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                             Image.BILINEAR)
        photos.append(np.asarray(photo, dtype=np.float32) / 255.0 * 0.7)
    return photos


def _glyph_alpha(glyph8: np.ndarray, d: int) -> np.ndarray:
    """The 8x8 digit (values 0-16) resized to a (d, d) alpha mask in [0, 1]."""
    from PIL import Image

    img = Image.fromarray((glyph8 / 16.0 * 255).astype(np.uint8)).resize((d, d), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _random_crop(rng: np.random.Generator, background: np.ndarray, image_size: int) -> np.ndarray:
    top = rng.integers(0, background.shape[0] - image_size + 1)
    left = rng.integers(0, background.shape[1] - image_size + 1)
    return background[top:top + image_size, left:left + image_size].copy()


def _blend(rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-blend `colour` through the (d, d) mask at a random position of `img` (in place; returned)."""
    d = alpha.shape[0]
    oy, ox = rng.integers(0, img.shape[0] - d + 1, size=2)
    alpha = alpha[:, :, None]
    patch = img[oy:oy + d, ox:ox + d]
    img[oy:oy + d, ox:ox + d] = patch * (1.0 - alpha) + alpha * colour
    return img


# ----------------------------------------------------------------------------- the shared recipe
def _digit_pools(targets: np.ndarray, seed: int) -> dict:
    """Disjoint digit-image pools per split (seeded, stratified by digit, 60/20/20)."""
    all_idx = np.arange(len(targets))
    pool_train, rest = train_test_split(all_idx, train_size=0.6, stratify=targets, random_state=seed)
    pool_val, pool_test = train_test_split(rest, train_size=0.5, stratify=targets[rest], random_state=seed)
    return {"train": pool_train, "validation": pool_val, "test": pool_test}


def _draw_rows(rng: np.random.Generator, pool: np.ndarray, targets: np.ndarray, counts: dict) -> tuple:
    """(digit index, label, background) per row: `counts[(label, background)]` rows per cell, then shuffled."""
    digit_idx, labels, bg = [], [], []
    for (y, b), k in counts.items():
        cand = pool[(targets[pool] >= 5) == bool(y)]
        digit_idx.append(rng.choice(cand, size=k, replace=k > len(cand)))
        labels.append(np.full(k, y, np.int64))
        bg.append(np.full(k, b, np.int64))
    digit_idx, labels, bg = (np.concatenate(a) for a in (digit_idx, labels, bg))
    order = rng.permutation(len(labels))
    return digit_idx[order], labels[order], bg[order]


def _features(image_size: int, extra: tuple) -> Features:
    columns = {"pixel_values": Array3D((3, image_size, image_size), "float32"), "labels": Value("int64"),
               "sensitive": Value("int64")}
    columns.update({name: Value("int64") for name in extra + ("digit", "digit_index")})
    return Features(columns)


def _compose_splits(rng: np.random.Generator, *, seed: int, image_size: int, counts: dict, compose: Composer,
                    group_of: Callable, description: str, bar_title: str, progress: bool,
                    extra: tuple = ()) -> DatasetDict:
    """Draw and compose every split. `group_of(labels, background)` gives `sensitive`; `extra` names the
    columns kept besides it (only "background")."""
    from sklearn.datasets import load_digits

    targets = load_digits().target.astype(np.int64)
    pools = _digit_pools(targets, seed)
    features = _features(image_size, extra)
    bar = tqdm(total=sum(sum(c.values()) for c in counts.values()), desc=bar_title, disable=not progress)
    out = {}
    for split in SPLITS:
        digit_idx, labels, bg = _draw_rows(rng, pools[split], targets, counts[split])
        pix = np.empty((len(labels), image_size, image_size, 3), np.float32)
        for i in range(len(labels)):
            pix[i] = compose(rng, digit_idx[i], bg[i])
            bar.update()
        pix = np.ascontiguousarray((pix.transpose(0, 3, 1, 2) - 0.5) / 0.5, dtype=np.float32)
        columns = {"pixel_values": pix, "labels": labels, "sensitive": group_of(labels, bg), "background": bg,
                   "digit": targets[digit_idx], "digit_index": digit_idx.astype(np.int64)}
        mapping = {name: columns[name] for name in features}
        info = DatasetInfo(description=description + f" Split: {split}.", features=features)
        out[split] = Dataset.from_dict(mapping, features=features, info=info)
    bar.close()
    return DatasetDict(out)


def _check_image_size(image_size: int) -> None:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")


# ----------------------------------------------------------------------------- digits on backgrounds
def load_digits_backgrounds(
    seed: int = 0,
    image_size: int = 32,
    n_train: int = 4000,
    n_val: int = 800,
    n_test: int = 800,
    minority_fraction: float = 0.2,
    train_correlation: float = 0.95,
    *,
    digit_scale: float = 0.75,
    progress: bool = True,
) -> DatasetDict:
    """Real digit images on real photo backgrounds, with a constructed subpopulation shift.

    The 1,797 sklearn digit images are first split (seeded, stratified by digit, 60/20/20) into
    disjoint train/validation/test pools; each sample then takes a digit from its split's pool
    (reused with different crops), upscales it to ``digit_scale * image_size`` pixels, and
    blends it in white at a random position onto a random ``image_size`` crop of a photo
    (dimmed to 70 % so the digit stays visible).

    * ``labels`` = 1 if digit >= 5 else 0; ``sensitive`` = 1 for the rare ``flower.jpg``
      background, 0 for the common ``china.jpg`` background.
    * Train: a fraction ``minority_fraction`` of images has the flower background, of which a
      fraction ``train_correlation`` has label 0 (so the cell label=1 x flower is tiny); the china
      images are split 50/50 between the labels. Validation/test: all 4 cells are equal.

    Columns: ``pixel_values`` (float32, shape (3, image_size, image_size), in [-1, 1], ready for
    ``ViTForImageClassification``), ``labels``, ``sensitive``, ``digit`` (0-9), ``digit_index``
    (row in ``sklearn.datasets.load_digits``). Use ``.with_format("torch")`` for fast batching.
    """
    from sklearn.datasets import load_digits

    _check_image_size(image_size)
    if not 0.0 < minority_fraction < 1.0 or not 0.0 <= train_correlation <= 1.0:
        raise ValueError("minority_fraction must be in (0, 1) and train_correlation in [0, 1]")
    d = max(4, min(image_size, int(round(digit_scale * image_size))))
    glyphs = np.stack([_glyph_alpha(img, d) for img in load_digits().images])  # (1797, d, d)
    backgrounds = _photo_backgrounds(image_size)

    def compose(rng, digit_index, background):
        img = _random_crop(rng, backgrounds[background], image_size)
        return _blend(rng, img, glyphs[digit_index], 1.0)

    counts = {"train": _split_counts_train(n_train, minority_fraction, train_correlation),
              "validation": _split_counts_balanced(n_val), "test": _split_counts_balanced(n_test)}
    return _compose_splits(np.random.default_rng(seed), seed=seed, image_size=image_size, counts=counts,
                           compose=compose, group_of=lambda labels, bg: bg, description=DIGITS_DESCRIPTION,
                           bar_title="digits: composing images", progress=progress)


# ----------------------------------------------------------------------------- Waterbirds-style digits
def load_waterbirds_style(
    seed: int = 0,
    n_train: int = 4800,
    n_val: int = 800,
    n_test: int = 1200,
    train_correlation: float = 0.95,
    image_size: int = 32,
    *,
    progress: bool = True,
) -> DatasetDict:
    """Waterbirds-style spurious-background task built from shipped images (no downloads).

    Object = a scikit-learn digit (the "bird"): ``labels`` = 1 for digits 5-9 ("waterbird"), 0 for
    0-4 ("landbird"). Background = a random crop of ``china.jpg`` (``background`` = 0, "land") or
    ``flower.jpg`` (1, "water"). Train: labels balanced, a fraction ``train_correlation`` of each
    class on its "own" background (background == label); validation/test: the four (label,
    background) cells are equal, so ``n_test=1200`` gives 300 rows per cell.

    ``sensitive`` = 1 when the background disagrees with the label (Waterbirds' minority groups,
    "landbird on water" and "waterbird on land"). Why: labels are balanced, so both backgrounds are
    equally common and neither is a minority; the rows ERM gets wrong are the mismatched ones, 5 % of
    train. s = 1[background != label] makes those rows FairNet's minority group (a group per row, as
    in JTT/GroupDRO's worst groups), and (labels, sensitive) cells are exactly Waterbirds' 4 groups.

    The 1,797 digit images are split (seeded, stratified by digit, 60/20/20) into disjoint
    train/validation/test pools; each row reuses a digit of its split's pool with fresh augmentation:
    size 55-85 % of the image, random position, random bright colour, random background crop and
    horizontal flip. Deterministic for a seed.

    Columns: ``pixel_values`` (float32, (3, image_size, image_size), in [-1, 1]), ``labels``,
    ``sensitive``, ``background`` (0 land / 1 water), ``digit``, ``digit_index`` (row in
    ``sklearn.datasets.load_digits``). Use ``.with_format("torch")`` for fast batching.
    """
    from sklearn.datasets import load_digits

    _check_image_size(image_size)
    if not 0.5 <= train_correlation <= 1.0:
        raise ValueError(f"train_correlation must be in [0.5, 1] (share of train rows with background == "
                         f"label), got {train_correlation}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 4:
            raise ValueError(f"{name} must be >= 4 (one row per label x background cell), got {n}")
    images = load_digits().images
    backgrounds = _photo_backgrounds(image_size)

    def compose(rng, digit_index, background):
        """A random crop (flipped half the time) with the digit rescaled to 55-85 %, tinted, at a random place."""
        img = _random_crop(rng, backgrounds[background], image_size)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        d = max(4, min(image_size, int(round(image_size * rng.uniform(0.55, 0.85)))))
        alpha = _glyph_alpha(images[digit_index], d)
        colour = rng.uniform(0.75, 1.0, size=3).astype(np.float32)  # bright, random tint
        return _blend(rng, img, alpha, colour)

    counts = {"train": _waterbirds_counts(n_train, train_correlation),
              "validation": _split_counts_balanced(n_val), "test": _split_counts_balanced(n_test)}
    return _compose_splits(np.random.default_rng([seed, 2024]), seed=seed, image_size=image_size, counts=counts,
                           compose=compose, group_of=lambda labels, bg: (bg != labels).astype(np.int64),
                           description=WATERBIRDS_DESCRIPTION, bar_title="waterbirds-style: composing",
                           progress=progress, extra=("background",))


# ----------------------------------------------------------------------------- object pretraining (stand-in for ImageNet)
def load_digit_objects(seed: int = 0, n: int = 4000, image_size: int = 32, *, split: str = "train",
                       progress: bool = False) -> Dataset:
    """Object-recognition data to pretrain a backbone for the Waterbirds-style task: the stand-in for the ImageNet
    weights real Waterbirds models start from (a from-scratch ViT on 95 %-correlated data learns the background
    only, ERM sits at chance on balanced test, and there is nothing left for any method to correct).

    ``labels`` = the digit (10 classes), drawn from `split`'s pool of the same seeded digit pools the two tasks use
    (``split="train"`` never shows a validation or test digit image), with the Waterbirds-style augmentation (size
    55-85 %, random position, bright random tint) on a plain random-colour background with mild noise: neither
    task photo appears, so pretraining teaches objects, not the background-label link. Columns ``pixel_values``
    (float32 (3, S, S) in [-1, 1]), ``labels`` and ``digit_index`` (row in ``load_digits``); deterministic for a
    seed."""
    from sklearn.datasets import load_digits

    _check_image_size(image_size)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {SPLITS}.")
    if n < 10:
        raise ValueError(f"n must be >= 10 (one row per digit), got {n}")
    digits = load_digits()
    targets = digits.target.astype(np.int64)
    pool = _digit_pools(targets, seed)[split]
    rng = np.random.default_rng([seed, 7])
    picks = rng.choice(pool, size=n, replace=n > len(pool))
    pix = np.empty((n, image_size, image_size, 3), np.float32)
    for i in tqdm(range(n), desc="digit objects", disable=not progress):
        base = rng.uniform(0.0, 0.6, size=3).astype(np.float32)
        img = np.clip(base + rng.normal(0.0, 0.05, size=(image_size, image_size, 3)), 0, 1).astype(np.float32)
        d = max(4, min(image_size, int(round(image_size * rng.uniform(0.55, 0.85)))))
        colour = rng.uniform(0.75, 1.0, size=3).astype(np.float32)
        pix[i] = _blend(rng, img, _glyph_alpha(digits.images[picks[i]], d), colour)
    pix = np.ascontiguousarray((pix.transpose(0, 3, 1, 2) - 0.5) / 0.5, dtype=np.float32)
    features = Features({"pixel_values": Array3D((3, image_size, image_size), "float32"), "labels": Value("int64"),
                         "digit_index": Value("int64")})
    return Dataset.from_dict({"pixel_values": pix, "labels": targets[picks], "digit_index": picks.astype(np.int64)},
                             features=features)
