"""The metering agent (DaemonSet): samples GPUs through NVML and ships signed batches.

Modules, pure ones first: `health` (is a GPU healthy, and why not), `records` (interval
records from consecutive readings), then the adapters: `nvml` (pynvml behind one small
interface). Sampling, pod attribution, the spool, shipping and metrics follow (issue 3).
"""

__all__ = ["health", "nvml", "records"]
