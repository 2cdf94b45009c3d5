"""Plumbing shared by `train_text.py` and `train_vision.py` that is not FairNet itself (not part of the package).

What lives here: the command-line options, process helpers (quiet logs, main-process printing under `accelerate` /
`torchrun`), the ERM cache (train once with `transformers.Trainer`, reuse for later runs) and the test-split metrics.
`outputs.py` writes and pushes the results. The FairNet flow itself (data → ERM → `get_peft_model(FairLoraConfig)`
→ `FairTrainer` → evaluate → save) is written out in each example; the data helpers (`hide_group_labels`,
`load_group_dataset`, ...) come from `fairnet_peft.data`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

# Bumped when the rows ERM trains on change for the same arguments, so an old cache is not reused: 2, the carve of a
# --dataset without validation/test splits is stratified (a cached ERM of version 1 trained on rows now held out).
ERM_CACHE_VERSION = 2
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- process / logging
def quiet_libraries() -> None:
    """Silence the known-harmless noise of transformers 5 / PEFT / datasets (load reports, FutureWarnings)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the Trainer's own bar stays
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")


def _has_accelerator() -> bool:
    """True with a GPU (or another torch accelerator). Without one, the trainers must be told `use_cpu=True`:
    otherwise, under torchrun, accelerate initialises the process group but runs every rank as a single process."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def dist_state():
    """accelerate's `PartialState` (initialises the process group under torchrun; a no-op for one process)."""
    from accelerate import PartialState

    return PartialState(cpu=not _has_accelerator())


def exit_launched_run() -> None:
    """End of a run: with a process group (torchrun / accelerate launch), wait for every rank, tear the group down and,
    on several processes, end this one without the interpreter's exit-time destructors.

    Left to those destructors, objects that outlive `destroy_process_group` (an FSDP model's device mesh, gloo's
    worker threads) can abort a rank that finished its work ("terminate called without an active exception", SIGABRT,
    seen on 2-process CPU runs on a busy machine even after the barrier and the teardown), and the launcher then
    reports the run failed. Every output is written and flushed before this is called; a run that raises never gets
    here and exits with its error as usual. One process: a plain return."""
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    several = dist.get_world_size() > 1
    dist.barrier()
    dist.destroy_process_group()
    if several:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def log(message: str) -> None:
    """Print on the main process only."""
    if dist_state().is_main_process:
        print(message, flush=True)


