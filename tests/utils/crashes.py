"""Killing the operator at its k-th write to the API server, and starting it again.

Issue 5 asks that the operator may be killed at any point and, restarted, converge. Every
point that matters is a write: between two writes the operator only reads and decides, and
what it decided dies with it. So the harness counts the write requests (POST, PUT, PATCH,
DELETE) the official client sends, at the HTTP level, where every write point is seen:
each node patch, eviction and status write, and each of the several creates, token
requests and deletions of a buyer's namespace (operator/buyers.py). At write number k the
operator dies (`Crash`) in one of two ways (`CrashMode`): before the request leaves, or
after it landed with its answer lost. Events are not counted: kopf posts them through a
client of its own, and nothing the operator decides reads them.

`OperatorLife` is one life of the operator: its own client, counting (and, given a
`CrashPoint`, crashing), with the `cluster.Cluster` and `buyers.BuyerNamespaces` the operator
builds on it, the booking handler (`handlers.book`, as kopf calls it on resume) and the
delivery pass (`executor.PoolDelivery`, as kopf's timer runs it), without kopf itself.
`Lives` runs steps until a round writes nothing, and when the life it runs on crashes,
starts the next one (without a crash point) and goes on: a restart, with nothing carried over
but the cluster.

Not here: a scenario, or what a converged cluster should hold (the tests say).
"""

from __future__ import annotations

import contextvars
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import kopf
from kopf._core.engines import posting
from kubernetes import client
from kubernetes.client import rest

from gpudelivery.operator import buyers, cluster, executor, handlers, resources
from gpudelivery.operator.settings import OperatorSettings

from utils import kube

__all__ = [
    "WRITES",
    "Crash",
    "CrashMode",
    "CrashPoint",
    "CrashingRESTClient",
    "Lives",
    "OperatorLife",
    "Write",
]

# The HTTP methods that change the cluster: the crash points.
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The address buyers' kubeconfigs name (any will do: nothing connects to it).
BUYER_SERVER = "https://k8s.gpu.example:6443"
# How many rounds a step gets to write nothing before it is said not to converge: a contract
# needs a handful of passes (operator/executor.py), a crash and a restart cost one more.
MAX_ROUNDS = 12


class Crash(BaseException):
    """The operator died at a write. A BaseException, as SystemExit is: no handler of the
    operator's may catch it, however broad."""


class CrashMode(enum.Enum):
    """Where, around write k, the operator dies."""

    # The request never reached the API server.
    BEFORE = "before"
    # The API server carried it out; its answer was lost.
    AFTER = "after"


@dataclass(frozen=True)
class CrashPoint:
    """Die at write number `write` (from 1) of a life, `mode` it."""

    write: int
    mode: CrashMode

    def __str__(self) -> str:
        return f"crash {self.mode.value} write {self.write}"


@dataclass(frozen=True)
class Write:
    """A write request sent (or about to be): its method and path."""

    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


class CrashingRESTClient(rest.RESTClientObject):
    """The official client's REST layer, counting the write requests (`writes`) and dying at
    `crash`. Once dead it sends nothing more: a dead process does not."""

    def __init__(self, configuration: client.Configuration, crash: CrashPoint | None) -> None:
        super().__init__(configuration)
        self.crash = crash
        self.writes: list[Write] = []
        self.dead = False

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> rest.RESTResponse:
        if self.dead:
            raise Crash(f"{method} {url}: the operator is dead")
        send: Callable[..., rest.RESTResponse] = super().request
        arguments = (method, url, headers, body, post_params, _request_timeout)
        write = Write(method.upper(), urlsplit(url).path) if method.upper() in WRITES else None
        if write is not None:
            self.writes.append(write)
        crash = self.crash
        if write is None or crash is None or len(self.writes) != crash.write:
            return send(*arguments)
        self.dead = True
        if crash.mode is CrashMode.AFTER:
            # Landed: the answer came back whole, and is lost with the process.
            send(*arguments).read()  # type: ignore[no-untyped-call]
        raise Crash(f"{crash}: {write}")


