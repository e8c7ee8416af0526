"""The metering agent (DaemonSet): samples GPUs through NVML and ships signed batches.

Pure modules first: `health` (is a GPU healthy, and why not), `readings` (what a round saw
of a GPU), `records` (interval records from consecutive readings). Then the agent's parts:
`sampling` (rounds and the XID pump), `spool` (durable signed chain), `shipping` (to the
API, with retries), `registration` (the node key, with the bootstrap token), `metrics`
(Prometheus and /healthz), `settings`, `keys`, and `agent` (the loop that ties them). The
adapters: `nvml` (pynvml behind one small interface), `attribution` (the kubelet's
pod-resources API and process cgroups), `pods` (pod UIDs from the API server),
`node_condition` (the GPUHealthy Node condition) and `kube` (the API server's client).
"""

__all__ = [
    "agent",
    "attribution",
    "health",
    "keys",
    "kube",
    "metrics",
    "node_condition",
    "nvml",
    "pods",
    "readings",
    "records",
    "registration",
    "sampling",
    "settings",
    "shipping",
    "spool",
]
