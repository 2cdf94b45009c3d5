"""`FairTrainingArguments`: `transformers.TrainingArguments` plus FairNet's stage, loss, anchor and pseudo-label knobs.

The standard `num_train_epochs` and `learning_rate` drive the contrastive LoRA stage (epochs over the anchor rows,
at least `lora_min_updates` optimizer updates, counted as if on one device so that scaling out keeps the run); the
detector stage has its own `detector_*` budget and stops early on a held-out slice of the labelled rows. Defaults
are the paper's (margin 0.5, τ from the adapter config) where they work on our default-settings suite; every
departure (LoRA learning rate, detector learning rate and early stopping, class-balanced anchors) is justified with
its measurement in docs/method.md §"Defaults". See docs/api.md.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Optional, Union

from transformers import TrainingArguments

from .pseudo_labels import METHODS as PSEUDO_LABELERS
from .selection import TIE_BREAKS


@dataclass
class FairTrainingArguments(TrainingArguments):
    # ------------------------------------------------------------------ data
    sensitive_column: str = field(
        default="sensitive",
        metadata={"help": "Dataset column with the sensitive group: 1 minority (to correct), 0 majority, -1 unknown."},
    )
    # ------------------------------------------------------------------ LoRA stage budget
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": (
                "Learning rate of the contrastive LoRA stage. Default 1e-3, a LoRA rate (Trainer's 5e-5 is meant for "
                "full fine-tuning: a LoRA whose B starts at zero barely moves at it; see docs/method.md)."
            )
        },
    )
    lora_min_updates: int = field(
        default=200,
        metadata={
            "help": (
                "Least number of optimizer updates of the LoRA stage. The stage runs max(this, ⌈num_train_epochs × "
                "anchors / (per_device_train_batch_size × gradient_accumulation_steps)⌉) updates, counted as if on "
                "one process: on N processes each update sees N× the anchors and the update count (and so the "
                "learning-rate schedule) is unchanged. `max_steps > 0` overrides the whole rule."
            )
        },
    )
    # ------------------------------------------------------------------ detector stage
    detector_epochs: float = field(
        default=20.0,
        metadata={"help": "Upper bound on the epochs of the detector stage (Eq. 1 BCE); it usually stops earlier."},
    )
    detector_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the detector stage."})
    detector_min_updates: int = field(
        default=300,
        metadata={
            "help": (
                "The detector stage does not stop early before this many updates (a fresh detector can sit on a "
                "plateau first); its budget is max(2 × this, detector_epochs × updates per epoch)."
            )
        },
    )
    detector_holdout_fraction: float = field(
        default=0.1,
        metadata={
            "help": (
                "Fraction of the labelled (or pseudo-labelled) training rows held out from the detector stage, "
                "stratified by group. Their class-balanced BCE decides early stopping, and they give the held-out "
                "`train_detector_auc` / `train_probe_auc`. 0 disables early stopping (the stage then runs its whole "
                "budget) and the held-out AUCs."
            )
        },
    )
    detector_patience: int = field(
        default=5,
        metadata={
            "help": (
                "Stop the detector stage after this many held-out evaluations without improvement of the held-out "
                "loss, and keep the best detector. Evaluations run every min(one epoch, 50) updates."
            )
        },
    )
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
    anchor_weighting: str = field(
        default="class_balanced",
        metadata={
            "help": (
                "Per-class weights of the anchors' loss terms (triplet and task): 'class_balanced' (inverse class "
                "frequency among the anchors: every class weighs the same), 'majority_prior' (the anchors' class mix "
                "re-weighted to the majority group's, so the minority is pulled toward the majority's behaviour, not "
                "to balanced accuracy) or 'none'. See docs/method.md for the measurement behind the default."
            )
        },
    )
    anchor_threshold: Union[float, str] = field(
        default="auto",
        metadata={
            "help": (
                "Risk above which a row without a (pseudo-)label counts as detected minority for the anchors and "
                "prototypes (anchor_source 'detector'/'union'). 'auto' = w₁ / (1 + w₁) with w₁ = N(s=0)/N(s=1) of the "
                "labelled rows: the detector is trained class-balanced, so this is where the minority becomes the more "
                "likely group under the training prior (0.9 for a 10 % minority). Independent of the gate τ, so the "
                "'w/o detector' ablation (gate_threshold=0) changes the gate only."
            )
        },
    )
    prototype_rows: str = field(
        default="correct",
        metadata={
            "help": (
                "Which majority rows make the prototypes μ_(y,0): 'correct' (default: those the frozen ERM model "
                "classifies correctly, so every prototype sits on its class's side of the head's boundary) or 'all' "
                "(the paper: every majority row of the class)."
            )
        },
    )
    lora_rows: str = field(
        default="train+eval",
        metadata={
            "help": (
                "Which rows the LoRA stage learns from: 'train+eval' (default: the training anchors and the minority "
                "rows of a seeded, (class × group)-stratified share `lora_eval_fraction` of the eval set, rows the "
                "base model never fit; the correction is then selected on the rest of the eval set), 'train' (the "
                "training anchors only, the paper; the whole eval set selects) or 'eval' (that share's minority rows "
                "only). Without an eval set with class labels, 'train'. See docs/method.md for the measurement."
            )
        },
    )
    lora_eval_fraction: float = field(
        default=0.5,
        metadata={"help": "With lora_rows 'train+eval' / 'eval': the share of the eval rows the LoRA stage may train "
                          "on (their minority rows); the selection uses the rest."},
    )
    selection_rows: str = field(
        default="share",
        metadata={
            "help": (
                "With lora_rows 'train+eval' / 'eval': which eval rows the selection reads. 'share' (default): the "
                "share the LoRA stage did not draw from. 'untrained': every row the LoRA stage did not train on, "
                "i.e. also the LoRA share's rows outside the minority, weighted per (class × group) cell so that ACC "
                "is the whole eval set's (twice the majority rows: a smaller standard error on the accuracy floor). "
                "Measured on the default-settings suite, it was no better across tasks (docs/method.md §7)."
            )
        },
    )
    lora_cross_fit: bool = field(
        default=False,
        metadata={
            "help": (
                "With lora_rows 'train+eval' / 'eval' and an eval set to split: before the LoRA that is kept, train "
                "a second one on the other share's minority rows, and select τ and the strength on every eval row, "
                "each share read through the LoRA that did not train on it (2-fold cross-fitting: twice the rows "
                "behind the accuracy floor and every cell). The kept LoRA is the one trained without it, bit for "
                "bit; the cost is a second LoRA stage. selection_rows is then moot. Measured, not the default: a "
                "steadier WGA gain on Adult at -0.5 accuracy points, no change on BUG (docs/method.md §7)."
            )
        },
    )
    min_anchors_per_batch: int = field(
        default=2, metadata={"help": "Batches with fewer anchors are skipped (and counted in the logs)."}
    )
    partial_label_propagation: bool = field(
        default=True,
        metadata={
            "help": (
                "Partial setting: a class-balanced scikit-learn LogisticRegression fitted on the labelled rows' "
                "frozen features labels the other rows, and the detector trains on all of them (known labels kept). "
                "False: the detector learns from the labelled rows only (the paper)."
            )
        },
    )
    # ------------------------------------------------------------------ unlabeled setting
    pseudo_labeler: str = field(
        default="auto",
        metadata={
            "help": (
                "How the minority is found when no row is labelled (fairnet_peft.training.pseudo_labels, scikit-learn): "
                "'lof' (LocalOutlierFactor within each class), 'gmm' / 'kmeans' (GEORGE-style clustering within each "
                "class, the smaller cluster is the minority), 'error_set' (rows the ERM model misclassifies, as JTT), "
                "or 'auto' (default: among lof/gmm/kmeans, the one whose pseudo-minority best explains ERM's errors, "
                "error_set if none does). Features: the head's input z joined with the mean-pooled detector input."
            )
        },
    )
    lof_n_neighbors: Union[int, str] = field(
        default="auto",
        metadata={"help": "LocalOutlierFactor n_neighbors per class; 'auto' = 3 × contamination × class rows, ≥ 20."},
    )
    lof_contamination: float = field(
        default=0.1, metadata={"help": "LocalOutlierFactor contamination: the share of each class marked minority."}
    )
    pseudo_clusters: int = field(
        default=2, metadata={"help": "Clusters per class for pseudo_labeler 'gmm' / 'kmeans' (smallest = minority)."}
    )
    # ------------------------------------------------------------------ selection after training
    threshold_selection: str = field(
        default="auto",
        metadata={
            "help": (
                "What is chosen after training on held-out rows (selection.py): 'auto' (default) = the gate threshold "
                "τ and the adapter strength α (the LoRA update scaled by α on gated rows) with the best worst-group "
                "accuracy within max_accuracy_drop and max_eod_increase; 'threshold' = τ only (α kept); 'none' = keep "
                "the configured τ and α when they stay within those limits, else switch the adapter off. Held-out rows: "
                "eval_dataset (class labels needed) or, without one, the detector's held-out training rows (which "
                "the LoRA stage then does not train on). Groups: the true ones (full), known labels else the "
                "detector's estimate (partial), the pseudo-groups (unlabeled). The saved config keeps the choice."
            )
        },
    )
    max_accuracy_drop: Union[float, str] = field(
        default=0.005,
        metadata={
            "help": (
                "Accuracy floor of the selection: no (τ, α) is kept at which the adapter loses more than this fraction "
                "of held-out accuracy against the adapter off (0.005 = half a point; 'none' = no floor)."
            )
        },
    )
    floor_standard_errors: float = field(
        default=2.0,
        metadata={
            "help": (
                "Margin of the accuracy floor, in standard errors of the paired accuracy difference (adapter vs off) "
                "on the held-out rows: a (τ, α) is kept only when its accuracy change minus this many standard errors "
                "is above −max_accuracy_drop; 0 = the point estimate alone. A correction that flips many held-out "
                "predictions must show a larger gain to pass, so small held-out sets do not let a costly correction "
                "through by chance. 2, not 1: the selection keeps the best of some 400 (τ, α) candidates, and the "
                "best of many passes a one-error margin by luck more often than one candidate would."
            )
        },
    )
    floor_admits_harmless: bool = field(
        default=False,
        metadata={
            "help": (
                "True: the accuracy floor's margin (floor_standard_errors) applies only to a (τ, α) that turns at "
                "least one held-out prediction from right to wrong, so one or two fixes with no break pass in under "
                "200 held-out rows, where the margin refuses them. False (default): the margin applies to every "
                "candidate that flips a row. A fixes-only candidate competes on held-out accuracy, so of ~100 "
                "candidates the luckiest few fixes win; on fresh seeds the rule kept one such correction that cost "
                "2.8 EOD points on test (docs/method.md §7)."
            )
        },
    )
    tie_break_standard_errors: Optional[float] = field(
        default=1.645,
        metadata={
            "help": (
                "Margin of the worst-group-loss tie-break (selection_tie_break), in standard errors of each cell's "
                "paired per-row loss change; None = floor_standard_errors. 1.645 (default), a one-sided 95 % test: a "
                "candidate reaches the tie-break only after it passed the accuracy floor (2 standard errors, which "
                "guards against harm) and tied with the adapter off on held-out WGA and accuracy, so this margin "
                "asks whether its worst-group gain is real, not whether it is safe. It goes with the default "
                "'worst_group_loss_bound' ranking: with the estimate's ranking a looser margin lets the luckiest of "
                "many candidates win (docs/method.md §7)."
            )
        },
    )
    accuracy_gain_beyond_noise: bool = field(
        default=True,
        metadata={
            "help": (
                "True (default): a correction beats the adapter off on held-out accuracy (at the same held-out WGA) "
                "only where its paired accuracy change exceeds tie_break_standard_errors standard errors; a smaller "
                "gain is a tie with the adapter off, which the worst-group-loss tie-break (and "
                "tie_break_max_majority_gate_rate) then decides. False (the rule before): the estimate ranks, so of "
                "~100 candidates one that fixes a single held-out row more than it breaks beats the adapter off; on "
                "a user's task with partly blank group labels such choices cost 1-2 rows of the worst cell's 22 "
                "test rows, and once 2.4 EOD points (docs/method.md §7)."
            )
        },
    )
    tie_break_max_majority_gate_rate: Union[float, str] = field(
        default=0.1,
        metadata={
            "help": (
                "The most of the held-out majority rows a correction that ties with the adapter off on held-out WGA "
                "and accuracy may gate and still win the worst-group-loss tie-break (selection_tie_break); 'none' = "
                "no bound. 0.1 (default): such a candidate's only evidence is one cell's loss, and a gate on many "
                "majority rows makes it a change of the model that a few held-out rows cannot vouch for (on 50 "
                "held-out rows the tie-break kept gates on 46 % and 93 % of the majority that cost 3 and 1 test rows "
                "of 100); the tie-break's winners on the suite's tasks gate none. Candidates that raise held-out WGA "
                "or accuracy are not bounded (max_majority_gate_rate bounds every candidate; docs/method.md §7)."
            )
        },
    )
    max_eod_increase: Union[float, str] = field(
        default=0.01,
        metadata={
            "help": (
                "EOD ceiling of the selection: no (τ, α) is kept whose equalized-odds difference (mean convention) on "
                "the held-out rows exceeds the adapter-off one by more than this (the correction must not overshoot "
                "past the majority; 'none' = no ceiling)."
            )
        },
    )
    max_majority_gate_rate: Union[float, str] = field(
        default="none",
        metadata={
            "help": (
                "Largest share of the held-out majority rows (group 0 of the selection's groups) on which the chosen "
                "gate may fire; 'none' (default) = no bound. A gate on most of the majority makes the adapter a "
                "global change of the model, which the few held-out rows of a cell cannot vouch for; the bound keeps "
                "the correction on the rows the detector marks. It bounds a share of rows, not a risk value, so it "
                "needs no calibrated detector. Not the default: a weak detector reaches the minority only by gating "
                "many majority rows too, and 0.5 cost Waterbirds-style Full 8 WGA points (docs/method.md §7)."
            )
        },
    )
    selection_tie_break: str = field(
        default="worst_group_loss_bound",
        metadata={
            "help": (
                "How the selection breaks a tie on worst-group accuracy and accuracy. 'worst_group_loss_bound' "
                "(default): among the candidates whose worst-group cross-entropy (GroupDRO's objective, from the same "
                "held-out logits) stays below the adapter-off one with each cell's loss raised by "
                "tie_break_standard_errors standard errors of the cell's paired per-row change, the one with the "
                "lowest such raised loss (the gain it shows at worst, not the luckiest estimate), then the weaker "
                "correction; 'worst_group_loss': the same test, ranked by the estimate; 'weakest' goes straight to "
                "the weaker correction, so the adapter stays off whenever no candidate beats it on WGA or ACC. Small "
                "held-out cells tie often: 5 rows cannot show a WGA gain that the loss does show (docs/method.md §7)."
            )
        },
    )
    min_selected_threshold: float = field(
        default=0.0,
        metadata={
            "help": (
                "Lowest gate threshold τ the selection may choose (the configured τ is always a candidate; 0 = "
                "every τ). The detector is trained class-balanced, so with labels risk 0.5 is where a row looks as "
                "much like the minority as like the majority: 0.5 keeps the LoRA off rows the detector places with "
                "the majority. Not the default: a detector trained on few or pseudo labels, or a weak one, puts "
                "minority rows below 0.5, and the bound then blocks real corrections (docs/method.md §7)."
            )
        },
    )
    min_detector_auc: float = field(
        default=0.65,
        metadata={
            "help": (
                "Do no harm: when the detector's ROC-AUC on its held-out rows is below this, it cannot tell who to "
                "correct, and the adapter is switched off (τ = 1) with a warning, whatever the selection would pick. "
                "The AUC is taken among rows of the same class (train_detector_auc_within_class), so a detector "
                "that only recognises a class the group is common in does not pass."
            )
        },
    )
    force_adapter: bool = field(
        default=False,
        metadata={"help": "Keep the adapter even when the detector cannot find the group (see min_detector_auc)."},
    )
    train_lora_when_blind: bool = field(
        default=False,
        metadata={
            "help": (
                "Train the LoRA stage even when the detector cannot find the group (min_detector_auc), so that "
                "trainer.reselect(force_adapter=True) can switch that LoRA on later. By default the stage is skipped "
                "then: the adapter stays off (τ = 1) whatever it learns, so its training would be time spent for "
                "nothing. force_adapter=True trains it too."
            )
        },
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
            "prototype_rows": ("correct", "all"),
            "pseudo_labeler": PSEUDO_LABELERS,
            "eval_sensitive_labels": ("auto", "use", "ignore"),
            "threshold_selection": ("auto", "threshold", "none"),
            "selection_tie_break": TIE_BREAKS,
            "anchor_weighting": ("class_balanced", "majority_prior", "none"),
            "lora_rows": ("train", "train+eval", "eval"),
            "selection_rows": ("untrained", "share"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"FairTrainingArguments.{name}={getattr(self, name)!r}: choose one of {valid}.")
        if not 0.0 < self.lora_eval_fraction < 1.0:
            raise ValueError(f"FairTrainingArguments.lora_eval_fraction={self.lora_eval_fraction}: must be in (0, 1), "
                             "e.g. 0.5 (half the eval rows train the LoRA, the other half selects).")
        if self.lora_cross_fit and self.lora_rows == "train":
            raise ValueError("FairTrainingArguments.lora_cross_fit=True with lora_rows='train': no eval row trains the "
                             "LoRA, so the whole eval set already selects and there is nothing to cross-fit. Use "
                             "lora_rows='train+eval' (the default) or lora_cross_fit=False.")
        if self.margin < 0:
            raise ValueError(f"FairTrainingArguments.margin={self.margin}: must be >= 0.")
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"FairTrainingArguments.gate_threshold={self.gate_threshold}: must be in [0, 1].")
        if not 0.0 < self.lof_contamination <= 0.5:
            raise ValueError(f"FairTrainingArguments.lof_contamination={self.lof_contamination}: must be in (0, 0.5].")
        if not 0.0 <= self.detector_holdout_fraction < 0.5:
            raise ValueError(
                f"FairTrainingArguments.detector_holdout_fraction={self.detector_holdout_fraction}: must be in [0, 0.5)."
            )
        if self.anchor_threshold != "auto" and not (isinstance(self.anchor_threshold, (int, float))
                                                    and 0.0 <= self.anchor_threshold < 1.0):
            raise ValueError(f"FairTrainingArguments.anchor_threshold={self.anchor_threshold!r}: 'auto' or a number in "
                             "[0, 1).")
        for name, hint in (("max_accuracy_drop", "0.005 = half a point"), ("max_eod_increase", "0.01 = one point"),
                           ("max_majority_gate_rate", "0.5 = half of the majority rows"),
                           ("tie_break_max_majority_gate_rate", "0.1 = a tenth of the majority rows")):
            value = getattr(self, name)
            if isinstance(value, str) and value != "none":
                with contextlib.suppress(ValueError):  # "0.01" from a command line
                    value = float(value)
                setattr(self, name, value)
            if value not in ("none", None) and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"FairTrainingArguments.{name}={value!r}: 'none' or a fraction in [0, 1] ({hint}).")
        if not (isinstance(self.floor_standard_errors, (int, float)) and 0.0 <= self.floor_standard_errors <= 5.0):
            raise ValueError(f"FairTrainingArguments.floor_standard_errors={self.floor_standard_errors!r}: a number "
                             "in [0, 5] (2 = the default margin, 0 = the point estimate).")
        for name in ("floor_admits_harmless", "accuracy_gain_beyond_noise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FairTrainingArguments.{name}={getattr(self, name)!r}: True or False.")
        if self.tie_break_standard_errors is not None and not (
                isinstance(self.tie_break_standard_errors, (int, float)) and 0.0 <= self.tie_break_standard_errors <= 5.0):
            raise ValueError(f"FairTrainingArguments.tie_break_standard_errors={self.tie_break_standard_errors!r}: a "
                             "number in [0, 5], or None for floor_standard_errors.")
        if not (isinstance(self.min_selected_threshold, (int, float)) and 0.0 <= self.min_selected_threshold <= 1.0):
            raise ValueError(f"FairTrainingArguments.min_selected_threshold={self.min_selected_threshold!r}: a number "
                             "in [0, 1] (0 = search every τ).")
        if not 0.0 <= self.min_detector_auc <= 1.0:
            raise ValueError(f"FairTrainingArguments.min_detector_auc={self.min_detector_auc!r}: must be in [0, 1].")
        for name in ("lora_min_updates", "detector_min_updates", "detector_patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name != "detector_patience" else 1):
                raise ValueError(f"FairTrainingArguments.{name}={getattr(self, name)!r}: must be a non-negative integer"
                                 + (" >= 1." if name == "detector_patience" else "."))
        if self.detector_epochs <= 0 or self.detector_learning_rate < 0:
            raise ValueError("FairTrainingArguments: detector_epochs must be > 0 and detector_learning_rate >= 0.")
        if self.lof_n_neighbors != "auto" and not (isinstance(self.lof_n_neighbors, int) and self.lof_n_neighbors >= 1):
            raise ValueError(f"FairTrainingArguments.lof_n_neighbors={self.lof_n_neighbors!r}: 'auto' or an integer >= 1.")
        if not isinstance(self.pseudo_clusters, int) or self.pseudo_clusters < 2:
            raise ValueError(f"FairTrainingArguments.pseudo_clusters={self.pseudo_clusters!r}: an integer >= 2.")
        if self.min_anchors_per_batch < 1:
            raise ValueError("FairTrainingArguments.min_anchors_per_batch must be >= 1.")
        if self.per_device_train_batch_size < self.min_anchors_per_batch:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} is below min_anchors_per_batch="
                f"{self.min_anchors_per_batch}: the LoRA stage skips a batch with fewer anchors, so it would skip "
                "every batch and the LoRA would not train (gradient accumulation does not help: the count is per "
                "batch). Raise per_device_train_batch_size, or set min_anchors_per_batch="
                f"{self.per_device_train_batch_size}.")
        if self.contrastive_weight < 0 or self.task_loss_weight < 0:
            raise ValueError("FairTrainingArguments.contrastive_weight and task_loss_weight must be >= 0.")
        kwargs = self.activation_checkpointing_kwargs if hasattr(self, "activation_checkpointing_kwargs") else None
        kwargs = kwargs or getattr(self, "gradient_checkpointing_kwargs", None) or {}
        if kwargs.get("use_reentrant"):
            raise ValueError(
                "FairTrainingArguments: reentrant activation checkpointing is not supported (the per-example gate "
                "is reused inside checkpointed blocks). Use activation_checkpointing_kwargs={'use_reentrant': False}."
            )


    def resolved_max_accuracy_drop(self) -> Optional[float]:
        return _bound(self.max_accuracy_drop)

    def resolved_max_eod_increase(self) -> Optional[float]:
        return _bound(self.max_eod_increase)

    def resolved_max_majority_gate_rate(self) -> Optional[float]:
        return _bound(self.max_majority_gate_rate)

    def resolved_tie_break_max_majority_gate_rate(self) -> Optional[float]:
        return _bound(self.tie_break_max_majority_gate_rate)

    def pseudo_labeler_knobs(self) -> dict:
        """The knobs `pseudo_labeler` takes (pseudo_labels.pseudo_label), from these arguments."""
        lof = dict(n_neighbors=self.lof_n_neighbors, contamination=self.lof_contamination)
        clusters = dict(n_clusters=self.pseudo_clusters)
        return {"lof": lof, "gmm": clusters, "kmeans": clusters, "auto": {**lof, **clusters}}.get(self.pseudo_labeler, {})


def _bound(value) -> Optional[float]:
    """A selection limit as a number, or None where it is 'none' (no limit)."""
    return None if value in ("none", None) else float(value)


def stage_arguments(args: TrainingArguments, **overrides) -> TrainingArguments:
    """A copy of `args` with `overrides`, for one stage or pass; the caller's object is never written to.

    A shallow `copy.copy`, not `dataclasses.replace`: replace re-runs `TrainingArguments.__post_init__`, and the new
    object's lazy device set-up (`_setup_devices`) then resets the accelerate state the running `Trainer` holds. The
    copy keeps that set-up, and the overrides are plain values of fields already validated (steps, rates, strategy
    names, output folders, `dataloader_drop_last`)."""
    unknown = [k for k in overrides if not hasattr(args, k)]
    if unknown:
        raise AttributeError(f"stage_arguments: {type(args).__name__} has no fields {unknown}.")
    stage = copy.copy(args)
    for key, value in overrides.items():
        setattr(stage, key, value)
    return stage
