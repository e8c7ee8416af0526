"""The tools `make test` fetches into .tools/bin for the chart and cluster checks."""

from __future__ import annotations

import subprocess
from pathlib import Path

TOOLS = Path(__file__).parents[1] / ".tools" / "bin"


def test_helm_is_fetched_and_runs() -> None:
    completed = subprocess.run(
        [str(TOOLS / "helm"), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert completed.stdout.startswith("v")


def test_kubectl_is_fetched_and_runs() -> None:
    completed = subprocess.run(
        [str(TOOLS / "kubectl"), "version", "--client"], capture_output=True, text=True, check=True
    )
    assert completed.stdout.startswith("Client Version: v1.")
