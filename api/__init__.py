"""The settlement and proof API (FastAPI + SQLModel + Alembic).

Not built yet: issue 4. This package only reserves the import name `gpudelivery.api`,
mapped from the `api/` folder by pyproject.toml.
"""

__all__: list[str] = []