class Stopwatch:
    """Seconds per step: `lap(name)` records the time since the previous lap; `total()` since the start. On a CUDA
    GPU it also records each step's peak allocated GPU memory in GiB (`memory`, this process's)."""

    def __init__(self):
        self.start = self.last = time.time()
        self.laps: dict[str, float] = {}
        self.memory: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.laps[name], self.last = now - self.last, now
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.memory[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()

    def total(self) -> dict[str, float]:
        return {**self.laps, "total": time.time() - self.start}


# ----------------------------------------------------------------------------- arguments
# FairNet knobs: (option, FairTrainingArguments field, argparse options, help). Unset (None) = the library default.
FAIR_KNOBS = (
    ("--lr", "learning_rate", dict(type=float), "Learning rate of the LoRA stage."),
    ("--detector-epochs", "detector_epochs", dict(type=float),
     "Upper bound on the detector stage's epochs (it stops early on held-out rows)."),
    ("--detector-lr", "detector_learning_rate", dict(type=float), "Learning rate of the detector stage."),
    ("--lora-min-updates", "lora_min_updates", dict(type=int),
     "Least number of LoRA-stage updates (FairTrainingArguments.lora_min_updates)."),
    ("--detector-min-updates", "detector_min_updates", dict(type=int),
     "No detector early stop before this many updates (FairTrainingArguments.detector_min_updates)."),
    ("--margin", "margin", dict(type=float), "Triplet margin m."),
    ("--task-loss-weight", "task_loss_weight", dict(type=float),
     "Weight λ_T of the task loss on the anchors in the LoRA stage."),
    ("--anchor-weighting", "anchor_weighting", {},
     "Per-class weights of the anchors' loss terms (FairTrainingArguments.anchor_weighting, e.g. class_balanced)."),
    ("--anchor-source", "anchor_source", dict(choices=("labels", "detector", "union")),
     "Which training rows are minority anchors (see docs/label-settings.md)."),
    ("--lora-rows", "lora_rows", dict(choices=("train", "train+eval", "eval")),
     "Which rows the LoRA stage learns from (FairTrainingArguments.lora_rows; 'train+eval' adds the minority rows of "
     "part of the validation split, which then does not select)."),
    ("--lora-cross-fit", "lora_cross_fit", dict(action=argparse.BooleanOptionalAction),
     "Train a second LoRA on the other part of the validation split and select τ and α on all of it, each part read "
     "through the LoRA that did not train on it (FairTrainingArguments.lora_cross_fit)."),
    ("--pseudo-labeler", "pseudo_labeler", {},
     "How the minority is found in the unlabeled setting (FairTrainingArguments.pseudo_labeler)."),
    ("--max-majority-gate-rate", "max_majority_gate_rate", {},
     "The most of the held-out majority rows the chosen correction may gate, e.g. 0.5, or none "
     "(FairTrainingArguments.max_majority_gate_rate)."),
    ("--selection-tie-break", "selection_tie_break", {},
     "How the selection after training breaks ties on held-out WGA and accuracy "
     "(FairTrainingArguments.selection_tie_break)."),
    ("--tie-break-standard-errors", "tie_break_standard_errors", dict(type=float),
     "Margin of that tie-break in standard errors (FairTrainingArguments.tie_break_standard_errors)."),
    ("--tie-break-max-majority-gate-rate", "tie_break_max_majority_gate_rate", {},
     "The most of the held-out majority rows a correction may gate and still win that tie-break, e.g. 0.1, or none "
     "(FairTrainingArguments.tie_break_max_majority_gate_rate)."),
    ("--eval-sensitive-labels", "eval_sensitive_labels", dict(choices=("auto", "use", "ignore")),
     "Whether evaluation and the selection after training read the validation split's groups: 'auto' only in the "
     "full setting; 'use' also in the partial setting, where the validation rows' known groups are real labels "
     "(FairTrainingArguments.eval_sensitive_labels)."),
    ("--accuracy-gain-beyond-noise", "accuracy_gain_beyond_noise", dict(action=argparse.BooleanOptionalAction),
     "A correction beats the adapter off on held-out accuracy only by a gain beyond the tie-break's margin "
     "(FairTrainingArguments.accuracy_gain_beyond_noise)."),
    ("--train-lora-when-blind", "train_lora_when_blind", dict(action=argparse.BooleanOptionalAction),
     "Train the LoRA stage even when the detector cannot find the group and the adapter stays off, e.g. to read it "
     "with benchmarks/example_ceiling.py (FairTrainingArguments.train_lora_when_blind)."),
)


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
                      help="Further cap the validation split (seeded, stratified). Its rows serve the per-epoch "
                           "evaluation and FairTrainer's held-out rows: half train the LoRA, the other half choose "
                           "the correction's threshold and strength, whose accuracy floor needs many rows to pass a "
                           "real gain. Default: no cap beyond --max-eval.")
    data.add_argument("--setting", choices=("full", "partial", "unlabeled"), default="full",
                      help="Which sensitive labels FairNet may see in training: all (full), a fraction of them "
                           "(partial) or none (unlabeled: pseudo-labels, FairTrainingArguments.pseudo_labeler). "
                           "Test labels are only used for reporting.")
    data.add_argument("--label-fraction", type=float, default=0.1,
                      help="partial setting: fraction of training rows that keep their sensitive label (seeded).")

    model = parser.add_argument_group("model / ERM")
    model.add_argument("--model", default=defaults.get("model"), help=defaults.get("model_help"))
    model.add_argument("--erm-cache", default=None,
                       help="Directory of the cached ERM model. Default: .cache/erm/<hash of model and data args>. "
                            "Re-runs with the same ERM arguments and the same local data and model contents load it "
                            "instead of training again.")
    model.add_argument("--retrain-erm", action="store_true", help="Ignore a cached ERM model and train it again.")
    model.add_argument("--erm-epochs", type=float, default=defaults["erm_epochs"], help="ERM epochs.")
    model.add_argument("--erm-lr", type=float, default=defaults["erm_lr"], help="ERM learning rate.")

    # FairNet knobs default to None = FairTrainingArguments' own defaults (one set for every task, docs/method.md).
    fair = parser.add_argument_group("FairNet (unset options keep the library defaults)")
    fair.add_argument("--epochs", type=float, default=defaults["epochs"],
                      help="Epochs of the contrastive LoRA stage (over the anchor rows; at least lora_min_updates).")
    fair.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r).")
    fair.add_argument("--threshold", type=float, default=0.5, help="Gate threshold τ (LoRA on when risk > τ).")
    fair.add_argument("--detector-layer", type=int, default=None,
                      help="Block whose input the detector reads, the LoRA adapting it and the blocks after it "
                           "(FairLoraConfig.detector_layer). Default: the middle block.")
    for flag, _, options, help_text in FAIR_KNOBS:
        fair.add_argument(flag, default=None, help=help_text, **options)

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="Per-device training batch size.")
    run.add_argument("--eval-batch-size", type=int, default=defaults.get("eval_batch_size", 64),
                     help="Per-device evaluation batch size.")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--bf16", action="store_true",
                     help="bf16 mixed precision (autocast) for the ERM, prediction and FairNet trainers "
                          "(TrainingArguments.bf16; needs a GPU with bf16 or a CPU). `accelerate launch "
                          "--mixed_precision bf16` does the same for every trainer without this flag.")
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
    if args.push_to_hub and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        parser.error("--push-to-hub does not run under FSDP (the push needs the whole adapter on one process): "
                     "train without it, then upload <output-dir>/adapter, e.g. `hf upload <repo> <output-dir>/adapter`")
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error("--label-fraction must be in (0, 1]")
    data_only = {"--dataset-config": args.dataset_config is not None, "--label-column": args.label_column != "label",
                 "--sensitive-column": args.sensitive_column != "sensitive",
                 "--minority-value": args.minority_value is not None,
                 "--text-pair-column": getattr(args, "text_pair_column", None) is not None}
    given = [flag for flag, set_ in data_only.items() if set_]
    if args.dataset is None and given:
        parser.error(f"{', '.join(given)} apply to a --dataset of your own; without --dataset the example trains on "
                     "its embedded data (its own columns and group). Add --dataset <file, folder or Hub name>.")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        parser.error(f"{gpus} GPUs are visible to one process: transformers would split every batch over them with "
                     "torch.nn.DataParallel, which FairLoRA does not support. Run on one GPU "
                     "(CUDA_VISIBLE_DEVICES=0 python ...) or on all of them, one process each "
                     f"(accelerate launch --num_processes {gpus} ...).")
    if args.num_threads is not None:
        torch.set_num_threads(max(1, args.num_threads))
    return args


