"""Where the NVML simulator lives, for the metering tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

SIM = Path(__file__).parents[2] / "metering" / "nvml-sim"
SCENARIOS = SIM / "scenarios"

# run_pynvml(code, *, scenario=None, seconds_in=0.0, expect_failure=False) -> result
PynvmlRunner = Callable[..., Any]
