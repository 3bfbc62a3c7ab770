"""Fixtures of the store tests."""

import pytest
from store_helpers import small_layout


@pytest.fixture
def layout():
    return small_layout()
