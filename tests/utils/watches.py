"""The change log of the emulated API server (kube.py), and what a watch sees of it.

kmock's own watches start with the current objects whatever version they ask for, and
filter by namespace and name only. The real server keeps recent changes: a watch from a
resourceVersion replays every change after it, and follows its selectors, so an object that
starts matching arrives as ADDED and one that stops matching as DELETED (`watch_event`).
`ChangeLog` keeps every change with the cluster-wide resourceVersion it was made at (so it
also hands out the versions) and wakes the watches following it. It keeps them all: nothing
is compacted, so no watch is ever told its version is too old (410 Gone).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple

import kmock

__all__ = ["Change", "ChangeLog", "watch_event"]


class Change(NamedTuple):
    """One write, as the change log keeps it for watches."""

    revision: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]  # the new state; for DELETED, the last one
    old: dict[str, Any] | None  # the state before (None for ADDED)


class ChangeLog:
    """Every change, by resource, in the order of the resourceVersions they were made at.

    Changes are recorded holding `changed` (an asyncio condition), as its waiters require."""

    def __init__(self) -> None:
        # Not 0: a watch from "0" starts with the current objects, not from the beginning.
        self.revision = 1
        self.changed = asyncio.Condition()
        self._changes: dict[kmock.resource, list[Change]] = collections.defaultdict(list)

    def advance(self) -> int:
        """The resourceVersion of the next write."""
        self.revision += 1
        return self.revision

    def record(self, resource: kmock.resource, change: Change) -> None:
        """Log a change (at the revision `advance` gave it) and wake the watches."""
        self._changes[resource].append(change)
        self.changed.notify_all()

    def seed(self, resource: kmock.resource, change: Change) -> None:
        """Log a change made before the server serves (nobody watches yet, so nobody is
        woken, and the condition's lock, which needs the server's loop, is not taken)."""
        self._changes[resource].append(change)

    def end(self, resource: kmock.resource) -> int:
        """The position after the last change of `resource`."""
        return len(self._changes[resource])

    def after(self, resource: kmock.resource, revision: int) -> int:
        """The position of the first change of `resource` after `revision`."""
        return bisect.bisect_right(self._changes[resource], revision, key=lambda c: c.revision)

    async def follow(
        self, resource: kmock.resource, position: int, deadline: float | None
    ) -> AsyncIterator[Change]:
        """The changes of `resource` from `position` on, as they are made, until the event
        loop's clock reaches `deadline` (None: never)."""
        changes = self._changes[resource]
        while True:
            async with self.changed:
                while position == len(changes):
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self.changed.wait()
                    except TimeoutError:
                        return
                batch, position = changes[position:], len(changes)
            for change in batch:
                yield change


def watch_event(
    change: Change, selects: Callable[[Mapping[str, Any]], bool]
) -> dict[str, Any] | None:
    """The event a watcher with a selection sees of a change (None: none): an object that
    comes into the selection is ADDED for it, one that leaves it DELETED."""
    was_in = change.old is not None and selects(change.old)
    now_in = change.type != "DELETED" and selects(change.obj)
    if was_in and now_in:
        kind = "MODIFIED"
    elif now_in:
        kind = "ADDED"
    elif was_in:
        kind = "DELETED"
    else:
        return None
    return {"type": kind, "object": change.obj}
