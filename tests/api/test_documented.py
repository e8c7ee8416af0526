"""The README documents every setting and every endpoint of the API."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from gpudelivery.api.settings import ApiSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_has_a_row_in_the_readme() -> None:
    names = [
        "GPUDELIVERY_DATABASE_URL" if name == "database_url" else f"GPUDELIVERY_API_{name.upper()}"
        for name in ApiSettings.model_fields
    ]
    assert len(names) == 7
    assert [name for name in names if f"| `{name}` |" not in README] == []


def test_every_endpoint_has_a_row_in_the_readme(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    endpoints = [f"{method.upper()} {path}" for path, ops in paths.items() for method in ops]
    assert len(endpoints) == 24
    assert [e for e in endpoints if f"| `{e}` |" not in README] == []
