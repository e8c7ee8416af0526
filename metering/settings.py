"""Configuration of the metering agent: environment variables under GPUDELIVERY_METER_.

Grouped like kopf's OperatorSettings; a nested field is set with a double underscore, e.g.
`GPUDELIVERY_METER_SAMPLING__INTERVAL_S=1`. Only this module reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, HttpUrl, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MeterSettings"]


class SamplingSettings(BaseModel):
    interval_s: int = Field(default=1, ge=1, le=60, description="Seconds between sampling rounds.")
    batch_interval_s: int = Field(
        default=10, ge=1, le=600, description="Seconds of records signed into one batch."
    )
    max_gap_rounds: int = Field(
        default=3,
        ge=1,
        le=60,
        description="A round later than this many intervals after the last one claims only "
        "its own interval: the rest is left unmetered, never filled with stale data.",
    )


class SpoolSettings(BaseModel):
    state_dir: Path = Field(
        default=Path("/var/lib/gpudelivery-meter"),
        description="Holds the node key (node.key, node.pub) and the spool (spool.sqlite3).",
    )
    max_bytes: int = Field(
        default=1 << 30, ge=1 << 16, description="Spool size limit; past it, gap markers."
    )


class ShippingSettings(BaseModel):
    api_url: HttpUrl | None = Field(
        default=None, description="Base URL of the gpudelivery API; unset: spool only."
    )
    batch_limit: int = Field(default=50, ge=1, le=100, description="Batches per request.")
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="HTTP timeout.")
    bootstrap_token_file: Path | None = Field(
        default=None,
        description="File holding the bootstrap token (a mounted Secret) that registers the "
        "node key with the API; unset: the key is registered by other means.",
    )


class ServerSettings(BaseModel):
    host: str = Field(default="0.0.0.0", description="Address of /metrics and /healthz.")
    port: int = Field(default=9400, ge=0, le=65535, description="Port; 0 picks a free one.")
    stale_after_s: int = Field(
        default=30, ge=1, description="/healthz fails when the last round is older than this."
    )


class NodeConditionSettings(BaseModel):
    enabled: bool = Field(
        default=True,
        description="Publish GPU health as the Node condition GPUHealthy and the GPUs' UUIDs as "
        "the Node annotation gpudelivery.io/gpu-uuids (needs RBAC: get and patch on nodes/status, "
        "patch on nodes).",
    )
    interval_s: int = Field(
        default=5, ge=1, le=300, description="Seconds between checks of the GPUs' verdicts."
    )
    heartbeat_s: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Rewrite an unchanged condition this often (its lastHeartbeatTime).",
    )


class AttributionSettings(BaseModel):
    enabled: bool = Field(default=True, description="Name the pods using each GPU in records.")
    socket: Path = Field(
        default=Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        description="The kubelet's pod-resources socket (mounted from the host).",
    )
    proc_root: Path = Field(
        default=Path("/proc"),
        description="The host's /proc, where NVML's PIDs live (hostPID, or the host's /proc "
        "mounted here).",
    )
    gpu_resources: list[str] = Field(
        default=["nvidia.com/"],
        min_length=1,
        description="Resource names that are GPUs; one ending in / takes its whole domain.",
    )
    ttl_s: float = Field(
        default=10.0, gt=0, le=300, description="Seconds one kubelet answer is used for."
    )
    timeout_s: float = Field(default=2.0, gt=0, le=30, description="Timeout of a kubelet call.")


class MeterSettings(BaseSettings):
    """Everything the metering agent can be told."""

    model_config = SettingsConfigDict(
        env_prefix="GPUDELIVERY_METER_", env_nested_delimiter="__", extra="forbid"
    )

    node_name: str = Field(
        min_length=1, max_length=253, description="This node's Kubernetes name (downward API)."
    )
    sampling: SamplingSettings = SamplingSettings()
    spool: SpoolSettings = SpoolSettings()
    shipping: ShippingSettings = ShippingSettings()
    server: ServerSettings = ServerSettings()
    node_condition: NodeConditionSettings = NodeConditionSettings()
    attribution: AttributionSettings = AttributionSettings()
    kubeconfig: Path | None = Field(
        default=None,
        description="Kubeconfig file to reach the API server (node condition, pods by UID); "
        "unset: the pod's service account; neither: both are off.",
    )

    @model_validator(mode="after")
    def _batches_hold_whole_rounds(self) -> MeterSettings:
        if self.sampling.batch_interval_s % self.sampling.interval_s:
            raise ValueError("sampling.batch_interval_s must be a multiple of sampling.interval_s")
        return self
