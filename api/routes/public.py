"""What anyone may read without a key: the provider's public key, to verify proofs."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from gpudelivery import signing
from gpudelivery.api.deps import StateDep

__all__ = ["router"]

router = APIRouter(tags=["public"])


class ProviderKey(BaseModel):
    key_id: str
    algorithm: str
    public_key_pem: str


class ProviderKeys(BaseModel):
    data: list[ProviderKey]
    count: int


@router.get(
    "/v1/keys",
    response_model=ProviderKeys,
    summary="The provider's public keys, which sign delivery proofs and tree heads.",
)
def provider_keys(state: StateDep) -> ProviderKeys:
    key = state.provider_key
    public = ProviderKey(
        key_id=key.key_id,
        algorithm=signing.ALGORITHM,
        public_key_pem=signing.public_pem(key.public_key).decode("ascii"),
    )
    return ProviderKeys(data=[public], count=1)