def cap_validation(ds, args):
    """--max-val: a seeded cap on the validation split, stratified on its (class, group) cells as the loaders'
    caps are: the selection after training reads these rows, and its worst cell is often a small one."""
    from fairnet_peft.data import stratified_subsample

    val = ds["validation"]
    if args.max_val is not None and args.max_val < len(val):
        ds["validation"] = val.select(stratified_subsample(val["labels"], val["sensitive"], args.max_val,
                                                           seed=args.seed + 3)).flatten_indices()
    return ds


def check_groups(ds, class_names) -> None:
    """Before ERM trains (minutes): the training split needs minority rows and a majority row of every class (the
    prototypes FairNet pulls the minority toward are per-class majority means); raise naming the cells. A validation
    or test split without minority rows, or with an empty (class × group) cell, is logged as a warning: the selection
    cannot see a worst-group gain there, and the test WGA would not cover the minority. So are a "minority" that is
    most of the training rows (a --minority-value that names the larger group) and a class without a training
    minority row."""
    y, s = np.asarray(ds["train"]["labels"]), np.asarray(ds["train"]["sensitive"])
    fix = ("Check --sensitive-column and --minority-value (or the 1 / 0 / -1 coding of the column), or give more "
           "training rows.")
    if not (s == 1).any():
        raise ValueError("the training split has no minority row (sensitive == 1; "
                         f"{describe_split(ds['train'], 'train')}). {fix}")
    empty = [class_names[k] for k in range(len(class_names)) if not ((y == k) & (s == 0)).any()]
    if empty:
        raise ValueError(f"the training split has no majority row (sensitive == 0) of class {empty} "
                         f"({describe_split(ds['train'], 'train')}): FairNet's prototypes are per-class majority "
                         f"means. {fix}")
    lacking = [class_names[k] for k in range(len(class_names)) if not ((y == k) & (s == 1)).any()]
    if lacking:
        log(f"[warning] the training split has no minority row of class {lacking}: the LoRA gets anchors of that "
            "class only from the validation split's minority rows (if it has any), so it may not correct that cell.")
    share = float((s == 1).sum() / max(int((s >= 0).sum()), 1))
    if share > 0.5:
        log(f"[warning] the group marked 1 is {100 * share:.0f} % of the training rows with a group: FairNet corrects "
            "toward group 0 (the majority's per-class prototypes). Check --minority-value: it names the minority.")
    for split in ("validation", "test"):
        y, s = np.asarray(ds[split]["labels"]), np.asarray(ds[split]["sensitive"])
        cells = [f"y={class_names[k]},s={g}" for k in range(len(class_names)) for g in (0, 1)
                 if not ((y == k) & (s == g)).any()]
        if cells:
            why = ("the selection cannot see a worst-group gain in a cell it does not have, so it may keep the "
                   "adapter off" if split == "validation" else "its worst-group accuracy covers only the cells it has")
            log(f"[warning] the {split} split has no row in {', '.join(cells)}: {why}. Give it rows of every class "
                f"in both groups: add such rows to your {split} file, or, where the loader carves the {split} split "
                "from your data (stratified on the class x group cells), give more rows of those cells.")


