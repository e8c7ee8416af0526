"""`gpudelivery prove` and `gpudelivery verify`: a signed proof round trip, and refusals."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpudelivery import signing
from gpudelivery.cli import app

from utils import factories


def prove(runner: CliRunner, files: factories.InputFiles, key: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "prove",
            "--terms",
            str(files.terms),
            "--assignments",
            str(files.assignments),
            "--meter",
            str(files.meter),
            "--key",
            str(key),
            "--issued-at",
            "2026-03-03T01:05:00Z",
            *extra,
        ],
    )


@pytest.fixture
def proof_file(
    runner: CliRunner, worked: factories.InputFiles, keypair: tuple[Path, Path], tmp_path: Path
) -> Path:
    out = tmp_path / "proof.json"
    result = prove(runner, worked, keypair[0], "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return out


def test_keys_generate_writes_a_private_key_only_its_owner_can_read(
    keypair: tuple[Path, Path],
) -> None:
    private, public = keypair
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private_pem(private.read_bytes())
    assert signing.key_id(signing.load_public_pem(public.read_bytes())) == key.key_id


def test_keys_generate_refuses_to_overwrite(runner: CliRunner, keypair: tuple[Path, Path]) -> None:
    before = keypair[0].read_bytes()
    result = runner.invoke(
        app, ["keys", "generate", "--out-dir", str(keypair[0].parent), "--name", "provider"]
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"gpudelivery: error: {keypair[0]}: already exists (use --force to replace it)\n"
    )
    assert keypair[0].read_bytes() == before


def test_keys_generate_prints_the_key_id_and_no_key_material(
    runner: CliRunner, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["keys", "generate", "--out-dir", str(tmp_path)])
    key = signing.load_private_pem((tmp_path / "gpudelivery.key").read_bytes())
    assert result.stdout == f"{key.key_id}\n"
    assert "PRIVATE" not in result.stdout + result.stderr


def test_proof_of_the_worked_example_verifies(
    runner: CliRunner, proof_file: Path, keypair: tuple[Path, Path]
) -> None:
    document = json.loads(proof_file.read_text())
    assert document["settlement"]["net"] == "2.00"
    assert document["issued_at"] == "2026-03-03T01:05:00Z"
    result = runner.invoke(app, ["verify", str(proof_file), "--pubkey", str(keypair[1])])
    assert result.exit_code == 0
    key_id = document["signature"]["key_id"]
    assert result.stdout == (
        f"verified: contract {factories.CONTRACT_ID}, signed by {key_id}; delivered 6480 of 7200 "
        "GPU-seconds, net 2.00 USD\n"
    )


def test_proof_goes_to_stdout_without_out(
    runner: CliRunner, worked: factories.InputFiles, keypair: tuple[Path, Path], proof_file: Path
) -> None:
    result = prove(runner, worked, keypair[0])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(proof_file.read_text())


def test_verify_against_the_meter_records_it_was_built_from(
    runner: CliRunner, proof_file: Path, keypair: tuple[Path, Path], worked: factories.InputFiles
) -> None:
    result = runner.invoke(
        app, ["verify", str(proof_file), "--pubkey", str(keypair[1]), "--meter", str(worked.meter)]
    )
    assert result.exit_code == 0
    assert result.stdout.endswith("; checked against the meter records\n")


def test_tampered_proof_exits_1_naming_what_does_not_match(
    runner: CliRunner, proof_file: Path, keypair: tuple[Path, Path]
) -> None:
    document = json.loads(proof_file.read_text())
    document["settlement"]["charge"] = "3.70"
    proof_file.write_text(json.dumps(document))
    result = runner.invoke(app, ["verify", str(proof_file), "--pubkey", str(keypair[1])])
    assert result.exit_code == 1
    key_id = document["signature"]["key_id"]
    assert result.stdout.splitlines() == [
        f"NOT verified: {proof_file}",
        f"  - signature: signature does not verify under key {key_id}",
        "  - settlement.charge: proof says '3.70', evidence gives '3.60'",
    ]


def test_verify_with_another_providers_key_fails(
    runner: CliRunner, proof_file: Path, tmp_path: Path
) -> None:
    runner.invoke(app, ["keys", "generate", "--out-dir", str(tmp_path), "--name", "other"])
    result = runner.invoke(
        app, ["verify", str(proof_file), "--pubkey", str(tmp_path / "other.pub")]
    )
    assert result.exit_code == 1
    assert "signature: made with key" in result.stdout


def test_provisional_proof_with_as_of(
    runner: CliRunner, worked: factories.InputFiles, keypair: tuple[Path, Path]
) -> None:
    result = prove(runner, worked, keypair[0], "--as-of", "2026-03-03T00:15:00Z")
    document = json.loads(result.stdout)
    assert (document["status"], document["settlement"]["delivered_gpu_seconds"]) == (
        "provisional",
        1680,
    )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--as-of", "2026-03-02T23:00:00Z"], "--as-of: precedes the contract window's start"),
        (
            ["--as-of", "soon"],
            "--as-of: 'soon' is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z",
        ),
    ],
)
def test_prove_refuses_bad_options(
    runner: CliRunner,
    worked: factories.InputFiles,
    keypair: tuple[Path, Path],
    arguments: list[str],
    expected: str,
) -> None:
    result = prove(runner, worked, keypair[0], *arguments)
    assert (result.exit_code, result.stderr) == (2, f"gpudelivery: error: {expected}\n")


def test_prove_refuses_a_public_key_as_signing_key(
    runner: CliRunner, worked: factories.InputFiles, keypair: tuple[Path, Path]
) -> None:
    result = prove(runner, worked, keypair[1])
    assert result.exit_code == 2
    assert (
        result.stderr == f"gpudelivery: error: {keypair[1]}: not an unencrypted PEM private key\n"
    )


def test_verify_refuses_a_file_that_is_not_a_proof(
    runner: CliRunner, worked: factories.InputFiles, keypair: tuple[Path, Path]
) -> None:
    result = runner.invoke(app, ["verify", str(worked.terms), "--pubkey", str(keypair[1])])
    assert result.exit_code == 2
    assert result.stderr == (
        f"gpudelivery: error: {worked.terms}: not a delivery proof: "
        "format: must be 'gpudelivery.delivery-proof/v1'\n"
    )
