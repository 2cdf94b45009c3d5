"""Benchmark data: the splits every method of a (dataset, seed) shares, the model each one starts from, and the group
labels each label setting sees.

Quality suite: `build_text` (UCI Adult as text + MiniLM, optionally with the bottom blocks frozen and their outputs
cached), `build_vision` (digits on backgrounds + a ViT from a config) and `build_hidden` (the synthetic task whose
group is not in the input + a tiny BERT) return a `Bundle`: per split the labels, the group labels and an `InputStore`
the `Collator` and `methods.predict` read rows from. Default-settings suite: `build_task` returns `datasets.Dataset`
splits in torch format and a model factory (`pretrain_backbone` gives the Waterbirds-style task its backbone). Both
subsample with `fairnet_peft.data.stratified_subsample`, and `setting_view` hides group labels with
`fairnet_peft.data.hide_group_labels`: what a user of the package does.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fairnet_peft.data import hide_group_labels, stratified_subsample

from .common import device, minilm_path, quiet, run_args
from .config import LABEL_FRACTION, TASK_OPTIONS, TASKS


# ------------------------------------------------------------------------------------------------ row stores
class InputStore:
    """Model inputs of one split, indexed by row: token ids, cached hidden states ('embeds') or pixel tensors."""

    def __init__(self, kind: str, rows, pad_id: int = 0):
        self.kind, self.rows, self.pad_id = kind, rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx) -> "InputStore":
        """The rows `idx`, in that order, as a new store."""
        idx = [int(i) for i in idx]
        if self.kind == "pixels":
            return InputStore(self.kind, self.rows[torch.as_tensor(idx, dtype=torch.long)], self.pad_id)
        rows = [self.rows[i] for i in idx]
        return InputStore(self.kind, rows, self.pad_id)

    @staticmethod
    def concat(stores: list) -> "InputStore":
        """One store holding the rows of `stores` one after the other (same kind)."""
        kind = stores[0].kind
        if any(s.kind != kind for s in stores):
            raise ValueError(f"InputStore.concat: mixed kinds {[s.kind for s in stores]}")
        rows = torch.cat([s.rows for s in stores]) if kind == "pixels" else [r for s in stores for r in s.rows]
        return InputStore(kind, rows, stores[0].pad_id)

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

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, np.int64)
        return Split(self.labels[idx], self.sensitive[idx], self.store.subset(idx))


@dataclass
class Bundle:
    """One dataset at one seed: the splits, a factory of identically initialised models, and FairLoRA settings."""

    name: str
    splits: dict
    new_model: Callable[[], nn.Module]
    fair_config: dict
    description: dict = field(default_factory=dict)


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


def _text_model(path: str, kind: str, vocab_size: int):
    """(model, description): a tiny random BERT for tests, else all-MiniLM-L6-v2 with a new 2-class head."""
    import transformers as T

    if kind == "tiny":
        bcfg = T.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, num_labels=2, max_position_embeddings=128)
        return T.BertForSequenceClassification(bcfg), "tiny BERT (4 blocks, hidden 32, random init)"
    # float32 whatever the stored dtype (a half-precision copy of the weights may be used on the GPU machine)
    model = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    return model, "all-MiniLM-L6-v2 (6 blocks, hidden 384) + new head"


@torch.no_grad()
def cached_hidden_states(full: nn.Module, ids_store: InputStore, k: int) -> InputStore:
    """Block k's input (hidden_states[k]) for every row of `ids_store`, unpadded, as an 'embeds' store."""
    dev, rows = device(), []
    full.to(dev)
    for start in range(0, len(ids_store), 128):
        b = {kk: v.to(dev) for kk, v in ids_store.batch(range(start, min(start + 128, len(ids_store)))).items()}
        hidden = full(**b, output_hidden_states=True).hidden_states[k].float().cpu()
        for j, n in enumerate(b["attention_mask"].sum(1).tolist()):
            rows.append(hidden[j, :n].clone())
    return InputStore("embeds", rows)


