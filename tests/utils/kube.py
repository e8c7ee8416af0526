"""The Kubernetes API server of the tests: kmock's KubernetesEmulator, run on a real port.

kmock stores objects and merges patches as plain JSON, and little more. `ClusterEmulator`
adds, by subclassing as kmock's docs invite, what the components rely on, so they are
tested against the API server's behaviour rather than a dictionary's:

- **Resources.** The built-in resources kmock bundles (with their scope and subresources)
  and the CRDs of the chart (charts/gpudelivery/crds) are declared from the start; a CRD
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

`running_cluster()` runs the emulator on its own event loop in a background thread, so
synchronous code (the official `kubernetes` client) talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import dataclasses
import datetime
import gzip
import importlib.resources
import json
import math
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml  # type: ignore[import-untyped]
from kmock._internal import parsing, rendering
from kubernetes import client

__all__ = [
    "CHART_CRDS",
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

CHART_CRDS = Path(__file__).parents[2] / "charts" / "gpudelivery" / "crds"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# The lists the real API server merges item by item under a strategic-merge patch, with
# their merge key (from the Kubernetes OpenAPI `x-kubernetes-patch-merge-key`).
_MERGE_KEYS = {("status", "conditions"): "type"}

# -- selectors ------------------------------------------------------------------------------


class SelectorError(ValueError):
    """A label or field selector the API server refuses (400 Bad Request)."""


# A label name (and value, which may also be empty): at most 63 characters.
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_DNS_SUBDOMAIN_CHARS = 253
_TOKEN = r"[^\s!=(),]+"
_SET_TERM = re.compile(rf"\s*({_TOKEN})\s+(in|notin)\s*\(([^()]*)\)\s*")
_EQUALITY_TERM = re.compile(rf"\s*({_TOKEN})\s*(==|=|!=)\s*([^\s!=(),]*)\s*")
_EXISTENCE_TERM = re.compile(rf"\s*(!?)\s*({_TOKEN})\s*")
# metav1.LabelSelector's expression operators, in the selector syntax's words.
_EXPRESSION_OPERATORS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    """One term of a label selector: `operator` is `=`, `!=`, `in`, `notin`, `exists` or
    `!` (does not exist); `=` and `!=` hold their one value in `values`."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    """The requirements of a `labelSelector` (all must hold); `SelectorError` if the API
    server would refuse it."""
    if not text.strip():
        return ()
    return tuple(_label_requirement(term, text) for term in _split_outside_parentheses(text))


def _split_outside_parentheses(text: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for at, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:at])
            start = at + 1
        if depth not in (0, 1):
            raise SelectorError(f"unable to parse requirement: unbalanced parentheses in {text!r}")
    if depth:
        raise SelectorError(f"unable to parse requirement: unbalanced parentheses in {text!r}")
    return [*terms, text[start:]]


def _label_requirement(term: str, text: str) -> LabelRequirement:
    if found := _SET_TERM.fullmatch(term):
        key, operator, listed = found.groups()
        values = frozenset(value.strip() for value in listed.split(",")) if listed.strip() else ()
        if not values:
            raise SelectorError(f"{key}: for 'in', 'notin' operators, values set can't be empty")
    elif found := _EQUALITY_TERM.fullmatch(term):
        key, operator, value = found.groups()
        operator, values = ("!=" if operator == "!=" else "="), frozenset({value})
    elif found := _EXISTENCE_TERM.fullmatch(term):
        negated, key = found.groups()
        operator, values = ("!" if negated else "exists"), frozenset()
    else:
        raise SelectorError(f"unable to parse requirement {term!r} of {text!r}")
    _check_label_key(key)
    for value in values:
        if not re.fullmatch(f"(?:{_LABEL_NAME})?", value):
            raise SelectorError(f"{key}: invalid label value {value!r}")
    return LabelRequirement(key, operator, frozenset(values))


def _check_label_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    valid_prefix = not slash or (
        len(prefix) <= _DNS_SUBDOMAIN_CHARS and re.fullmatch(_DNS_SUBDOMAIN, prefix)
    )
    if not valid_prefix or not re.fullmatch(_LABEL_NAME, name):
        raise SelectorError(f"invalid label key {key!r}")


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a `metav1.LabelSelector` (a budget's, a policy's) selects `labels`; a null
    selector selects nothing, an empty one everything."""
    if selector is None:
        return False
    requirements = [
        LabelRequirement(key, "=", frozenset({value}))
        for key, value in (selector.get("matchLabels") or {}).items()
    ]
    for expression in selector.get("matchExpressions") or ():
        operator = _EXPRESSION_OPERATORS.get(expression.get("operator"))
        if operator is None:
            raise SelectorError(f"unknown label selector operator {expression!r}")
        values = frozenset(expression.get("values") or ())
        requirements.append(LabelRequirement(expression["key"], operator, values))
    return all(requirement.matches(labels) for requirement in requirements)


