"""GPU health: the rules that decide whether a GPU's seconds can count as delivered.

A GPU is unhealthy while any of these holds:

- a **critical XID** was reported since its last reset. Every XID is critical except the
  ones an application causes and survives (13 graphics engine exception, 31 memory page
  fault, 43 channel stopped by a user, 45 preemptive cleanup, 68 video processor exception,
  109 context switch timeout): the driver reports them for a buyer's bug, not a broken GPU.
  A critical XID sticks until the GPU is reset, seen as its energy counter starting again;
- the GPU has **fallen off the bus** (NVML answers GPU_IS_LOST);
- a **row remap is pending** (the GPU needs a reset to use its spare rows) or a **remap
  failed** (it has run out of them);
- **NVML does not answer** for it: no reading is no evidence of health.

This module only judges; it reads nothing. The sampler feeds it readings and XIDs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["APPLICATION_XIDS", "HealthTracker", "Verdict", "is_critical_xid"]

# XIDs caused by applications, not by the GPU (NVIDIA's XID catalogue, "user app" causes).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


def is_critical_xid(code: int) -> bool:
    """True for every XID except the application errors."""
    return code not in APPLICATION_XIDS


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a GPU is healthy now, and every reason it is not."""

    healthy: bool
    reasons: tuple[str, ...]


HEALTHY = Verdict(healthy=True, reasons=())


class HealthTracker:
    """The health of one GPU across readings: remembers critical XIDs until a reset."""

    def __init__(self) -> None:
        self._critical_xids: list[int] = []

    @property
    def critical_xids(self) -> tuple[int, ...]:
        return tuple(self._critical_xids)

    @property
    def alarmed(self) -> bool:
        """A critical XID is on record: the GPU stays unhealthy until it is reset."""
        return bool(self._critical_xids)

    def observe_xid(self, code: int) -> None:
        if is_critical_xid(code) and code not in self._critical_xids:
            self._critical_xids.append(code)

    def observe_reset(self) -> None:
        """The GPU was reset: its critical XIDs no longer count."""
        self._critical_xids.clear()

    def judge(
        self,
        *,
        error: str | None,
        lost: bool = False,
        remap_pending: bool = False,
        remap_failed: bool = False,
    ) -> Verdict:
        """The verdict for a reading: `error` is NVML's answer when the GPU could not be read."""
        if not (self._critical_xids or lost or error is not None or remap_pending or remap_failed):
            return HEALTHY  # the common case, every second on every GPU
        reasons = [f"critical XID {code} since the last reset" for code in self._critical_xids]
        if lost:
            reasons.append("GPU fallen off the bus (GPU_IS_LOST)")
        elif error is not None:
            reasons.append(f"NVML does not answer: {error}")
        if remap_pending:
            reasons.append("row remap pending: the GPU needs a reset")
        if remap_failed:
            reasons.append("row remap failed: no spare rows left")
        return Verdict(healthy=not reasons, reasons=tuple(reasons))
