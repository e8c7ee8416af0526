"""The Kubernetes API server of the tests: kmock's KubernetesEmulator, run on a real port.

kmock stores objects and merges patches as plain JSON, and little more. `ClusterEmulator`
adds, by subclassing as kmock's docs invite, what the components rely on, so they are
tested against the API server's behaviour rather than a dictionary's:

- **Resources.** The built-in resources kmock bundles (with their scope and subresources)
  and the CRDs of the chart (charts/gpudelivery/crds) are stored and served from the start
  (as `helm install` leaves them); a CRD
  created through the API is served from then on. Anything else answers 404. kmock cannot
  parse the `namespaces` resource itself (`/api/v1/namespaces` fails, `/namespaces/x` reads
  as "namespace x"): requests are routed by `parse_route()` on their real path instead.
- **Selectors** on list, watch and deletecollection: `labelSelector` with equality
  (`a=b`, `a==b`, `a!=b`), sets (`a in (x,y)`, `a notin (x)`) and existence (`a`, `!a`);
  `fieldSelector` with `=`, `==`, `!=` on the fields the real server supports for the
  resource (`metadata.name` and `metadata.namespace` everywhere; `spec.nodeName` and
  `status.phase` of pods, ...). A malformed selector or an unsupported field answers 400.
- **resourceVersion**: every write stamps the object with the next value of one cluster-wide
  counter, and lists carry the current one. A PUT, a merge or strategic patch, or a DELETE
  precondition naming another resourceVersion than the stored one answers 409 Conflict;
  a JSON patch whose `test` op fails answers 422 (kopf relies on both). A write that changes
  nothing is not written (no new version, no event), as on the real server.
- **Status subresource**, for every resource that declares one: a write to `/status` changes
  only `status`, a write to the resource keeps the stored `status`, and a custom resource
  is created without one. Strategic-merge patches of custom resources answer 415.
  Strategic merges merge `status.conditions` by `type` (`merge_by_key`); other lists are
  replaced whole.
- **Deletion** honours finalizers (`deletionTimestamp` first, gone once they are removed).
  Deleting a namespace deletes everything in it; the namespace stays `Terminating` until
  its last object is gone, and refuses new objects meanwhile (403).
- **Eviction** (`pods/eviction`) honours the PodDisruptionBudget selecting the pod: it
  answers 429 when the budget allows no disruption (the cause names the budget), else
  deletes the pod. No controllers run here, so a budget's expected count is its matching
  pods that have not finished, and a pod counts as healthy while `Running` and not being
  deleted. Pending, finished and terminating pods are evicted without a budget, as on the
  real server.
- **TokenRequest** (`serviceaccounts/token`): an opaque random token expiring
  `expirationSeconds` (default 3600, at least 600) after `clock()`; `issued_tokens` keeps
  them for assertions.
- **Watches** replay the changes after the requested `resourceVersion` (or start with the
  current objects) and follow the selectors the way the real server does: an object that
  starts matching arrives as ADDED, one that stops matching as DELETED. `timeoutSeconds`
  ends the stream.
- **An access log** (`access_log`): the set of (RBAC verb, API group, resource[/sub]) of
  every resource request, discovery excluded, which the RBAC test compares with the chart's
  ClusterRole.
- **kmock's reactions** still answer for the server (`emulator[kmock.method.PATCH] << 503`
  injects a failure); as in kmock, the write happens first, so to the client it is a lost
  answer. kmock dispatches a request by looking for it among every request served so far,
  for every reaction (100 ms a request after 2,000): without reactions of a test's own,
  requests are served without that dispatch.

Not emulated: admission and defaulting (beyond a pod's `Pending` phase and a namespace's
`Active` one; no schema validation: tests/operator checks the CRD schemas), server-side
apply (415), garbage collection by owner references, pagination (`limit` is ignored: lists
are whole), watch bookmarks, `>`/`<` label requirements (400), a namespace's existence when
an object is created in it (the metering tests rely on that), the kubelet (a deleted pod
without finalizers is gone at once; pods keep the status they are created with). Memory
grows with every write and request: kmock keeps every version and request, for assertions.

This module serves the requests; the behaviours live in modules of their own, re-exported
here for the tests: the stored objects and the rules of every write (store.py), selectors
(selection.py), patch formats (patches.py), the change log watches follow (watches.py),
routing and RBAC names (routes.py), evictions (evictions.py), token requests (tokens.py) and
the errors answered (apierrors.py).

`running_cluster()` runs the emulator on its own event loop in a background thread, so
synchronous code (the official `kubernetes` client) talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import parsing, rendering
from kubernetes import client

from utils import apierrors, evictions, patches, routes, selection, store, tokens, watches

# Re-exported: the tests import these names from this module.
from utils.patches import MERGE_PATCH, STRATEGIC_MERGE, merge_by_key
from utils.routes import Access, Route, parse_route
from utils.selection import (
    FieldRequirement,
    LabelRequirement,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
    selector_matches,
)
from utils.store import CHART_CRDS, chart_crds
from utils.tokens import IssuedToken

__all__ = [
    "CHART_CRDS",
    "MERGE_PATCH",
    "STRATEGIC_MERGE",
    "Access",
    "ClusterEmulator",
    "FieldRequirement",
    "IssuedToken",
    "LabelRequirement",
    "Route",
    "SelectorError",
    "api_client",
    "chart_crds",
    "core_api",
    "merge_by_key",
    "parse_field_selector",
    "parse_label_selector",
    "parse_route",
    "running_cluster",
    "selector_matches",
    "write_kubeconfig",
]

_PODS = kmock.resource("", "v1", "pods")
_SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
_BUDGETS = kmock.resource("policy", "v1", "poddisruptionbudgets")


@attrs.define(kw_only=True)
class ClusterEmulator(store.ObjectStore):
    """KubernetesEmulator with the API server behaviours the module docstring lists.

    kmock's own write path (`KubernetesEmulator._handle`) is replaced, not extended: it
    stores plain merges. The request dispatch to reactions and fallbacks (kmock's DSL, so
    tests can still inject failures) is kept; writes happen before it, as in kmock, and the
    fallbacks serve their outcome."""

    _outcomes: dict[rendering.Request, tuple[int, Any]] = attrs.field(factory=dict, init=False)
    # Each access, with the User-Agents of the clients that made it.
    _accesses: dict[routes.Access, set[str]] = attrs.field(factory=dict, init=False)
    _tokens: dict[str, tokens.IssuedToken] = attrs.field(factory=dict, init=False)
    _builtin_reactions: int = attrs.field(default=0, init=False)
    # The test thread reads what the server's thread writes.
    _records_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[self._has_outcome] << self._serve_outcome
        self._builtin_reactions = len(self._payloads)

    @property
    def access_log(self) -> frozenset[routes.Access]:
        """Every (verb, group, resource[/subresource]) requested so far."""
        with self._records_lock:
            return frozenset(self._accesses)

    def accesses_by(self, *agents: str) -> frozenset[routes.Access]:
        """The accesses made by clients whose User-Agent starts with one of `agents` (the
        operator's, as against a test's own setup calls)."""
        with self._records_lock:
            return frozenset(
                access
                for access, seen in self._accesses.items()
                if any(agent.startswith(agents) for agent in seen)
            )

    @property
    def issued_tokens(self) -> dict[str, tokens.IssuedToken]:
        """The tokens issued so far, by token."""
        with self._records_lock:
            return dict(self._tokens)

    # -- requests -------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # The real server serves paths with a trailing slash (the client's discovery uses
        # /api/ and /apis/); kmock serves them without.
        path = raw_request.path.rstrip("/") or "/"
        path = routes.NAMESPACES_PLACEHOLDER if path == "/api/v1/namespaces" else path
        if path != raw_request.path:
            url = raw_request.rel_url.with_path(path).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=url)
        return await super().__call__(raw_request)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        request = self._routed(request)
        method = str(request.method.value)
        verb = routes.rbac_verb(method, request.name, request.params)
        if verb is not None and request.resource is not None and request.resource.plural:
            resource = request.resource.plural
            if request.subresource:
                resource = f"{resource}/{request.subresource}"
            access = routes.Access(verb, request.resource.group or "", resource)
            with self._records_lock:
                self._accesses.setdefault(access, set()).add(request.headers.get("User-Agent", ""))
            if verb not in ("get", "list", "watch"):
                async with self._log.changed:
                    self._outcomes[request] = self._write(verb, request)
        try:
            payload = None if self._reacting() else self._fallback(request)
            if payload is None:
                # kmock's dispatch (reactions, then fallbacks), skipping its write path.
                return await super(kmock.KubernetesEmulator, self)._handle(request)
            return await rendering.Response(payload=payload)(request)
        finally:
            self._outcomes.pop(request, None)

    def _reacting(self) -> bool:
        """Whether the test added reactions of its own (kmock's DSL: `emulator[...] << ...`).
        Only then are requests dispatched by kmock, which looks for each request among all
        the requests served so far, for every reaction: its cost grows with their number
        (100 ms a request after 2,000). Otherwise the fallbacks serve them directly."""
        return len(self._payloads) > self._builtin_reactions

    def _fallback(self, request: rendering.Request) -> rendering.Payload | None:
        """What kmock's fallbacks serve a resource request (None: not a resource request)."""
        if request in self._outcomes:
            return self._serve_outcome(request)
        if request.resource is None or request.resource.plural is None:
            return None  # discovery
        if request.action == kmock.action.LIST:
            return self._serve_list(request)
        if request.action == kmock.action.WATCH:
            return self._serve_watch(request)
        if request.action == kmock.action.FETCH:
            return self._serve_fetch(request)
        return None

    def _routed(self, request: rendering.Request) -> rendering.Request:
        """The request with the route of its real path (kmock misreads `namespaces`), in
        kmock's record of requests too: its dispatch finds requests there by identity."""
        route = routes.parse_route(request.url.path)
        if route is None:
            return request
        resource = kmock.resource(group=route.group, version=route.version, plural=route.plural)
        parsed = (resource, route.namespace, route.name, route.subresource)
        if parsed == (request.resource, request.namespace, request.name, request.subresource):
            return request
        path = parsing.ParsedPath(
            route.group, route.version, route.plural, route.namespace, route.name
        )
        routed = attrs.evolve(
            request,
            action=parsing.guess_k8s(path, request.method, dict(request.params)),
            resource=resource,
            namespace=route.namespace,
            name=route.name,
            subresource=route.subresource,
        )
        self._requests[self._requests.index(request)] = routed
        return routed

    def _has_outcome(self, request: rendering.Request) -> bool:
        return request in self._outcomes

    def _serve_outcome(self, request: rendering.Request) -> rendering.Response:
        status, body = self._outcomes[request]
        return rendering.Response(status=status, payload=body)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        return self._serve_outcome(request)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        return self._serve_outcome(request)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._serve_outcome(request)

    # -- reads ----------------------------------------------------------------------------

    async def _serve_api(self, request: rendering.Request) -> rendering.Payload:
        # The official client's model of the answer requires the addresses (kmock omits them).
        addresses = [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.host or ""}]
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": addresses}

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        resource = self._declared(request)
        status = request.subresource == "status" and self._has_status(resource)
        if (request.subresource is not None and not status) or request.name is None:
            raise apierrors.not_found(resource.plural or "")
        return self._require(self._key(request, request.name))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        resource = self._declared(request)
        selects = self._selection(request)
        items = [obj for _, obj in self._live(resource) if selects(obj)]
        return self._list_of(resource, items)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        resource = self._declared(request)
        selects = self._selection(request)
        since = request.params.get("resourceVersion", "")
        if not re.fullmatch(r"\d*", since):
            raise apierrors.error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        timeout_s = request.params.get("timeoutSeconds")
        deadline = None
        if timeout_s:
            deadline = asyncio.get_running_loop().time() + float(timeout_s)
        yield b""  # the headers: the stream is open even if nothing happens
        if since in ("", "0"):
            initial: list[dict[str, Any]] = [
                {"type": "ADDED", "object": obj} for _, obj in self._live(resource) if selects(obj)
            ]
            position = self._log.end(resource)
        else:
            initial = []
            position = self._log.after(resource, int(since))
        for event in initial:
            yield event
        async for change in self._log.follow(resource, position, deadline):
            if (seen := watches.watch_event(change, selects)) is not None:
                yield seen

    # -- writes ---------------------------------------------------------------------------

    def _write(self, verb: str, request: rendering.Request) -> tuple[int, Any]:
        """Apply a write to the stored objects: (HTTP status, response body)."""
        resource = self._declared(request)
        name, subresource = request.name, request.subresource
        if name is None and subresource is None and verb == "create":
            return 201, self._create(resource, request.namespace, request.data)
        if name is None and subresource is None and verb == "deletecollection":
            return 200, self._delete_collection(request)
        if name is None:
            raise apierrors.error(
                405, "MethodNotAllowed", f"{verb} is not supported on a collection"
            )
        key = self._key(request, name)
        if subresource == "status" and not self._has_status(resource):
            raise apierrors.not_found(resource.plural or "")
        if verb == "create" and (resource, subresource) == (_PODS, "eviction"):
            return 201, self._evict(key, request.data)
        if verb == "create" and (resource, subresource) == (_SERVICE_ACCOUNTS, "token"):
            return 201, self._issue_token(key, request.data)
        if verb == "update" and subresource in (None, "status"):
            return 200, self._replace(key, subresource, request.data)
        if verb == "patch" and subresource in (None, "status"):
            return 200, self._patch(
                key, subresource, patches.content_type(request.headers), request.data
            )
        if verb == "delete" and subresource is None:
            return 200, self._delete_object(key, request.data)
        raise apierrors.not_found(resource.plural or "")

    def _delete_collection(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._declared(request)
        selects = self._selection(request)
        keys = [key for key, obj in self._live(resource) if selects(obj)]
        return self._list_of(resource, [self._delete(key) for key in keys])

    def _evict(self, key: store.Key, data: Any) -> dict[str, Any]:
        pod = self._require(key)
        name = (store.as_object(data).get("metadata") or {}).get("name")
        if name not in (None, key[2]):
            message = f"the eviction names {name}, not pod {key[2]}"
            raise apierrors.error(400, "BadRequest", message)
        evictions.check_eviction(
            pod,
            budgets=[obj for (_, ns, _), obj in self._live(_BUDGETS) if ns == key[1]],
            pods=[obj for (_, ns, _), obj in self._live(_PODS) if ns == key[1]],
        )
        self._delete(key)
        return evictions.evicted()

    def _issue_token(self, key: store.Key, data: Any) -> dict[str, Any]:
        self._require(key)
        spec = store.as_object(data).get("spec") or {}
        token, issued, answer = tokens.issue_token(key[1] or "", key[2], spec, self.clock())
        with self._records_lock:
            self._tokens[token] = issued
        return answer

    # -- requests' objects ----------------------------------------------------------------

    def _declared(self, request: rendering.Request) -> kmock.resource:
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self.resources:
            raise apierrors.not_found("")
        return resource

    def _key(self, request: rendering.Request, name: str) -> store.Key:
        resource = self._declared(request)
        return resource, request.namespace if self._namespaced(resource) else None, name

    def _selection(self, request: rendering.Request) -> Callable[[Mapping[str, Any]], bool]:
        """Whether an object is one the request lists: namespace, name and selectors."""
        resource = self._declared(request)
        try:
            return selection.selection(
                namespace=request.namespace if self._namespaced(resource) else None,
                name=request.name,
                labels=request.params.get("labelSelector", ""),
                fields=request.params.get("fieldSelector", ""),
                resource=(resource.group or "", resource.plural or ""),
            )
        except selection.SelectorError as exc:
            raise apierrors.error(400, "BadRequest", str(exc)) from exc


@contextlib.contextmanager
def running_cluster() -> Iterator[tuple[ClusterEmulator, str]]:
    """A `ClusterEmulator` serving HTTP on 127.0.0.1: (emulator, base URL)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kmock", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    async def start() -> tuple[ClusterEmulator, str]:
        emulator = await stack.enter_async_context(ClusterEmulator())
        server = await stack.enter_async_context(kmock.Server(emulator))
        return emulator, str(server.url).rstrip("/")

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig file for the emulator at `url` (no credentials: it asks for none)."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                "users": [{"name": "tests", "user": {}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": "tests"}}
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


def api_client(url: str) -> client.ApiClient:
    """An official client's ApiClient talking HTTP to the emulator at `url`."""
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def core_api(url: str) -> client.CoreV1Api:
    """The official client's CoreV1Api, talking HTTP to the emulator at `url`."""
    return client.CoreV1Api(api_client(url))
