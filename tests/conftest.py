"""Shared test fixtures: where the real assets are, and a skip when they are absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# FTCORE_TEST_ASSETS points elsewhere, e.g. at a copy carried to the GPU machine.
SHARED_ASSETS = Path(os.environ.get("FTCORE_TEST_ASSETS", PROJECT_ROOT.parent / "shared" / "assets"))


@pytest.fixture
def assets() -> Path:
    """Path to ../shared/assets (real models, tokenizers, data); skips the test when it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real test assets not found at {SHARED_ASSETS} (a fresh clone has no ../shared)")
    return SHARED_ASSETS


@pytest.fixture
def gsm8k_questions(assets) -> list[str]:
    """The questions of the real GSM8K test split: varied English prose for tokenizer comparisons."""
    lines = (assets / "data" / "gsm8k_test.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines]
