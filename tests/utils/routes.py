"""What a request to the emulated API server (kube.py) addresses, and how RBAC names it.

kmock cannot parse the `namespaces` resource itself (`/api/v1/namespaces` fails,
`/namespaces/x` reads as "namespace x"), so the emulator routes every request by
`parse_route()` on its real path instead, after serving the namespaces collection under a
placeholder path kmock can parse (`NAMESPACES_PLACEHOLDER`). `Access` is the same request as
RBAC sees it (verb, API group, resource[/subresource]), for the access log the RBAC test
compares with the chart's ClusterRole; discovery requests (no resource) have none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["NAMESPACES_PLACEHOLDER", "Access", "Route", "parse_route", "rbac_verb"]


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
NAMESPACES_PLACEHOLDER = "/api/v1/namespaces/.collection"
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def parse_route(path: str) -> Route | None:
    """The route of an API path (None for paths outside /api and /apis)."""
    path = "/api/v1/namespaces" if path == NAMESPACES_PLACEHOLDER else path
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


def rbac_verb(method: str, name: str | None, params: Mapping[str, str]) -> str | None:
    """The RBAC verb of a request to a resource (None: a method RBAC does not name)."""
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)


class Access(NamedTuple):
    """One kind of request, as RBAC names it: ("patch", "", "pods/status")."""

    verb: str
    group: str
    resource: str
