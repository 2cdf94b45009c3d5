"""Helpers shared by `train_text.py` and `train_vision.py` (not part of the `fairnet_peft` package).

Both examples run the same pipeline:

1. ERM: fine-tune (or train from scratch) the classifier with a plain `transformers.Trainer`; the result is cached
   in `--erm-cache` so that re-runs (other label settings, other FairNet knobs) skip this step;
2. FairNet: wrap the ERM model with a FairLoRA adapter and run `FairTrainer` (detector → prototypes → LoRA);
3. evaluate ERM and FairNet on the test split (ACC, WGA, EOD, gate rate per group);
4. write the adapter (with a model card holding the fairness table), a plot and `metrics.json`; optionally push.

Everything here works unchanged under `python`, `accelerate launch` and `torchrun`: the trainers handle the
distribution, and only the main process writes files or prints the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Offline-friendly defaults before the HF libraries are imported (an explicit environment wins).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
if REPO_ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO_ROOT)

ERM_CACHE_VERSION = 1
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- process / logging
def quiet_libraries() -> None:
    """Silence the known-harmless noise of transformers 5 / PEFT (load reports, FutureWarnings)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bar stays
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


def dist_state():
    """accelerate's `PartialState` (initialises the process group under torchrun; a no-op for one process)."""
    from accelerate import PartialState

    return PartialState(cpu=not _has_accelerator())


def log(message: str) -> None:
    """Print on the main process only."""
    if dist_state().is_main_process:
        print(message, flush=True)


def _has_accelerator() -> bool:
    """True with a GPU (or another torch accelerator). Without one, the trainers must be told `use_cpu=True`:
    otherwise, under torchrun, accelerate initialises the process group but runs every rank as a single process."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser, *, defaults: dict) -> None:
    """Options shared by both examples. `defaults` holds the per-example default values."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None,
                      help="HF dataset name, a local CSV/JSON/JSONL/Parquet file, a data directory or a "
                           "`save_to_disk` directory. Default: the embedded dataset of the example.")
    data.add_argument("--dataset-config", default=None, help="Configuration name of an HF dataset.")
    data.add_argument("--label-column", default="label",
                      help="Column with the task label (only for --dataset; ints or strings).")
    data.add_argument("--sensitive-column", default="sensitive",
                      help="Column with the sensitive attribute (only for --dataset).")
    data.add_argument("--minority-value", default=None,
                      help="Value of --sensitive-column that marks the minority group (1); other values become the "
                           "majority (0) and missing values unknown (-1). Default: the column is already coded "
                           "1 / 0 / -1.")
    data.add_argument("--max-train", type=int, default=defaults.get("max_train"),
                      help="Subsample the training split to this many rows (seeded).")
    data.add_argument("--max-eval", type=int, default=defaults.get("max_eval"),
                      help="Subsample the validation and test splits to this many rows (seeded).")
    data.add_argument("--max-val", type=int, default=defaults.get("max_val"),
                      help="Further cap the validation split (used for per-epoch evaluation only). Default: "
                           "--max-eval.")
    data.add_argument("--setting", choices=("full", "partial", "unlabeled"), default="full",
                      help="Which sensitive labels FairNet may see in training: all (full), a fraction of them "
                           "(partial) or none (unlabeled: pseudo-labels from LOF). Test labels are only used for "
                           "reporting.")
    data.add_argument("--label-fraction", type=float, default=0.1,
                      help="partial setting: fraction of training rows that keep their sensitive label (seeded).")

    model = parser.add_argument_group("model / ERM")
    model.add_argument("--model", default=defaults.get("model"), help=defaults.get("model_help"))
    model.add_argument("--erm-cache", default=None,
                       help="Directory of the cached ERM model. Default: .cache/erm/<hash of model and data args>. "
                            "Re-runs with the same ERM arguments load it instead of training again.")
    model.add_argument("--retrain-erm", action="store_true", help="Ignore a cached ERM model and train it again.")
    model.add_argument("--erm-epochs", type=float, default=defaults["erm_epochs"], help="ERM epochs.")
    model.add_argument("--erm-lr", type=float, default=defaults["erm_lr"], help="ERM learning rate.")

    # FairNet knobs default to None = FairTrainingArguments' own defaults (one set for every task, docs/method.md).
    fair = parser.add_argument_group("FairNet (unset options keep the library defaults)")
    fair.add_argument("--epochs", type=float, default=defaults["epochs"],
                      help="Epochs of the contrastive LoRA stage (over the anchor rows; at least lora_min_updates).")
    fair.add_argument("--lr", type=float, default=None, help="Learning rate of the LoRA stage.")
    fair.add_argument("--detector-epochs", type=float, default=None,
                      help="Upper bound on the detector stage's epochs (it stops early on held-out rows).")
    fair.add_argument("--detector-lr", type=float, default=None, help="Learning rate of the detector stage.")
    fair.add_argument("--lora-min-updates", type=int, default=None,
                      help="Least number of LoRA-stage updates (FairTrainingArguments.lora_min_updates).")
    fair.add_argument("--detector-min-updates", type=int, default=None,
                      help="No detector early stop before this many updates (FairTrainingArguments.detector_min_updates).")
    fair.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r).")
    fair.add_argument("--threshold", type=float, default=0.5, help="Gate threshold τ (LoRA on when risk > τ).")
    fair.add_argument("--margin", type=float, default=None, help="Triplet margin m.")
    fair.add_argument("--task-loss-weight", type=float, default=None,
                      help="Weight λ_T of the task loss on the anchors in the LoRA stage.")
    fair.add_argument("--class-balanced-anchors", action=argparse.BooleanOptionalAction, default=None,
                      help="Weight the anchors by inverse class frequency.")
    fair.add_argument("--anchor-source", choices=("labels", "detector", "union"), default=None,
                      help="Which training rows are minority anchors (see docs/label-settings.md).")
    fair.add_argument("--pseudo-labeler", default=None,
                      help="How the minority is found in the unlabeled setting (FairTrainingArguments.pseudo_labeler).")

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="Per-device training batch size.")
    run.add_argument("--eval-batch-size", type=int, default=defaults.get("eval_batch_size", 64),
                     help="Per-device evaluation batch size.")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--num-threads", type=int, default=defaults.get("num_threads"),
                     help="torch CPU threads per process (default: torch's choice). Small models run faster with 1, "
                          "especially on a shared machine.")
    run.add_argument("--output-dir", default=defaults["output_dir"])
    run.add_argument("--push-to-hub", action="store_true",
                     help="Push the adapter (model.push_to_hub) to --hub-model-id, and the ERM base model it needs "
                          "to --hub-base-id.")
    run.add_argument("--hub-model-id", default=None, help="Hub repo of the adapter, e.g. me/fairnet-adult.")
    run.add_argument("--hub-base-id", default=None,
                     help="Hub repo for the ERM base model. Default: <hub-model-id>-erm.")
    run.add_argument("--demo", action="store_true", help=defaults.get("demo_help", "Small measured preset."))


