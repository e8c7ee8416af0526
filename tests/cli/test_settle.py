"""`gpudelivery settle`: the worked example through the command line, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpudelivery.cli import app

from utils import factories

WORKED_FIGURES = factories.WORKED_SETTLEMENT


def settle(runner: CliRunner, files: factories.InputFiles) -> Any:
    return runner.invoke(
        app,
        [
            "settle",
            "--terms",
            str(files.terms),
            "--assignments",
            str(files.assignments),
            "--meter",
            str(files.meter),
        ],
    )


def test_worked_example_settles_to_the_documented_figures(
    runner: CliRunner, worked: factories.InputFiles
) -> None:
    result = settle(runner, worked)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == WORKED_FIGURES
    assert list(json.loads(result.stdout)) == list(WORKED_FIGURES)


def test_shipped_example_files_settle_through_the_console_script() -> None:
    example = Path(__file__).parents[2] / "examples" / "worked-example"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpudelivery",
            "settle",
            "--terms",
            str(example / "terms.json"),
            "--assignments",
            str(example / "assignments.jsonl"),
            "--meter",
            str(example / "meter.jsonl"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == WORKED_FIGURES


def test_blank_lines_in_jsonl_files_are_skipped(
    runner: CliRunner, worked: factories.InputFiles
) -> None:
    worked.meter.write_text("\n" + worked.meter.read_text().replace("\n", "\n\n"))
    assert json.loads(settle(runner, worked).stdout) == WORKED_FIGURES


def test_ledger_lines_of_other_contracts_are_ignored(
    runner: CliRunner, worked: factories.InputFiles
) -> None:
    other = {
        "contract_id": "OTHER",
        "node": "n9",
        "gpu_uuid": "GPU-9",
        "from": "2026-03-03T00:00:00Z",
        "to": "2026-03-03T01:00:00Z",
    }
    with worked.assignments.open("a") as stream:
        stream.write(json.dumps(other) + "\n")
    assert json.loads(settle(runner, worked).stdout) == WORKED_FIGURES


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def edit_line(path: Path, number: int, **changes: Any) -> None:
    data = json.loads(path.read_text().splitlines()[number - 1])
    for name, value in changes.items():
        if value is None:
            data.pop(name)
        else:
            data[name] = value
    replace_line(path, number, json.dumps(data))


BAD_INPUTS = [
    # (which file, how to break it, the expected one-line message after the file name)
    (
        "terms",
        lambda p: p.write_text("{not json"),
        ": malformed JSON: Expecting property name enclosed in double quotes",
    ),
    (
        "terms",
        lambda p: p.write_text(json.dumps(factories.terms_json(colour="red"))),
        ": colour: unknown field",
    ),
    (
        "terms",
        lambda p: p.write_text(
            json.dumps(
                factories.terms_json(start="2026-03-03T01:00:00Z", end="2026-03-03T00:00:00Z")
            )
        ),
        ": end (2026-03-03T00:00:00Z) must be after start (2026-03-03T01:00:00Z)",
    ),
    (
        "terms",
        lambda p: p.write_text(json.dumps(factories.terms_json(start="2026-03-03T01:00:00+01:00"))),
        ": start: '2026-03-03T01:00:00+01:00' is not in UTC (use a Z suffix)",
    ),
    (
        "meter",
        lambda p: replace_line(p, 3, '{"node": "n1",'),
        ":3: malformed JSON: Expecting property name enclosed in double quotes",
    ),
    ("meter", lambda p: replace_line(p, 4, "NaN"), ":4: malformed JSON: NaN is not valid JSON"),
    ("meter", lambda p: replace_line(p, 4, "[1, 2]"), ":4: must be a JSON object, got list"),
    (
        "meter",
        lambda p: edit_line(p, 7, t1="2026-03-03T00:02:00Z", t0="2026-03-03T00:02:00Z"),
        ":7: t1: must be after t0",
    ),
    (
        "meter",
        lambda p: edit_line(p, 8, t0="2026-03-03T01:02:00+01:00"),
        ":8: t0: '2026-03-03T01:02:00+01:00' is not in UTC (use a Z suffix)",
    ),
    ("meter", lambda p: edit_line(p, 9, healthy="yes"), ":9: healthy: must be true or false"),
    ("meter", lambda p: edit_line(p, 9, healthy=None), ":9: healthy: missing"),
    (
        "meter",
        lambda p: edit_line(p, 10, utilization_gpu_pct=140),
        ":10: utilization_gpu_pct: must be a number from 0 to 100",
    ),
    ("assignments", lambda p: edit_line(p, 2, shift="night"), ":2: shift: unknown field"),
    (
        "assignments",
        lambda p: edit_line(p, 1, to="2026-03-03T00:00:00Z"),
        ":1: to: must be after from",
    ),
    (
        "assignments",
        lambda p: edit_line(p, 3, gpu_uuid=""),
        ":3: gpu_uuid: must be a non-empty string",
    ),
    ("assignments", lambda p: p.write_bytes(b"\xff\xfe"), ": is not UTF-8 text"),
    ("assignments", lambda p: p.unlink(), ": cannot read: No such file or directory"),
]


@pytest.mark.parametrize(("which", "breaks", "expected"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_naming_file_and_line(
    runner: CliRunner, worked: factories.InputFiles, which: str, breaks: Any, expected: str
) -> None:
    path = getattr(worked, which)
    breaks(path)
    result = settle(runner, worked)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"gpudelivery: error: {path}{expected}\n"
