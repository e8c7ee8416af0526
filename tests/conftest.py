"""Settings and fixtures shared by every test area."""

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from utils.nvml import SIM

# CI runs on a 2-core machine shared with PostgreSQL: no deadline (speed lives in bench/),
# and a fixed profile so a run explores the same number of examples everywhere.
settings.register_profile(
    "gpudelivery", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gpudelivery")


@pytest.fixture(scope="session")
def nvml_sim_dir() -> Path:
    """The folder holding the freshly built libnvidia-ml.so.1 (metering/nvml-sim)."""
    subprocess.run(["make", "--silent", "-C", str(SIM)], check=True, capture_output=True)
    return SIM / "build"
