"""Reading the offline tools' input files, with errors that name the file and line.

`TERMS.json` is one JSON object; `ASSIGN.jsonl` and `METER.jsonl` hold one JSON object per
line (blank lines are allowed and skipped). Meter files can be large, so they are read as a
stream; the ledger and the terms are small and read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpudelivery import errors, evidence, terms
from gpudelivery.evidence import Assignment, MeterRecord

__all__ = [
    "InputFileError",
    "iter_meter_records",
    "read_assignments",
    "read_json",
    "read_terms",
]


class InputFileError(errors.GpuDeliveryError):
    """A file that cannot be read or holds bad input; the message is one line."""

    def __init__(self, path: Path, message: str, *, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InputFileError(path, f"malformed JSON: {reason}", line=line) from exc


def _open_text(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as stream:
            yield from enumerate(stream, start=1)
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(path, "is not UTF-8 text") from exc


def read_json(path: Path) -> Any:
    """One JSON value from a file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(path, "is not UTF-8 text") from exc
    return _decode(path, text, None)


def read_terms(path: Path) -> terms.ContractTerms:
    try:
        return terms.parse_terms(read_json(path))
    except errors.TermsError as exc:
        raise InputFileError(path, str(exc)) from exc


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in _open_text(path):
        if line.strip():
            yield number, _decode(path, line, number)


def read_assignments(path: Path) -> list[Assignment]:
    ledger = []
    for number, data in _json_lines(path):
        try:
            ledger.append(evidence.assignment_from_json(data))
        except errors.InputError as exc:
            raise InputFileError(path, str(exc), line=number) from exc
    return ledger


def iter_meter_records(path: Path) -> Iterator[tuple[dict[str, Any], MeterRecord]]:
    """Each meter record as (the decoded JSON object, the parsed record)."""
    for number, data in _json_lines(path):
        try:
            yield data, evidence.meter_record_from_json(data)
        except errors.InputError as exc:
            raise InputFileError(path, str(exc), line=number) from exc
