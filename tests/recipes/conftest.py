"""Fixtures for the end-to-end recipe tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def last_checkpoint():
    from ftcore.training import find_latest_checkpoint

    def find(output_dir: Path) -> Path:
        folder = find_latest_checkpoint(output_dir)
        assert folder is not None, f"no checkpoint in {output_dir}"
        return folder

    return find