def parse_with_preset(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], preset: dict):
    """Parse `argv`; with `--demo`, `preset` replaces the defaults (explicit options still win)."""
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push-to-hub needs --hub-model-id")
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error("--label-fraction must be in (0, 1]")
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(max(1, args.num_threads))
    return args


# ----------------------------------------------------------------------------- datasets
def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in ("", "?", "nan", "NaN", "None")


def _norm(value: Any) -> str:
    """Value as a comparable string: 1, 1.0, '1' and ' 1 ' all become '1'."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def encode_sensitive(values: Sequence[Any], minority_value: Optional[str]) -> list[int]:
    """Map a raw sensitive column to 1 (minority) / 0 (majority) / -1 (unknown)."""
    if minority_value is None:
        out = []
        for v in values:
            if _is_missing(v):
                out.append(-1)
                continue
            key = _norm(v)
            if key not in ("-1", "0", "1"):
                raise ValueError(
                    f"The sensitive column has the value {v!r}; pass --minority-value to say which value is the "
                    "minority (the others become the majority), or code the column as 1 / 0 / -1."
                )
            out.append(int(key))
        return out
    target = _norm(minority_value)
    return [-1 if _is_missing(v) else int(_norm(v) == target) for v in values]


def _load_raw(spec: str, config: Optional[str]):
    """`datasets` object for --dataset: a local file, a data directory, a save_to_disk directory or a Hub name."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f)) for f in
                                   ("dataset_dict.json", "state.json")):
        return load_from_disk(spec)
    if os.path.isfile(spec):
        ext = spec.lower().rsplit(".", 2)
        kind = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
        name = ext[-1] if ext[-1] not in ("gz", "bz2", "xz", "zst") else ext[-2]
        if name not in kind:
            raise ValueError(f"--dataset {spec!r}: unsupported file type; use CSV, TSV, JSON(L) or Parquet.")
        extra = {"delimiter": "\t"} if name == "tsv" else {}
        return DatasetDict(load_dataset(kind[name], data_files={"train": spec}, **extra))
    return load_dataset(spec, config) if config else load_dataset(spec)


