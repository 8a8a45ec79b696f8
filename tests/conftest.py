"""Shared test fixtures: location of ../shared data (tests skip with a clear reason when it is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test when it is absent."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not found: shared test data absent on this machine")
    return path
