"""Shared fixtures of the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def tree_bytes(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes): what 'byte-identical caches' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tree():
    return tree_bytes