def describe_split(ds, name: str, class_names=None) -> str:
    """One log line: rows per (label, group) cell, the group unknown (s=?) counted per label; each class by its name
    when `class_names` are given (as the warnings of `check_groups` name them)."""
    y, s = np.asarray(ds["labels"]), np.asarray(ds["sensitive"])
    s = np.where(s < 0, -1, s)  # every unknown code counts as one
    label = (lambda k: k) if class_names is None else (lambda k: class_names[k])
    counts = [(f"y={label(k)},s={'?' if g < 0 else g}", int(((y == k) & (s == g)).sum()))
              for k in np.unique(y) for g in (0, 1, -1)]
    return f"{name}: {len(ds)} rows (" + ", ".join(f"{cell}: {n}" for cell, n in counts if n) + ")"


# ----------------------------------------------------------------------------- ERM (cached)
def mixed_precision(args) -> str:
    """The precision every trainer of the run uses: "bf16" with --bf16, else accelerate's launch setting ("no")."""
    return "bf16" if args.bf16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def local_fingerprint(spec) -> Optional[str]:
    """What identifies the contents of a local file or folder, so that an edited dataset or model at the same path
    is not mistaken for the cached one: a file's sha256; a folder's sha256 over its files' relative paths, sizes and
    modification times (reading every byte of an image folder or a model would cost more than it saves). None for a
    name that is not a local path (a Hub id: its name is the key)."""
    if not isinstance(spec, str) or not os.path.exists(spec):
        return None
    digest = hashlib.sha256()
    if os.path.isfile(spec):
        with open(spec, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for folder, dirs, files in os.walk(spec):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, spec)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def erm_cache_dir(args, key: dict) -> tuple[str, dict]:
    """The ERM cache directory and the key that must match for a cached model to be reused (fp32 runs keep the key
    they had before precision was an option; a bf16 ERM is cached apart). A local dataset or model adds its
    `local_fingerprint`: the same path with other contents trains ERM again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    precision = mixed_precision(args)
    prints = {f"{name}_fingerprint": local_fingerprint(key.get(name)) for name in ("dataset", "model")}
    key = {**key, "world_size": world, "version": ERM_CACHE_VERSION,
           **({"mixed_precision": precision} if precision != "no" else {}),
           **{k: v for k, v in prints.items() if v is not None}}
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


PICKLED = ("training_args.bin",)  # what Trainer.save_model writes besides safetensors/JSON: torch.save(args), a pickle


def _drop_pickles(folder: str) -> None:
    """The ERM folder is a model users push and load: safetensors and JSON only (what it was trained with is in
    erm_key.json)."""
    for name in PICKLED:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)


def train_or_load_erm(*, args, key: dict, build_model: Callable[[], Any], train_ds, eval_ds,
                      save_extra: Callable[[str], None], trainer_kwargs: dict) -> tuple[str, dict]:
    """Train the ERM classifier with `transformers.Trainer` unless `key` matches the cache.

    Returns (absolute cache directory, info): the adapter records it as its base model path."""
    from transformers import Trainer, TrainingArguments

    from fairnet_peft.metrics import make_compute_metrics

    state = dist_state()
    cache_dir, key = erm_cache_dir(args, key)
    hit = (not args.retrain_erm) and cached_erm(cache_dir, key)
    state.wait_for_everyone()  # every rank has decided before anything is written
    if hit:
        log(f"[erm] using the cached ERM model in {cache_dir}")
        with open(os.path.join(cache_dir, "erm_info.json")) as f:
            return os.path.abspath(cache_dir), {**json.load(f), "cached": True}

    log(f"[erm] training the ERM model ({args.erm_epochs} epochs) → {cache_dir}")
    start = time.time()
    model = build_model()
    targs = TrainingArguments(output_dir=os.path.join(args.output_dir, "erm_trainer"), num_train_epochs=args.erm_epochs,
                              learning_rate=args.erm_lr, warmup_steps=0.1, weight_decay=0.01, **_run_arguments(args))
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
        _drop_pickles(cache_dir)
        save_extra(cache_dir)
        with open(os.path.join(cache_dir, "erm_info.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        with open(os.path.join(cache_dir, "erm_key.json"), "w") as f:  # written last: marks a complete cache
            json.dump(key, f, indent=2, default=str)
    state.wait_for_everyone()
    del trainer, model
    return os.path.abspath(cache_dir), {**info, "cached": False}


# ----------------------------------------------------------------------------- FairNet and evaluation
def _run_arguments(args) -> dict:
    """TrainingArguments fields every trainer of the examples shares (batch sizes, seed, devices, precision, no
    checkpoints). Every trainer of one process must use the same precision: accelerate refuses a second one."""
    return dict(per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
                eval_strategy="epoch", save_strategy="no", logging_steps=10, report_to="none", seed=args.seed,
                dataloader_num_workers=0, dataloader_pin_memory=_has_accelerator(), use_cpu=not _has_accelerator(),
                bf16=args.bf16)


def fair_training_args(args, **extra):
    """FairTrainingArguments from the options: --epochs and the FairNet knobs that are set; the rest default."""
    from fairnet_peft import FairTrainingArguments

    knobs = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in FAIR_KNOBS}
    return FairTrainingArguments(output_dir=os.path.join(args.output_dir, "fair_trainer"), sensitive_column="sensitive",
                                 num_train_epochs=args.epochs, **{k: v for k, v in knobs.items() if v is not None},
                                 **_run_arguments(args), **extra)


def predict_args(args):
    """TrainingArguments for a prediction-only `Trainer` (batch size, distribution, no logging)."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=os.path.join(args.output_dir, "predict"), report_to="none",
                             per_device_eval_batch_size=args.eval_batch_size, dataloader_num_workers=0,
                             dataloader_pin_memory=_has_accelerator(), use_cpu=not _has_accelerator(), seed=args.seed,
                             bf16=args.bf16)


