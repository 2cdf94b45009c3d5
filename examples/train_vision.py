#!/usr/bin/env python
"""FairNet on images: ERM training → FairLoRA adapter + FairTrainer → ERM vs FairNet on the test split.

Default: a small `ViTForImageClassification` built from a config (32x32 input, patch 4, hidden 64, 4 blocks, 4 heads,
MLP 256) trained from scratch on `fairnet_peft.data.load_digits_backgrounds` (sklearn digits pasted on photo
backgrounds; y = digit >= 5, s = 1 for the rare 'flower' background, which in training occurs almost only with y = 0).

    python examples/train_vision.py --demo
    python examples/train_vision.py --setting unlabeled
    python examples/train_vision.py --model ./my-vit --dataset ./images.parquet --image-column image \\
        --label-column label --sensitive-column group --minority-value rare
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_vision.py --demo

`--model` takes a pretrained HF image classifier (name or local path; its head is replaced); images of `--dataset`
are then converted with its `AutoImageProcessor`. The image column may hold images, file paths (relative to the
dataset's folder) or pixel arrays (`as_image`). Outputs as in train_text.py: adapter/ with a model card,
group_accuracies.png and metrics.json in --output-dir; the ERM model is cached (see --erm-cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import outputs  # noqa: E402

DEFAULTS = dict(
    model=None,
    model_help="HF image-classification model name or local path (pretrained; the head is replaced). Default: a "
               "small ViT built from a config and trained from scratch (see --image-size).",
    max_train=4000, max_eval=800, max_val=None,
    erm_epochs=20, erm_lr=1e-3,
    epochs=5,  # FairNet knobs: the library defaults
    batch_size=64, eval_batch_size=128,
    # The ViT is tiny: a second thread mostly waits at synchronisation points, and when another process shares the
    # CPU, 2 threads ran an ERM epoch 8x slower than 1 thread (103 s vs 13 s for 4000 images). Raise it for big models.
    num_threads=1,
    output_dir="outputs/vision",
    demo_help="The defaults with a smaller test split (400 images) and output in outputs/demo-vision.",
)
DEMO = dict(max_eval=400, output_dir="outputs/demo-vision")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_arguments(parser, defaults=DEFAULTS)
    vision = parser.add_argument_group("vision")
    vision.add_argument("--image-column", default="image",
                        help="Column with the images, image file paths (relative to the dataset's folder) or pixel "
                             "arrays (only for --dataset).")
    vision.add_argument("--image-size", type=int, default=32,
                        help="Input size of the from-scratch ViT (ignored with --model, which sets its own).")
    return parser


def scratch_config(image_size: int, num_labels: int, class_names):
    from transformers import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=256, num_labels=num_labels,
                     id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})


def image_processor(args):
    """The pretrained model's processor, or a resize + [-1, 1] scaling for the from-scratch ViT."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    if args.model:
        return AutoImageProcessor.from_pretrained(args.model)
    return ViTImageProcessor(size={"height": args.image_size, "width": args.image_size}, do_resize=True,
                             do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def processor_size(processor, fallback: int) -> int:
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    for source in (crop, size):
        if isinstance(source, dict):
            for key in ("height", "shortest_edge"):
                if source.get(key):
                    return int(source[key])
        elif isinstance(source, int):
            return source
    return fallback


def _renormalise(ds, processor):
    """The digits loader gives [-1, 1] pixels; a pretrained --model wants its own processor's normalisation."""
    import numpy as np

    mean = np.asarray(getattr(processor, "image_mean", [0.5] * 3), np.float32).reshape(3, 1, 1)
    std = np.asarray(getattr(processor, "image_std", [0.5] * 3), np.float32).reshape(3, 1, 1)

    def renorm(batch):
        x = (np.asarray(batch["pixel_values"], np.float32) + 1.0) / 2.0
        return {"pixel_values": (x - mean) / std}

    return ds.map(renorm, batched=True, batch_size=256)


def readable(value, column: str, base: str, where: str):
    """`as_image(...)` decoded to RGB; a file or bytes PIL cannot read raise a ValueError naming the row and file."""
    from PIL import UnidentifiedImageError

    try:
        return as_image(value, column, base).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        raise ValueError(f"{where}: the image in column {column!r} ({name or 'embedded bytes'}) cannot be read: "
                         f"{err}. Replace or remove that file (or its row) and run again.") from err


def as_image(value, column: str, base: str):
    """A PIL image from what an image column may hold: an image, a file path (relative to the dataset's folder), the
    {"bytes", "path"} dict of an undecoded `datasets.Image`, or an H×W(×C) or C×H×W array of pixel values (0-255,
    or 0-1 floats)."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else as_image(value["path"], column, base)
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base, value)
        if not os.path.isfile(path):
            raise ValueError(f"image column {column!r} names the file {value!r}, which is not at {path!r}; paths are "
                             "read relative to the dataset's folder.")
        return Image.open(path)
    if isinstance(value, (list, np.ndarray)):
        pixels = np.asarray(value)
        if pixels.ndim in (2, 3) and pixels.dtype != object:
            if pixels.dtype.kind == "f" and pixels.size and pixels.max() <= 1.0:
                pixels = pixels * 255.0
            if pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[-1] not in (1, 3, 4):
                pixels = pixels.transpose(1, 2, 0)  # channels first (C×H×W), as torch stores images
            if pixels.ndim == 3 and pixels.shape[-1] == 1:
                pixels = pixels[..., 0]
            return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    raise ValueError(f"image column {column!r} holds {type(value).__name__} values; give images, image file paths or "
                     "H×W(×C) pixel arrays (--image-column names the column).")


def load_data(args, processor):
    """DatasetDict with pixel_values/labels/sensitive, and the class names."""
    from fairnet_peft.data import load_digits_backgrounds, load_group_dataset

    with common.dist_state().main_process_first():
        if args.dataset is None:
            size = processor_size(processor, args.image_size) if args.model else args.image_size
            n_eval = args.max_eval or 800
            ds = load_digits_backgrounds(seed=args.seed, image_size=size, n_train=args.max_train or 4000,
                                         n_val=args.max_val or n_eval, n_test=n_eval, progress=False)
            ds, names = ds.remove_columns(["digit", "digit_index"]), ["digit<5", "digit>=5"]
            if args.model:
                ds = _renormalise(ds, processor)
        else:
            ds, names = load_group_dataset(
                args.dataset, config=args.dataset_config, label_column=args.label_column,
                sensitive_column=args.sensitive_column, minority_value=args.minority_value,
                keep_columns=[args.image_column], seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)

            base = args.dataset if os.path.isdir(args.dataset) else os.path.dirname(os.path.abspath(args.dataset))

            from datasets import DatasetDict, Image

            def convert(batch, rows, split):
                images = [readable(v, args.image_column, base, f"{split} row {i}")
                          for v, i in zip(batch[args.image_column], rows)]
                return {"pixel_values": processor(images=images, return_tensors="np")["pixel_values"]}

            converted = {}
            for split, part in ds.items():
                if isinstance(part.features.get(args.image_column), Image):  # decoded by readable(), which names
                    part = part.cast_column(args.image_column, Image(decode=False))  # a file that cannot be read
                converted[split] = part.map(convert, batched=True, batch_size=64, with_indices=True,
                                            fn_kwargs={"split": split}, remove_columns=[args.image_column])
            ds = DatasetDict(converted)
    return common.cap_validation(ds, args), names


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # 1. Arguments
    args = common.parse_with_preset(build_parser(), argv, DEMO)
    common.quiet_libraries()
    from peft import get_peft_model
    from transformers import (AutoModelForImageClassification, ViTForImageClassification, default_data_collator,
                              set_seed)

    from fairnet_peft import FairLoraConfig, FairTrainer  # importing fairnet_peft registers the PEFT type FAIRLORA
    from fairnet_peft.data import hide_group_labels

    clock = common.Stopwatch()
    set_seed(args.seed)
    processor = image_processor(args)

    # 2. Data: hide the group labels the --setting does not have (train/validation; test keeps them for reporting)
    ds, class_names = load_data(args, processor)
    common.check_groups(ds, class_names)
    visible = hide_group_labels(ds, args.setting, args.label_fraction, args.seed)
    data = visible.with_format("numpy")  # much faster to batch than the "torch" format for Array3D columns
    for split in common.SPLITS:
        common.log("[data] " + common.describe_split(visible[split], split, class_names))
    collator, test = default_data_collator, data["test"]
    clock.lap("data")

    # 3. ERM: train the classifier (plain Trainer), cached in --erm-cache; evaluate it on test
    def build_model():
        set_seed(args.seed)
        if args.model:
            return AutoModelForImageClassification.from_pretrained(
                args.model, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                label2id={n: i for i, n in enumerate(class_names)}, ignore_mismatched_sizes=True)
        return ViTForImageClassification(scratch_config(args.image_size, len(class_names), class_names))

    erm_key = dict(kind="vision", model=args.model or "vit-scratch", image_size=args.image_size,
                   dataset=args.dataset or "digits_backgrounds", config=args.dataset_config,
                   image_column=args.image_column, label_column=args.label_column, max_train=args.max_train,
                   seed=args.seed, epochs=args.erm_epochs, lr=args.erm_lr, batch_size=args.batch_size)
    erm_dir, erm_info = common.train_or_load_erm(
        args=args, key=erm_key, build_model=build_model, train_ds=data["train"].remove_columns("sensitive"),
        eval_ds=data["validation"].remove_columns("sensitive"), save_extra=processor.save_pretrained,
        trainer_kwargs=dict(data_collator=collator))
    clock.lap("erm")
    erm_logits = common.erm_test_logits(AutoModelForImageClassification, erm_dir, args, collator, test)
    erm_test = common.test_metrics(erm_logits, test["labels"], test["sensitive"])
    clock.lap("erm_test")

    # 4. FairNet: a FairLoRA adapter on the ERM model, trained by FairTrainer (detector → prototypes → LoRA)
    config = FairLoraConfig(r=args.rank, lora_alpha=2 * args.rank, threshold=args.threshold,
                            detector_layer=args.detector_layer, base_model_name_or_path=erm_dir)
    model = get_peft_model(AutoModelForImageClassification.from_pretrained(erm_dir), config)
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
    details = {"task": "image classification",
               "data": args.dataset or "digits on photo backgrounds (fairnet_peft.data.load_digits_backgrounds)",
               "minority group (s=1)": common.minority_description(args, default="flower background"),
               "model": args.model or "ViT from scratch (32x32, patch 4, hidden 64, 4 blocks, 4 heads, MLP 256)"}
    return outputs.finish_run(
        args=args, kind="vision", model=model, trainer=trainer, train_result=train_result, erm=(erm_dir, erm_info),
        data=data, logits={"ERM": erm_logits, "FairNet": logits}, results={"ERM": erm_test, "FairNet": fair_test},
        card=dict(title="FairNet (FairLoRA) adapter for image classification", loader="AutoPeftModel",
                  details=details, class_names=class_names),
        timings=clock.total(), memory=clock.memory)


if __name__ == "__main__":
    main()
    common.exit_launched_run()