def _text_split(part, cfg: dict, name: str, seed: int, tok):
    """(labels, sensitive, token ids) of one split: validation/test subsampled, rows sorted by length."""
    labels, sensitive = np.asarray(part["labels"], np.int64), np.asarray(part["sensitive"], np.int64)
    texts = list(part["text"])
    limit, offset = {"validation": (cfg["n_val"], 11), "test": (cfg["n_test"], 13)}.get(name, (None, 0))
    keep = (stratified_subsample(labels, sensitive, limit, seed + offset) if limit is not None and len(labels) > limit
            else np.arange(len(labels)))
    labels, sensitive, texts = labels[keep], sensitive[keep], [texts[i] for i in keep]
    ids = tok(texts, truncation=True, max_length=cfg["max_length"])["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")  # length-sorted: little padding when predicting
    return labels[order], sensitive[order], [ids[i] for i in order]


def build_text(cfg: dict, seed: int, minilm: Optional[str] = None) -> Bundle:
    """UCI Adult as text; with `freeze=k` > 0 the bottom k blocks run once here and the model is the rest."""
    import transformers as T

    from fairnet_peft.data import load_adult_text

    n_eval = max(cfg["n_val"], cfg["n_test"])
    ds = load_adult_text(seed=seed, max_train=cfg["n_train"], max_eval=n_eval, progress=False)
    path = minilm_path(minilm)
    tok = T.AutoTokenizer.from_pretrained(path)
    T.set_seed(seed)
    full, model_name = _text_model(path, cfg["model"], tok.vocab_size)
    full.eval()
    k, n_blocks = int(cfg["freeze"]), full.config.num_hidden_layers
    if not 0 <= k < n_blocks:
        raise ValueError(f"text.freeze={k}: must be in [0, {n_blocks - 1}]")
    splits = {}
    for name in ("train", "validation", "test"):
        labels, sensitive, ids = _text_split(ds[name], cfg, name, seed, tok)
        store = InputStore("ids", ids, pad_id=tok.pad_token_id or 0)
        splits[name] = Split(labels, sensitive, cached_hidden_states(full, store, k) if k else store)
    full.cpu()
    init = strip_bottom(full, k) if k else full
    del full
    fair = dict(task_type="SEQ_CLS")
    if k:
        fair["detector_layer"] = max(0, n_blocks // 2 - k)  # the full model's middle block, as with freeze=0
    desc = {"model": model_name, "frozen bottom blocks (cached)": k, "max_length": cfg["max_length"]}
    return Bundle("text", splits, lambda: copy.deepcopy(init), fair, desc)


def build_vision(cfg: dict, seed: int) -> Bundle:
    import transformers as T

    from fairnet_peft.data import load_digits_backgrounds

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


def build_hidden(cfg: dict, seed: int) -> Bundle:
    """The synthetic task whose group is not in the input (`make_synthetic_text(group_in_input=False)`: no group
    marker, the group drawn independently of the tokens) with a tiny BERT from a config."""
    import transformers as T

    from fairnet_peft.data import make_synthetic_text

    ds = make_synthetic_text(seed=seed, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"],
                             group_in_input=False)
    splits = {}
    for name in ("train", "validation", "test"):
        part = ds[name]
        ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(part["input_ids"], part["attention_mask"])]
        splits[name] = Split(np.asarray(part["labels"], np.int64), np.asarray(part["sensitive"], np.int64),
                             InputStore("ids", ids, pad_id=0))
    bcfg = T.BertConfig(vocab_size=32, hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                        num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"], num_labels=2,
                        max_position_embeddings=64)
    T.set_seed(seed)
    init = T.BertForSequenceClassification(bcfg)
    desc = {"model": f"BERT from config: {cfg['layers']} blocks, hidden {cfg['hidden']}, random init",
            "data": "make_synthetic_text(group_in_input=False): no group marker, group independent of the tokens"}
    return Bundle("hidden", splits, lambda: copy.deepcopy(init), dict(task_type="SEQ_CLS"), desc)


