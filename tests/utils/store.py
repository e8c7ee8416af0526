"""What the emulated API server (kube.py) stores, and the rules every write to it follows.

`ObjectStore` is the state half of `ClusterEmulator`: the resources it serves (kmock's
bundled built-ins, the chart's CRDs, and any CRD created since), the objects, keyed by
(resource, namespace, name), and the log of every change to them, which watches replay. Its
writes follow the real server where kmock's plain JSON merges do not:

- every write stamps the object with the next value of one cluster-wide resourceVersion
  counter; a write naming another resourceVersion (or a delete precondition naming another
  uid) than the stored one is refused with 409, and a write that changes nothing is not
  written (no new version, no change logged);
- `status` is written only through the status subresource of the resources that declare
  one, and a custom resource is created without it;
- patches are told apart by content type (patches.py); a JSON patch whose `test` op fails
  answers 422, and a strategic-merge patch of a custom resource 415;
- deletion honours finalizers, and deleting a namespace deletes everything in it, which
  stays `Terminating` (refusing new objects, 403) until its last object is gone.

Requests are the emulator's: this module never sees one, so it neither routes, selects nor
records who asked (kube.py does).
"""

from __future__ import annotations

import copy
import datetime
import gzip
import importlib.resources
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml  # type: ignore[import-untyped]

from utils import apierrors, patches, watches

__all__ = [
    "CHART_CRDS",
    "NAMESPACES",
    "Key",
    "ObjectStore",
    "as_object",
    "chart_crds",
    "rfc3339",
]

CHART_CRDS = Path(__file__).parents[2] / "charts" / "gpudelivery" / "crds"
NAMESPACES = kmock.resource("", "v1", "namespaces")
_PODS = kmock.resource("", "v1", "pods")
_CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_CRD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_GENERATED_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_GENERATED_NAME_LENGTH = 5

# Where an object is stored: (resource, namespace or None if cluster-scoped, name).
Key = tuple[kmock.resource, str | None, str]


def chart_crds() -> list[dict[str, Any]]:
    """The chart's CustomResourceDefinitions, as `helm install` would create them."""
    return [yaml.safe_load(path.read_text()) for path in sorted(CHART_CRDS.glob("*.yaml"))]


def rfc3339(moment: datetime.datetime) -> str:
    """A timestamp as the API server writes them: UTC, whole seconds."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def as_object(data: Any) -> dict[str, Any]:
    """A copy of a request body that is a Kubernetes object; 400 if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("metadata", {}), dict):
        message = "the request body is not a Kubernetes object"
        raise apierrors.error(400, "BadRequest", message)
    return copy.deepcopy(data)


