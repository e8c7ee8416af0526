"""The operator's kopf handlers: what it does when its resources appear or change.

`register` puts the handlers on a kopf registry (a fresh one per operator, so tests can run
several), each a thin wrapper that reads what it needs through `cluster.Cluster`, decides
with a plain function and writes the status last, as the reconcile contract asks.

Booking: a new ComputeContract (or one found without a phase when the operator resumes) is
booked or rejected (operator/booking.py). Decisions are taken one at a time under a lock
and the status is written before the lock is released, so two contracts created at once are
never both fitted into the same room. A booked contract keeps its phase: booking it again
after a restart changes nothing.

Pools: each DeliveryPool's status says how many nodes its selector matches and how many of
them contracts may hold, refreshed on a timer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from gpudelivery import errors, timefmt
from gpudelivery.operator import (
    admission,
    booking,
    cluster,
    executor,
    ledger,
    mirror,
    mirroring,
    nodes,
    resources,
)
from gpudelivery.operator import (
    errors as operator_errors,
)
from gpudelivery.operator.settings import OperatorSettings

__all__ = ["Runtime", "register"]

# Event reasons the operator posts on its resources.
EVENT_BOOKED = "Booked"
EVENT_REJECTED = "Rejected"
EVENT_LEDGER_REFUSED = "LedgerRefused"
# The phases of the contracts booking counts, as the status spells them.
_LIVE = frozenset(phase.value for phase in booking.LIVE)
# The ComputeContract CRD, on whose timer contracts are mirrored with the API.
CONTRACTS_CRD = f"{resources.CONTRACTS}.{resources.GROUP}"
# The ComputeContract condition saying whether the API holds the ledger as the status does.
CONDITION_LEDGER_REPORTED = "LedgerReported"


@dataclass
class Runtime:
    """What the handlers share (kopf's `memo`): the cluster, the settings, the clock and the
    lock that makes booking decisions one at a time."""

    cluster: cluster.Cluster
    settings: OperatorSettings
    connection: kopf.ConnectionInfo
    clock: Callable[[], float] = time.time
    booking_lock: threading.Lock = field(default_factory=threading.Lock)
    tenancy: executor.Tenancy | None = None
    # Reports the assignment ledger to the API; None when no API is configured.
    ledger: ledger.LedgerClient | None = None
    # Reads and registers contracts at the API (mirroring); None when no API is configured.
    contracts: mirror.ContractsClient | None = None
    # When each contract's buyer namespace was last made whole (executor.PoolDelivery).
    namespaces_checked: dict[str, int] = field(default_factory=dict)
    # The failures announced already (resource, message): each is posted once per run.
    announced: set[tuple[str, str]] = field(default_factory=set)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Put the operator's handlers on `registry`, timed by `settings`."""
    kopf.on.login(registry=registry)(_login)
    kopf.on.startup(registry=registry)(_configure)
    for decorator in (kopf.on.create, kopf.on.resume):
        decorator(
            resources.GROUP, resources.VERSION, resources.CONTRACTS, registry=registry, id="book"
        )(book)

    def timer(
        plural: str,
        interval: float,
        handler_id: str,
        *,
        group_version: tuple[str, str] = (resources.GROUP, resources.VERSION),
        name: str | None = None,
    ) -> Callable[[Callable[..., None]], Any]:
        """kopf's timer of every `plural` object (or only the one named `name`)."""
        field = None if name is None else "metadata.name"
        return kopf.timer(
            *group_version, plural, registry=registry, interval=interval, id=handler_id,
            field=field, value=name,
        )  # fmt: skip

    reconcile_s, sync_s = settings.timing.reconcile_interval_s, settings.api.sync_interval_s
    timer(resources.POOLS, reconcile_s, "pool-status")(refresh_pool)
    timer(resources.POOLS, reconcile_s, "deliver")(deliver)
    if settings.api.url is not None:
        timer(resources.CONTRACTS, sync_s, "ledger")(report_ledger)
        # The mirror is the cluster's, not any one object's: it runs on the timer of the
        # ComputeContract CRD, which exists while the operator has work, and which kopf's
        # peering pauses on the replicas that are not active, as any handler.
        crds = ("apiextensions.k8s.io", "v1")
        timer(
            "customresourcedefinitions", sync_s, "mirror", group_version=crds, name=CONTRACTS_CRD
        )(mirror_contracts)
    admission.register(registry, settings)


def _login(memo: Runtime, **_: Any) -> kopf.ConnectionInfo:
    return memo.connection


def _configure(settings: kopf.OperatorSettings, memo: Runtime, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "gpudelivery.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpudelivery.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="gpudelivery.io", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    admission.configure(settings, memo.settings)


def book(body: kopf.Body, name: str, memo: Runtime, logger: kopf.Logger, **_: Any) -> None:
    """Book a new contract or reject it; a contract that has a phase is left as it is."""
    if body.get("status", {}).get("phase"):
        return
    with memo.booking_lock:
        decision = _decide(memo, name, body)
        now = timefmt.format_utc(int(memo.clock()))
        memo.cluster.patch_contract_status(
            name,
            {
                "phase": decision.phase.value,
                "reason": decision.reason,
                "pool": decision.pool,
                "nodesNeeded": decision.nodes,
                "transitions": [
                    {"phase": decision.phase.value, "at": now, "reason": decision.reason}
                ],
            },
        )
    if decision.phase == resources.Phase.BOOKED:
        kopf.info(body, reason=EVENT_BOOKED, message=decision.reason)
        logger.info("contract %s: %s", name, decision.reason)
    else:
        kopf.warn(body, reason=EVENT_REJECTED, message=decision.reason)
        logger.warning("contract %s rejected: %s", name, decision.reason)


def _decide(memo: Runtime, name: str, body: Mapping[str, Any]) -> booking.Decision:
    try:
        contract_terms = resources.terms_from_body(body)
    except errors.TermsError as exc:
        return booking.Decision(resources.Phase.REJECTED, f"invalid terms: {exc}")
    pools, capacity = [], {}
    for pool_body in memo.cluster.pools():
        try:
            pool = resources.pool_from_body(pool_body)
        except errors.InputError:
            continue  # the pool's own handler reports it
        pools.append(pool)
        if pool.instrument == contract_terms.instrument:  # only its own pool is counted
            capacity[pool.name] = _capacity(memo, pool)[1]
    others = []
    for other in memo.cluster.contracts():
        other_name = other.get("metadata", {}).get("name")
        phase = other.get("status", {}).get("phase")
        instrument = other.get("spec", {}).get("instrument")
        # Only the live contracts of the instrument count: the rest are not read (reading
        # every contract's terms for every booking grew with the square of the contracts).
        if other_name == name or phase not in _LIVE or instrument != contract_terms.instrument:
            continue
        try:
            other_terms = resources.terms_from_body(other)
            other_phase = resources.Phase(phase)
        except (errors.TermsError, ValueError):
            continue
        others.append(booking.Contract(other_name, other_terms, other_phase))
    contract = booking.Contract(name, contract_terms, None)
    return booking.decide(
        contract, pools=pools, others=others, capacity=capacity, now_s=int(memo.clock())
    )


def refresh_pool(body: kopf.Body, name: str, memo: Runtime, **_: Any) -> None:
    """Write how many nodes the pool has, and how many contracts may hold."""
    try:
        pool = resources.pool_from_body(body)
    except errors.InputError as exc:
        raise kopf.PermanentError(f"invalid DeliveryPool: {exc}") from exc
    matching, bookable = _capacity(memo, pool)
    memo.cluster.patch_pool_status(name, {"nodes": matching, "bookableNodes": bookable})


def _capacity(memo: Runtime, pool: resources.Pool) -> tuple[int, int]:
    """How many nodes the pool's selector matches, and how many contracts may hold."""
    found = memo.cluster.nodes(pool.node_selector)
    quarantined = sum(1 for node in found if nodes.is_quarantined(node))
    return len(found), booking.capacity_nodes(pool, matching=len(found), quarantined=quarantined)


def deliver(body: kopf.Body, memo: Runtime, logger: kopf.Logger, **_: Any) -> None:
    """One delivery pass over the pool (operator/executor.py)."""
    try:
        pool = resources.pool_from_body(body)
    except errors.InputError as exc:
        raise kopf.PermanentError(f"invalid DeliveryPool: {exc}") from exc

    def announce(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        # A failure found again at every pass is posted once per operator run.
        if reason == executor.EVENT_FAILED_ACTION:
            key = (str((body.get("metadata") or {}).get("name")), message)
            if key in memo.announced:
                return
            memo.announced.add(key)
        _announce(body, kind, reason, message)

    passes = executor.PoolDelivery(
        memo.cluster,
        clock=memo.clock,
        not_ready_after_s=memo.settings.timing.not_ready_after_s,
        tenancy=memo.tenancy,
        announce=announce,
        logger=logger,
        checked=memo.namespaces_checked,
    )
    passes.run(pool)


def _announce(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """Post an Event about a ComputeContract read through the client."""
    raw = {
        "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
        "kind": "ComputeContract",
        "metadata": dict(body.get("metadata") or {}),
    }
    reference = kopf.Body(cast(kopf.RawBody, raw))
    kopf.event(reference, type=kind, reason=reason, message=message)


def report_ledger(body: kopf.Body, name: str, memo: Runtime, logger: kopf.Logger, **_: Any) -> None:
    """Report the contract's ledger to the API unless it acknowledged these very intervals;
    while it cannot take them, the timer tries again (delivery never waits for it)."""
    status = body.get("status") or {}
    recorded = status.get("ledger") or {}
    if memo.ledger is None or not recorded.get("intervals"):
        return
    try:
        intervals = ledger.from_status(recorded["intervals"])
    except (errors.InputError, operator_errors.OperatorError) as exc:
        raise kopf.PermanentError(f"unreadable ledger: {exc}") from exc
    digest = ledger.digest(intervals)
    if recorded.get("reported") == digest:
        return
    contract_id = str((body.get("spec") or {}).get("contractId"))
    try:
        memo.ledger.report(contract_id, intervals)
    except operator_errors.LedgerUnavailableError as exc:
        logger.info("contract %s: ledger not reported yet: %s", contract_id, exc)
        changed = _ledger_condition(memo, status, "False", "Unavailable", str(exc))
        if changed is not None:
            memo.cluster.patch_contract_status(name, {"conditions": changed})
        return
    except operator_errors.LedgerRefusedError as exc:
        kopf.warn(body, reason=EVENT_LEDGER_REFUSED, message=str(exc))
        changed = _ledger_condition(memo, status, "False", "Refused", str(exc))
        if changed is not None:
            memo.cluster.patch_contract_status(name, {"conditions": changed})
        return
    message = f"{len(intervals)} intervals acknowledged"
    changed = _ledger_condition(memo, status, "True", "Acknowledged", message)
    patch: dict[str, Any] = {"ledger": {"reported": digest}}
    if changed is not None:
        patch["conditions"] = changed
    memo.cluster.patch_contract_status(name, patch)
    logger.info("contract %s: ledger reported (%s)", contract_id, message)


def _ledger_condition(
    memo: Runtime, status: Mapping[str, Any], state: str, reason: str, message: str
) -> list[dict[str, Any]] | None:
    """The conditions with LedgerReported set so, or None when it already says so."""
    conditions = [dict(c) for c in status.get("conditions") or [] if isinstance(c, dict)]
    current = next((c for c in conditions if c.get("type") == CONDITION_LEDGER_REPORTED), {})
    if (current.get("status"), current.get("reason")) == (state, reason):
        return None
    condition = {
        "type": CONDITION_LEDGER_REPORTED,
        "status": state,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timefmt.format_utc(int(memo.clock())),
    }
    others = [c for c in conditions if c.get("type") != CONDITION_LEDGER_REPORTED]
    return [*others, condition]


def mirror_contracts(memo: Runtime, logger: kopf.Logger, **_: Any) -> None:
    """Make the API and the cluster hold the same contracts (operator/mirroring.py)."""
    if memo.contracts is None:
        return
    try:
        held = memo.contracts.list_all()
    except operator_errors.ApiUnavailableError as exc:
        logger.info("contracts not mirrored this time: %s", exc)
        return
    plan = mirroring.plan(held, memo.cluster.contracts(), now_s=int(memo.clock()))
    for body in plan.create:
        if memo.cluster.create_contract(body):
            logger.info("contract %s: created from the API", body["spec"]["contractId"])
    for mark in plan.mark_cancelled:
        memo.cluster.patch_contract(mark.resource, mark.patch())
        logger.info("contract %s: cancelled at the API", mark.contract_id)
    try:
        for contract_terms in plan.register:
            memo.contracts.register(contract_terms)
            logger.info("contract %s: registered with the API", contract_terms.contract_id)
        for contract_id in plan.cancel:
            memo.contracts.cancel(contract_id)
            logger.info("contract %s: cancellation sent to the API", contract_id)
    except operator_errors.ApiUnavailableError as exc:
        logger.info("contracts not all mirrored this time: %s", exc)
    except operator_errors.ApiRefusedError as exc:
        logger.warning("the API refused a mirrored contract: %s", exc)
    for finding in plan.findings:
        key = (finding.resource, finding.message)
        if key not in memo.announced:
            memo.announced.add(key)
            _announce(
                {"metadata": {"name": finding.resource}}, "Warning", finding.kind, finding.message
            )
            logger.warning("contract %s: %s", finding.resource, finding.message)