def _subsample(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_custom_dataset(args, *, keep_columns: Sequence[str], seed: int):
    """Load --dataset, encode labels and sensitive values, and split into train/validation/test.

    Existing splits are used ('validation'/'valid'/'dev' and 'test'); missing ones are carved out of train (seeded,
    80/10/10 or 90/10). Returns (DatasetDict with `keep_columns` + labels + sensitive, list of class names).
    """
    from datasets import ClassLabel, DatasetDict

    raw = _load_raw(args.dataset, args.dataset_config)
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict(train=raw)
    aliases = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
    splits = {"train": raw["train"] if "train" in raw else raw[next(iter(raw))]}
    for split, names in aliases.items():
        for name in names:
            if name in raw:
                splits[split] = raw[name]
                break
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        frac = 0.1 * len(missing)
        parts = splits["train"].train_test_split(test_size=frac, seed=seed)
        splits["train"] = parts["train"]
        if len(missing) == 2:
            rest = parts["test"].train_test_split(test_size=0.5, seed=seed)
            splits["validation"], splits["test"] = rest["train"], rest["test"]
        else:
            splits[missing[0]] = parts["test"]

    for col in list(keep_columns) + [args.label_column, args.sensitive_column]:
        if col not in splits["train"].column_names:
            raise ValueError(f"--dataset has no column {col!r} (columns: {splits['train'].column_names}).")

    feature = splits["train"].features[args.label_column]
    if isinstance(feature, ClassLabel):
        class_names = list(feature.names)
        encode = lambda v: int(v)  # noqa: E731
    else:
        values = sorted({_norm(v) for ds in splits.values() for v in ds[args.label_column] if not _is_missing(v)},
                        key=lambda x: (not x.lstrip("-").isdigit(), int(x) if x.lstrip("-").isdigit() else 0, x))
        class_names = values
        index = {v: i for i, v in enumerate(values)}
        encode = lambda v: index[_norm(v)]  # noqa: E731

    out = {}
    for split, ds in splits.items():
        ds = ds.filter(lambda row: not _is_missing(row[args.label_column]))
        labels = [encode(v) for v in ds[args.label_column]]
        sensitive = encode_sensitive(ds[args.sensitive_column], args.minority_value)
        drop = [c for c in ds.column_names if c not in keep_columns]
        ds = ds.remove_columns(drop).add_column("labels", labels).add_column("sensitive", sensitive)
        out[split] = ds
    out["train"] = _subsample(out["train"], args.max_train, seed)
    out["validation"] = _subsample(out["validation"], args.max_eval, seed + 1)
    out["test"] = _subsample(out["test"], args.max_eval, seed + 2)
    if len(class_names) < 2:
        raise ValueError(f"--label-column {args.label_column!r} has fewer than two classes: {class_names}.")
    return DatasetDict(out), class_names


def apply_label_setting(ds, setting: str, fraction: float, seed: int):
    """Hide the sensitive labels that `setting` does not have (train and validation; test keeps them for reporting).

    full: unchanged. partial: a seeded `fraction` of the training rows keep their label (at least one minority row),
    the rest and the whole validation split become -1. unlabeled: train and validation become -1.
    """
    from datasets import DatasetDict

    if setting == "full":
        return ds
    out = dict(ds)
    train_s = np.asarray(ds["train"]["sensitive"])
    if setting == "partial":
        rng = np.random.default_rng(seed)
        keep = rng.random(len(train_s)) < fraction
        minority = np.flatnonzero(train_s == 1)
        if minority.size and not (keep & (train_s == 1)).any():
            keep[rng.choice(minority)] = True  # the detector needs at least one labelled minority row
        new_s = np.where(keep, train_s, -1)
    else:
        new_s = np.full_like(train_s, -1)
    out["train"] = ds["train"].remove_columns("sensitive").add_column("sensitive", new_s.tolist())
    out["validation"] = ds["validation"].remove_columns("sensitive").add_column(
        "sensitive", [-1] * len(ds["validation"]))
    return DatasetDict(out)


def describe_split(ds, name: str) -> str:
    y, s = np.asarray(ds["labels"]), np.asarray(ds["sensitive"])
    cells = ", ".join(f"y={k},s={g}: {int(((y == k) & (s == g)).sum())}"
                      for k in np.unique(y) for g in (0, 1) if ((y == k) & (s == g)).any())
    unknown = int((s < 0).sum())
    return f"{name}: {len(ds)} rows ({cells}{f', s unknown: {unknown}' if unknown else ''})"


# ----------------------------------------------------------------------------- ERM
def erm_cache_dir(args, key: dict) -> tuple[str, dict]:
    """The ERM cache directory and the key that must match for a cached model to be reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    key = {**key, "world_size": world, "version": ERM_CACHE_VERSION}
    if args.erm_cache:
        return args.erm_cache, key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(".cache", "erm", digest), key


def cached_erm(cache_dir: str, key: dict) -> bool:
    path = os.path.join(cache_dir, "erm_key.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    if saved != json.loads(json.dumps(key, default=str)):
        log(f"[erm] cache {cache_dir} was built with other arguments; training ERM again.")
        return False
    return True


def train_or_load_erm(*, args, key: dict, build_model: Callable[[], Any], train_ds, eval_ds,
                      save_extra: Callable[[str], None], trainer_kwargs: dict) -> tuple[str, dict]:
    """Train the ERM classifier with `transformers.Trainer` unless `key` matches the cache. Returns (dir, info)."""
    from transformers import Trainer, TrainingArguments

    from fairnet_peft.metrics import make_compute_metrics

    state = dist_state()
    cache_dir, key = erm_cache_dir(args, key)
    hit = (not args.retrain_erm) and cached_erm(cache_dir, key)
    state.wait_for_everyone()  # every rank has decided before anything is written
    if hit:
        log(f"[erm] using the cached ERM model in {cache_dir}")
        with open(os.path.join(cache_dir, "erm_info.json")) as f:
            return cache_dir, {**json.load(f), "cached": True}

    log(f"[erm] training the ERM model ({args.erm_epochs} epochs) → {cache_dir}")
    start = time.time()
    model = build_model()
    targs = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "erm_trainer"),
        num_train_epochs=args.erm_epochs,
        learning_rate=args.erm_lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_accelerator(), use_cpu=not _has_accelerator(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                      compute_metrics=make_compute_metrics(use_sensitive=False), **trainer_kwargs)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    info = {"train_seconds": time.time() - start, "validation": evals[-1] if evals else {}}
    if state.is_main_process and os.path.isdir(cache_dir):
        if os.listdir(cache_dir) and not os.path.exists(os.path.join(cache_dir, "erm_key.json")):
            raise SystemExit(f"--erm-cache {cache_dir} is a non-empty directory that is not an ERM cache of these "
                             "examples; refusing to overwrite it. Pass an empty or new directory.")
        shutil.rmtree(cache_dir)
    state.wait_for_everyone()
    trainer.save_model(cache_dir)  # every rank calls it (it may gather); only the main process writes
    if state.is_main_process:
        save_extra(cache_dir)
        with open(os.path.join(cache_dir, "erm_info.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        with open(os.path.join(cache_dir, "erm_key.json"), "w") as f:  # written last: marks a complete cache
            json.dump(key, f, indent=2, default=str)
    state.wait_for_everyone()
    del trainer, model
    return cache_dir, {**info, "cached": False}


# ----------------------------------------------------------------------------- FairNet
def fair_training_args(args, **extra):
    from fairnet_peft import FairTrainingArguments

    knobs = dict(learning_rate=args.lr, detector_epochs=args.detector_epochs, detector_learning_rate=args.detector_lr,
                 margin=args.margin, task_loss_weight=args.task_loss_weight,
                 class_balanced_anchors=args.class_balanced_anchors, anchor_source=args.anchor_source,
                 pseudo_labeler=args.pseudo_labeler, lora_min_updates=args.lora_min_updates,
                 detector_min_updates=args.detector_min_updates)
    return FairTrainingArguments(
        output_dir=os.path.join(args.output_dir, "fair_trainer"),
        sensitive_column="sensitive",
        num_train_epochs=args.epochs,
        **{k: v for k, v in knobs.items() if v is not None},
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_accelerator(), use_cpu=not _has_accelerator(),
        **extra,
    )


# ----------------------------------------------------------------------------- evaluation
def predict_args(args):
    """TrainingArguments for a prediction-only `Trainer` (batch size, distribution, no logging)."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=os.path.join(args.output_dir, "predict"), report_to="none",
                             per_device_eval_batch_size=args.eval_batch_size, dataloader_num_workers=0,
                             dataloader_pin_memory=_has_accelerator(), use_cpu=not _has_accelerator(), seed=args.seed)


