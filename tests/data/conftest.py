"""Fixtures for data tests (the small shapes build itself is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from sycoca_jax.data import sources
from tests.helpers import SMALL_NAME


@pytest.fixture(scope="session")
def train_source(data_dir):
    return sources.open_source(SMALL_NAME, "train", data_dir)
