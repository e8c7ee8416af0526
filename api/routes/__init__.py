"""The API's routes, one module per area: `public` (the provider's keys), `contracts`,
`meter` (key registration, ingest, the evidence log)."""

__all__ = ["contracts", "meter", "public"]