# Fields every resource can be selected by, and those only some can (the real API server's
# field label conversion functions).
_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
_RESOURCE_FIELDS = {
    ("", "pods"): frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    ("", "nodes"): frozenset({"spec.unschedulable"}),
    ("", "namespaces"): frozenset({"status.phase"}),
    ("", "secrets"): frozenset({"type"}),
    ("", "events"): frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "reason",
            "type",
        }
    ),
}
# A boolean field the server renders even where the object leaves it out.
_FIELD_DEFAULTS = {"spec.unschedulable": "false"}


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    """One term of a field selector: `field` equals `value`, or differs from it."""

    field: str
    value: str
    negated: bool = False

    def matches(self, obj: Mapping[str, Any]) -> bool:
        node: Any = obj
        for part in self.field.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            actual = _FIELD_DEFAULTS.get(self.field, "")
        elif isinstance(node, bool):
            actual = "true" if node else "false"
        else:
            actual = str(node)
        return (actual == self.value) != self.negated


def parse_field_selector(text: str) -> tuple[FieldRequirement, ...]:
    """The requirements of a `fieldSelector` (`\\`, `,` and `=` escaped by a backslash in
    values); `SelectorError` if the API server would refuse its syntax."""
    requirements = []
    for term in _split_unescaped_commas(text):
        if term:
            field, operator, value = _split_field_term(term, text)
            requirements.append(FieldRequirement(field, _unescape(value), operator == "!="))
    return tuple(requirements)


def _split_unescaped_commas(text: str) -> list[str]:
    terms, start, at = [], 0, 0
    while at < len(text):
        if text[at] == "\\":
            at += 1
        elif text[at] == ",":
            terms.append(text[start:at])
            start = at + 1
        at += 1
    return [*terms, text[start:]]


def _split_field_term(term: str, text: str) -> tuple[str, str, str]:
    at = 0
    while at < len(term):
        if term[at] == "\\":
            at += 2
            continue
        for operator in ("!=", "==", "="):
            if term.startswith(operator, at):
                return term[:at], operator, term[at + len(operator) :]
        at += 1
    raise SelectorError(f"invalid selector: {text!r}; can't understand {term!r}")


def _unescape(value: str) -> str:
    unescaped, escaping = [], False
    for char in value:
        if escaping:
            if char not in "\\,=":
                raise SelectorError(f"invalid escape sequence \\{char} in {value!r}")
            unescaped.append(char)
            escaping = False
        elif char == "\\":
            escaping = True
        elif char in ",=":
            raise SelectorError(f"unescaped {char!r} in field selector value {value!r}")
        else:
            unescaped.append(char)
    if escaping:
        raise SelectorError(f"invalid escape sequence at the end of {value!r}")
    return "".join(unescaped)


# -- patches --------------------------------------------------------------------------------


