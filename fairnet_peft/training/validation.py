"""Up-front checks of FairTrainer's training dataset, so that bad data fails before any stage has trained.

`validate_train_dataset` reads the columns once through Arrow (no per-row Python loop on the happy path): the
sensitive column (1 minority, 0 majority, -1 unknown), the task labels (0..K-1), float feature columns (NaN/inf) and
`input_ids` (inside the vocabulary). It returns the label setting and the two integer arrays the trainer keeps.
Every error is a `ValueError` that names the column and says how to fix it; slow row-level searches run only to
report rows once a cheap pass has found a problem.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["validate_train_dataset", "infer_label_setting"]

_MAX_ROWS_SHOWN = 10
_CHUNK_ROWS = 4096  # feature columns are scanned in row chunks, so one pixel column never sits in memory as float64


def infer_label_setting(sensitive: np.ndarray) -> str:
    """'full' (every row's group known), 'partial' (some) or 'unlabeled' (none; every value is -1)."""
    known = sensitive >= 0
    if known.all():
        return "full"
    return "unlabeled" if not known.any() else "partial"


def validate_train_dataset(dataset, *, sensitive_column: str, num_labels: Optional[int],
                           vocab_size: Optional[int]) -> tuple[str, np.ndarray, np.ndarray]:
    """Check FairTrainer's `train_dataset`; return `(setting, sensitive, labels)` as int64 arrays.

    `setting` is "full", "partial" or "unlabeled" (see `infer_label_setting`). `num_labels` (K) bounds the labels to
    0..K-1 when given; `vocab_size` bounds `input_ids` to 0..vocab_size-1 when given. Raises `ValueError` naming the
    column and the fix for: a non-`datasets.Dataset`, missing columns, 0 or 1 rows, labels that are not integer class
    ids in range (strings, floats, None, -100), a single class, sensitive values outside {-1, 0, 1} (strings, NaN,
    fractions), no minority or no majority row among the labelled rows, NaN/inf in float feature columns and token ids
    outside the vocabulary.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        hint = " Pass one split, e.g. dataset['train']." if hasattr(dataset, "keys") else ""
        raise ValueError(f"FairTrainer needs a `datasets.Dataset` (with a sensitive column) as train_dataset, got "
                         f"{type(dataset).__name__}.{hint} Build one with datasets.Dataset.from_dict(...) or .from_pandas(...).")
    names = dataset.column_names
    if sensitive_column not in names:
        raise ValueError(
            f"train_dataset has no sensitive column {sensitive_column!r} (columns: {names}). Add one with 1 = minority, "
            "0 = majority, -1 = unknown, or set FairTrainingArguments(sensitive_column=...)."
        )
    label_column = _label_column(names)
    if label_column is None:
        raise ValueError(f"train_dataset needs a 'labels' column with the task classes 0..K-1 (columns: {names}). "
                         "Rename your target column with dataset.rename_column(<name>, 'labels').")
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty (0 rows); pass the training split with its rows.")
    if len(dataset) == 1:
        raise ValueError("train_dataset has a single row; FairNet needs minority and majority rows of at least two "
                         "classes. Pass the whole training split.")
    labels = _labels(dataset, label_column, num_labels)
    sensitive = _sensitive(dataset, sensitive_column)
    setting = infer_label_setting(sensitive)
    if setting != "unlabeled":
        if not (sensitive == 1).any():
            raise ValueError(
                f"No minority rows ({sensitive_column} == 1) in the {setting} setting: the detector has nothing to "
                "learn. Mark the minority with 1, or mark every row -1 to use the unlabeled setting (pseudo-labels)."
            )
        if not (sensitive == 0).any():
            raise ValueError(
                f"No majority rows ({sensitive_column} == 0): every labelled row is in the minority, but FairNet's "
                "prototypes are built from majority rows. Mark the majority group with 0 (1 = minority, -1 = unknown)."
            )
    skip = {sensitive_column, "labels", "label"}
    for name, feature in dataset.features.items():
        if name not in skip and "float" in str(feature):
            _check_finite(dataset, name)
    if vocab_size is not None and "input_ids" in names:
        _check_token_ids(dataset, int(vocab_size))
    return setting, sensitive, labels


# ------------------------------------------------------------------------------------------ columns
def _label_column(names) -> Optional[str]:
    """The class column: `labels`, else `label` (Trainer's collators accept either), else None."""
    return "labels" if "labels" in names else "label" if "label" in names else None


def _arrow(dataset, name: str) -> pa.ChunkedArray:
    column = dataset.with_format("arrow")[name]  # respects select/shuffle/filter (the indices mapping)
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"rows {rows[:_MAX_ROWS_SHOWN].tolist()}" + (f" (showing {_MAX_ROWS_SHOWN} of {len(rows)})"
                                                          if len(rows) > _MAX_ROWS_SHOWN else "")


#: why an eval row needs a class id too: FairTrainer reads eval rows, not only Trainer's metrics
_EVAL_ROWS = ("FairTrainer selects the correction on the eval rows and trains its LoRA on some of them (lora_rows), "
              "so ")


def _labels(dataset, column: str, num_labels: Optional[int], split: str = "train_dataset") -> np.ndarray:
    """`column` as int64 class ids 0..K-1 (K = `num_labels`, else the largest id + 1); `split` names the dataset in
    the errors. The training split also needs two classes."""
    why = _EVAL_ROWS if split == "eval_dataset" else ""
    arr = _arrow(dataset, column)
    kind = arr.type
    if not pa.types.is_integer(kind):
        what = ("strings" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else
                "floats" if pa.types.is_floating(kind) else "booleans" if pa.types.is_boolean(kind) else str(kind))
        fix = ("map them to class ids, e.g. dataset.class_encode_column(" + repr(column) + ")"
               if what == "strings" else f"cast it, e.g. dataset.cast_column({column!r}, datasets.Value('int64'))")
        raise ValueError(f"{split} column {column!r} holds {what}, not integer class ids 0..K-1; {fix}.")
    if arr.null_count:
        missing = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False))
        raise ValueError(f"{split} column {column!r} has missing values (None) in {_rows(missing)}; {why}every "
                         "row needs its class id 0..K-1. Drop or label those rows.")
    labels = arr.to_numpy().astype(np.int64)
    if (labels == -100).any():
        raise ValueError(f"{split} column {column!r} has -100 (the 'ignore' label) in {_rows(labels == -100)}; "
                         f"{why}every row needs its class id 0..K-1. Drop those rows.")
    high = num_labels if num_labels is not None else int(labels.max()) + 1
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        values = sorted(set(labels[bad].tolist()))[:_MAX_ROWS_SHOWN]
        bound = f"num_labels={num_labels}" if num_labels is not None else "class ids"
        raise ValueError(
            f"{split} column {column!r} has values {values} outside 0..{high - 1} ({bound}) in {_rows(bad)}. "
            "Map the labels to 0..K-1, or build the model with num_labels=K."
        )
    if split == "train_dataset" and len(np.unique(labels)) < 2:
        raise ValueError(f"train_dataset has a single class (column {column!r} is {int(labels[0])} in every row); "
                         "FairNet's prototypes need at least two classes.")
    return labels


