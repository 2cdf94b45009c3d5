"""Your own data as a FairNet-ready ``DatasetDict``: a local CSV/TSV/JSON(L)/Parquet file, a data or ``save_to_disk``
directory, or a Hub dataset name.

``load_group_dataset`` reads it (``_read``), picks or carves the train/validation/test splits (``_splits``), encodes
the label column to class ids and the group column with ``sampling.encode_sensitive``, and subsamples (seeded).
The result has the kept input columns plus ``labels`` and ``sensitive``, as the shipped loaders do.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .sampling import encode_sensitive, is_missing, normalize_value

_FILE_KINDS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
_SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _read(spec: str, config: Optional[str]):
    """The ``datasets`` object behind ``spec`` (a file, a data directory, a save_to_disk directory or a Hub name)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f)) for f in ("dataset_dict.json", "state.json")):
        return load_from_disk(spec)
    if os.path.isfile(spec):
        parts = spec.lower().rsplit(".", 2)
        ext = parts[-1] if parts[-1] not in ("gz", "bz2", "xz", "zst") else parts[-2]
        if ext not in _FILE_KINDS:
            raise ValueError(f"dataset {spec!r}: unsupported file type; use CSV, TSV, JSON(L) or Parquet.")
        extra = {"delimiter": "\t"} if ext == "tsv" else {}
        return DatasetDict(load_dataset(_FILE_KINDS[ext], data_files={"train": spec}, **extra))
    return load_dataset(spec, config) if config else load_dataset(spec)


def _splits(raw, seed: int) -> dict:
    """train/validation/test: the existing splits ('valid'/'val'/'dev' count as validation); the missing ones are
    carved out of train (seeded; 80/10/10 or 90/10)."""
    from datasets import DatasetDict

    raw = raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)
    splits = {"train": raw["train"] if "train" in raw else raw[next(iter(raw))]}
    for split, names in _SPLIT_NAMES.items():
        found = [name for name in names if name in raw]
        if found:
            splits[split] = raw[found[0]]
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        parts = splits["train"].train_test_split(test_size=0.1 * len(missing), seed=seed)
        splits["train"] = parts["train"]
        if len(missing) == 2:
            rest = parts["test"].train_test_split(test_size=0.5, seed=seed)
            splits["validation"], splits["test"] = rest["train"], rest["test"]
        else:
            splits[missing[0]] = parts["test"]
    return splits


def _class_encoder(splits: dict, label_column: str):
    """(class names, value → class id): a ClassLabel's names, else the sorted distinct values (numbers first)."""
    from datasets import ClassLabel

    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), int
    values = {normalize_value(v) for ds in splits.values() for v in ds[label_column] if not is_missing(v)}

    def order(x: str):
        numeric = x.lstrip("-").isdigit()
        return (not numeric, int(x) if numeric else 0, x)

    names = sorted(values, key=order)
    index = {v: i for i, v in enumerate(names)}
    return names, lambda v: index[normalize_value(v)]


def _subsample(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_group_dataset(path: str, *, label_column: str = "label", sensitive_column: str = "sensitive",
                       minority_value=None, keep_columns: Sequence[str] = (), config: Optional[str] = None,
                       seed: int = 0, max_train: Optional[int] = None, max_eval: Optional[int] = None):
    """Load ``path`` as train/validation/test with ``keep_columns`` + ``labels`` + ``sensitive``.

    Rows without a label are dropped. ``labels``: class ids (see the returned class names). ``sensitive``:
    ``encode_sensitive(column, minority_value)`` (1 minority / 0 majority / -1 unknown). ``max_train`` caps train and
    ``max_eval`` validation and test (seeded shuffles with seeds ``seed``, ``seed + 1``, ``seed + 2``).
    Returns ``(DatasetDict, class_names)``.
    """
    from datasets import DatasetDict

    splits = _splits(_read(path, config), seed)
    for col in list(keep_columns) + [label_column, sensitive_column]:
        if col not in splits["train"].column_names:
            raise ValueError(f"dataset {path!r} has no column {col!r} (columns: {splits['train'].column_names}); "
                             "pass the right column name.")
    class_names, encode = _class_encoder(splits, label_column)
    if len(class_names) < 2:
        raise ValueError(f"label column {label_column!r} has fewer than two classes: {class_names}.")
    out = {}
    for split, ds in splits.items():
        ds = ds.filter(lambda row: not is_missing(row[label_column]))
        labels = [encode(v) for v in ds[label_column]]
        sensitive = encode_sensitive(ds[sensitive_column], minority_value)
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep_columns])
        out[split] = ds.add_column("labels", labels).add_column("sensitive", sensitive)
    caps = {"train": (max_train, seed), "validation": (max_eval, seed + 1), "test": (max_eval, seed + 2)}
    return DatasetDict({s: _subsample(ds, *caps[s]) for s, ds in out.items()}), class_names