def merge_by_key(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    """A strategic merge of two lists of objects on `key`: patched items replace fields of
    the current item of the same key, new items are appended, the rest stay in order.
    An item `{"$patch": "delete", key: k}` removes item k."""
    merged = [dict(item) for item in current]
    for item in patch:
        at = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del merged[at]
        elif at is None:
            merged.append(dict(item))
        else:
            merged[at].update(item)
    return merged


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null removes a key, anything else replaces.
    The result shares what the patch leaves alone with `target`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


def _strategic_merge(current: Mapping[str, Any], patch: dict[str, Any]) -> Any:
    """A strategic-merge patch applied as the merge patch it amounts to: the merge-keyed
    lists of the patch merged with the stored ones, every other list replaced."""
    patch = copy.deepcopy(patch)
    for (section, field), merge_key in _MERGE_KEYS.items():
        part = patch.get(section)
        if isinstance(part, dict) and isinstance(part.get(field), list):
            stored = current.get(section) or {}
            part[field] = merge_by_key(stored.get(field) or [], part[field], merge_key)
    return _merge_patch(current, patch)


# -- routes and errors ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    """What a request path addresses: a resource, maybe in a namespace, maybe one object."""

    group: str
    version: str
    plural: str | None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


# kmock cannot parse the namespaces collection path at all; it reaches kmock under this one
# (not a valid namespace name, so no real object can be addressed by it).
_NAMESPACES_PLACEHOLDER = "/api/v1/namespaces/.collection"
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def parse_route(path: str) -> Route | None:
    """The route of an API path (None for paths outside /api and /apis)."""
    path = "/api/v1/namespaces" if path == _NAMESPACES_PLACEHOLDER else path
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    namespace_subresource = group == "" and rest[2:3] and rest[2] in _NAMESPACE_SUBRESOURCES
    if (
        len(rest) >= 3
        and rest[0] == "namespaces"
        and not (len(rest) == 3 and namespace_subresource)
    ):
        namespace, rest = rest[1], rest[2:]
    return Route(
        group=group,
        version=version,
        plural=rest[0] if rest else None,
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


def _rbac_verb(method: str, name: str | None, params: Mapping[str, str]) -> str | None:
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)


def _error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """The Status error the real API server answers with."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def _not_found(plural: str, name: str | None = None) -> kmock.KubernetesError:
    if name is None:
        return _error(404, "NotFound", "the server could not find the requested resource")
    return _error(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)


def _conflict(plural: str, name: str) -> kmock.KubernetesError:
    message = (
        f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return _error(409, "Conflict", message, name=name, kind=plural)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def chart_crds() -> list[dict[str, Any]]:
    """The chart's CustomResourceDefinitions, as `helm install` would create them."""
    return [yaml.safe_load(path.read_text()) for path in sorted(CHART_CRDS.glob("*.yaml"))]


# -- the emulator ---------------------------------------------------------------------------


class Access(NamedTuple):
    """One kind of request, as RBAC names it: ("patch", "", "pods/status")."""

    verb: str
    group: str
    resource: str


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A token the emulator issued for a service account."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires: datetime.datetime


class _Change(NamedTuple):
    revision: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]  # the new state; for DELETED, the last one
    old: dict[str, Any] | None  # the state before (None for ADDED)


