"""The patch formats the emulated API server (kube.py) tells apart, and how it merges them.

kmock merges every patch as plain JSON. The real server reads the content type: a JSON patch
(RFC 6902, a list of operations, which the emulator applies with `jsonpatch`), a JSON merge
patch (RFC 7386, `merge_patch`), or a strategic-merge patch (`strategic_merge`), which is a
merge patch whose merge-keyed lists are merged item by item (`merge_by_key`) instead of
replaced whole. The only merge-keyed list known here is the one the components write,
`status.conditions` (by `type`); of the strategic-merge directives only `$patch: delete` in
such a list is understood. Server-side apply is not emulated.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "STRATEGIC_MERGE",
    "content_type",
    "merge_by_key",
    "merge_patch",
    "strategic_merge",
]

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# The lists the real API server merges item by item under a strategic-merge patch, with
# their merge key (from the Kubernetes OpenAPI `x-kubernetes-patch-merge-key`).
_MERGE_KEYS = {("status", "conditions"): "type"}


def content_type(headers: Mapping[str, str]) -> str:
    """The patch format a request's headers name: its content type, without parameters."""
    for header, value in headers.items():
        if header.lower() == "content-type":
            return value.split(";")[0].strip()
    return ""


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


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null removes a key, anything else replaces.
    The result shares what the patch leaves alone with `target`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def strategic_merge(current: Mapping[str, Any], patch: dict[str, Any]) -> Any:
    """A strategic-merge patch applied as the merge patch it amounts to: the merge-keyed
    lists of the patch merged with the stored ones, every other list replaced."""
    patch = copy.deepcopy(patch)
    for (section, field), merge_key in _MERGE_KEYS.items():
        part = patch.get(section)
        if isinstance(part, dict) and isinstance(part.get(field), list):
            stored = current.get(section) or {}
            part[field] = merge_by_key(stored.get(field) or [], part[field], merge_key)
    return merge_patch(current, patch)