@attrs.define(kw_only=True)
class ObjectStore(kmock.KubernetesEmulator):
    """kmock's emulator holding objects the way the real API server does (module docstring).

    The writes are methods for `ClusterEmulator` to call while serving a request, holding the
    change log's condition: they raise the Status error the request is refused with."""

    crds: Sequence[Mapping[str, Any]] = attrs.field(factory=chart_crds)
    clock: Callable[[], datetime.datetime] = _utc_now

    _log: watches.ChangeLog = attrs.field(factory=watches.ChangeLog, init=False)
    _custom: set[kmock.resource] = attrs.field(factory=set, init=False)
    # The keys of `objects` by resource, and how many keys it held when last indexed: a list
    # reads its resource's keys, not every object's (with thousands of nodes and events the
    # scan took most of the emulator's time in bench/bench_operator.py).
    _keys: dict[kmock.resource, set[Key]] = attrs.field(factory=dict, init=False)
    _indexed: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        bundled = importlib.resources.files("kmock._internal") / "resources.json.gz"
        self.resources.load_data(gzip.decompress(bundled.read_bytes()))
        for crd in self.crds:
            self._seed_crd(crd)

    def _seed_crd(self, crd: Mapping[str, Any]) -> None:
        """Store `crd` and serve its resource, as `helm install` leaves a chart's CRDs."""
        obj = copy.deepcopy(dict(crd))
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=rfc3339(self.clock()), generation=1)
        meta["resourceVersion"] = str(self._log.advance())
        self.objects[(_CRDS, None, meta["name"])] = obj
        self._log.seed(_CRDS, watches.Change(int(meta["resourceVersion"]), "ADDED", obj, None))
        self.register_crd(obj)

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

    # -- writes ---------------------------------------------------------------------------

    def _create(self, resource: kmock.resource, namespace: str | None, data: Any) -> dict[str, Any]:
        """Create an object of `resource` in `namespace` (None: the one the object names)."""
        obj = as_object(data)
        meta = obj.setdefault("metadata", {})
        if self._namespaced(resource):
            namespace = namespace or meta.get("namespace")
            if not namespace or meta.get("namespace") not in (None, namespace):
                message = "the namespace of the object does not match the request's"
                raise apierrors.error(400, "BadRequest", message)
            meta["namespace"] = namespace
            if self._terminating(namespace):
                message = (
                    f"unable to create new content in namespace {namespace} "
                    "because it is being terminated"
                )
                raise apierrors.error(403, "Forbidden", message)
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(
                secrets.choice(_GENERATED_NAME_CHARS) for _ in range(_GENERATED_NAME_LENGTH)
            )
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise apierrors.error(
                422, "Invalid", "metadata.name: Required value: name or generateName"
            )
        key: Key = (resource, namespace, meta["name"])
        if self._current(key) is not None:
            message = f'{resource.plural} "{meta["name"]}" already exists'
            raise apierrors.error(
                409, "AlreadyExists", message, name=meta["name"], kind=resource.plural
            )
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = rfc3339(self.clock())
        meta["generation"] = 1
        for system_field in ("deletionTimestamp", "resourceVersion"):
            meta.pop(system_field, None)
        if resource in self._custom and self._has_status(resource):
            obj.pop("status", None)
        if resource == _PODS:
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        if resource == NAMESPACES:
            obj["status"] = {"phase": "Active"}
        created = self._commit(key, obj, None)
        if resource == _CRDS:
            self.register_crd(created)
        return created

    def _replace(self, key: Key, subresource: str | None, data: Any) -> dict[str, Any]:
        current = self._require(key)
        body = as_object(data)
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, key[2]):
            message = f"the name of the object ({meta['name']}) does not match the URL's"
            raise apierrors.error(400, "BadRequest", message)
        self._check_version(key, current, meta.get("resourceVersion"))
        return self._update(key, current, self._confined(key[0], subresource, current, body))

    def _patch(
        self, key: Key, subresource: str | None, content_type: str, data: Any
    ) -> dict[str, Any]:
        current = self._require(key)
        if content_type == patches.JSON_PATCH and isinstance(data, list):
            try:
                patched = jsonpatch.apply_patch(copy.deepcopy(current), data, in_place=True)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise apierrors.error(
                    422, "Invalid", f"the JSON patch does not apply: {exc}"
                ) from exc
        elif content_type == patches.MERGE_PATCH and isinstance(data, dict):
            patched = patches.merge_patch(copy.deepcopy(current), data)
        elif content_type == patches.STRATEGIC_MERGE and isinstance(data, dict):
            if key[0] in self._custom:
                message = "strategic merge patches are not supported on custom resources"
                raise apierrors.error(415, "UnsupportedMediaType", message)
            patched = patches.strategic_merge(copy.deepcopy(current), data)
        else:
            raise apierrors.error(415, "UnsupportedMediaType", f"unsupported patch: {content_type}")
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise apierrors.error(422, "Invalid", "the patched object has no metadata")
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

    def _update(self, key: Key, current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
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

    def _check_version(self, key: Key, current: dict[str, Any], proposed: Any) -> None:
        if proposed and proposed != current["metadata"].get("resourceVersion"):
            raise apierrors.conflict(key[0].plural or "", key[2])

    def _delete_object(self, key: Key, options: Any) -> dict[str, Any]:
        current = self._require(key)
        preconditions = (options or {}).get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, current["metadata"].get(field)):
                raise apierrors.conflict(key[0].plural or "", key[2])
        return self._delete(key)

    def _delete(self, key: Key) -> dict[str, Any]:
        """Delete an object: at once, or mark it and wait for its finalizers (and for a
        namespace, its objects); its last state."""
        current = self._require(key)
        resource, _, name = key
        if resource != NAMESPACES and not current["metadata"].get("finalizers"):
            self._remove(key, current)
            return current
        if "deletionTimestamp" not in current["metadata"]:
            marked = copy.deepcopy(current)
            marked["metadata"]["deletionTimestamp"] = rfc3339(self.clock())
            if resource == NAMESPACES:
                marked.setdefault("status", {})["phase"] = "Terminating"
            current = self._commit(key, marked, current)
        if resource == NAMESPACES:
            for content in self._contents(name):
                if self._current(content) is not None:
                    self._delete(content)
        self._finalize(key)
        return current

    def _finalize(self, key: Key) -> None:
        """Remove an object being deleted once nothing holds it any more."""
        current = self._current(key)
        if current is None or "deletionTimestamp" not in current["metadata"]:
            return
        if current["metadata"].get("finalizers"):
            return
        if key[0] == NAMESPACES and self._contents(key[2]):
            return
        self._remove(key, current)

    def _remove(self, key: Key, current: dict[str, Any]) -> None:
        self._commit(key, None, current)
        if key[1] is not None:
            self._finalize((NAMESPACES, None, key[1]))

    def _commit(
        self, key: Key, new: dict[str, Any] | None, old: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Store a new state (None: remove) under the next resourceVersion, tell watchers."""
        revision = self._log.advance()
        resource = key[0]
        if new is None:
            assert old is not None  # a removal removes something
            final = {**old, "metadata": {**old["metadata"]}}
            final["metadata"]["resourceVersion"] = str(revision)
            self.objects[key].delete()
            change = watches.Change(revision, "DELETED", final, old)
        else:
            new["metadata"]["resourceVersion"] = str(revision)
            if key in self.objects:
                self.objects[key].history.append(new)
            else:
                self.objects[key] = new
                self._index(key)
            change = watches.Change(revision, "ADDED" if old is None else "MODIFIED", new, old)
        self._log.record(resource, change)
        return change.obj

    # -- lookups --------------------------------------------------------------------------

    def _namespaced(self, resource: kmock.resource) -> bool:
        return bool(self.resources[resource].namespaced)

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in self.resources[resource].subresources

    def _current(self, key: Key) -> dict[str, Any] | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _require(self, key: Key) -> dict[str, Any]:
        current = self._current(key)
        if current is None:
            raise apierrors.not_found(key[0].plural or "", key[2])
        return current

    def _live(self, resource: kmock.resource) -> list[tuple[Key, dict[str, Any]]]:
        """The objects of a resource, by namespace and name (the real server's order)."""
        objects = self.objects
        keys = [key for key in self._keys_of(resource) if key in objects]
        live = [(key, objects[key].raw) for key in keys if not objects[key].deleted]
        return sorted(live, key=lambda item: (item[0][1] or "", item[0][2]))

    def _index(self, key: Key) -> None:
        """Index a key the store has just added (when the index was whole before it; if not,
        `_keys_of` indexes everything at the next read)."""
        if len(self.objects) == self._indexed + 1:
            self._keys.setdefault(key[0], set()).add(key)
            self._indexed += 1

    def _keys_of(self, resource: kmock.resource) -> set[Key]:
        """The keys stored for `resource`, deleted ones included. The store adds each new key
        to the index (`_index`); the store never removes a key (a deletion marks it), so a
        count that differs means a key stored or removed some other way (a test writing to
        kmock's `objects`): everything is indexed again then."""
        if len(self.objects) != self._indexed:
            self._keys.clear()
            for key in self.objects:
                self._keys.setdefault(key[0], set()).add(key)
            self._indexed = len(self.objects)
        return self._keys.get(resource, set())

    def _contents(self, namespace: str) -> list[Key]:
        return [key for key, obj in self.objects.items() if key[1] == namespace and not obj.deleted]

    def _terminating(self, namespace: str) -> bool:
        obj = self._current((NAMESPACES, None, namespace))
        return obj is not None and "deletionTimestamp" in obj["metadata"]

    def _list_of(self, resource: kmock.resource, items: list[dict[str, Any]]) -> dict[str, Any]:
        group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        return {
            "apiVersion": group_version,
            "kind": f"{self.resources[resource].kind or ''}List",
            "metadata": {"resourceVersion": str(self._log.revision)},
            "items": items,
        }
