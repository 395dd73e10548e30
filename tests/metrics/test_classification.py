"""Classification metrics against scikit-learn and a hand-computed case."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from visiontune.metrics.classification import classification_metrics

CLASSES = ["none", "mild", "moderate", "severe", "proliferative"]


def one_hot_probs(preds: list[int], k: int) -> torch.Tensor:
    probs = torch.full((len(preds), k), 0.1 / (k - 1))
    probs[torch.arange(len(preds)), torch.tensor(preds)] = 0.9
    return probs


def test_against_sklearn_on_random_predictions() -> None:
    gen = torch.Generator().manual_seed(7)
    targets = torch.randint(0, 5, (200,), generator=gen)
    probs = torch.rand(200, 5, generator=gen).softmax(-1)
    # make predictions correlate with the targets so kappa is not ~0
    probs[torch.arange(120), targets[:120]] += 1.0
    probs = probs / probs.sum(-1, keepdim=True)
    preds = probs.argmax(-1)
    m = classification_metrics(probs, targets, CLASSES, referable_from=2)
    t, p = targets.numpy(), preds.numpy()
    s = m.scalars
    assert s["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-6)
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p), abs=1e-6)
    assert s["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"), abs=1e-6)
    kappa = cohen_kappa_score(t, p, weights="quadratic")
    assert s["quadratic_kappa"] == pytest.approx(kappa, abs=1e-5)
    recalls = recall_score(t, p, average=None)
    for i, name in enumerate(CLASSES):
        assert s[f"sensitivity.{name}"] == pytest.approx(recalls[i], abs=1e-6)
        specificity = recall_score(t != i, p != i)
        assert s[f"specificity.{name}"] == pytest.approx(specificity, abs=1e-6)
    assert m.tables["confusion_matrix"] == confusion_matrix(t, p, labels=range(5)).tolist()
    positive, predicted = t >= 2, p >= 2
    assert s["referable.sensitivity"] == pytest.approx(recall_score(positive, predicted))
    assert s["referable.specificity"] == pytest.approx(recall_score(~positive, ~predicted))
    auc = roc_auc_score(positive, probs[:, 2:].sum(-1).numpy())
    assert s["referable.auc"] == pytest.approx(auc, abs=1e-5)


def test_hand_computed_case_with_an_absent_class() -> None:
    # targets: none x3, mild x2, moderate x1; preds: none,none,mild | mild,none | severe
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = [0, 0, 1, 1, 0, 3]
    m = classification_metrics(one_hot_probs(preds, 5), targets, CLASSES)
    s = m.scalars
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["sensitivity.none"] == pytest.approx(2 / 3)
    assert s["sensitivity.mild"] == pytest.approx(1 / 2)
    assert s["sensitivity.moderate"] == 0.0
    # specificity of none: of the 3 non-none items, 1 (mild -> none) is wrongly called none
    assert s["specificity.none"] == pytest.approx(2 / 3)
    assert s["specificity.severe"] == pytest.approx(5 / 6)
    # balanced accuracy averages only the 3 classes that occur: (2/3 + 1/2 + 0) / 3
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    # F1 per class: none 2/3, mild 1/2, moderate 0, severe 0 (predicted, absent); proliferative
    # never occurs anywhere and is left out of the macro average, as scikit-learn does.
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert "sensitivity.severe" not in s and "sensitivity.proliferative" not in s
    assert "sensitivity.severe" in m.tables["undefined"]
    assert m.tables["confusion_matrix"][0] == [2, 1, 0, 0, 0]
    assert m.tables["support"] == [3, 2, 1, 0, 0]


def test_perfect_and_degenerate_predictions() -> None:
    targets = torch.tensor([0, 1, 2, 3, 4])
    s = classification_metrics(one_hot_probs([0, 1, 2, 3, 4], 5), targets, CLASSES, 2).scalars
    assert s["accuracy"] == s["quadratic_kappa"] == s["referable.auc"] == 1.0
    only_none = classification_metrics(one_hot_probs([0, 0], 5), torch.tensor([0, 0]), CLASSES, 2)
    assert "quadratic_kappa" not in only_none.scalars  # undefined, not a fake 0 or NaN
    assert "referable.auc" not in only_none.scalars
    assert only_none.scalars["referable.specificity"] == 1.0
