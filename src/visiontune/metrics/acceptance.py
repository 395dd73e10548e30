"""Acceptance criteria from the config (`accuracy: ">=0.90"`), judged at every evaluation."""

from __future__ import annotations

import operator

from visiontune.config.schema import parse_criterion

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def judge(criteria: dict[str, str], scalars: dict[str, float]) -> dict[str, dict[str, object]]:
    """Per criterion: the value, the criterion, and pass/fail (a missing metric fails)."""
    verdicts: dict[str, dict[str, object]] = {}
    for name, text in criteria.items():
        op, threshold = parse_criterion(text)
        value = scalars.get(name)
        passed = value is not None and _OPS[op](value, threshold)
        verdicts[name] = {"criterion": text.strip(), "value": value, "passed": passed}
    return verdicts
