"""GPU health rules: which XIDs are critical, what sticks until a reset, and why."""

from __future__ import annotations

import pytest

from gpudelivery.metering import health


@pytest.mark.parametrize("code", [13, 31, 43, 45, 68, 109])
def test_application_xids_are_not_critical(code: int) -> None:
    assert not health.is_critical_xid(code)
    tracker = health.HealthTracker()
    tracker.observe_xid(code)
    assert tracker.judge(error=None) == health.Verdict(True, ())


@pytest.mark.parametrize("code", [48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 1])
def test_every_other_xid_is_critical_and_sticks_until_reset(code: int) -> None:
    assert health.is_critical_xid(code)
    tracker = health.HealthTracker()
    tracker.observe_xid(code)
    assert tracker.judge(error=None) == health.Verdict(
        False, (f"critical XID {code} since the last reset",)
    )
    assert not tracker.judge(error=None).healthy
    tracker.observe_reset()
    assert tracker.judge(error=None).healthy


def test_a_repeated_xid_is_reported_once() -> None:
    tracker = health.HealthTracker()
    for code in (79, 79, 48):
        tracker.observe_xid(code)
    assert tracker.critical_xids == (79, 48)


def test_every_reason_is_listed() -> None:
    tracker = health.HealthTracker()
    tracker.observe_xid(79)
    verdict = tracker.judge(error="GPU is lost", lost=True, remap_pending=True, remap_failed=True)
    assert verdict == health.Verdict(
        False,
        (
            "critical XID 79 since the last reset",
            "GPU fallen off the bus (GPU_IS_LOST)",
            "row remap pending: the GPU needs a reset",
            "row remap failed: no spare rows left",
        ),
    )


def test_nvml_not_answering_is_unhealthy() -> None:
    verdict = health.HealthTracker().judge(error="Unknown Error")
    assert verdict == health.Verdict(False, ("NVML does not answer: Unknown Error",))
