"""Waiting for a condition with a deadline: tests never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(condition: Callable[[], bool], *, deadline_s: float = 30.0, every_s: float = 0.02) -> None:
    """Return once `condition()` holds; fail if it does not before the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(every_s)
