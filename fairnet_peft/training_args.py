"""`FairTrainingArguments`: `transformers.TrainingArguments` plus FairNet's stage, loss, anchor and pseudo-label knobs.

The standard `num_train_epochs` and `learning_rate` drive the contrastive LoRA stage; the detector stage has its own
`detector_epochs` and `detector_learning_rate`. Defaults are the paper's (margin 0.5, τ from the adapter config) or,
where the paper is silent, the authors' own run (task term weight 0.1). See docs/api.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments


@dataclass
class FairTrainingArguments(TrainingArguments):
    # ------------------------------------------------------------------ data
    sensitive_column: str = field(
        default="sensitive",
        metadata={"help": "Dataset column with the sensitive group: 1 minority (to correct), 0 majority, -1 unknown."},
    )
    # ------------------------------------------------------------------ detector stage
    detector_epochs: float = field(default=5.0, metadata={"help": "Epochs of the detector stage (Eq. 1 BCE)."})
    detector_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the detector stage."})
    # ------------------------------------------------------------------ LoRA stage loss
    margin: float = field(default=0.5, metadata={"help": "Triplet margin m of Eq. 2 (paper: 0.5, tuned in [0.1, 1])."})
    distance: str = field(
        default="euclidean",
        metadata={"help": "Distance D of Eq. 2 on L2-normalised features: 'euclidean', 'squared_euclidean', 'cosine'."},
    )
    negative_strategy: str = field(
        default="nearest",
        metadata={
            "help": (
                "Negative prototype of Eq. 2: 'nearest' other-class majority prototype (any number of classes), "
                "'all' (mean of the hinges over every other class) or 'random'."
            )
        },
    )
    contrastive_weight: float = field(default=1.0, metadata={"help": "Weight λ_C of the triplet loss."})
    task_loss_weight: float = field(
        default=0.1,
        metadata={"help": "Weight λ_T of the task loss on the anchors in the LoRA stage (authors' run: 0.1; 0 allowed)."},
    )
    lora_objective: str = field(
        default="contrastive",
        metadata={
            "help": (
                "'contrastive' (Eq. 2 + λ_T task loss, FairNet) or 'task' (the 'w/o contrastive' ablation: the task "
                "loss alone on the flagged rows, LoRA on)."
            )
        },
    )
    gate_threshold: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Overrides the adapter's τ for training and evaluation, e.g. 0.0 for the 'w/o detector' ablation "
                "(LoRA on for every row). None keeps FairLoraConfig.threshold."
            )
        },
    )
    # ------------------------------------------------------------------ anchors
    anchor_source: str = field(
        default="union",
        metadata={
            "help": (
                "Which rows are minority anchors and build the prototypes: 'labels' (known labels, or pseudo-labels "
                "in the unlabeled setting), 'detector' (rows the trained detector flags) or 'union' (labels where "
                "known, the detector elsewhere)."
            )
        },
    )
    class_balanced_anchors: bool = field(
        default=False, metadata={"help": "Weight anchors by inverse class frequency among the training anchors."}
    )
    min_anchors_per_batch: int = field(
        default=2, metadata={"help": "Batches with fewer anchors are skipped (and counted in the logs)."}
    )
    # ------------------------------------------------------------------ unlabeled setting
    pseudo_labeler: str = field(
        default="lof",
        metadata={
            "help": (
                "How the minority is found when no row is labelled: 'lof' (scikit-learn LocalOutlierFactor on the "
                "frozen representations, as in the paper) or 'error_set' (rows the ERM model misclassifies, as JTT)."
            )
        },
    )
    lof_n_neighbors: int = field(default=20, metadata={"help": "LocalOutlierFactor n_neighbors."})
    lof_contamination: float = field(
        default=0.1, metadata={"help": "LocalOutlierFactor contamination: the fraction of rows marked minority."}
    )
    # ------------------------------------------------------------------ model selection
    eval_sensitive_labels: str = field(
        default="auto",
        metadata={
            "help": (
                "Whether evaluation may use the eval set's sensitive labels ('use', 'ignore', or 'auto' = only in "
                "the full setting). When ignored, selection metrics are eval_accuracy and eval_worst_class_accuracy."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        choices = {
            "distance": ("euclidean", "squared_euclidean", "cosine"),
            "negative_strategy": ("nearest", "all", "random"),
            "lora_objective": ("contrastive", "task"),
            "anchor_source": ("labels", "detector", "union"),
            "pseudo_labeler": ("lof", "error_set"),
            "eval_sensitive_labels": ("auto", "use", "ignore"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"FairTrainingArguments.{name}={getattr(self, name)!r}: choose one of {valid}.")
        if self.margin < 0:
            raise ValueError(f"FairTrainingArguments.margin={self.margin}: must be >= 0.")
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"FairTrainingArguments.gate_threshold={self.gate_threshold}: must be in [0, 1].")
        if not 0.0 < self.lof_contamination <= 0.5:
            raise ValueError(f"FairTrainingArguments.lof_contamination={self.lof_contamination}: must be in (0, 0.5].")
        if self.min_anchors_per_batch < 1:
            raise ValueError("FairTrainingArguments.min_anchors_per_batch must be >= 1.")
        if self.contrastive_weight < 0 or self.task_loss_weight < 0:
            raise ValueError("FairTrainingArguments.contrastive_weight and task_loss_weight must be >= 0.")
        kwargs = self.activation_checkpointing_kwargs if hasattr(self, "activation_checkpointing_kwargs") else None
        kwargs = kwargs or getattr(self, "gradient_checkpointing_kwargs", None) or {}
        if kwargs.get("use_reentrant"):
            raise ValueError(
                "FairTrainingArguments: reentrant activation checkpointing is not supported (the per-example gate "
                "is reused inside checkpointed blocks). Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
