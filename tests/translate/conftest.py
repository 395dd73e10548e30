"""Fixtures of the translate tests: a copy of the real tiles per test, and this folder on
sys.path for the test-only model and losses (imported by dotted path, as a user's would be)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.translate.tiles import copy_tiles


@pytest.fixture(autouse=True)
def user_code_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture
def tiles(tmp_path: Path) -> Path:
    return copy_tiles(tmp_path / "tiles")
