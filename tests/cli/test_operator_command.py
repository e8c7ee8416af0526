"""`gpudelivery operator run`: the operator as a provider starts it, in a process of its own,
against the cluster emulator; and what it says of a bad setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gpudelivery.cli import app

from utils.operators import add_contract, add_nodes, add_pool, cluster_at, contract_status
from utils.polling import poll


def test_the_operator_command_books_contracts_until_it_is_stopped(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as cluster:
        add_pool(cluster)
        add_nodes(cluster, 1)
        environment = {
            **os.environ,
            "GPUDELIVERY_OPERATOR_KUBECONFIG": str(cluster.kubeconfig),
            "GPUDELIVERY_OPERATOR_PEERING__STANDALONE": "true",
        }
        command = [sys.executable, "-m", "gpudelivery", "operator", "run"]
        process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            name = add_contract(cluster, end="2099-01-01T00:00:00Z")

            def phase() -> str | None:
                return contract_status(cluster, name).get("phase")

            poll(lambda: phase() is not None or process.poll() is not None)
            assert phase() == "Booked"
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output.decode()
    assert b"booked 1 node of pool h100" in output


def test_a_bad_operator_setting_is_named_and_nothing_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["operator", "run"], env={"GPUDELIVERY_OPERATOR_TIMING__NOT_READY_AFTER_S": "-5"}
    )
    assert result.exit_code == 2
    assert (
        "GPUDELIVERY_OPERATOR_TIMING__NOT_READY_AFTER_S: Input should be greater than or equal to 0"
        in result.output
    )


def test_an_api_url_without_a_key_is_refused_by_name() -> None:
    result = CliRunner().invoke(
        app, ["operator", "run"], env={"GPUDELIVERY_OPERATOR_API__URL": "https://api.example"}
    )
    assert result.exit_code == 2
    assert (
        "GPUDELIVERY_OPERATOR_API: Value error, api.url needs api.token_file (an API key of "
        "role operator)" in result.output
    )


def test_an_unreadable_api_key_file_is_named_and_nothing_runs(tmp_path: Path) -> None:
    missing = tmp_path / "operator.key"
    result = CliRunner().invoke(
        app,
        ["operator", "run"],
        env={
            "GPUDELIVERY_OPERATOR_API__URL": "https://api.example",
            "GPUDELIVERY_OPERATOR_API__TOKEN_FILE": str(missing),
        },
    )
    assert result.exit_code == 2
    assert (
        f"GPUDELIVERY_OPERATOR_API__TOKEN_FILE {missing}: No such file or directory"
        in result.output
    )
