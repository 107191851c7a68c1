"""Shared fixtures: the real public data in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_DATA = ROOT / "sample_data"
PIPELINES = ROOT / "pipelines"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when that folder is absent (e.g. a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real public data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def breast_panel_path() -> Path:
    return PIPELINES / "breast-5plex.toml"


@pytest.fixture(scope="session")
def panel(breast_panel_path):
    """The breast five-plex panel (a module may define its own ``panel`` instead)."""
    from qdplex.panel import read_panel

    return read_panel(breast_panel_path)


@pytest.fixture(scope="session", autouse=True)
def checkout_before():
    """The checkout's git status before the first test (test_checkout.py compares after the last)."""
    from test_checkout import checkout_state

    return checkout_state(ROOT)


def pytest_collection_modifyitems(config, items):
    """The checkout check runs after every other test."""
    items.sort(key=lambda item: item.name == "test_checkout_left_as_found")
