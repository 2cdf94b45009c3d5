"""Your own data as a FairNet-ready ``DatasetDict``: a local CSV/TSV/JSON(L)/Parquet file, a data or ``save_to_disk``
directory, or a Hub dataset name.

``load_group_dataset`` reads it (``_read``: a path that looks local must exist, and a file must have data rows), picks
the splits it has (``_named_splits``) and carves the missing validation/test splits out of train (``_carve``, stratified
on the (label, group) cells so that every split keeps the minority's share of each class; too few rows to carve is an
error naming the minimum), encodes the label column to class ids (``_class_encoder``: number-looking labels such as "1"
and "1.0" are one class) and the group column with ``sampling.encode_sensitive``, and subsamples (seeded, stratified
on the same cells). The result has the kept input columns plus ``labels`` and ``sensitive``, like the shipped
loaders' results.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
from typing import Optional, Sequence

from .sampling import encode_sensitive, is_missing, normalize_value, stratified_split, stratified_subsample

_FILE_KINDS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
_COMPRESSED = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open, "zst": None}
_OTHER_DATA_EXTENSIONS = ("txt", "arrow", "xlsx", "xls", "pkl", "feather", "zip", "tar")
_SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
# held-out fractions used to carve the missing splits out of train: one missing split, two missing splits
_CARVE_FRACTIONS = {1: (0.1,), 2: (0.2, 0.5)}


def _extension(spec: str) -> tuple[str, Optional[str]]:
    """(data extension, compression extension or None) of a file name: 'a.csv.gz' → ('csv', 'gz')."""
    parts = os.path.basename(spec).lower().split(".")
    if len(parts) > 2 and parts[-1] in _COMPRESSED:
        return parts[-2], parts[-1]
    return (parts[-1] if len(parts) > 1 else ""), None


def _looks_local(spec: str) -> bool:
    """A relative or absolute path rather than a Hub dataset id ('name' or 'namespace/name'): it starts with ./ ../
    / or ~, uses backslashes, has more than one '/', or ends in a data file extension."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    ext, _ = _extension(spec)
    return ext in _FILE_KINDS or ext in _OTHER_DATA_EXTENSIONS


def _has_data_rows(path: str, ext: str, compression: Optional[str]) -> Optional[bool]:
    """Whether a data file holds at least one row, read from its first lines (Parquet: its footer); None when it
    cannot tell (a compression the standard library does not read)."""
    if ext == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows > 0
    opener = _COMPRESSED[compression] if compression else open
    if opener is None:
        return None
    needed = 2 if ext in ("csv", "tsv") else 1  # a CSV's first line is its header
    seen = 0
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            text = line.strip()
            if text and not (ext in ("json", "jsonl") and text in ("[", "]", "[]")):
                seen += 1
                if seen >= needed:
                    return True
    return False


def _empty(path: str) -> str:
    """Why the data file at `path` holds no rows ('is empty (0 bytes)', 'has a header but no data rows', ...), or ''."""
    ext, compression = _extension(path)
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    if _has_data_rows(path, ext, compression) is False:
        return "has a header but no data rows" if ext in ("csv", "tsv") else "has no data rows"
    return ""