def erm_test_logits(model_class, erm_dir: str, args, collator, test):
    """The ERM model's logits on the test rows (group column dropped). The model lives only for this call, so a large
    base model is not held on the GPU beside the FairNet copy for the rest of the run."""
    import gc

    import torch
    from transformers import Trainer

    model = model_class.from_pretrained(erm_dir)
    logits = Trainer(model=model, args=predict_args(args), data_collator=collator).predict(
        test.remove_columns("sensitive")).predictions
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits


def test_metrics(logits, labels, sensitive, *, risk=None, gate=None, threshold: float = 0.5) -> dict:
    """Every fairness metric of one model on the test split (sensitive labels used: this is reporting only)."""
    from fairnet_peft.metrics import evaluate_predictions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate_predictions(np.asarray(logits), np.asarray(labels), sensitive_features=np.asarray(sensitive),
                                       gates=gate, risk=risk, threshold=threshold)
    return {k: float(v) for k, v in metrics.items()}


def cell_accuracies(logits, labels, sensitive) -> dict:
    """Accuracy and row count per (label × group) cell, for the plot."""
    from fairnet_peft.metrics import group_accuracies, predicted_labels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return group_accuracies(np.asarray(labels), predicted_labels(logits), sensitive_features=np.asarray(sensitive))


