"""`gpudelivery operator run`: the operator as a provider starts it, in a process of its own,
against the cluster emulator; and what it says of a bad setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gpudelivery import terms
from gpudelivery.cli import app
from gpudelivery.operator import resources

from utils.factories import terms_json
from utils.operators import cluster_at
from utils.polling import poll


def test_the_operator_command_books_contracts_until_it_is_stopped(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as cluster:
        group, version = resources.GROUP, resources.VERSION
        cluster.custom.create_cluster_custom_object(
            group,
            version,
            resources.POOLS,
            {"metadata": {"name": "h100"}, "spec": {"instrument": "H100-SXM-80GB"}},
        )
        cluster.core.create_node(
            {"metadata": {"name": "gpu-0", "labels": {"nvidia.com/gpu.product": "H100-SXM-80GB"}}}
        )
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
            body = resources.contract_body(
                terms.parse_terms(terms_json(end="2099-01-01T00:00:00Z"))
            )
            cluster.custom.create_cluster_custom_object(group, version, resources.CONTRACTS, body)

            def phase() -> str | None:
                found = cluster.custom.get_cluster_custom_object(
                    group, version, resources.CONTRACTS, body["metadata"]["name"]
                )
                return found.get("status", {}).get("phase")

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