def _read(spec: str, config: Optional[str]):
    """The ``datasets`` object behind ``spec`` (a file, a data directory, a save_to_disk directory or a Hub name)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f)) for f in ("dataset_dict.json", "state.json")):
        return load_from_disk(spec)
    if os.path.isfile(spec):
        ext, compression = _extension(spec)
        if ext not in _FILE_KINDS:
            raise ValueError(f"dataset {spec!r}: unsupported file type; use CSV, TSV, JSON(L) or Parquet.")
        what = _empty(spec)
        if what:
            raise ValueError(f"dataset file {spec!r} {what}: load_group_dataset needs rows with a "
                             "label and a sensitive value. Check that the file was written completely.")
        extra = {"delimiter": "\t"} if ext == "tsv" else {}
        return DatasetDict(load_dataset(_FILE_KINDS[ext], data_files={"train": spec}, **extra))
    if os.path.isdir(spec):  # a folder of split files: an empty one would fail inside `datasets`, naming no file
        for folder, dirs, names in sorted(os.walk(spec)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]  # as `datasets` skips them
            for name in sorted(n for n in names if not n.startswith((".", "_"))):
                path = os.path.join(folder, name)
                what = _extension(path)[0] in _FILE_KINDS and _empty(path)
                if what:
                    raise ValueError(
                        f"dataset folder {spec!r}: {os.path.relpath(path, spec)!r} {what}. Fill it, or remove it: "
                        "a split without a file is carved from the training rows.")
    if _looks_local(spec) and not os.path.exists(spec):
        raise FileNotFoundError(
            f"dataset {spec!r}: no such file or directory (looked for {os.path.abspath(os.path.expanduser(spec))!r}; "
            f"the working directory is {os.getcwd()!r}). Fix the path; a Hub dataset is named 'name' or "
            "'namespace/name', without a file extension."
        )
    return load_dataset(spec, config) if config else load_dataset(spec)


def _rows_needed(missing: int) -> int:
    """The fewest rows from which `_carve` (⌈test_size·n⌉ held-out rows, the rest train, as
    `datasets.train_test_split` rounds) carves `missing` non-empty splits with `_CARVE_FRACTIONS`, leaving train
    non-empty."""
    def carves(n: int, fractions) -> bool:
        if not fractions:
            return n >= 1
        test, train = math.ceil(fractions[0] * n), math.floor((1 - fractions[0]) * n)
        if len(fractions) == 1:
            return test >= 1 and train >= 1
        return train >= 1 and carves(test, fractions[1:])

    return next(n for n in range(1, 1000) if carves(n, _CARVE_FRACTIONS[missing]))


def _named_splits(raw) -> dict:
    """train and the validation/test splits ``raw`` already has ('valid'/'val'/'dev' count as validation)."""
    from datasets import DatasetDict

    raw = raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)
    splits = {"train": raw["train"] if "train" in raw else raw[next(iter(raw))]}
    for split, names in _SPLIT_NAMES.items():
        found = [name for name in names if name in raw]
        if found:
            splits[split] = raw[found[0]]
    return splits


def _carve(splits: dict, cells, seed: int, spec: str) -> dict:
    """Carve the missing validation/test splits out of train (seeded; 80/10/10 or 90/10, `datasets`' rounding),
    stratified on ``cells(train)``, one (label, group) key per row (`sampling.stratified_split`)."""
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    n, needed = len(splits["train"]), _rows_needed(len(missing))
    if n < needed:
        raise ValueError(
            f"dataset {spec!r} has {n} row{'s' if n != 1 else ''} and no {' or '.join(missing)} split; carving "
            f"{' and '.join(missing)} out of it ({' / '.join(['80', '10', '10'] if len(missing) == 2 else ['90', '10'])}"
            f" %) needs at least {needed} rows. Add rows (FairNet needs both groups of every class in each split, "
            "so in practice hundreds), or provide the splits yourself: a folder with train/validation/test files, "
            "or a DatasetDict saved with save_to_disk."
        )
    train, keys = splits["train"], cells(splits["train"])
    kept, held = stratified_split(keys, math.ceil(_CARVE_FRACTIONS[len(missing)][0] * n), seed)
    if len(missing) == 1:
        return {**splits, "train": train.select(kept), missing[0]: train.select(held)}
    val, test = stratified_split([keys[i] for i in held], math.ceil(_CARVE_FRACTIONS[2][1] * len(held)), seed)
    return {**splits, "train": train.select(kept), "validation": train.select(held[val]),
            "test": train.select(held[test])}


def _class_order(name: str):
    """Class names sort numerically when they are numbers ('2' before '10'), then as text."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _class_encoder(splits: dict, label_column: str):
    """(class names, value → class id): a ClassLabel's names, else the sorted distinct values (numbers first).

    Values are compared by `normalize_value`, so number-looking labels are one class however they are written:
    1, 1.0, "1" and "1.0" are class "1"."""
    from datasets import ClassLabel

    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), int
    values = {normalize_value(v) for v in splits["train"][label_column] if not is_missing(v)}
    for split, ds in splits.items():  # a class the model never trains on cannot be predicted, nor corrected
        unseen = sorted({normalize_value(v) for v in ds[label_column] if not is_missing(v)} - values, key=_class_order)
        if unseen:
            raise ValueError(f"label column {label_column!r}: the {split} split has labels {unseen[:10]} that no "
                             f"training row has (training labels: {sorted(values, key=_class_order)[:10]}). Fix or "
                             "drop those rows, or move some of them into train.")
    names = sorted(values, key=_class_order)
    _warn_stray_classes(splits, label_column, names)
    index = {v: i for i, v in enumerate(names)}
    return names, lambda v: index[normalize_value(v)]


def _warn_stray_classes(splits: dict, label_column: str, names: list) -> None:
    """A class with few training rows (under 1 %) and none in the given validation/test files is more often a typo
    ('complaimt') than a class: it would become one more output of the model. Warn, naming a close spelling."""
    import difflib
    import warnings
    from collections import Counter

    others = [ds for split, ds in splits.items() if split != "train"]
    if not others:
        return
    counts = Counter(normalize_value(v) for v in splits["train"][label_column] if not is_missing(v))
    elsewhere = {normalize_value(v) for ds in others for v in ds[label_column] if not is_missing(v)}
    total = sum(counts.values())
    for name in names:
        if name not in elsewhere and counts[name] < 0.01 * total:
            close = difflib.get_close_matches(name, [n for n in names if n != name], n=1, cutoff=0.75)
            hint = f" It reads like {close[0]!r}: a typo?" if close else ""
            warnings.warn(
                f"label column {label_column!r}: class {name!r} has {counts[name]} of the {total} training rows and "
                f"no row in the {' or '.join(s for s in splits if s != 'train')} split, so the model gets an output "
                f"for it that nothing evaluates.{hint} Fix or drop those rows if it is not a class.",
                UserWarning, stacklevel=4)


