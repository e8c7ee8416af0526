"""The settlement and proof API (FastAPI + SQLModel + Alembic).

`app` builds the FastAPI application; `routes` hold the HTTP surface, one module per area.
The services beside them hold the rules and never commit: `contracts`, `ingest`,
`evidence_log`, `ledger`, `proofs`, `finalization`, `webhooks`, `outbox`. `jobs` runs the
periodic ones, `metrics` serves Prometheus, `auth` says who calls and what each role may
do, `models` are the tables, changed only by `migrations`, `db` makes engines for
PostgreSQL and SQLite, and `settings` reads GPUDELIVERY_API_* and
GPUDELIVERY_DATABASE_URL.
"""

__all__ = [
    "app",
    "auth",
    "contracts",
    "db",
    "errors",
    "evidence_log",
    "finalization",
    "ingest",
    "jobs",
    "ledger",
    "metrics",
    "migrations",
    "models",
    "outbox",
    "proofs",
    "settings",
    "webhooks",
]
