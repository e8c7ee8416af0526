"""FastAPI dependencies shared by the routes: the session, the caller, the settings.

`SessionDep` is one session per request; the route commits when it has done everything it
must do together (a settlement and its outbox row), and any error rolls back, so a refused
request stores nothing. `CurrentPrincipal` is the authenticated caller (api.auth).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gpudelivery import signing
from gpudelivery.api import auth
from gpudelivery.api.metrics import ApiMetrics
from gpudelivery.api.settings import ApiSettings

__all__ = ["AppState", "CurrentPrincipal", "SessionDep", "StateDep"]


@dataclass
class AppState:
    """What the app is built with (api.app.create_app), reachable from every request."""

    settings: ApiSettings
    engine: Engine
    provider_key: signing.SigningKey
    bootstrap_token: str | None
    metrics: ApiMetrics


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.gpudelivery
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key: gpd_<id>_<secret>.")


def get_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> auth.Principal:
    return auth.authenticate(session, None if credentials is None else credentials.credentials)


CurrentPrincipal = Annotated[auth.Principal, Depends(get_principal)]
