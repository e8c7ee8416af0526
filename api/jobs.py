"""Periodic jobs (APScheduler), run by exactly one replica.

The jobs are thin: each opens a session, calls one service, commits, and counts its run.

| job | every | does |
| --- | --- | --- |
| `tree_head` | 60 s | signs and publishes a new head of the evidence log when it grew |
| `rollups` | 30 s | folds new meter records into the hour and minute roll-ups proofs read |
| `finalize` | 30 s | final proof, settlement and outbox rows of windows ended `grace_s` ago |
| `dispatch` | 5 s | delivers due outbox messages to the exchanges' webhooks |
| `stale_meters` | 15 s | an incident for a serving node whose last batch is over 60 s old |

Leadership: on PostgreSQL a replica runs the jobs only while it holds a session-level
advisory lock on a connection of its own (`pg_try_advisory_lock`), tried again each
period, so when the leader dies its lock goes with its connection and another replica
takes over. SQLite is a single process: it always leads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, func, select

from gpudelivery import signing, timefmt
from gpudelivery.api import db, evidence_log, finalization, rollups
from gpudelivery.api.models import Assignment, Contract, Incident, MeterBatch

__all__ = ["JobRunner", "Leadership", "detect_stale_meters"]

logger = logging.getLogger(__name__)

# The advisory lock key of the jobs' leader (any constant shared by all replicas).
LEADER_LOCK_KEY = 0x67707564  # "gpud"
# A node serving a contract and silent this long raises an incident.
STALE_AFTER_S = 60
INCIDENT_METER_SILENT = "meter_silent"


class Leadership:
    """Whether this replica runs the jobs (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Connection | None = None

    def is_leader(self) -> bool:
        if not db.is_postgresql(self.engine):
            return True
        if self._connection is not None:
            try:
                self._connection.execute(text("SELECT 1"))
                return True
            except Exception:  # the connection died, and the lock with it
                self._connection = None
        connection = self.engine.connect()
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}
        ).scalar()
        connection.commit()
        if taken:
            self._connection = connection
            logger.info("this replica leads the periodic jobs")
            return True
        connection.close()
        return False

    def release(self) -> None:
        if self._connection is not None:
            try:
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": LEADER_LOCK_KEY}
                )
            finally:
                # Invalidated, not returned to the pool: the database session ends, and any
                # lock it still held goes with it.
                self._connection.invalidate()
                self._connection.close()
                self._connection = None


def detect_stale_meters(session: Session, *, now_s: int) -> list[str]:
    """Raise an incident for each node serving a live window whose last batch is older than
    STALE_AFTER_S (once per silence: not again until it has shipped since)."""
    serving = session.exec(
        select(Assignment.node)
        .join(Contract, col(Contract.id) == col(Assignment.contract_id))
        .where(
            Contract.start_s <= now_s,
            Contract.end_s > now_s,
            Assignment.start_s <= now_s,
            (col(Assignment.end_s).is_(None)) | (col(Assignment.end_s) > now_s),
        )
        .distinct()
    ).all()
    raised = []
    for node in sorted(serving):
        last = session.exec(
            select(func.max(MeterBatch.received_at)).where(MeterBatch.node == node)
        ).one()
        if last is not None and now_s - last <= STALE_AFTER_S:
            continue
        since = last if last is not None else 0
        already = session.exec(
            select(Incident.id).where(
                Incident.kind == INCIDENT_METER_SILENT,
                Incident.node == node,
                Incident.at_s > since,
            )
        ).first()
        if already is not None:
            continue
        detail = (
            "no meter batch ever received from this node while it serves a contract"
            if last is None
            else f"no meter batch since {timefmt.format_utc(last)} while it serves a contract"
        )
        session.add(Incident(kind=INCIDENT_METER_SILENT, node=node, detail=detail, at_s=now_s))
        raised.append(node)
    return raised


@dataclass
class JobStats:
    """Runs and failures by job, for the metrics."""

    runs: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


class JobRunner:
    """The scheduler of the periodic jobs of one replica."""

    def __init__(
        self,
        engine: Engine,
        *,
        key: signing.SigningKey,
        dispatch: Callable[[Session, int], object] | None = None,
        grace_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.key = key
        self.grace_s = grace_s
        self.clock = clock
        self.dispatch = dispatch
        self.leadership = Leadership(engine)
        self.stats = JobStats()
        self.scheduler = BackgroundScheduler(timezone="UTC")

    def _run(self, name: str, work: Callable[[Session, int], object]) -> None:
        if not self.leadership.is_leader():
            return
        try:
            with Session(self.engine) as session:
                work(session, int(self.clock()))
                session.commit()
            self.stats.runs[name] = self.stats.runs.get(name, 0) + 1
        except Exception:  # a job must never kill the scheduler; it is counted and logged
            self.stats.failures[name] = self.stats.failures.get(name, 0) + 1
            logger.exception("job %s failed", name)

    def tree_head(self) -> None:
        self._run("tree_head", lambda s, now: evidence_log.tree_head(s, key=self.key, now_s=now))

    def rollups(self) -> None:
        self._run("rollups", lambda s, now: rollups.roll_up_all(s, now_s=now))

    def finalize(self) -> None:
        self._run(
            "finalize",
            lambda s, now: finalization.finalize_due(
                s, key=self.key, now_s=now, grace_s=self.grace_s
            ),
        )

    def stale_meters(self) -> None:
        self._run("stale_meters", lambda s, now: detect_stale_meters(s, now_s=now))

    def dispatch_outbox(self) -> None:
        if self.dispatch is not None:
            self._run("dispatch", self.dispatch)

    def start(self) -> None:
        for job, every_s in (
            (self.tree_head, 60),
            (self.rollups, 30),
            (self.finalize, 30),
            (self.dispatch_outbox, 5),
            (self.stale_meters, 15),
        ):
            self.scheduler.add_job(job, "interval", seconds=every_s, max_instances=1, coalesce=True)
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.leadership.release()
