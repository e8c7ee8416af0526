"""The mutating admission webhook that pins buyers' pods to their contract's nodes.

kopf serves it: `register` puts a `kopf.on.mutate` handler on pod creation, which asks
operator/pinning.py what to change and answers with that patch; `configure` gives kopf the
HTTPS server. Every replica serves it (kopf runs admission outside peering), so the
Service in front of them keeps answering while one replica restarts.

The MutatingWebhookConfiguration is written by the operator, not by kopf: kopf's managed
configuration (`settings.admission.managed`) can set neither a namespaceSelector nor a
Service reference (nolar/kopf#864, #1155), so it would send every pod of the cluster to us,
at a URL that an API server outside the cluster's DNS cannot resolve. Ours, CONFIGURATION,
holds one webhook, WEBHOOK:

- pods, CREATE, only in namespaces labelled `gpudelivery.io/contract` (the buyers');
- failurePolicy `Fail`: while no replica answers, pods in buyers' namespaces are refused
  (their controllers retry) rather than admitted unpinned, since an unpinned pod may land on
  a GPU node that is not the contract's. Nothing outside buyers' namespaces waits on us, the
  operator's own pods included;
- sideEffects `None`, reinvocationPolicy `IfNeeded` (a later webhook cannot unpin a pod),
  timeoutSeconds TIMEOUT_S;
- clientConfig: the Service when `service_host` is `<service>.<namespace>.svc`, else the URL
  `https://<service_host>:<port>`; the path names the handler, as kopf routes requests.

Each replica writes it (create, else merge patch: the same body from every replica) when
its server starts and whenever its certificate files change. It stays when the operator
stops: buyers' pods wait for the operator rather than go unpinned.

TLS: `cert_file` and `key_file` (a Secret all replicas mount; kopf re-reads them when they
change) with `ca_file` or the certificate itself as the configuration's caBundle. Unset: a
certificate made at start for `service_host` and the listening address, signed by itself
(`cryptography`; kopf's own maker needs `certbuilder`). That is for one replica only
(`peering.standalone`): each replica would make its own and overwrite the other's caBundle.

Not here: what a pod gets (operator/pinning.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import ipaddress
import re
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping
from typing import Any, cast

import kopf
import kubernetes
import tenacity
import urllib3.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpudelivery import errors
from gpudelivery.operator import cluster, pinning, resources
from gpudelivery.operator.settings import OperatorSettings

__all__ = [
    "CONFIGURATION",
    "HANDLER_ID",
    "TIMEOUT_S",
    "USER_AGENT",
    "WEBHOOK",
    "PinningServer",
    "client_config",
    "configuration_body",
    "configure",
    "pin_pod",
    "register",
]

# The MutatingWebhookConfiguration the operator keeps, and its one webhook (a qualified name).
CONFIGURATION = "gpudelivery.io"
WEBHOOK = "pin-pods.gpudelivery.io"
# The kopf handler's id: kopf serves it at /<id> and runs only that handler there.
HANDLER_ID = "pin-pods"
# How long the API server waits for an answer (it allows 1 to 30 s): the handler is a pure
# function, so a slow answer means an unreachable replica, better refused and retried.
TIMEOUT_S = 10
# The operator's own client's User-Agent (runner.USER_AGENT, which tests compare: runner
# imports this module through handlers), so the RBAC test counts these requests.
USER_AGENT = f"gpudelivery-operator/{importlib.metadata.version('gpudelivery')}"
# A self-signed certificate outlives any run of the operator, which makes a new one at start.
_SELF_SIGNED_DAYS = 3650
# Refusal code of a pod aiming at another contract's nodes (the API server shows it).
_FORBIDDEN = 403
# A Service's in-cluster name, as the API server verifies its certificate.
_SERVICE_HOST = re.compile(r"^(?P<name>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc$")
_CONFLICT = 409
_TRANSIENT = frozenset({429, 500, 502, 503, 504})


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Put the webhook's handler on `registry` when the webhook is enabled (kopf refuses to
    start with an admission handler and no server)."""
    if settings.webhook.enabled:
        kopf.on.mutate("v1", "pods", registry=registry, id=HANDLER_ID, operations=["CREATE"])(
            pin_pod
        )