def test_metrics(logits, labels, sensitive, *, risk=None, gate=None, threshold: float = 0.5) -> dict:
    """Every fairness metric of one model on the test split (sensitive labels used: this is reporting only)."""
    from fairnet_peft.metrics import make_compute_metrics

    predictions = logits if risk is None and gate is None else (logits, risk, gate)
    compute = make_compute_metrics(threshold=threshold, use_sensitive=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = compute((predictions, (np.asarray(labels), np.asarray(sensitive))))
    return {k: float(v) for k, v in metrics.items()}


def cell_accuracies(logits, labels, sensitive) -> dict:
    """Accuracy and row count per (label × group) cell, for the plot."""
    from fairnet_peft.metrics import group_accuracies

    pred = np.asarray(logits).argmax(-1) if np.asarray(logits).ndim == 2 else (np.asarray(logits) > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return group_accuracies(np.asarray(labels), pred, sensitive_features=np.asarray(sensitive))


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


SUMMARY_COLUMNS = (("ACC", "accuracy"), ("WGA", "worst_group_accuracy"), ("EOD", "equalized_odds_difference"),
                   ("gate rate s=0", "gate_rate_s0"), ("gate rate s=1", "gate_rate_s1"))


def summary_table(results: dict[str, dict], *, markdown: bool = False) -> str:
    """ERM vs FairNet: ACC, WGA (min over label × group cells), EOD (mean of |ΔTPR|, |ΔFPR|), gate rate per group."""
    header = ["model"] + [name for name, _ in SUMMARY_COLUMNS]
    rows = [[name] + [_fmt(m.get(key)) for _, key in SUMMARY_COLUMNS] for name, m in results.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    rule = "-" * len(fmt(header))
    return "\n".join([rule, fmt(header), rule] + [fmt(r) for r in rows] + [rule])


# ----------------------------------------------------------------------------- outputs
def model_card(*, title: str, base_model: str, loader: str, results: dict, details: dict, repo_or_dir: str) -> str:
    """The card text above the package's "Fairness evaluation" section (which `save_pretrained` appends)."""
    meta = "\n".join(["---", "library_name: peft", f"base_model: {base_model}",
                      "tags:", "- fairness", "- fairnet", "- fairlora", "- peft", "---", ""])
    lines = [
        meta,
        f"# {title}",
        "",
        "A **FairLoRA** adapter (FairNet: a bias detector at an intermediate layer switches a contrastively trained "
        "conditional LoRA on per example), trained with `fairnet_peft` on top of an ERM classifier.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in details.items()]
    lines += [
        "",
        "## ERM vs FairNet on the test split",
        "",
        summary_table(results, markdown=True),
        "ACC: accuracy. WGA: worst accuracy over (label × group) cells. EOD: ½(|ΔTPR| + |ΔFPR|) between the groups. "
        "Gate rate: fraction of test rows of each group for which the LoRA was switched on (s=1 is the minority). "
        "Small test splits make WGA noisy: one row of the smallest cell moves it by 1/(cell size).",
        "",
        "The section *Fairness evaluation* below lists every test metric of the FairNet model.",
        "",
        "## Usage",
        "",
        "`import fairnet_peft` must run **before** loading: it registers the PEFT type `FAIRLORA` "
        "(without it PEFT fails with `KeyError: 'FAIRLORA'`).",
        "",
        "```python",
        "import fairnet_peft  # registers FAIRLORA",
        f"from peft import {loader}",
        "",
        f"model = {loader}.from_pretrained({repo_or_dir!r}).eval()",
        "out = model(**inputs)                    # the detector gates each example",
        "rec = fairnet_peft.gate_record(model)    # rec.risk, rec.gate",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_outputs(*, args, model, cells: dict, fair_test: dict, metrics: dict, card: str) -> dict:
    """Adapter + model card, group-accuracy plot and metrics.json in --output-dir (main process only)."""
    from fairnet_peft.model_card import attach_fairness_report
    from fairnet_peft.plots import plot_group_accuracies

    out = os.path.abspath(args.output_dir)
    adapter_dir = os.path.join(out, "adapter")
    paths = {"adapter": adapter_dir, "plot": os.path.join(out, "group_accuracies.png"),
             "metrics": os.path.join(out, "metrics.json"), "model_card": os.path.join(adapter_dir, "README.md")}
    if not dist_state().is_main_process:
        return paths
    os.makedirs(adapter_dir, exist_ok=True)
    for scratch in ("predict", "erm_trainer"):  # Trainer output dirs that stay empty (save_strategy="no")
        path = os.path.join(out, scratch)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    # Our card first; save_pretrained then lets PEFT update its metadata, and the attached report adds the
    # "Fairness evaluation" section (fairnet_peft.metrics.render_fairness_table of the FairNet test metrics).
    with open(paths["model_card"], "w", encoding="utf-8") as f:
        f.write(card)
    attach_fairness_report(model, fair_test, split="test")
    model.save_pretrained(adapter_dir)
    _add_card_tags(paths["model_card"], ["fairness", "fairnet", "fairlora"])
    plot_group_accuracies(cells, paths["plot"], title="Test accuracy per (label × group) cell")
    with open(paths["metrics"], "w") as f:
        json.dump({**metrics, "outputs": paths}, f, indent=2, default=_json_default)
    return paths


def _add_card_tags(path: str, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys(list(card.data.tags or []) + tags))
    card.save(path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def push_outputs(*, args, model, erm_dir: str, card_path: str) -> dict:
    """Push the ERM base model and the adapter (model.push_to_hub), then the model card (main process only)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not dist_state().is_main_process:
        return {}
    api = HfApi()
    base_id = args.hub_base_id or f"{args.hub_model_id}-erm"
    api.create_repo(base_id, exist_ok=True)
    upload = os.path.join(args.output_dir, "erm_upload")
    shutil.rmtree(upload, ignore_errors=True)
    shutil.copytree(erm_dir, upload, ignore=shutil.ignore_patterns("erm_key.json", "erm_info.json"))
    api.upload_folder(repo_id=base_id, folder_path=upload, commit_message="ERM base model for a FairLoRA adapter")
    shutil.rmtree(upload, ignore_errors=True)

    config = model.peft_config[model.active_adapter]
    local_base = config.base_model_name_or_path
    config.base_model_name_or_path = base_id  # so AutoPeftModel*.from_pretrained(<adapter repo>) finds the base
    try:
        with warnings.catch_warnings():  # PEFT probes the base repo for a changed vocabulary; it has not changed
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.push_to_hub(args.hub_model_id, commit_message="FairLoRA adapter (fairnet_peft)")
    finally:
        config.base_model_name_or_path = local_base
    with open(card_path, encoding="utf-8") as f:  # the local card, with the Hub ids instead of local paths
        card = f.read().replace(repr(os.path.dirname(card_path)), repr(args.hub_model_id))
        card = card.replace(local_base, base_id)
    tmp = card_path + ".hub"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(card)
    try:
        api.create_commit(repo_id=args.hub_model_id, commit_message="Model card with the fairness table",
                          operations=[CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=tmp)])
    finally:
        os.remove(tmp)
    return {"adapter_repo": args.hub_model_id, "base_repo": base_id}


def run_pipeline(*, args, kind: str, data, class_names: list[str], erm_key: dict, build_model: Callable[[], Any],
                 load_model: Callable[[str], Any], collator, save_extra: Callable[[str], None], erm_trainer_kwargs: dict,
                 task_type: Optional[str], loader: str, title: str, details: dict, timings: dict) -> dict:
    """ERM (cached) → ERM test metrics → FairLoRA + FairTrainer → FairNet test metrics → outputs (→ push).

    `data` is the processed DatasetDict (model inputs + labels + sensitive) after the label setting was applied to
    train/validation; its test split keeps the true sensitive labels (reporting only).
    """
    from peft import get_peft_model
    from transformers import Trainer

    from fairnet_peft import FairLoraConfig

    state = dist_state()
    t = time.time()
    erm_dir, erm_info = train_or_load_erm(
        args=args, key=erm_key, build_model=build_model, train_ds=data["train"].remove_columns("sensitive"),
        eval_ds=data["validation"].remove_columns("sensitive"), save_extra=save_extra,
        trainer_kwargs=dict(data_collator=collator, **erm_trainer_kwargs))
    timings["erm"] = time.time() - t
    erm_dir = os.path.abspath(erm_dir)

    # ERM on the test split
    t = time.time()
    test = data["test"]
    erm_pred = Trainer(model=load_model(erm_dir), args=predict_args(args), data_collator=collator).predict(
        test.remove_columns("sensitive"))
    erm_test = test_metrics(erm_pred.predictions, test["labels"], test["sensitive"])
    timings["erm_test"] = time.time() - t

    # FairLoRA adapter on the ERM model + FairTrainer (detector → prototypes → contrastive LoRA)
    t = time.time()
    config = FairLoraConfig(task_type=task_type, r=args.rank, lora_alpha=2 * args.rank, threshold=args.threshold,
                            base_model_name_or_path=erm_dir)
    model = get_peft_model(load_model(erm_dir), config)
    from fairnet_peft import FairTrainer

    trainer = FairTrainer(model=model, args=fair_training_args(args), train_dataset=data["train"],
                          eval_dataset=data["validation"], data_collator=collator)
    resolved = model.peft_config["default"]
    log(f"[fairnet] label setting: {trainer.label_setting}; LoRA on {sorted(resolved.target_modules)} of blocks "
        f"{resolved.layers_to_transform}; the detector reads the input of block {resolved.detector_layer}")
    train_result = trainer.train()
    timings["fairnet_train"] = time.time() - t

    t = time.time()
    tau = float(resolved.threshold)
    logits, risk, gate = trainer.predict(test).predictions
    fair_test = test_metrics(logits, test["labels"], test["sensitive"], risk=risk, gate=gate, threshold=tau)
    timings["fairnet_test"] = time.time() - t
    timings["total"] = time.time() - timings.pop("_start")

    results = {"ERM": erm_test, "FairNet": fair_test}
    cells = {name: cell_accuracies(pred, test["labels"], test["sensitive"])
             for name, pred in (("ERM", erm_pred.predictions), ("FairNet", logits))}
    details = {**details, "classes": ", ".join(map(str, class_names)),
               "label setting": args.setting + (f" ({args.label_fraction:g} of the train rows labelled)"
                                                if args.setting == "partial" else ""),
               "ERM base model": erm_dir, "train / test rows": f"{len(data['train'])} / {len(test)}",
               "gate threshold τ": f"{tau:g}"}
    adapter_dir = os.path.join(os.path.abspath(args.output_dir), "adapter")
    card = model_card(title=title, base_model=erm_dir, loader=loader, results=results, details=details,
                      repo_or_dir=adapter_dir)
    metrics = {"task": kind, "setting": args.setting, "label_setting_inferred": trainer.label_setting,
               "erm": erm_test, "fairnet": fair_test, "threshold": tau,
               "fairnet_train": dict(train_result.metrics), "erm_train": erm_info, "erm_dir": erm_dir,
               "cells_test": cells, "timings_s": timings, "args": vars(args), "world_size": state.num_processes}
    paths = write_outputs(args=args, model=model, cells=cells, fair_test=fair_test, metrics=metrics, card=card)
    pushed = push_outputs(args=args, model=model, erm_dir=erm_dir, card_path=paths["model_card"]) \
        if args.push_to_hub else {}
    finish(args=args, name=kind, results=results, timings=timings, paths=paths, pushed=pushed)
    state.wait_for_everyone()
    return {"erm": erm_test, "fairnet": fair_test, "paths": paths, "pushed": pushed, "timings": timings,
            "label_setting": trainer.label_setting}


def finish(*, args, name: str, results: dict, timings: dict, paths: dict, pushed: dict) -> None:
    log("")
    log(f"{name}: ERM vs FairNet on the test split ({args.setting} setting)")
    log(summary_table(results))
    log("WGA = worst (label x group) cell accuracy; EOD = mean of |dTPR|, |dFPR|; gate rate = P(LoRA on | s).")
    log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    log(f"outputs: {paths.get('adapter')}, {paths.get('plot')}, {paths.get('metrics')}")
    if pushed:
        log(f"pushed: adapter → {pushed['adapter_repo']}, ERM base → {pushed['base_repo']}")
