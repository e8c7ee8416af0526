"""Meter routes: key registration, ingest, the evidence log (docs/ingest.md,
docs/evidence-log.md).

Ingest takes no API key: every batch proves itself by its node key's signature, and a
request whose batches are not so signed stores nothing. Keys are registered with the
bootstrap token the chart gives the meter DaemonSet, and revoked by an admin. The evidence
log's head and proofs are public: anyone may check that the log only grows.

Each route commits once, after its service has done everything; an error rolls back.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

import msgspec
import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gpudelivery import batches, timefmt
from gpudelivery.api import auth, errors, evidence_log, ingest
from gpudelivery.api.deps import CurrentPrincipal, SessionDep, StateDep
from gpudelivery.api.models import MeterKey, TreeHead

__all__ = ["router"]

# Indexes and sizes a BIGINT column can hold, with room: larger ones answer 422.
_MAX_INDEX = 2**62

router = APIRouter(tags=["meter"])

_bootstrap_bearer = HTTPBearer(
    auto_error=False, description="The bootstrap token the meters register their keys with."
)


class MeterKeyCreate(BaseModel):
    node: str = Field(min_length=1, max_length=253, description="The Kubernetes node name.")
    public_key_pem: str = Field(
        max_length=4096, description="The node's Ed25519 public key, PEM SubjectPublicKeyInfo."
    )


class MeterKeyPublic(BaseModel):
    node: str
    key_id: str
    registered_at: str
    revoked_at: str | None = None


class IngestRequest(BaseModel):
    """What `POST /v1/meter/batches` reads (documented only: the route parses the body
    itself, so that a malformed request answers 400 as docs/ingest.md says)."""

    model_config = ConfigDict(extra="forbid")

    batches: list[dict[str, Any]] = Field(min_length=1, max_length=ingest.MAX_BATCHES_PER_REQUEST)


class IngestAnswer(BaseModel):
    results: list[ingest.BatchResult]


class TreeHeadPublic(BaseModel):
    format: str = evidence_log.TREE_HEAD_FORMAT
    size: int
    root_hash: str
    timestamp: str
    key_id: str
    signature: str


class InclusionProofPublic(BaseModel):
    leaf_index: int
    tree_size: int
    leaf_hash: str
    hashes: list[str]


class ConsistencyProofPublic(BaseModel):
    old_size: int
    new_size: int
    hashes: list[str]


def _key_public(key: MeterKey) -> MeterKeyPublic:
    return MeterKeyPublic(
        node=key.node,
        key_id=key.key_id,
        registered_at=timefmt.format_utc(key.registered_at),
        revoked_at=None if key.revoked_at is None else timefmt.format_utc(key.revoked_at),
    )


def _head_public(head: TreeHead) -> TreeHeadPublic:
    return TreeHeadPublic(
        size=head.size,
        root_hash=head.root_hash,
        timestamp=timefmt.format_utc(head.timestamp_s),
        key_id=head.key_id,
        signature=head.signature,
    )


def require_bootstrap_token(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bootstrap_bearer)],
) -> None:
    """Let the request through only with the configured bootstrap token."""
    if state.bootstrap_token is None:
        raise errors.ForbiddenError(
            "meter key registration is disabled: the API has no bootstrap token"
        )
    if credentials is None:
        raise errors.AuthenticationError("the bootstrap token is required (Authorization: Bearer)")
    if not hmac.compare_digest(
        credentials.credentials.encode("utf-8"), state.bootstrap_token.encode("utf-8")
    ):
        raise errors.AuthenticationError("wrong bootstrap token")


@router.post(
    "/v1/meter/keys",
    response_model=MeterKeyPublic,
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_bootstrap_token)],
    summary="Register a node's meter key (with the bootstrap token).",
    responses={
        200: {"description": "The key was already registered for this node."},
        409: {"description": "The key is registered for another node, or was revoked."},
    },
)
def register_key(body: MeterKeyCreate, session: SessionDep, response: Response) -> MeterKeyPublic:
    key, created = ingest.register_key(
        session, node=body.node, public_key_pem=body.public_key_pem, now_s=int(time.time())
    )
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return _key_public(key)


@router.delete(
    "/v1/meter/keys/{key_id}",
    response_model=MeterKeyPublic,
    summary="Revoke a node's meter key (admin): its batches answer unknown_key.",
)
def revoke_key(key_id: str, principal: CurrentPrincipal, session: SessionDep) -> MeterKeyPublic:
    auth.require(principal)
    key = ingest.revoke_key(session, key_id=key_id, now_s=int(time.time()))
    session.commit()
    return _key_public(key)


class _UsualBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A request whose batches are all in the agent's usual shape (batches.UsualBatch)."""

    batches: list[batches.UsualBatch]


