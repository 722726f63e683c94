"""Shared test fixtures."""

from __future__ import annotations

import locale
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_locale() -> Iterator[None]:
    """ITK's DICOM writer (GDCM) switches the process locale to "C", which makes Python's text files
    ASCII-only; the tests that write DICOM series must not change how later tests read files."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)
