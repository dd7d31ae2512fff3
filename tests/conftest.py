"""Shared test fixtures: the real public data in ../shared/data and the shipped demo slide."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
DEMO_SLIDE = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test with a clear reason when absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (the ../shared/data folder ships beside the repo in CI)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture
def demo_slide() -> Path:
    assert DEMO_SLIDE.is_file(), f"the demo slide {DEMO_SLIDE} is shipped in the repo and must exist"
    return DEMO_SLIDE
