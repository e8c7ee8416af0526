"""How every benchmark prints its figures: a table for the reader, then one JSON line for
tools (the figures as measured, in one run)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_figures"]


def print_figures(title: str, figures: Mapping[str, Any], *, thousands: bool = True) -> None:
    """`figures` as a table titled `title` (integers with thousands separators unless told
    not to), then as a JSON line."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        shown = f"{value:,}" if thousands and isinstance(value, int) else str(value)
        table.add_row(name, shown)
    Console().print(table)
    print(json.dumps(figures))
