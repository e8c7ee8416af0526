"""Configuration of the delivery operator: environment variables under GPUDELIVERY_OPERATOR_.

Grouped like kopf's OperatorSettings; a nested field is set with a double underscore, e.g.
`GPUDELIVERY_OPERATOR_API__URL=https://api.gpu.example`. Only this module reads the
environment; the operator applies the kopf part to kopf's own settings at startup.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, HttpUrl, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ApiSettings",
    "BuyerSettings",
    "OperatorSettings",
    "PeeringSettings",
    "TimingSettings",
    "WebhookSettings",
]


class ApiSettings(BaseModel):
    url: HttpUrl | None = Field(
        default=None,
        description="Base URL of the gpudelivery API; unset: contracts come only from the "
        "cluster and the ledger stays in their status.",
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding an API key of role `operator` (a mounted Secret).",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="HTTP timeout.")
    sync_interval_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Seconds between mirrorings of the API's contracts, and between reports "
        "of a ledger the API has not acknowledged.",
    )

    @model_validator(mode="after")
    def _token_with_url(self) -> ApiSettings:
        if self.url is not None and self.token_file is None:
            raise ValueError("api.url needs api.token_file (an API key of role operator)")
        return self


class BuyerSettings(BaseModel):
    server: str | None = Field(
        default=None,
        description="The Kubernetes API server's URL as buyers reach it, written into their "
        "kubeconfigs; unset: the address the operator itself uses (fine for a local cluster, "
        "not for buyers outside it).",
    )
    ca_file: Path | None = Field(
        default=None,
        description="The CA certificate (PEM) buyers' kubeconfigs trust the API server by; "
        "unset: the one the operator trusts, if any.",
    )


class PeeringSettings(BaseModel):
    name: str = Field(
        default="gpudelivery",
        min_length=1,
        description="The kopf peering object the replicas share: one of them is active.",
    )
    standalone: bool = Field(
        default=False, description="Run without peering (a single replica, or development)."
    )


class TimingSettings(BaseModel):
    reconcile_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds between reconciliations of a live contract: how late a window "
        "edge or a failed node is noticed at most.",
    )
    not_ready_after_s: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="A node NotReady for longer than this is substituted.",
    )


class WebhookSettings(BaseModel):
    """The admission webhook that pins buyers' pods to their contract's nodes
    (operator/admission.py says how it is served and configured)."""

    enabled: bool = Field(
        default=True,
        description="Serve the mutating admission webhook that pins buyers' pods to their "
        "contract's nodes, and keep its MutatingWebhookConfiguration; off: buyers add the "
        "node selector and toleration themselves.",
    )
    host: str = Field(default="0.0.0.0", description="Address the webhook server listens on.")
    port: int = Field(
        default=9443,
        ge=0,
        le=65535,
        description="Its port, also the port of the Service named by service_host; 0 picks a "
        "free one (tests).",
    )
    cert_file: Path | None = Field(
        default=None,
        description="TLS certificate (PEM, a mounted Secret, re-read when it changes); unset: "
        "a self-signed one made at start, which needs a single replica (peering.standalone).",
    )
    key_file: Path | None = Field(default=None, description="The certificate's private key.")
    ca_file: Path | None = Field(
        default=None,
        description="The CA that issued cert_file, given to the API server to trust it; "
        "unset: the certificate itself.",
    )
    service_host: str | None = Field(
        default=None,
        description="The host name the API server reaches the webhook at, which the "
        "certificate names: `<service>.<namespace>.svc` makes the configuration name that "
        "Service (port `port`); any other host is called as https://<host>:<port>; unset: "
        "the listening address (development).",
    )

    @model_validator(mode="after")
    def _certificate_is_whole(self) -> WebhookSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("webhook.cert_file and webhook.key_file are set together")
        if self.ca_file is not None and self.cert_file is None:
            raise ValueError("webhook.ca_file needs webhook.cert_file")
        return self


class OperatorSettings(BaseSettings):
    """Everything the delivery operator can be told."""

    model_config = SettingsConfigDict(
        env_prefix="GPUDELIVERY_OPERATOR_", env_nested_delimiter="__", extra="forbid"
    )

    api: ApiSettings = ApiSettings()
    buyers: BuyerSettings = BuyerSettings()
    peering: PeeringSettings = PeeringSettings()
    timing: TimingSettings = TimingSettings()
    webhook: WebhookSettings = WebhookSettings()
    kubeconfig: Path | None = Field(
        default=None,
        description="Kubeconfig file to reach the API server; unset: the pod's service "
        "account (in-cluster), else ~/.kube/config.",
    )
