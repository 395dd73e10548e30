"""val_fraction with data.group_pattern keeps both eyes of a patient on one side."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from visiontune.config.schema import DataConfig
from visiontune.data.imagefolder import Record, stratified_holdout


def eyepacs_records(patients: int = 40) -> list[Record]:
    rng = random.Random(0)
    return [
        Record(Path(f"{p}_{eye}.jpeg"), rng.randrange(5), f"{p}_{eye}")
        for p in range(patients)
        for eye in ("left", "right")
    ]


def patients(records: list[Record]) -> set[str]:
    return {r.sample_id.split("_")[0] for r in records}


def test_group_pattern_never_splits_a_patient() -> None:
    records = eyepacs_records()
    problems: list[str] = []
    train, val = stratified_holdout(
        records, 0.25, seed=1, problems=problems, group_pattern=r"^(\d+)_"
    )
    assert problems == []
    assert patients(train).isdisjoint(patients(val))
    assert len(train) + len(val) == 80 and 14 <= len(val) <= 26  # ~10 of 40 patients, 2 eyes each
    # the same split by image leaks patients into both sides: the grouping is what prevents it
    image_train, image_val = stratified_holdout(records, 0.25, seed=1, problems=[])
    assert patients(image_train) & patients(image_val)


def test_ids_the_pattern_does_not_match_are_named() -> None:
    problems: list[str] = []
    records = [*eyepacs_records(4), Record(Path("x.jpeg"), 0, "scan-x")]
    stratified_holdout(records, 0.5, seed=0, problems=problems, group_pattern=r"^(\d+)_")
    assert problems and "matches no group in 1 sample id(s), e.g. ['scan-x']" in problems[0]


def test_a_broken_pattern_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        DataConfig(train=Path("."), group_pattern="([0-9]+")
