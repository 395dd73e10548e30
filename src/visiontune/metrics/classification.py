"""Classification metrics from predicted probabilities, with torchmetrics doing the counting.

Scalar names are flat and use the user's class names (`sensitivity.severe`), so acceptance
criteria in the config can name them directly. A metric that is undefined on this evaluation
set (the sensitivity of a class with no sample, kappa when everything is one class, an AUC
with one kind of target) is left out and listed in `tables["undefined"]` rather than reported
as 0 or NaN: a missing metric fails an acceptance criterion loudly instead of passing or
failing it by accident.

torchmetrics is imported when metrics are first computed, not with the package: it adds about
60 MB to every training process that has not evaluated yet.
"""

from __future__ import annotations

import math

import torch

from visiontune.task import Metrics


def classification_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    referable_from: int | None = None,
) -> Metrics:
    """Accuracy, balanced accuracy, macro-F1, quadratic kappa, per-class sensitivity and
    specificity, the confusion matrix, and binary referable metrics when asked.

    `probs` is (N, K) class probabilities, `targets` (N,) class indices.
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_cohen_kappa,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_recall,
        multiclass_specificity,
    )

    k = len(classes)
    probs = probs.float()
    targets = targets.long()
    preds = probs.argmax(dim=-1)
    support = torch.bincount(targets, minlength=k)
    recall = multiclass_recall(preds, targets, num_classes=k, average=None)
    specificity = multiclass_specificity(preds, targets, num_classes=k, average=None)
    negatives = len(targets) - support

    values: dict[str, float] = {
        "accuracy": multiclass_accuracy(preds, targets, num_classes=k, average="micro").item(),
        # Mean recall over the classes present in the targets (scikit-learn's definition);
        # torchmetrics' macro recall would also average in 0 for predicted-but-absent classes.
        "balanced_accuracy": recall[support > 0].mean().item() if len(targets) else math.nan,
        "macro_f1": multiclass_f1_score(preds, targets, num_classes=k, average="macro").item(),
        "quadratic_kappa": multiclass_cohen_kappa(
            preds, targets, num_classes=k, weights="quadratic"
        ).item(),
    }
    for i, name in enumerate(classes):
        values[f"sensitivity.{name}"] = recall[i].item() if support[i] > 0 else math.nan
        values[f"specificity.{name}"] = specificity[i].item() if negatives[i] > 0 else math.nan
    if referable_from is not None:
        values.update(referable_metrics(probs, targets, referable_from))

    scalars = {name: v for name, v in values.items() if math.isfinite(v)}
    confusion = multiclass_confusion_matrix(preds, targets, num_classes=k)
    tables = {
        "classes": list(classes),
        "confusion_matrix": confusion.tolist(),
        "support": support.tolist(),
        "undefined": sorted(set(values) - set(scalars)),
    }
    return Metrics(scalars=scalars, tables=tables)


def referable_metrics(
    probs: torch.Tensor, targets: torch.Tensor, threshold_class: int
) -> dict[str, float]:
    """Binary metrics where positive means class index >= `threshold_class` (DR: grade >= 2).

    The binary score is the probability mass on the positive classes; the binary decision
    follows the multiclass prediction so that both views of a sample agree.
    """
    from torchmetrics.functional.classification import binary_auroc

    positive = targets >= threshold_class
    predicted = probs.argmax(dim=-1) >= threshold_class
    n_pos = int(positive.sum())
    n_neg = len(targets) - n_pos
    tp = int((predicted & positive).sum())
    tn = int((~predicted & ~positive).sum())
    score = probs[:, threshold_class:].sum(dim=-1)
    both = n_pos > 0 and n_neg > 0
    return {
        "referable.sensitivity": tp / n_pos if n_pos else math.nan,
        "referable.specificity": tn / n_neg if n_neg else math.nan,
        "referable.auc": binary_auroc(score, positive.long()).item() if both else math.nan,
    }