_USUAL_BODY = msgspec.json.Decoder(_UsualBody)


async def _read_batches(request: Request) -> list[Any]:
    """The request's batches, or 400 (docs/ingest.md: errors of the request as a whole).

    A body of usual batches is decoded typed, the rest as plain JSON; ingest gives either
    the same verdicts (batches.parse_batch)."""
    body = await request.body()
    documents: list[Any]
    try:
        documents = _USUAL_BODY.decode(body).batches
    except msgspec.DecodeError:  # not JSON, or not only usual batches: decoded as plain JSON
        documents = _plain_batches(body)
    if not 1 <= len(documents) <= ingest.MAX_BATCHES_PER_REQUEST:
        raise errors.ApiError(
            f"a request carries 1 to {ingest.MAX_BATCHES_PER_REQUEST} batches, not {len(documents)}"
        )
    return documents


def _plain_batches(body: bytes) -> list[Any]:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.ApiError(f"the body is not JSON: {exc}") from exc
    if not isinstance(decoded, dict) or set(decoded) != {"batches"}:
        raise errors.ApiError('the body must be {"batches": [...]}')
    documents = decoded["batches"]
    if not isinstance(documents, list):
        raise errors.ApiError('the body must be {"batches": [...]}')
    return documents


@router.post(
    "/v1/meter/batches",
    response_model=IngestAnswer,
    response_model_exclude_none=True,
    summary="Ship signed meter batches; one result per batch, in request order.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": IngestRequest.model_json_schema()}},
        }
    },
    responses={
        400: {"description": "Not JSON, not {batches: [...]}, or not 1 to 100 batches."},
        413: {"description": "The body is larger than the API takes."},
    },
)
def ingest_batches(
    documents: Annotated[list[Any], Depends(_read_batches)], session: SessionDep, state: StateDep
) -> IngestAnswer:
    results = ingest.ingest(session, documents=documents, now_s=int(time.time()))
    session.commit()
    stored = sum(
        ingest.record_count(document)
        for document, result in zip(documents, results, strict=True)
        if result.status == ingest.BatchStatus.ACCEPTED
    )
    state.metrics.count_ingest([str(result.status.value) for result in results], stored)
    return IngestAnswer(results=results)


@router.get(
    "/v1/evidence/tree-head",
    response_model=TreeHeadPublic,
    tags=["evidence"],
    summary="The evidence log's size and root, signed by the provider key.",
)
def get_tree_head(state: StateDep, session: SessionDep) -> TreeHeadPublic:
    head = evidence_log.tree_head(session, key=state.provider_key, now_s=int(time.time()))
    session.commit()
    return _head_public(head)


@router.get(
    "/v1/evidence/consistency",
    response_model=ConsistencyProofPublic,
    tags=["evidence"],
    summary="Proof that the log of size `to` extends the log of size `from`.",
)
def get_consistency(
    session: SessionDep,
    old_size: Annotated[int, Query(alias="from", ge=0, le=_MAX_INDEX)],
    new_size: Annotated[int, Query(alias="to", ge=0, le=_MAX_INDEX)],
) -> ConsistencyProofPublic:
    proof = evidence_log.consistency(session, old_size=old_size, new_size=new_size)
    session.commit()  # keeps any subtree roots the proof had to compute
    return ConsistencyProofPublic(
        old_size=proof.old_size, new_size=proof.new_size, hashes=list(proof.hashes)
    )


@router.get(
    "/v1/evidence/{leaf_index}/inclusion",
    response_model=InclusionProofPublic,
    tags=["evidence"],
    summary="Proof that leaf `leaf_index` is in the log of size `size` "
    "(default: the current tree head's).",
)
def get_inclusion(
    state: StateDep,
    session: SessionDep,
    leaf_index: Annotated[int, Path(ge=0, le=_MAX_INDEX)],
    size: Annotated[int | None, Query(ge=1, le=_MAX_INDEX)] = None,
) -> InclusionProofPublic:
    if size is None:
        head = evidence_log.tree_head(session, key=state.provider_key, now_s=int(time.time()))
        session.commit()
        size = head.size
    proof = evidence_log.inclusion(session, leaf_index=leaf_index, size=size)
    session.commit()  # keeps any subtree roots the proof had to compute
    return InclusionProofPublic(
        leaf_index=proof.leaf_index,
        tree_size=proof.tree_size,
        leaf_hash=proof.leaf_hash,
        hashes=list(proof.hashes),
    )