def minority_description(args, *, default: str) -> str:
    """The model card's "minority group (s=1)" line."""
    if args.minority_value:
        return f"{args.sensitive_column} == {args.minority_value}"
    return default if args.dataset is None else f"{args.sensitive_column} == 1"


def setting_text(args, inferred: str, sensitive=None) -> str:
    """The label setting the run trained in, as the summary and the model card give it: the trainer infers it from
    the training rows' groups (`sensitive`, -1 unknown), so a `--setting full` dataset with unknown groups trains as
    partial. Partial: how many training rows kept a group, counted (`--label-fraction` is drawn over every row, so
    rows the data left blank make it fewer)."""
    text = inferred
    if inferred == "partial" and sensitive is not None:
        known = np.asarray(sensitive) >= 0
        text += f" ({int(known.sum())} of the {len(known)} training rows labelled"
        text += f", --label-fraction {args.label_fraction:g})" if args.setting == "partial" else ")"
    return text if inferred == args.setting else f"{text} (--setting {args.setting}; some training groups unknown)"


def log_adapter(model, trainer, args=None) -> None:
    """One line: the label setting the trainer inferred and where the adapter sits; a warning when the data made the
    setting another than `--setting` asked for."""
    if args is not None and trainer.label_setting != args.setting:
        unknown = int((np.asarray(trainer.train_dataset[trainer.args.sensitive_column]) < 0).sum())
        warnings.warn(
            f"--setting {args.setting}, but {unknown} of the {len(trainer.train_dataset)} training rows have an "
            f"unknown group (-1, or a missing value in the group column), so FairTrainer runs the "
            f"{trainer.label_setting} setting: its selection and evaluation read no validation groups "
            "(docs/label-settings.md). Give every training row its group for the full setting.", UserWarning,
            stacklevel=2)
    config = model.peft_config[model.active_adapter]
    blocks = f" of blocks {config.layers_to_transform}" if config.layers_to_transform is not None else ""
    read = (f"block {config.detector_layer}" if config.detector_layer is not None
            else repr(config.detector_module))  # no layer stack found (e.g. ALBERT's shared layer): the module
    log(f"[fairnet] label setting: {trainer.label_setting}; LoRA on {sorted(config.target_modules)}{blocks}; the "
        f"detector reads the input of {read}")
