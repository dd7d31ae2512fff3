"""Every shipped YAML config loads into its typed dataclass (a typo in a shipped file is a bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgcl.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _config_class(path: Path):
    from evaluation.cli import EvalConfig
    from evaluation.extract import ExtractConfig
    from evaluation.mil.cli import MilConfig
    from evaluation.segmentation.config import SegConfig
    from preprocessing.config import TileConfig
    from sgcl.train.config import PretrainConfig

    name, folder = path.name, path.parent.name
    if folder == "tile" or name.endswith("_tile.yaml"):
        return TileConfig
    if folder == "pretrain":
        return PretrainConfig
    if name.startswith("extract"):
        return ExtractConfig
    if name.startswith("seg"):
        return SegConfig
    if name.startswith("heatmap"):
        from evaluation.heatmap_cli import HeatmapConfig

        return HeatmapConfig
    if name.startswith("mil"):
        return MilConfig
    return EvalConfig


CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_config_loads(path):
    load_config(_config_class(path), path)


def test_config_reference_is_current():
    """docs/config-reference.md is generated from the dataclasses; regenerate it when a key changes."""
    from sgcl.config_reference import render

    doc = REPO / "docs" / "config-reference.md"
    assert doc.read_text() == render(), "run: python -m sgcl.config_reference > docs/config-reference.md"