_Key = tuple[kmock.resource, str | None, str]
_NAMESPACES = kmock.resource("", "v1", "namespaces")
_PODS = kmock.resource("", "v1", "pods")
_SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
_BUDGETS = kmock.resource("policy", "v1", "poddisruptionbudgets")
_CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_CRD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
# Pods in these phases (or being deleted) are evicted without asking their budget.
_BUDGET_EXEMPT_PHASES = frozenset({"Pending", "Succeeded", "Failed"})
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
_BUDGET_VIOLATION = "Cannot evict pod as it would violate the pod's disruption budget."
# TokenRequest's defaults and floor (seconds), and the audience of an API server by default.
_TOKEN_DEFAULT_S = 3600
_TOKEN_MIN_S = 600
_API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)
_GENERATED_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_GENERATED_NAME_LENGTH = 5


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with the API server behaviours the module docstring lists.

    kmock's own write path (`KubernetesEmulator._handle`) is replaced, not extended: it
    stores plain merges. The request dispatch to reactions and fallbacks (kmock's DSL, so
    tests can still inject failures) is kept; writes happen before it, as in kmock, and the
    fallbacks serve their outcome."""

    crds: Sequence[Mapping[str, Any]] = attrs.field(factory=chart_crds)
    clock: Callable[[], datetime.datetime] = _utc_now

    # Not 0: a watch from "0" starts with the current objects, not from the beginning.
    _revision: int = attrs.field(default=1, init=False)
    _changes: dict[kmock.resource, list[_Change]] = attrs.field(
        factory=lambda: collections.defaultdict(list), init=False
    )
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _outcomes: dict[rendering.Request, tuple[int, Any]] = attrs.field(factory=dict, init=False)
    _custom: set[kmock.resource] = attrs.field(factory=set, init=False)
    _accesses: set[Access] = attrs.field(factory=set, init=False)
    _tokens: dict[str, IssuedToken] = attrs.field(factory=dict, init=False)
    _builtin_reactions: int = attrs.field(default=0, init=False)
    # The test thread reads what the server's thread writes.
    _records_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        bundled = importlib.resources.files("kmock._internal") / "resources.json.gz"
        self.resources.load_data(gzip.decompress(bundled.read_bytes()))
        for crd in self.crds:
            self.register_crd(crd)
        self.fallback[self._has_outcome] << self._serve_outcome
        self._builtin_reactions = len(self._payloads)

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve the custom resource a CustomResourceDefinition declares."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                resource = kmock.resource(spec["group"], version["name"], names["plural"])
                self.resources[resource] = kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular") or names["kind"].lower(),
                    namespaced=spec["scope"] == "Namespaced",
                    verbs=_CRD_VERBS,
                    shortnames=names.get("shortNames") or (),
                    categories=names.get("categories") or (),
                    subresources=version.get("subresources") or {},
                )
                self._custom.add(resource)

    @property
    def access_log(self) -> frozenset[Access]:
        """Every (verb, group, resource[/subresource]) requested so far."""
        with self._records_lock:
            return frozenset(self._accesses)

    @property
    def issued_tokens(self) -> dict[str, IssuedToken]:
        """The tokens issued so far, by token."""
        with self._records_lock:
            return dict(self._tokens)

    # -- requests -------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # The real server serves paths with a trailing slash (the client's discovery uses
        # /api/ and /apis/); kmock serves them without.
        path = raw_request.path.rstrip("/") or "/"
        path = _NAMESPACES_PLACEHOLDER if path == "/api/v1/namespaces" else path
        if path != raw_request.path:
            url = raw_request.rel_url.with_path(path).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=url)
        return await super().__call__(raw_request)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        request = self._routed(request)
        method = str(request.method.value)
        verb = _rbac_verb(method, request.name, request.params)
        if verb is not None and request.resource is not None and request.resource.plural:
            resource = request.resource.plural
            if request.subresource:
                resource = f"{resource}/{request.subresource}"
            with self._records_lock:
                self._accesses.add(Access(verb, request.resource.group or "", resource))
            if verb not in ("get", "list", "watch"):
                async with self._changed:
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
        route = parse_route(request.url.path)
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
            raise _not_found(resource.plural or "")
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
            raise _error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        timeout_s = request.params.get("timeoutSeconds")
        deadline = None
        if timeout_s:
            deadline = asyncio.get_running_loop().time() + float(timeout_s)
        yield b""  # the headers: the stream is open even if nothing happens

        changes = self._changes[resource]
        if since in ("", "0"):
            initial: list[dict[str, Any]] = [
                {"type": "ADDED", "object": obj} for _, obj in self._live(resource) if selects(obj)
            ]
            position = len(changes)
        else:
            initial = []
            position = bisect.bisect_right(changes, int(since), key=lambda c: c.revision)
        for event in initial:
            yield event
        while True:
            async with self._changed:
                while position == len(changes):
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._changed.wait()
                    except TimeoutError:
                        return
                batch, position = changes[position:], len(changes)
            for change in batch:
                if (seen := _watch_event(change, selects)) is not None:
                    yield seen

    # -- writes ---------------------------------------------------------------------------

    def _write(self, verb: str, request: rendering.Request) -> tuple[int, Any]:
        """Apply a write to the stored objects: (HTTP status, response body)."""
        resource = self._declared(request)
        name, subresource = request.name, request.subresource
        if name is None and subresource is None and verb == "create":
            return 201, self._create(request)
        if name is None and subresource is None and verb == "deletecollection":
            return 200, self._delete_collection(request)
        if name is None:
            raise _error(405, "MethodNotAllowed", f"{verb} is not supported on a collection")
        key = self._key(request, name)
        if subresource == "status" and not self._has_status(resource):
            raise _not_found(resource.plural or "")
        if verb == "create" and (resource, subresource) == (_PODS, "eviction"):
            return 201, self._evict(key, request.data)
        if verb == "create" and (resource, subresource) == (_SERVICE_ACCOUNTS, "token"):
            return 201, self._issue_token(key, request.data)
        if verb == "update" and subresource in (None, "status"):
            return 200, self._replace(key, subresource, request.data)
        if verb == "patch" and subresource in (None, "status"):
            return 200, self._patch(key, subresource, _content_type(request), request.data)
        if verb == "delete" and subresource is None:
            return 200, self._delete_object(key, request.data)
        raise _not_found(resource.plural or "")

    def _create(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._declared(request)
        obj = _body(request.data)
        meta = obj.setdefault("metadata", {})
        if self._namespaced(resource):
            namespace = request.namespace or meta.get("namespace")
            if not namespace or meta.get("namespace") not in (None, namespace):
                message = "the namespace of the object does not match the request's"
                raise _error(400, "BadRequest", message)
            meta["namespace"] = namespace
            if self._terminating(namespace):
                message = (
                    f"unable to create new content in namespace {namespace} "
                    "because it is being terminated"
                )
                raise _error(403, "Forbidden", message)
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(
                secrets.choice(_GENERATED_NAME_CHARS) for _ in range(_GENERATED_NAME_LENGTH)
            )
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value: name or generateName")
        key: _Key = (resource, namespace, meta["name"])
        if self._current(key) is not None:
            message = f'{resource.plural} "{meta["name"]}" already exists'
            raise _error(409, "AlreadyExists", message, name=meta["name"], kind=resource.plural)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = _rfc3339(self.clock())
        meta["generation"] = 1
        for system_field in ("deletionTimestamp", "resourceVersion"):
            meta.pop(system_field, None)
        if resource in self._custom and self._has_status(resource):
            obj.pop("status", None)
        if resource == _PODS:
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        if resource == _NAMESPACES:
            obj["status"] = {"phase": "Active"}
        created = self._commit(key, obj, None)
        if resource == _CRDS:
            self.register_crd(created)
        return created

    def _replace(self, key: _Key, subresource: str | None, data: Any) -> dict[str, Any]:
        current = self._require(key)
        body = _body(data)
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, key[2]):
            message = f"the name of the object ({meta['name']}) does not match the URL's"
            raise _error(400, "BadRequest", message)
        self._check_version(key, current, meta.get("resourceVersion"))
        return self._update(key, current, self._confined(key[0], subresource, current, body))

    def _patch(
        self, key: _Key, subresource: str | None, content_type: str, data: Any
    ) -> dict[str, Any]:
        current = self._require(key)
        if content_type == JSON_PATCH and isinstance(data, list):
            try:
                patched = jsonpatch.apply_patch(copy.deepcopy(current), data, in_place=True)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise _error(422, "Invalid", f"the JSON patch does not apply: {exc}") from exc
        elif content_type == MERGE_PATCH and isinstance(data, dict):
            patched = _merge_patch(copy.deepcopy(current), data)
        elif content_type == STRATEGIC_MERGE and isinstance(data, dict):
            if key[0] in self._custom:
                message = "strategic merge patches are not supported on custom resources"
                raise _error(415, "UnsupportedMediaType", message)
            patched = _strategic_merge(copy.deepcopy(current), data)
        else:
            raise _error(415, "UnsupportedMediaType", f"unsupported patch: {content_type}")
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise _error(422, "Invalid", "the patched object has no metadata")
        self._check_version(key, current, patched["metadata"].get("resourceVersion"))
        return self._update(key, current, self._confined(key[0], subresource, current, patched))

    def _confined(
        self,
        resource: kmock.resource,
        subresource: str | None,
        current: dict[str, Any],
        proposed: dict[str, Any],
    ) -> dict[str, Any]:
        """The proposed object, cut to what the write may change: only `status` through
        the status subresource, anything but `status` through a resource that has one."""
        if subresource == "status":
            confined, source = copy.deepcopy(current), proposed
        elif self._has_status(resource):
            confined, source = copy.deepcopy(proposed), current
        else:
            return copy.deepcopy(proposed)
        confined.pop("status", None)
        if "status" in source:
            confined["status"] = copy.deepcopy(source["status"])
        return confined

    def _update(self, key: _Key, current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Store `new` over `current`, keeping the fields only the server writes."""
        meta, kept = new.setdefault("metadata", {}), current["metadata"]
        for system_field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(system_field, None)
            if system_field in kept:
                meta[system_field] = kept[system_field]
        meta["resourceVersion"] = kept.get("resourceVersion")
        meta["generation"] = kept.get("generation", 1) + (new.get("spec") != current.get("spec"))
        if new == current:
            return current
        updated = self._commit(key, new, current)
        self._finalize(key)
        return updated

    def _check_version(self, key: _Key, current: dict[str, Any], proposed: Any) -> None:
        if proposed and proposed != current["metadata"].get("resourceVersion"):
            raise _conflict(key[0].plural or "", key[2])

    def _delete_object(self, key: _Key, options: Any) -> dict[str, Any]:
        current = self._require(key)
        preconditions = (options or {}).get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, current["metadata"].get(field)):
                raise _conflict(key[0].plural or "", key[2])
        return self._delete(key)

    def _delete_collection(self, request: rendering.Request) -> dict[str, Any]:
        resource = self._declared(request)
        selects = self._selection(request)
        keys = [key for key, obj in self._live(resource) if selects(obj)]
        return self._list_of(resource, [self._delete(key) for key in keys])

    def _delete(self, key: _Key) -> dict[str, Any]:
        """Delete an object: at once, or mark it and wait for its finalizers (and for a
        namespace, its objects); its last state."""
        current = self._require(key)
        resource, _, name = key
        if resource != _NAMESPACES and not current["metadata"].get("finalizers"):
            self._remove(key, current)
            return current
        if "deletionTimestamp" not in current["metadata"]:
            marked = copy.deepcopy(current)
            marked["metadata"]["deletionTimestamp"] = _rfc3339(self.clock())
            if resource == _NAMESPACES:
                marked.setdefault("status", {})["phase"] = "Terminating"
            current = self._commit(key, marked, current)
        if resource == _NAMESPACES:
            for content in self._contents(name):
                if self._current(content) is not None:
                    self._delete(content)
        self._finalize(key)
        return current

    def _finalize(self, key: _Key) -> None:
        """Remove an object being deleted once nothing holds it any more."""
        current = self._current(key)
        if current is None or "deletionTimestamp" not in current["metadata"]:
            return
        if current["metadata"].get("finalizers"):
            return
        if key[0] == _NAMESPACES and self._contents(key[2]):
            return
        self._remove(key, current)

    def _remove(self, key: _Key, current: dict[str, Any]) -> None:
        self._commit(key, None, current)
        if key[1] is not None:
            self._finalize((_NAMESPACES, None, key[1]))

    def _evict(self, key: _Key, data: Any) -> dict[str, Any]:
        pod = self._require(key)
        name = (_body(data).get("metadata") or {}).get("name")
        if name not in (None, key[2]):
            raise _error(400, "BadRequest", f"the eviction names {name}, not pod {key[2]}")
        exempt = pod.get("status", {}).get("phase") in _BUDGET_EXEMPT_PHASES
        if not exempt and "deletionTimestamp" not in pod["metadata"]:
            self._check_budget(key, pod)
        self._delete(key)
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }

    def _check_budget(self, key: _Key, pod: Mapping[str, Any]) -> None:
        """Refuse (429) the eviction of `pod` if its budget allows no disruption."""
        labels = pod["metadata"].get("labels") or {}
        budgets = [
            budget
            for (_, namespace, _), budget in self._live(_BUDGETS)
            if namespace == key[1]
            and selector_matches((budget.get("spec") or {}).get("selector"), labels)
        ]
        if len(budgets) > 1:
            message = (
                "This pod has more than one PodDisruptionBudget, "
                "which the eviction subresource does not support."
            )
            raise _error(500, "InternalError", message)
        if not budgets:
            return
        (budget,) = budgets
        selector = budget["spec"].get("selector")
        pods = [
            other
            for (_, namespace, _), other in self._live(_PODS)
            if namespace == key[1]
            and selector_matches(selector, other["metadata"].get("labels") or {})
            and other.get("status", {}).get("phase") not in _FINISHED_PHASES
        ]
        healthy = sum(
            other.get("status", {}).get("phase") == "Running"
            and "deletionTimestamp" not in other["metadata"]
            for other in pods
        )
        desired = _desired_healthy(budget["spec"], len(pods))
        if healthy - desired < 1:
            cause = (
                f"The disruption budget {budget['metadata']['name']} needs {desired} healthy "
                f"pods and has {healthy} currently"
            )
            causes = [{"reason": "DisruptionBudget", "message": cause}]
            raise _error(429, "TooManyRequests", _BUDGET_VIOLATION, causes=causes)

    def _issue_token(self, key: _Key, data: Any) -> dict[str, Any]:
        self._require(key)
        spec = _body(data).get("spec") or {}
        seconds = spec.get("expirationSeconds")
        seconds = _TOKEN_DEFAULT_S if seconds is None else seconds
        if not isinstance(seconds, int) or seconds < _TOKEN_MIN_S:
            message = (
                f"spec.expirationSeconds: Invalid value: {seconds}: "
                "may not specify a duration less than 10 minutes"
            )
            raise _error(422, "Invalid", message)
        audiences = tuple(spec.get("audiences") or _API_AUDIENCES)
        expires = self.clock() + datetime.timedelta(seconds=seconds)
        token = secrets.token_urlsafe(32)
        namespace = key[1] or ""
        with self._records_lock:
            self._tokens[token] = IssuedToken(namespace, key[2], audiences, expires)
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": key[2], "namespace": namespace},
            "spec": {"audiences": list(audiences), "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": _rfc3339(expires)},
        }

    def _commit(
        self, key: _Key, new: dict[str, Any] | None, old: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Store a new state (None: remove) under the next resourceVersion, tell watchers."""
        self._revision += 1
        resource = key[0]
        if new is None:
            assert old is not None  # a removal removes something
            final = {**old, "metadata": {**old["metadata"]}}
            final["metadata"]["resourceVersion"] = str(self._revision)
            self.objects[key].delete()
            change = _Change(self._revision, "DELETED", final, old)
        else:
            new["metadata"]["resourceVersion"] = str(self._revision)
            if key in self.objects:
                self.objects[key].history.append(new)
            else:
                self.objects[key] = new
            change = _Change(self._revision, "ADDED" if old is None else "MODIFIED", new, old)
        self._changes[resource].append(change)
        self._changed.notify_all()
        return change.obj

    # -- lookups --------------------------------------------------------------------------

    def _declared(self, request: rendering.Request) -> kmock.resource:
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self.resources:
            raise _not_found("")
        return resource

    def _namespaced(self, resource: kmock.resource) -> bool:
        return bool(self.resources[resource].namespaced)

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in self.resources[resource].subresources

    def _key(self, request: rendering.Request, name: str) -> _Key:
        resource = self._declared(request)
        return resource, request.namespace if self._namespaced(resource) else None, name

    def _current(self, key: _Key) -> dict[str, Any] | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _require(self, key: _Key) -> dict[str, Any]:
        current = self._current(key)
        if current is None:
            raise _not_found(key[0].plural or "", key[2])
        return current

    def _live(self, resource: kmock.resource) -> list[tuple[_Key, dict[str, Any]]]:
        """The objects of a resource, by namespace and name (the real server's order)."""
        live = [
            (key, obj.raw)
            for key, obj in self.objects.items()
            if key[0] == resource and not obj.deleted
        ]
        return sorted(live, key=lambda item: (item[0][1] or "", item[0][2]))

    def _contents(self, namespace: str) -> list[_Key]:
        return [key for key, obj in self.objects.items() if key[1] == namespace and not obj.deleted]

    def _terminating(self, namespace: str) -> bool:
        obj = self._current((_NAMESPACES, None, namespace))
        return obj is not None and "deletionTimestamp" in obj["metadata"]

    def _selection(self, request: rendering.Request) -> Callable[[Mapping[str, Any]], bool]:
        """Whether an object is one the request lists: namespace, name and selectors."""
        resource = self._declared(request)
        try:
            labels = parse_label_selector(request.params.get("labelSelector", ""))
            fields = parse_field_selector(request.params.get("fieldSelector", ""))
            supported = _COMMON_FIELDS | _RESOURCE_FIELDS.get(
                (resource.group or "", resource.plural or ""), frozenset()
            )
            for field in fields:
                if field.field not in supported:
                    raise SelectorError(f'field label not supported: "{field.field}"')
        except SelectorError as exc:
            raise _error(400, "BadRequest", str(exc)) from exc
        namespace = request.namespace if self._namespaced(resource) else None
        name = request.name

        def selects(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            object_labels = meta.get("labels") or {}
            return (
                namespace in (None, meta.get("namespace"))
                and name in (None, meta.get("name"))
                and all(requirement.matches(object_labels) for requirement in labels)
                and all(requirement.matches(obj) for requirement in fields)
            )

        return selects

    def _list_of(self, resource: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        return {
            "apiVersion": group_version,
            "kind": f"{self.resources[resource].kind or ''}List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }


def _watch_event(
    change: _Change, selects: Callable[[Mapping[str, Any]], bool]
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


def _desired_healthy(spec: Mapping[str, Any], expected: int) -> int:
    """How many healthy pods a budget's spec asks for out of `expected` (percentages round
    up, as the disruption controller rounds them)."""

    def scaled(value: int | str) -> int:
        if isinstance(value, str) and value.endswith("%"):
            return math.ceil(int(value[:-1]) * expected / 100)
        return int(value)

    if spec.get("maxUnavailable") is not None:
        return max(expected - scaled(spec["maxUnavailable"]), 0)
    if spec.get("minAvailable") is not None:
        return scaled(spec["minAvailable"])
    return 0


def _body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("metadata", {}), dict):
        raise _error(400, "BadRequest", "the request body is not a Kubernetes object")
    return copy.deepcopy(data)


def _content_type(request: rendering.Request) -> str:
    for header, value in request.headers.items():
        if header.lower() == "content-type":
            return value.split(";")[0].strip()
    return ""


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
