"""The API's routes, one module per area: `public` (the provider's keys), `contracts`
(contracts and capacity), `delivery` (the ledger, proofs, settlements), `meter` (key
registration, ingest, the evidence log), `webhooks`."""

__all__ = ["contracts", "delivery", "meter", "params", "public", "webhooks"]