def _check_minority_value(splits: dict, column: str, minority_value) -> None:
    """`minority_value` must match some row (compared by `normalize_value`): else name the values the column has,
    and a spelling that differs only in case."""
    target = normalize_value(minority_value)
    values = {normalize_value(v) for ds in splits.values() for v in ds[column] if not is_missing(v)}
    if target in values:
        return
    shown = sorted(values, key=_class_order)
    case = [v for v in shown if v.lower() == target.lower()]
    hint = f" (values compare with their case: did you mean {case[0]!r}?)" if case else ""
    raise ValueError(f"minority_value={minority_value!r} (--minority-value) matches no row of column {column!r}, "
                     f"whose values are {shown[:10]}{' …' if len(shown) > 10 else ''}{hint}. Pass one of them.")


def _subsample(ds, n: Optional[int], seed: int):
    """``n`` rows of ``ds`` (all when None), seeded and stratified on its (labels, sensitive) cells."""
    if n is None or n >= len(ds):
        return ds
    return ds.select(stratified_subsample(ds["labels"], ds["sensitive"], n, seed)).flatten_indices()


def load_group_dataset(path: str, *, label_column: str = "label", sensitive_column: str = "sensitive",
                       minority_value=None, keep_columns: Sequence[str] = (), config: Optional[str] = None,
                       seed: int = 0, max_train: Optional[int] = None, max_eval: Optional[int] = None):
    """Load ``path`` as train/validation/test with ``keep_columns`` + ``labels`` + ``sensitive``.

    Rows without a label are dropped. ``labels``: class ids (see the returned class names; number-looking labels
    such as 1, "1" and "1.0" are one class). ``sensitive``: ``encode_sensitive(column, minority_value)`` (1 minority /
    0 majority / -1 unknown; ``minority_value`` 1, "1", 1.0 and "1.0" all match a cell "1.0"). ``max_train`` caps
    train and ``max_eval`` validation and test (seeded draws stratified on the (label, group) cells, seeds ``seed``,
    ``seed + 1``, ``seed + 2``). Missing validation/test splits are carved out of train (80/10/10, or 90/10 when one
    exists), stratified on the same cells, with seed ``seed``.
    Returns ``(DatasetDict, class_names)``. A local-looking path that does not exist is a ``FileNotFoundError``; an
    empty file, or too few rows to carve the missing splits, a ``ValueError`` that says how many rows are needed; a
    ``minority_value`` that matches no row, or a validation/test label no training row has, a ``ValueError`` naming
    the values.
    """
    from datasets import Dataset, DatasetDict, Features, Value

    clash = sorted({"labels", "sensitive"} & set(keep_columns))
    if clash:
        raise ValueError(f"keep_columns={list(keep_columns)} includes {clash}, which load_group_dataset writes itself "
                         "(the encoded label and group); pass the source columns as label_column / sensitive_column.")
    splits = _named_splits(_read(path, config))
    for col in list(keep_columns) + [label_column, sensitive_column]:
        if col not in splits["train"].column_names:
            role, flag = {label_column: ("label_column", "--label-column"),
                          sensitive_column: ("sensitive_column", "--sensitive-column")}.get(
                col, ("keep_columns", "--text-column / --text-pair-column / --image-column"))
            raise ValueError(f"dataset {path!r} has no column {col!r} (columns: {splits['train'].column_names}); "
                             f"pass the right column name as {role} ({flag} in the examples).")

    def cells(ds):  # the (label, group) cell of each row, as the splits are stratified on them
        labels = [None if is_missing(v) else normalize_value(v) for v in ds[label_column]]
        return list(zip(labels, encode_sensitive(ds[sensitive_column], minority_value)))

    splits = _carve(splits, cells, seed, path)
    if minority_value is not None:
        _check_minority_value(splits, sensitive_column, minority_value)
    class_names, encode = _class_encoder(splits, label_column)
    if len(class_names) < 2:
        raise ValueError(f"label column {label_column!r} has fewer than two classes: {class_names}.")
    out = {}
    for split, ds in splits.items():
        ds = ds.filter(lambda label: not is_missing(label), input_columns=[label_column])  # decodes no image
        if len(ds) == 0:
            raise ValueError(f"dataset {path!r}: the {split} split has no row with a label in {label_column!r}; "
                             "every split needs labelled rows.")
        columns = {"labels": [encode(v) for v in ds[label_column]],
                   "sensitive": encode_sensitive(ds[sensitive_column], minority_value)}
        if keep_columns:  # add_column flattens the filter's indices; the kept columns keep their features
            ds = ds.select_columns(list(keep_columns))
            out[split] = ds.add_column("labels", columns["labels"]).add_column("sensitive", columns["sensitive"])
        else:  # no column to keep: a table with no columns cannot take new ones, so build it from the two
            out[split] = Dataset.from_dict(columns, features=Features(labels=Value("int64"), sensitive=Value("int64")))
    caps = {"train": (max_train, seed), "validation": (max_eval, seed + 1), "test": (max_eval, seed + 2)}
    return DatasetDict({s: _subsample(ds, *caps[s]) for s, ds in out.items()}), class_names
