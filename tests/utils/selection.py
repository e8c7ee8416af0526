"""Label and field selectors, as the Kubernetes API server parses and matches them.

kmock ignores selectors. The emulated API server (kube.py) filters list, watch and
deletecollection requests with them (`selection`), and asks `selector_matches` which pods a
PodDisruptionBudget's `metav1.LabelSelector` selects. `labelSelector` takes equality
(`a=b`, `a==b`, `a!=b`), sets (`a in (x,y)`, `a notin (x)`) and existence (`a`, `!a`);
`fieldSelector` takes `=`, `==`, `!=` on the fields the real server supports for the
resource (`metadata.name` and `metadata.namespace` everywhere; `spec.nodeName` and
`status.phase` of pods, ...). A malformed selector, an unsupported field and a `>`/`<` label
requirement raise `SelectorError`, which the emulator answers with 400.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FieldRequirement",
    "LabelRequirement",
    "SelectorError",
    "parse_field_selector",
    "parse_label_selector",
    "selection",
    "selector_matches",
]


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


def selection(
    *,
    namespace: str | None,
    name: str | None,
    labels: str,
    fields: str,
    resource: tuple[str, str],
) -> Callable[[Mapping[str, Any]], bool]:
    """Whether an object is one a list, watch or deletecollection request selects: in
    `namespace` and named `name` (None: any), and matching its `labelSelector` and
    `fieldSelector`; `SelectorError` if the server would refuse them for the resource
    (group, plural)."""
    label_requirements = parse_label_selector(labels)
    field_requirements = parse_field_selector(fields)
    supported = _COMMON_FIELDS | _RESOURCE_FIELDS.get(resource, frozenset())
    for requirement in field_requirements:
        if requirement.field not in supported:
            raise SelectorError(f'field label not supported: "{requirement.field}"')

    def selects(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        object_labels = meta.get("labels") or {}
        return (
            namespace in (None, meta.get("namespace"))
            and name in (None, meta.get("name"))
            and all(requirement.matches(object_labels) for requirement in label_requirements)
            and all(requirement.matches(obj) for requirement in field_requirements)
        )

    return selects


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
