"""Meter routes: key registration, ingest, the evidence log (docs/ingest.md)."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(tags=["meter"])