BUILDERS = {"text": "build_text", "vision": "build_vision", "hidden": "build_hidden"}


def hf_dataset(split: Split, sensitive: Optional[np.ndarray] = None, weight: Optional[np.ndarray] = None,
               offset: int = 0):
    """The rows of `split` as a `datasets.Dataset` of (row index into the store, labels, sensitive[, weight]); `offset`
    shifts the row index (a store that holds several splits one after the other)."""
    from datasets import Dataset

    cols = {"row": offset + np.arange(len(split)), "labels": split.labels,
            "sensitive": split.sensitive if sensitive is None else sensitive}
    if weight is not None:
        cols["weight"] = np.asarray(weight, np.float32)
    return Dataset.from_dict(cols)


# ------------------------------------------------------------------------------------------------ label settings
def setting_view(ds: dict, setting: str, seed: int, fraction: float = LABEL_FRACTION) -> dict:
    """The splits a label `setting` sees: `fairnet_peft.data.hide_group_labels` on train and validation (full: as is;
    partial: a seeded `fraction` of the train group labels, validation unknown; unlabeled: train and validation
    unknown); test keeps its labels (reporting only). `ds` maps split names to `datasets.Dataset`s; the format of
    each split (e.g. torch) is kept."""
    from datasets import DatasetDict

    seen = hide_group_labels(DatasetDict(train=ds["train"], validation=ds["validation"]), setting, fraction, seed)
    out = dict(ds)
    for name in ("train", "validation"):
        fmt = ds[name].format
        out[name] = seen[name].with_format(fmt["type"], columns=None, **fmt["format_kwargs"])
    return out


def setting_groups(labels: dict, sensitive: dict, setting: str, seed: int,
                   fraction: float = LABEL_FRACTION) -> tuple:
    """(train, validation) group labels a `setting` sees, for arrays: `setting_view` on {labels, sensitive} columns."""
    from datasets import Dataset

    ds = {k: Dataset.from_dict({"labels": np.asarray(labels[k]), "sensitive": np.asarray(sensitive[k])})
          for k in ("train", "validation")}
    seen = setting_view(ds, setting, seed, fraction)
    return tuple(np.asarray(seen[k]["sensitive"], np.int64) for k in ("train", "validation"))


# ------------------------------------------------------------------------------------------------ default-settings tasks
def task_loader(task: str):
    """(name, function) of the task's loader in fairnet_peft.data; function None when the package lacks it."""
    import fairnet_peft.data as D

    name = TASKS[task][0]
    if name is None:  # the second text task: whichever load_*_text besides Adult the package ships
        name = next((n for n in sorted(dir(D)) if n.startswith("load_") and n.endswith("_text")
                     and n != "load_adult_text"), None)
    return (name, getattr(D, name)) if name and hasattr(D, name) else (name, None)


def _take(ds, n: int, seed: int):
    """`ds` subsampled to n rows by `fairnet_peft.data.stratified_subsample`."""
    if n >= len(ds):
        return ds
    return ds.select(stratified_subsample(np.asarray(ds["labels"]), np.asarray(ds["sensitive"]), n, seed))


def pretrain_backbone(vit_config, pre: dict, seed: int, out: str) -> dict:
    """The stand-in for an ImageNet checkpoint (Waterbirds-style task): a ViT of `vit_config`'s shape trained with a
    plain `Trainer` to name the digit (10 classes) on `fairnet_peft.data.load_digit_objects` (the seed's *train*
    digit pool, plain backgrounds: neither task photo, so no background-label link). Returns the backbone's
    state dict without the classifier; the task model loads it and keeps its own fresh 2-class head."""
    import transformers as T

    from fairnet_peft.data import load_digit_objects

    T.set_seed(seed)
    objects = load_digit_objects(seed, n=pre["n"], image_size=vit_config.image_size).with_format("torch")
    config = copy.deepcopy(vit_config)
    config.num_labels = 10
    args = T.TrainingArguments(**run_args(out, seed, pre["epochs"], pre["batch"], pre["batch"]),
                               learning_rate=pre["lr"], lr_scheduler_type="cosine", warmup_steps=0.1)
    trainer = quiet(T.Trainer(model=T.ViTForImageClassification(config), args=args, train_dataset=objects))
    trainer.train()
    return {k: v for k, v in trainer.model.state_dict().items() if not k.startswith("classifier.")}


