"""A test double of the API's meter ingest endpoint (docs/ingest.md), over real HTTP.

It verifies every batch with the core (signature, key, chain order), deduplicates on
(node, key, seq) and hash, and answers per batch as the contract says. Tests can make it
answer 503 for a while, refuse requests outright, or not listen at all (down). With a
`bootstrap_token`, it registers node keys as `POST /v1/meter/keys` says; a registered key
is accepted only for its node.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gpudelivery import batches, errors, signing


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class IngestDouble:
    """Stores verified batches per (node, key id) chain; `stored` is what it accepted."""

    def __init__(
        self,
        keys: list[ed25519.Ed25519PublicKey],
        port: int | None = None,
        *,
        bootstrap_token: str | None = None,
    ) -> None:
        self.keys = {signing.key_id(key): key for key in keys}
        self.bootstrap_token = bootstrap_token
        self.key_nodes: dict[str, str] = {}  # key id -> node, for registered keys
        self.registrations: list[tuple[int, str | None]] = []  # (status, authorization)
        self.port = port or free_port()
        self.stored: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests = 0
        self.busy_answers = 0  # answer this many requests 503 first
        self.refuse_with: int | None = None  # answer every request with this status
        self.answers: list[list[str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                authorization = self.headers.get("authorization")
                if self.path == "/v1/meter/keys":
                    status, answer, headers = double.register(authorization, body)
                else:
                    status, answer, headers = double.handle(self.path, body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def register(self, authorization: str | None, body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests += 1
            status, answer = self._register(authorization, body)
            self.registrations.append((status, authorization))
            return status, answer, {}

    def _register(self, authorization: str | None, body: bytes) -> tuple[int, Any]:
        if self.busy_answers:
            self.busy_answers -= 1
            return 503, {"detail": "busy"}
        if self.bootstrap_token is None or authorization != f"Bearer {self.bootstrap_token}":
            return 401, {"detail": "bootstrap token required"}
        request = json.loads(body)
        key = signing.load_public_pem(request["public_key_pem"].encode())
        key_id = signing.key_id(key)
        if self.key_nodes.get(key_id, request["node"]) != request["node"]:
            return 409, {"detail": "key registered for another node"}
        status = 200 if key_id in self.key_nodes else 201
        self.keys[key_id] = key
        self.key_nodes[key_id] = request["node"]
        return status, {"node": request["node"], "key_id": key_id, "registered_at": "now"}

    def revoke(self, key_id: str) -> None:
        with self._lock:
            self.keys.pop(key_id, None)
            self.key_nodes.pop(key_id, None)

    def handle(self, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests += 1
            if path != "/v1/meter/batches":
                return 404, {"detail": "not found"}, {}
            if self.busy_answers:
                self.busy_answers -= 1
                return 503, {"detail": "busy"}, {"retry-after": "0"}
            if self.refuse_with is not None:
                return self.refuse_with, {"detail": "refused by the test"}, {}
            documents = json.loads(body)["batches"]
            results = []
            blocked: set[tuple[str, str]] = set()
            for document in documents:
                results.append(self._ingest(document, blocked))
            self.answers.append([result["status"] for result in results])
            return 200, {"results": results}, {}

    def _ingest(self, document: dict[str, Any], blocked: set[tuple[str, str]]) -> dict[str, Any]:
        answer = {
            "node": document.get("node"),
            "key_id": document.get("key_id"),
            "seq": document.get("seq"),
        }
        key_id = str(document.get("key_id"))
        key = self.keys.get(key_id)
        if key is None or self.key_nodes.get(key_id, document.get("node")) != document.get("node"):
            return {**answer, "status": "unknown_key"}
        try:
            batch = batches.verify_batch(document, key)
        except (errors.GpuDeliveryError, ValueError) as exc:
            return {**answer, "status": "invalid", "detail": str(exc)}
        chain = self.stored.setdefault((batch.node, batch.key_id), [])
        if (batch.node, batch.key_id) in blocked:
            return {**answer, "status": "out_of_order", "expected_seq": len(chain)}
        if batch.seq < len(chain):
            if batches.batch_hash(chain[batch.seq]) == batch.hash:
                return {**answer, "status": "duplicate"}
            blocked.add((batch.node, batch.key_id))
            return {**answer, "status": "fork"}
        if batch.seq > len(chain):
            blocked.add((batch.node, batch.key_id))
            return {**answer, "status": "out_of_order", "expected_seq": len(chain)}
        previous = batches.parse_batch(chain[-1]) if chain else None
        try:
            batches.check_link(previous, batch)
        except batches.ChainError as exc:
            blocked.add((batch.node, batch.key_id))
            return {**answer, "status": "fork", "detail": str(exc)}
        chain.append(document)
        return {**answer, "status": "accepted"}
