"""The signals the metering agent publishes on its Node and the delivery operator reads.

The agent (metering/node_condition.py) writes them, the operator (operator/nodes.py) reads
them, and the two components may not import each other: the names and the one format they
share live here, in the core. The annotation's format is the whole contract: the UUIDs,
sorted, without repeats, joined by commas, so one set of GPUs is always the same text and an
unchanged set is never rewritten.

Not here: reading or writing a Node (each component does its own, through its own client).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ANNOTATION_GPU_UUIDS",
    "CONDITION_GPU_HEALTHY",
    "format_gpu_uuids",
    "parse_gpu_uuids",
]

# The Node condition saying whether every GPU of the node is healthy ("True"/"False").
CONDITION_GPU_HEALTHY = "GPUHealthy"
# The Node annotation listing the node's GPU UUIDs, as `format_gpu_uuids` writes them.
ANNOTATION_GPU_UUIDS = "gpudelivery.io/gpu-uuids"

_SEPARATOR = ","


def format_gpu_uuids(uuids: Iterable[str]) -> str:
    """The annotation's text for `uuids`: sorted, without repeats, comma-joined.

    Blank UUIDs are left out and surrounding whitespace is dropped, as `parse_gpu_uuids`
    does; a UUID holding a comma cannot be written and is a ValueError.
    """
    items = {uuid.strip() for uuid in uuids} - {""}
    if broken := sorted(uuid for uuid in items if _SEPARATOR in uuid):
        raise ValueError(f"a GPU UUID cannot hold a comma: {broken[0]!r}")
    return _SEPARATOR.join(sorted(items))


def parse_gpu_uuids(text: str | None) -> tuple[str, ...]:
    """The GPU UUIDs an annotation lists, sorted and without repeats.

    Tolerant of what a hand edit leaves: no annotation or an empty one lists none, and blank
    items and whitespace around items are ignored.
    """
    if not text:
        return ()
    return tuple(sorted({item.strip() for item in text.split(_SEPARATOR)} - {""}))
