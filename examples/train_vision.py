#!/usr/bin/env python
"""FairNet on images: ERM training → FairLoRA adapter + FairTrainer → ERM vs FairNet on the test split.

Default: a small `ViTForImageClassification` built from a config (32x32 input, patch 4, hidden 64, 4 blocks, 4 heads,
MLP 256) trained from scratch on `fairnet_peft.datasets.load_digits_backgrounds` (sklearn digits pasted on photo
backgrounds; y = digit >= 5, s = 1 for the rare 'flower' background, which in training occurs almost only with y = 0).

    python examples/train_vision.py --demo
    python examples/train_vision.py --setting unlabeled
    python examples/train_vision.py --model ./my-vit --dataset ./images.parquet --image-column image \\
        --label-column label --sensitive-column group --minority-value rare
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_vision.py --demo

`--model` takes a pretrained HF image classifier (name or local path; its head is replaced); images of `--dataset`
are then converted with its `AutoImageProcessor`. Outputs as in train_text.py: adapter/ with a model card,
group_accuracies.png and metrics.json in --output-dir; the ERM model is cached (see --erm-cache).
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
    vision.add_argument("--image-column", default="image", help="Column with the images (only for --dataset).")
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


def load_data(args, processor):
    """DatasetDict with pixel_values/labels/sensitive (torch format), and the class names."""
    import numpy as np

    state = common.dist_state()
    with state.main_process_first():
        if args.dataset is None:
            from fairnet_peft.datasets import load_digits_backgrounds

            size = processor_size(processor, args.image_size) if args.model else args.image_size
            n_eval = args.max_eval or 800
            ds = load_digits_backgrounds(seed=args.seed, image_size=size, n_train=args.max_train or 4000,
                                         n_val=args.max_val or n_eval, n_test=n_eval, progress=False)
            ds = ds.remove_columns(["digit", "digit_index"])
            names = ["digit<5", "digit>=5"]
            if args.model:  # the loader gives [-1, 1]; use the pretrained model's normalisation instead
                mean = np.asarray(getattr(processor, "image_mean", [0.5] * 3), np.float32).reshape(3, 1, 1)
                std = np.asarray(getattr(processor, "image_std", [0.5] * 3), np.float32).reshape(3, 1, 1)

                def renorm(batch):
                    x = (np.asarray(batch["pixel_values"], np.float32) + 1.0) / 2.0
                    return {"pixel_values": (x - mean) / std}

                ds = ds.map(renorm, batched=True, batch_size=256)
        else:
            ds, names = common.load_custom_dataset(args, keep_columns=[args.image_column], seed=args.seed)

            def convert(batch):
                images = [img.convert("RGB") for img in batch[args.image_column]]
                return {"pixel_values": processor(images=images, return_tensors="np")["pixel_values"]}

            ds = ds.map(convert, batched=True, batch_size=64, remove_columns=[args.image_column])
    if args.max_val is not None and args.max_val < len(ds["validation"]):
        ds["validation"] = ds["validation"].shuffle(seed=args.seed + 3).select(range(args.max_val))
    return ds, names


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_with_preset(build_parser(), argv, DEMO)
    common.quiet_libraries()
    from transformers import AutoModelForImageClassification, ViTForImageClassification, default_data_collator, set_seed

    import fairnet_peft  # noqa: F401  (registers the PEFT type FAIRLORA)

    timings = {"_start": time.time()}
    set_seed(args.seed)
    processor = image_processor(args)
    ds, class_names = load_data(args, processor)
    visible = common.apply_label_setting(ds, args.setting, args.label_fraction, args.seed)
    data = visible.with_format("numpy")  # much faster to batch than the "torch" format for Array3D columns
    for split in common.SPLITS:
        common.log("[data] " + common.describe_split(visible[split], split))
    timings["data"] = time.time() - timings["_start"]

    def build_model():
        set_seed(args.seed)
        if args.model:
            return AutoModelForImageClassification.from_pretrained(
                args.model, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                label2id={n: i for i, n in enumerate(class_names)}, ignore_mismatched_sizes=True)
        return ViTForImageClassification(scratch_config(args.image_size, len(class_names), class_names))

    def save_extra(path):
        processor.save_pretrained(path)

    erm_key = dict(kind="vision", model=args.model or "vit-scratch", image_size=args.image_size,
                   dataset=args.dataset or "digits_backgrounds", config=args.dataset_config,
                   image_column=args.image_column, label_column=args.label_column, max_train=args.max_train,
                   seed=args.seed, epochs=args.erm_epochs, lr=args.erm_lr, batch_size=args.batch_size)
    details = {"task": "image classification",
               "data": args.dataset or "digits on photo backgrounds (fairnet_peft.datasets.load_digits_backgrounds)",
               "minority group (s=1)": (f"{args.sensitive_column} == {args.minority_value}" if args.minority_value
                                        else "flower background" if args.dataset is None
                                        else f"{args.sensitive_column} == 1"),
               "model": args.model or "ViT from scratch (32x32, patch 4, hidden 64, 4 blocks, 4 heads, MLP 256)"}
    return common.run_pipeline(
        args=args, kind="vision", data=data, class_names=class_names, erm_key=erm_key, build_model=build_model,
        load_model=AutoModelForImageClassification.from_pretrained, collator=default_data_collator,
        save_extra=save_extra, erm_trainer_kwargs={}, task_type=None, loader="AutoPeftModel",
        title="FairNet (FairLoRA) adapter for image classification", details=details, timings=timings)


if __name__ == "__main__":
    main()
