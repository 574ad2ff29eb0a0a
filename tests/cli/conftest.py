"""CLI tests name components in tests/fixtures (e.g. `ftcore_test_components.tiny_mlp`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
