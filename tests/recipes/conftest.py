"""Recipes report progress on the ``adaptnet.recipes`` logger; the tests read it on stdout, as the CLI shows it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adaptnet.recipes import show_progress


@pytest.fixture(autouse=True)
def _progress_on_stdout() -> Iterator[None]:
    with show_progress():
        yield
