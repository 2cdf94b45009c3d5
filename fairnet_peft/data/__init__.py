"""Offline, seeded benchmark data for FairNet (no downloads at run time), and the group-label helpers.

Every loader returns a ``datasets.DatasetDict`` with ``train``/``validation``/``test`` splits and integer columns
``labels`` (target class) and ``sensitive`` (1 = minority group that FairNet should correct, 0 = majority, -1 =
unknown); each split's ``info.description`` says what it is. ``text``: ``load_adult_text`` (real UCI Adult rows as
sentences), ``load_bug_professions_text`` (real BUG sentences, gender shift), ``make_synthetic_text`` (tiny tokenised
task for tests). ``vision``: ``load_digits_backgrounds`` and ``load_waterbirds_style`` (digits on photos).
``files``: ``load_group_dataset`` (your own CSV/JSON/Parquet/Hub data). ``sampling``: ``encode_sensitive``,
``stratified_subsample``, ``stratified_split``, ``partial_group_labels`` and ``hide_group_labels`` (the
partial/unlabeled settings).
"""

from __future__ import annotations

from .files import load_group_dataset
from .sampling import (
    LABEL_SETTINGS,
    encode_sensitive,
    group_strata,
    hide_group_labels,
    partial_group_labels,
    stratified_split,
    stratified_subsample,
)
from .text import (
    ADULT_N_TEST,
    ADULT_N_TRAIN,
    ADULT_TEST_FILE,
    ADULT_TRAIN_FILE,
    BUG_FILE,
    BUG_TEST_PER_CELL,
    DATA_DIR,
    SYNTH_TOKENS,
    load_adult_text,
    load_bug_professions_text,
    make_synthetic_text,
)
from .vision import load_digit_objects, load_digits_backgrounds, load_waterbirds_style

__all__ = [
    "DATA_DIR",
    "ADULT_TRAIN_FILE",
    "ADULT_TEST_FILE",
    "ADULT_N_TRAIN",
    "ADULT_N_TEST",
    "BUG_FILE",
    "BUG_TEST_PER_CELL",
    "LABEL_SETTINGS",
    "SYNTH_TOKENS",
    "encode_sensitive",
    "group_strata",
    "hide_group_labels",
    "load_adult_text",
    "load_bug_professions_text",
    "load_digit_objects",
    "load_digits_backgrounds",
    "load_group_dataset",
    "load_waterbirds_style",
    "make_synthetic_text",
    "partial_group_labels",
    "stratified_split",
    "stratified_subsample",
]
