"""Webhook routes: an exchange registers, lists and deletes where it is reported to
(api.webhooks holds the rules, docs/webhooks.md the format receivers implement)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, Field

from gpudelivery import timefmt
from gpudelivery.api import auth, webhooks
from gpudelivery.api.auth import Role
from gpudelivery.api.deps import CurrentPrincipal, SessionDep
from gpudelivery.api.models import Webhook

__all__ = ["ResolverDep", "get_resolver", "router"]

router = APIRouter(tags=["webhooks"])


def get_resolver() -> webhooks.Resolver:
    """How webhook hosts are resolved for the SSRF check (tests override it)."""
    return webhooks.resolve_host


ResolverDep = Annotated[webhooks.Resolver, Depends(get_resolver)]


def _now() -> int:
    return int(time.time())


class WebhookCreate(BaseModel):
    url: str = Field(
        min_length=1,
        max_length=webhooks.MAX_URL_LENGTH,
        description="An https URL whose host is, and resolves only to, public addresses.",
    )
    allow_private: bool = Field(
        default=False,
        description="Admin only: accept an http URL or a private, loopback or link-local "
        "host (tests, private clearing networks).",
    )
    exchange: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Admin only (and then required): the exchange the webhook is for.",
    )


class WebhookPublic(BaseModel):
    id: str
    exchange: str
    url: str
    created_at: str
    disabled_at: str | None


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    count: int


def _public(webhook: Webhook) -> WebhookPublic:
    return WebhookPublic(
        id=webhook.id,
        exchange=webhook.exchange,
        url=webhook.url,
        created_at=timefmt.format_utc(webhook.created_at),
        disabled_at=None
        if webhook.disabled_at is None
        else timefmt.format_utc(webhook.disabled_at),
    )


@router.post(
    "/v1/webhooks",
    response_model=WebhookPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Register where final proofs and settlements are delivered (exchange).",
    responses={
        403: {"description": "Not an exchange, or allow_private without being an admin."},
        409: {"description": "The URL is registered already, or too many webhooks."},
        422: {"description": "The URL is refused (scheme, private address: SSRF)."},
    },
)
def create_webhook(
    session: SessionDep, principal: CurrentPrincipal, resolve: ResolverDep, body: WebhookCreate
) -> WebhookPublic:
    auth.require(principal, Role.EXCHANGE)
    webhook = webhooks.register_webhook(
        session,
        exchange=principal,
        url=body.url,
        allow_private=body.allow_private,
        now_s=_now(),
        resolve=resolve,
        on_behalf_of=body.exchange,
    )
    session.commit()
    return _public(webhook)


@router.get(
    "/v1/webhooks",
    response_model=WebhooksPublic,
    summary="Your active webhooks (an admin sees every exchange's).",
)
def list_webhooks(session: SessionDep, principal: CurrentPrincipal) -> WebhooksPublic:
    auth.require(principal, Role.EXCHANGE)
    page = webhooks.list_webhooks(session, principal=principal)
    return WebhooksPublic(data=[_public(webhook) for webhook in page], count=len(page))


@router.delete(
    "/v1/webhooks/{webhook_id}",
    response_model=WebhookPublic,
    summary="Disable a webhook; its undelivered messages are given up (its exchange).",
    responses={404: {"description": "No such webhook, or not yours."}},
)
def delete_webhook(session: SessionDep, principal: CurrentPrincipal, webhook_id: str) -> Any:
    auth.require(principal, Role.EXCHANGE)
    webhook = webhooks.delete_webhook(
        session, principal=principal, webhook_id=webhook_id, now_s=_now()
    )
    session.commit()
    return _public(webhook)