class OperatorLife:
    """One life of the operator against the emulator at `url`, with its own client (crashing
    at `crash`, if given); `close` it once it is over."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float],
        crash: CrashPoint | None = None,
        not_ready_after_s: int = 60,
    ) -> None:
        self.api_client = kube.api_client(url)
        self.api_client.rest_client.close()
        self.rest = self.api_client.rest_client = CrashingRESTClient(
            self.api_client.configuration, crash
        )
        self.cluster = cluster.Cluster(self.api_client)
        self.tenancy = buyers.BuyerNamespaces(self.api_client, server=BUYER_SERVER, ca_data=None)
        self.clock = clock
        self.not_ready_after_s = not_ready_after_s
        self.logger = logging.getLogger("gpudelivery.crashes")
        # The Events the operator announced: (reason, message), in order.
        self.announced: list[tuple[str, str]] = []

    @property
    def writes(self) -> list[Write]:
        """The write requests this life sent (or died sending)."""
        return self.rest.writes

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    def book(self) -> None:
        """The booking handler on every ComputeContract, in order of name, as kopf resumes
        them: those without a phase are booked or rejected, the others left alone."""
        runtime = handlers.Runtime(
            cluster=self.cluster,
            settings=OperatorSettings(),
            connection=kopf.ConnectionInfo(server=self.api_client.configuration.host),
            clock=self.clock,
        )
        for body in sorted(self.cluster.contracts(), key=_name):
            raw = kopf.Body(body)  # type: ignore[arg-type]
            _unposted().run(handlers.book, raw, name=_name(body), memo=runtime, logger=self.logger)

    def deliver(self) -> None:
        """A delivery pass over every DeliveryPool, as kopf's timer of each runs one."""
        for body in sorted(self.cluster.pools(), key=_name):
            passes = executor.PoolDelivery(
                self.cluster,
                clock=self.clock,
                not_ready_after_s=self.not_ready_after_s,
                tenancy=self.tenancy,
                announce=self._announce,
                logger=self.logger,
            )
            passes.run(resources.pool_from_body(body))

    def _announce(self, body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.announced.append((reason, message))


@dataclass
class Lives:
    """The operator's lives against the emulator at `url`: the first dies at `crash` (if
    given), the next ones never do. Crashes the harness absorbed are in `crashes`; each is
    checked by `on_crash` (with the crash, before the restart) when given."""

    url: str
    clock: Callable[[], float]
    crash: CrashPoint | None = None
    on_crash: Callable[[Crash], None] | None = None
    crashes: list[Crash] = field(default_factory=list)
    past: list[OperatorLife] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.life = OperatorLife(self.url, clock=self.clock, crash=self.crash)

    @property
    def writes(self) -> list[Write]:
        """Every write request of every life, in order (the one a life died at included)."""
        return [write for life in (*self.past, self.life) for write in life.writes]

    def settle(self, step: Callable[[OperatorLife], None], *, what: str = "step") -> int:
        """Run `step` on the living operator until a round of it writes nothing, restarting the
        operator after a crash; how many rounds it took. AssertionError after `MAX_ROUNDS`."""
        for rounds in range(1, MAX_ROUNDS + 1):
            before = len(self.life.writes)
            try:
                step(self.life)
            except Crash as crash:
                self.crashes.append(crash)
                if self.on_crash is not None:
                    self.on_crash(crash)
                self._restart()
                continue
            if len(self.life.writes) == before:
                return rounds
        tail = ", ".join(map(str, self.life.writes[-5:]))
        raise AssertionError(f"{what} still writes after {MAX_ROUNDS} rounds (last: {tail})")

    def _restart(self) -> None:
        self.life.close()
        self.past.append(self.life)
        self.life = OperatorLife(self.url, clock=self.clock)

    def close(self) -> None:
        self.life.close()

    def __enter__(self) -> Lives:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _unposted() -> contextvars.Context:
    """A context in which kopf's `info`/`warn` post nothing: the handlers run outside kopf,
    which is what would post the Events (through a queue of its own, not this client)."""
    quiet = kopf.OperatorSettings()
    quiet.posting.enabled = False
    quiet.posting.level = logging.CRITICAL  # `kopf.warn` looks at the level alone
    context = contextvars.copy_context()
    context.run(posting.settings_var.set, quiet)
    return context


def _name(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name"))
