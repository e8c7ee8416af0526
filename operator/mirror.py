"""The API's side of mirroring contracts: reading every contract, registering and cancelling.

`ContractsClient` speaks to the API as the `operator` role, as `ledger.LedgerClient` does:
`list_all` pages through `GET /v1/contracts` (the operator sees every contract),
`register` sends a contract applied on the cluster (`PUT /v1/contracts/{id}`, idempotent),
`cancel` cancels one the operator registered (`POST /v1/contracts/{id}/cancel`). What to do
is decided by `mirroring.plan`; this module only carries it to the API. It never retries by
itself: an `ApiUnavailableError` is worth another try on the operator's next round, an
`ApiRefusedError` is not.

Not here: the cluster's side, and when mirroring runs (the operator's timer).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from gpudelivery import errors as core_errors
from gpudelivery import terms, timefmt
from gpudelivery.operator import api_calls, errors, mirroring

__all__ = ["CANCEL_PATH", "CONTRACTS_PATH", "CONTRACT_PATH", "PAGE_SIZE", "ContractsClient"]

# The API's contract endpoints (README, "The settlement and proof API"), relative to its URL.
CONTRACTS_PATH = "/v1/contracts"
CONTRACT_PATH = "/v1/contracts/{contract_id}"
CANCEL_PATH = "/v1/contracts/{contract_id}/cancel"
# The largest page GET /v1/contracts answers: the fewest round trips per mirroring.
PAGE_SIZE = 500


class ContractsClient(api_calls.ApiCalls):
    """Reads, registers and cancels contracts in the API as the `operator` role; raises
    `ApiUnavailableError` when it is worth trying again later, `ApiRefusedError` if not."""

    def list_all(self) -> list[mirroring.ApiContract]:
        """Every contract the API holds, in its order (window start, then id). A contract
        created while the pages are read may be missed or seen twice: it is kept once, and
        a missed one is seen by the next round."""
        found: dict[str, mirroring.ApiContract] = {}
        offset = 0
        while True:
            page = self._send(
                "GET",
                CONTRACTS_PATH,
                params={"offset": offset, "limit": PAGE_SIZE},
            )
            items = page.get("data")
            if not isinstance(items, list):
                raise errors.ApiRefusedError("the API answered a page without data")
            for item in items:
                contract = _contract(item)
                found.setdefault(contract.contract_id, contract)
            offset += len(items)
            if not items or offset >= int(page.get("count", 0)):
                return list(found.values())

    def register(self, contract: terms.ContractTerms) -> mirroring.ApiContract:
        """Register a contract applied on the cluster; the API's contract under its id (which
        may be an exchange's, sent with the same terms). Other terms held under the id raise
        `ApiRefusedError` naming the differences: nothing is overwritten."""
        path = CONTRACT_PATH.format(contract_id=quote(contract.contract_id, safe=""))
        return _contract(self._send("PUT", path, json=contract.to_json()))

    def cancel(self, contract_id: str) -> mirroring.ApiContract:
        """Cancel a contract the operator registered, before its start; cancelling a
        cancelled one answers it again."""
        path = CANCEL_PATH.format(contract_id=quote(contract_id, safe=""))
        return _contract(self._send("POST", path))

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._object(self._request(method, path, **kwargs))


def _contract(item: object) -> mirroring.ApiContract:
    """The API's `ContractPublic` as the mirror reads it; `ApiRefusedError` if it is not one."""
    if not isinstance(item, dict):
        raise errors.ApiRefusedError("the API answered a contract that is not an object")
    try:
        cancelled_at = item.get("cancelled_at")
        return mirroring.ApiContract(
            terms=terms.parse_terms(item.get("terms")),
            origin=mirroring.Origin(str(item.get("origin"))),
            cancelled_at_s=None
            if cancelled_at is None
            else timefmt.parse_utc(cancelled_at, field="cancelled_at"),
        )
    except (core_errors.InputError, ValueError) as exc:
        where = item.get("contract_id", "?")
        raise errors.ApiRefusedError(
            f"the API answered contract {where} unreadably: {exc}"
        ) from exc
