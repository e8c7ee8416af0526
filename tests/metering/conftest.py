"""The NVML simulator, built once per test session, and a way to run pynvml against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from utils.nvml import PynvmlRunner


@pytest.fixture
def run_pynvml(nvml_sim_dir: Path) -> PynvmlRunner:
    """Run `code` (which sets `result`) with the real pynvml in a fresh process.

    `scenario` names the file, `seconds_in` puts the process that far into the scenario's
    timeline (through GPUDELIVERY_NVML_EPOCH). Returns `result` as JSON, or, with
    `expect_failure`, the completed process.
    """

    def run(
        code: str,
        *,
        scenario: Path | None = None,
        seconds_in: float = 0.0,
        expect_failure: bool = False,
    ) -> Any:
        environment = {
            **os.environ,
            "LD_LIBRARY_PATH": str(nvml_sim_dir),
            "GPUDELIVERY_NVML_EPOCH": repr(time.time() - seconds_in),
        }
        environment.pop("GPUDELIVERY_NVML_SCENARIO", None)
        if scenario is not None:
            environment["GPUDELIVERY_NVML_SCENARIO"] = str(scenario)
        program = "import json, time\nimport pynvml\n" + textwrap.dedent(code)
        program += "\nprint(json.dumps(result))\n"
        completed = subprocess.run(
            [sys.executable, "-c", program],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        if expect_failure:
            return completed
        assert completed.returncode == 0, completed.stderr
        return json.loads(completed.stdout.splitlines()[-1])

    return run
