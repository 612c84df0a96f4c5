"""
Marks every test under ``tests/e2e/`` with ``e2e`` (registered in pyproject.toml), so that
``pytest -m "not e2e"`` is the quick in-memory run and plain ``pytest`` still runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
