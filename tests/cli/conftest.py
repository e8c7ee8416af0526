"""Fixtures for driving the `gpudelivery` command in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from utils import factories


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def worked(tmp_path: Path) -> factories.InputFiles:
    """The worked example of SETTLEMENT.md as input files."""
    return factories.write_worked_example(tmp_path)


@pytest.fixture
def keypair(tmp_path: Path, runner: CliRunner) -> tuple[Path, Path]:
    """A provider key pair written by `gpudelivery keys generate`."""
    from gpudelivery.cli import app

    result = runner.invoke(
        app, ["keys", "generate", "--out-dir", str(tmp_path / "keys"), "--name", "provider"]
    )
    assert result.exit_code == 0, result.stderr
    return tmp_path / "keys" / "provider.key", tmp_path / "keys" / "provider.pub"