def configure(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Set kopf's admission server from `settings.webhook`; `kopf.PermanentError` (the
    operator does not start) for a self-signed certificate with more than one replica."""
    if not settings.webhook.enabled:
        return
    if settings.webhook.cert_file is None and not settings.peering.standalone:
        raise kopf.PermanentError(
            "the admission webhook needs GPUDELIVERY_OPERATOR_WEBHOOK__CERT_FILE and "
            "__KEY_FILE (one certificate all replicas mount) unless the operator runs alone "
            "(GPUDELIVERY_OPERATOR_PEERING__STANDALONE=true)"
        )
    kopf_settings.admission.server = PinningServer(settings)
    kopf_settings.admission.managed = None  # PinningServer writes the configuration


async def pin_pod(
    body: kopf.Body, namespace: str | None, patch: kopf.Patch, logger: kopf.Logger, **_: Any
) -> None:
    """Pin a pod created in a buyer's namespace to the contract's nodes (pinning.spec_patch);
    refuse one that selects another contract's nodes. A pod of another namespace reaches
    here only if its namespace carries the contract label without being the operator's:
    it is left as it is. The namespace is the object's own, which the API server sets from
    the request before admission (Kubernetes 1.24 and later)."""
    contract = pinning.contract_of_namespace(namespace)
    if contract is None:
        return
    try:
        changes = pinning.spec_patch(body, contract)
    except errors.InputError as exc:
        logger.warning("pod refused in %s: %s", namespace, exc)
        raise kopf.AdmissionError(str(exc), code=_FORBIDDEN) from exc
    for key, value in changes.items():
        patch.spec[key] = value
    if changes:
        logger.info("pod pinned to the nodes of contract %s", contract)


class PinningServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server, which also keeps CONFIGURATION pointing at itself, and
    makes its self-signed certificate with `cryptography`."""

    def __init__(self, settings: OperatorSettings) -> None:
        webhook = settings.webhook
        super().__init__(
            addr=webhook.host,
            port=webhook.port or None,  # kopf picks a free port for None
            host=webhook.service_host,
            certfile=webhook.cert_file,
            pkeyfile=webhook.key_file,
            cafile=webhook.ca_file,
        )
        self.kubeconfig = settings.kubeconfig

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        config = cluster.configuration(self.kubeconfig)
        api_client = kubernetes.client.ApiClient(config)
        api_client.user_agent = USER_AGENT
        api = kubernetes.client.AdmissionregistrationV1Api(api_client)
        try:
            # kopf's server is an async generator (annotated as an iterator): closing it
            # stops serving even when writing the configuration failed.
            server = cast(AsyncGenerator[kopf.WebhookClientConfig, None], super().__call__(fn))
            async with contextlib.aclosing(server) as serving:
                async for served in serving:
                    body = configuration_body(client_config(served, self.host))
                    async for attempt in _retrying():
                        with attempt:
                            await asyncio.to_thread(_write_configuration, api, body)
                    yield served
        finally:
            api_client.close()  # type: ignore[no-untyped-call]

    @staticmethod
    def build_certificate(
        hostnames: Collection[str], password: str | None = None
    ) -> tuple[bytes, bytes]:
        """A certificate signed by its own key (PEM), for `hostnames` (names and addresses;
        the first name is its subject), and the key (PEM, encrypted with `password`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for hostname in dict.fromkeys(hostnames):
            try:
                address = ipaddress.ip_address(hostname)
            except ValueError:
                names.append(x509.DNSName(hostname))
                continue
            if not address.is_unspecified:
                names.append(x509.IPAddress(address))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
        now = datetime.datetime.now(datetime.UTC)
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
            .not_valid_after(now + datetime.timedelta(days=_SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        encryption: serialization.KeySerializationEncryption = (
            serialization.NoEncryption()
            if password is None
            else serialization.BestAvailableEncryption(password.encode("utf-8"))
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def client_config(served: Mapping[str, Any], service_host: str | None) -> dict[str, Any]:
    """How the API server reaches the handler, from what kopf's server reports (its URL and
    CA bundle): the Service when `service_host` is `<service>.<namespace>.svc`, else the URL;
    either way at the handler's path."""
    url = urllib.parse.urlsplit(str(served["url"]))
    path = f"{url.path.rstrip('/')}/{HANDLER_ID}"
    service = _SERVICE_HOST.match(service_host or "")
    config: dict[str, Any]
    if service is None:
        config = {"url": urllib.parse.urlunsplit(url._replace(path=path))}
    else:
        config = {
            "service": {
                "namespace": service["namespace"],
                "name": service["name"],
                "port": url.port,
                "path": path,
            }
        }
    if served.get("caBundle"):
        config["caBundle"] = served["caBundle"]
    return config


def configuration_body(client: Mapping[str, Any]) -> dict[str, Any]:
    """The MutatingWebhookConfiguration CONFIGURATION, calling the handler at `client`."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION},
        "webhooks": [
            {
                "name": WEBHOOK,
                "admissionReviewVersions": ["v1"],
                "clientConfig": dict(client),
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchExpressions": [{"key": resources.LABEL_CONTRACT, "operator": "Exists"}]
                },
                "failurePolicy": "Fail",
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": TIMEOUT_S,
            }
        ],
    }


def _write_configuration(
    api: kubernetes.client.AdmissionregistrationV1Api, body: Mapping[str, Any]
) -> None:
    """Create the configuration, or write its webhooks whole over the existing one (a JSON
    merge patch replaces a list; a strategic one would merge the webhooks by name)."""
    model = kubernetes.client.V1MutatingWebhookConfiguration.model_validate(dict(body))
    try:
        api.create_mutating_webhook_configuration(model)
    except kubernetes.client.ApiException as exc:
        if exc.status != _CONFLICT:
            raise
        api.patch_mutating_webhook_configuration(
            CONFIGURATION,
            {"webhooks": body["webhooks"]},
            _content_type="application/merge-patch+json",
        )


def _retrying() -> tenacity.AsyncRetrying:
    """Retries of a configuration write the API server could not take now; anything else
    (a refusal, missing RBAC) stops the operator, so the pod's restarts show it."""
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(_is_transient),
        stop=tenacity.stop_after_attempt(5),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10),
        reraise=True,
    )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, kubernetes.client.ApiException):
        return exc.status in _TRANSIENT
    return isinstance(exc, urllib3.exceptions.HTTPError)
