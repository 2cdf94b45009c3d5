"""FairNet fairness metrics as an ``evaluate`` module, loadable offline from this file.

    metric = evaluate.load("/path/to/fairnet_peft/evaluation/metric/fairnet_metric.py")
    # or: metric = fairnet_peft.metrics.load_evaluate_metric()
    metric.compute(predictions=preds, references=labels, sensitive_features=groups)

The numbers come from ``fairnet_peft.metrics.fairness_summary``, so they equal the functions'.
``add_batch`` accumulates predictions and references; ``sensitive_features`` is passed to
``compute`` in the same row order. Unknown groups are -1; without sensitive features only
``accuracy`` and ``worst_class_accuracy`` are returned.
"""

import datasets
import evaluate

from fairnet_peft.metrics import fairness_summary

_DESCRIPTION = (
    "Accuracy, worst-group accuracy over (label x group) cells, worst-class accuracy, equalized-odds "
    "difference (mean = 1/2(|dTPR|+|dFPR|), the FairNet paper's; and worst case = max), equal "
    "opportunity and demographic parity differences, and per-cell accuracies. Multiclass labels use "
    "a macro one-vs-rest average; rows with sensitive value -1 are excluded from group metrics."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    sensitive_features (list of int, optional): group per row, -1 = unknown.
    labels (list of int, optional): the full class set (e.g. range(K)); fixes the multiclass rule.
    per_cell (bool, default True): also return acc_y{y}_s{s} for every cell.
Returns:
    dict of floats: accuracy, worst_class_accuracy and, with sensitive features,
    worst_group_accuracy, worst_sensitive_group_accuracy, average_group_accuracy,
    equalized_odds_difference, equalized_odds_difference_worst_case,
    equal_opportunity_difference, demographic_parity_difference, acc_y*_s*.
"""

_CITATION = """
@inproceedings{zhou2025fairnet,
  title={FairNet: Dynamic Fairness Correction without Performance Loss via Contrastive Conditional LoRA},
  author={Zhou, Songqi and others},
  note={arXiv:2510.19421},
  booktitle={NeurIPS},
  year={2025}
}
"""


class FairnetMetric(evaluate.Metric):
    """``evaluate`` wrapper of :func:`fairnet_peft.metrics.fairness_summary`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sensitive_features=None, labels=None, per_cell=True):
        return fairness_summary(
            references,
            predictions,
            sensitive_features=sensitive_features,
            labels=labels,
            per_cell=per_cell,
        )
