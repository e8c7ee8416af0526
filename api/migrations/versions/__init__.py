"""Alembic revisions, applied in order by gpudelivery api migrate."""