def build_task(task: str, cfg: dict, seed: int):
    """(splits with model inputs + labels + sensitive in torch format, model factory, task_type, pad id, note)."""
    import transformers as T

    name, load = task_loader(task)
    if load is None:
        return None
    wanted = dict(seed=seed, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"], progress=False,
                  max_train=cfg["n_train"], max_eval=cfg["n_test"], image_size=cfg.get("image_size"),
                  digit_scale=cfg.get("digit_scale"))
    params = inspect.signature(load).parameters
    options = TASK_OPTIONS.get(task, {})
    if bad := [k for k in options if k not in params]:
        raise ValueError(f"TASK_OPTIONS[{task!r}]: {name} has no parameter {bad}")
    ds = load(**{k: v for k, v in wanted.items() if k in params and v is not None}, **options)
    sizes = {"train": cfg["n_train"], "validation": cfg["n_val"], "test": cfg["n_test"]}
    ds = {sp: _take(ds[sp], n, seed + i) for i, (sp, n) in enumerate(sizes.items())}
    family, pad = TASKS[task][1], 0
    if family == "minilm":
        path = minilm_path()
        tok = T.AutoTokenizer.from_pretrained(path)
        pad = tok.pad_token_id or 0
        ds = {sp: d.map(lambda b: tok(b["text"], truncation=True, max_length=cfg["max_length"]), batched=True)
              .select_columns(["input_ids", "attention_mask", "labels", "sensitive"]) for sp, d in ds.items()}

        def new_model():
            return T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
        desc, task_type = "all-MiniLM-L6-v2 + new head", "SEQ_CLS"
    elif family == "bert":
        vocab = int(max(max(map(max, d["input_ids"])) for d in ds.values())) + 1
        length = len(ds["train"][0]["input_ids"])
        bcfg = T.BertConfig(vocab_size=vocab, num_labels=2, max_position_embeddings=max(64, length), **cfg["model"])

        def new_model():
            return T.BertForSequenceClassification(bcfg)
        desc, task_type = f"BERT from config {cfg['model']}", "SEQ_CLS"
    else:
        size = int(np.asarray(ds["train"][0]["pixel_values"]).shape[-1])
        vcfg = T.ViTConfig(image_size=size, num_channels=3, hidden_dropout_prob=0.0, num_labels=2, **cfg["model"])
        backbone = None
        if cfg.get("pretrain"):  # Waterbirds-style: start from an object-pretrained backbone, as Waterbirds does
            with tempfile.TemporaryDirectory() as tmp:
                backbone = pretrain_backbone(vcfg, cfg["pretrain"], seed, tmp)

        def new_model():
            model = T.ViTForImageClassification(vcfg)
            if backbone is not None:
                missing = model.load_state_dict(backbone, strict=False).missing_keys
                assert all(k.startswith("classifier.") for k in missing), missing
            return model
        start = (f"pretrained to name the digit on {cfg['pretrain']['n']} plain-background images of the train pool"
                 if backbone is not None else "from config")
        desc, task_type = f"ViT {start}, {size}px, {cfg['model']}", None
        ds = {sp: d.select_columns(["pixel_values", "labels", "sensitive"]) for sp, d in ds.items()}
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else name
    return ({sp: d.with_format("torch") for sp, d in ds.items()}, new_model, task_type, pad,
            f"fairnet_peft.data.{call}; {desc}")