def _sensitive(dataset, column: str, split: Optional[str] = None) -> np.ndarray:
    name = f"{split} column {column!r}" if split else f"Column {column!r}"
    arr = _arrow(dataset, column)
    kind = arr.type
    fix = "use 1 = minority, 0 = majority, -1 = unknown"
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        sample = arr.slice(0, 3).to_pylist()
        raise ValueError(f"{name} holds {kind} values (e.g. {sample}), not group ids; {fix}. Map the values "
                         f"first: fairnet_peft.data.encode_sensitive(dataset[{column!r}], minority_value=...) gives "
                         "1 / 0 / -1 (it matches 1, '1' and '1.0' alike), or load the file with "
                         "fairnet_peft.data.load_group_dataset(..., minority_value=...).")
    if arr.null_count:
        missing = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False))
        raise ValueError(f"{name} has missing values (None) in {_rows(missing)}; use -1 for unknown groups.")
    values = arr.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(kind):
        if np.isnan(values).any():
            raise ValueError(f"{name} contains NaN in {_rows(np.isnan(values))}; use -1 for unknown groups.")
        fractional = values != np.round(values)
        if fractional.any():
            raise ValueError(f"{name} has non-integer values {sorted(set(values[fractional].tolist()))[:5]} "
                             f"in {_rows(fractional)}; {fix}.")
    values = values.astype(np.int64)
    bad = sorted(set(np.unique(values).tolist()) - {-1, 0, 1})
    if bad:
        raise ValueError(f"{name} has values {bad} outside {{-1, 0, 1}} (1 minority, 0 majority, -1 unknown). If "
                         "the column codes the groups otherwise (e.g. 1 and 2), map it first: "
                         f"fairnet_peft.data.encode_sensitive(dataset[{column!r}], minority_value=...) gives 1 for "
                         "the value you name, 0 for the others and -1 for missing ones.")
    return values


