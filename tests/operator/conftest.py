"""The operator's integration fixtures (tests/utils/operators.py has the helpers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from utils import operators


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[operators.Cluster]:
    """The cluster emulator over HTTP, with the official client's APIs."""
    with operators.cluster_at(tmp_path) as running:
        yield running