# ------------------------------------------------------------------------------------------ model inputs
def _leaves(arr: pa.ChunkedArray) -> tuple[pa.ChunkedArray, bool]:
    """The innermost values of a (nested) list column, and whether a None appeared at any level (a missing row or
    value, which flattening would silently drop)."""
    missing = arr.null_count > 0
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = pc.list_flatten(arr)
        missing = missing or arr.null_count > 0
    return arr, missing


def _row_mask(dataset, name: str, is_bad) -> np.ndarray:
    """Slow path, only after a problem was found: which rows hold a bad value."""
    mask = np.zeros(len(dataset), dtype=bool)
    for i, row in enumerate(dataset.with_format(None)[name]):  # plain Python rows: None stays visible
        values = np.asarray(_none_to_nan(row), dtype=np.float64)
        mask[i] = bool(np.isnan(values).any() or is_bad(values).any())
    return mask


def _none_to_nan(row):
    if row is None:
        return np.nan
    if isinstance(row, (list, tuple)):
        return [_none_to_nan(v) for v in row]
    return row


def _check_finite(dataset, name: str) -> None:
    """Float feature columns (pixel_values, precomputed embeddings, ...) must not hold NaN, inf or None."""
    for start in range(0, len(dataset), _CHUNK_ROWS):
        leaves, missing = _leaves(_arrow(dataset.select(range(start, min(start + _CHUNK_ROWS, len(dataset)))), name))
        if not pa.types.is_floating(leaves.type):
            return  # e.g. a struct column whose repr mentions a float: not a plain float tensor
        if pa.types.is_float16(leaves.type):
            leaves = leaves.cast(pa.float32())
        if missing or not pc.all(pc.is_finite(leaves)).as_py():
            mask = _row_mask(dataset, name, lambda v: ~np.isfinite(v))
            raise ValueError(f"Feature column {name!r} has NaN/inf values in {_rows(mask)} (a None counts as NaN); "
                             "clean or drop those rows before training.")


def _check_token_ids(dataset, vocab_size: int, split: str = "train_dataset") -> None:
    leaves, missing = _leaves(_arrow(dataset, "input_ids"))
    if not pa.types.is_integer(leaves.type):
        raise ValueError(f"{split} column 'input_ids' holds {leaves.type} values, not integer token ids; tokenize "
                         "the text (tokenizer(...)['input_ids']) or cast the column to int64.")
    if missing:
        mask = _row_mask(dataset, "input_ids", np.isnan)
        raise ValueError(f"{split} column 'input_ids' has missing (None) rows or token ids in {_rows(mask)}; drop "
                         "those rows or pad with the tokenizer's pad id.")
    if len(leaves) == 0:
        return
    bounds = pc.min_max(leaves).as_py()
    if bounds["min"] < 0 or bounds["max"] >= vocab_size:
        mask = _row_mask(dataset, "input_ids", lambda v: (v < 0) | (v >= vocab_size))
        raise ValueError(
            f"{split} column 'input_ids' has token ids outside 0..{vocab_size - 1} (the model's "
            f"vocab_size={vocab_size}; seen min {bounds['min']}, max {bounds['max']}) in {_rows(mask)}. Tokenize with the model's own "
            "tokenizer, or resize the embeddings (model.resize_token_embeddings(len(tokenizer)))."
        )


def check_pseudo_labeler_rows(setting: str, labels: np.ndarray, pseudo_labeler: str, lof_n_neighbors) -> None:
    """Unlabeled setting with `pseudo_labeler='lof'`: LOF runs within each class, so a class needs more rows than a
    fixed `lof_n_neighbors`, and with 'auto' neighbours (at least 20) some class must have more than 20 (a smaller
    class gets no minority). 'auto' needs no check: it skips a labeler that fails and says so if all do."""
    counts = np.bincount(labels) if len(labels) else np.zeros(1, dtype=np.int64)
    counts = counts[counts > 0] if (counts > 0).any() else counts
    fixed = lof_n_neighbors != "auto"
    rows = int(counts.min() if fixed else counts.max())
    neighbours = lof_n_neighbors if fixed else 20
    if setting == "unlabeled" and pseudo_labeler == "lof" and rows <= neighbours:
        which = "smallest" if fixed else "largest"
        raise ValueError(
            f"Unlabeled setting: the {which} class has {rows} rows but lof_n_neighbors={lof_n_neighbors!r} "
            f"needs more than {neighbours} per class (LOF runs within each class). Lower "
            "FairTrainingArguments.lof_n_neighbors, choose pseudo_labeler='gmm'/'kmeans'/'error_set', or add data.")


def check_eval_dataset(dataset, sensitive_column: str, num_labels: Optional[int] = None,
                       vocab_size: Optional[int] = None, split: str = "eval_dataset") -> None:
    """An eval split's sensitive column (if any) holds only -1 (unknown), 0 and 1; its labels (if any) are class ids
    0..K-1 and its `input_ids` are inside the vocabulary (a `datasets.Dataset`: the rows FairTrainer reads). A bad id
    there would otherwise surface on a GPU as a device-side assert, at an unrelated line."""
    from datasets import Dataset

    for ds in dataset.values() if isinstance(dataset, dict) else [dataset]:
        if isinstance(ds, Dataset):
            names = ds.column_names
            label_column = _label_column(names)
            if label_column is not None and len(ds):
                _labels(ds, label_column, num_labels, split=split)
            if vocab_size is not None and "input_ids" in names:
                _check_token_ids(ds, int(vocab_size), split=split)
            if sensitive_column in names and len(ds):  # coded as the training column: no strings, None, NaN, 2
                _sensitive(ds, sensitive_column, split=split)


def check_selection_metric(metric: Optional[str], uses_sensitive: bool, setting: Optional[str]) -> None:
    """`metric_for_best_model` may read the eval set's group labels only when the setting may use them."""
    metric = metric or ""
    group_metrics = ("worst_group", "equalized_odds", "gate_rate_s", "acc_y", "detector_")
    label_free = metric.removeprefix("eval_").startswith("pseudo_")
    if not uses_sensitive and not label_free and any(g in metric for g in group_metrics):
        raise ValueError(
            f"metric_for_best_model={metric!r} needs the eval set's sensitive labels, which the {setting} "
            "setting must not use for selection (that would leak labels the setting lacks). Use 'accuracy' or "
            "'worst_class_accuracy', or set eval_sensitive_labels='use' if your validation split really has them.")
