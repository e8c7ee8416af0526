"""The metering agent as a process: on the simulated driver, shipping to the ingest double."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gpudelivery import batches, signing
from gpudelivery.metering import keys, spool

from utils.kube import core_api, running_cluster, write_kubeconfig
from utils.kubelet import FakeKubelet, pod, short_socket_path
from utils.nvml import SCENARIOS
from utils.polling import poll
from utils.receiver import IngestDouble, free_port

NODE = "gpu-node-7"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def environment(nvml_sim_dir: Path, state_dir: Path, **settings: str) -> dict[str, str]:
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(nvml_sim_dir),
        "GPUDELIVERY_NVML_SCENARIO": str(SCENARIOS / "h100x8.yaml"),
        "GPUDELIVERY_NVML_EPOCH": repr(time.time() - 20),
        "GPUDELIVERY_METER_NODE_NAME": NODE,
        "GPUDELIVERY_METER_SPOOL__STATE_DIR": str(state_dir),
        "GPUDELIVERY_METER_SAMPLING__BATCH_INTERVAL_S": "1",
        "GPUDELIVERY_METER_SERVER__HOST": "127.0.0.1",
        "GPUDELIVERY_METER_SERVER__PORT": "0",
    }
    env.update({f"GPUDELIVERY_METER_{name.upper()}": value for name, value in settings.items()})
    return env


@pytest.fixture
def start_agent() -> Iterator[Callable[[dict[str, str]], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpudelivery", "meter"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def stored(receiver: IngestDouble, key_id: str) -> list[int]:
    return [document["seq"] for document in receiver.stored.get((NODE, key_id), [])]


def test_kill_9_and_restart_lose_and_duplicate_nothing(
    nvml_sim_dir: Path,
    state_dir: Path,
    start_agent: Callable[[dict[str, str]], subprocess.Popen[str]],
) -> None:
    key = keys.load_or_create(state_dir)
    receiver = IngestDouble([key.public_key])
    receiver.start()
    try:
        env = environment(nvml_sim_dir, state_dir, shipping__api_url=receiver.url)
        first = start_agent(env)
        poll(lambda: len(stored(receiver, key.key_id)) >= 3)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before_restart = len(stored(receiver, key.key_id))
        second = start_agent(env)
        poll(lambda: len(stored(receiver, key.key_id)) >= before_restart + 3)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        delivered = receiver.stored[(NODE, key.key_id)]
        chain = batches.verify_chain(delivered, key.public_key)
        assert [batch.seq for batch in chain] == list(range(len(chain)))  # no gap, no repeat
        store = spool.Spool(state_dir / "spool.sqlite3", node=NODE, key=key)
        head = store.head()
        pending = store.depth()
        store.close()
        assert head is not None
        # Whatever the spool holds was delivered, or waits for the next start: nothing lost.
        assert head[0] == chain[-1].seq + pending
        records = [record for batch in chain for record in batch.records]
        assert {record.gpu_uuid[-2:] for record in records} == {f"{i:02d}" for i in range(8)}
        assert all(record.healthy for record in records)
    finally:
        receiver.stop()


def test_metrics_and_health_are_served_and_a_stop_spools_the_last_records(
    nvml_sim_dir: Path,
    state_dir: Path,
    start_agent: Callable[[dict[str, str]], subprocess.Popen[str]],
) -> None:
    port = free_port()
    env = environment(
        nvml_sim_dir, state_dir, server__port=str(port), sampling__batch_interval_s="60"
    )
    agent = start_agent(env)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    poll(answers)

    def scrape() -> list[str]:
        return httpx.get(base + "/metrics", timeout=5).text.splitlines()

    def samples(name: str) -> list[str]:
        return [line for line in scrape() if line.startswith((name + "{", name + " "))]

    poll(lambda: len(samples("gpudelivery_meter_gpu_power_watts")) == 8)
    assert all(line.endswith(" 650.0") for line in samples("gpudelivery_meter_gpu_power_watts"))
    gpu0 = 'gpu="0",node="gpu-node-7",uuid="GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f00"'
    assert f"gpudelivery_meter_gpu_healthy{{{gpu0}}} 1.0" in scrape()
    assert samples("gpudelivery_meter_spool_depth_batches") == [
        "gpudelivery_meter_spool_depth_batches 0.0"
    ]

    def last_round() -> float:
        return float(samples("gpudelivery_meter_last_sample_timestamp_seconds")[0].split()[-1])

    first_round = last_round()
    poll(lambda: last_round() >= first_round + 2)  # a few rounds in; the 60 s batch is open
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    key = keys.load_or_create(state_dir)
    store = spool.Spool(state_dir / "spool.sqlite3", node=NODE, key=key)
    spooled = store.pending(10)
    store.close()
    assert len(spooled) == 1
    assert len(spooled[0]["records"]) % 8 == 0
    assert len(spooled[0]["records"]) >= 8


def test_a_bad_setting_is_named(nvml_sim_dir: Path, state_dir: Path) -> None:
    env = environment(nvml_sim_dir, state_dir, sampling__interval_s="0")
    completed = subprocess.run(
        [sys.executable, "-m", "gpudelivery", "meter"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    variable = "GPUDELIVERY_METER_SAMPLING__INTERVAL_S"
    expected = f"gpudelivery: error: {variable}: Input should be greater than or equal to 1\n"
    assert completed.stderr == expected


def test_the_node_condition_turns_false_naming_a_gpu_that_falls_off_the_bus(
    nvml_sim_dir: Path,
    state_dir: Path,
    tmp_path: Path,
    start_agent: Callable[[dict[str, str]], subprocess.Popen[str]],
) -> None:
    lost_gpu = "GPU-0a1b2c3d-0000-4000-8000-000000000003"
    with running_cluster() as (_, url):
        api = core_api(url)
        api.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
        env = environment(
            nvml_sim_dir,
            state_dir,
            kubeconfig=str(write_kubeconfig(tmp_path / "kubeconfig", url)),
            node_condition__interval_s="1",
        )
        # GPU 3 reports XID 79 and is lost 30 s into the scenario: 10 s from now.
        env["GPUDELIVERY_NVML_SCENARIO"] = str(SCENARIOS / "xid79.yaml")
        env["GPUDELIVERY_NVML_EPOCH"] = repr(time.time() - 20)
        start_agent(env)

        def gpu_condition() -> tuple[str, str] | None:
            for condition in api.read_node(NODE).status.conditions:
                if condition.type == "GPUHealthy":
                    return condition.status, condition.message
            return None

        poll(lambda: gpu_condition() == ("True", "8 GPUs healthy"))
        expected = (
            "False",
            f"{lost_gpu}: critical XID 79 since the last reset, "
            "GPU fallen off the bus (GPU_IS_LOST)",
        )
        poll(lambda: gpu_condition() == expected)
        kinds = [condition.type for condition in api.read_node(NODE).status.conditions]
        assert kinds == ["Ready", "GPUHealthy"]


def test_the_agent_registers_its_key_with_the_bootstrap_token_then_ships(
    nvml_sim_dir: Path,
    state_dir: Path,
    tmp_path: Path,
    start_agent: Callable[[dict[str, str]], subprocess.Popen[str]],
) -> None:
    token = "bootstrap-" + "x7" * 16
    (tmp_path / "token").write_text(token + "\n")
    receiver = IngestDouble([], bootstrap_token=token)
    receiver.start()
    try:
        env = environment(
            nvml_sim_dir,
            state_dir,
            shipping__api_url=receiver.url,
            shipping__bootstrap_token_file=str(tmp_path / "token"),
        )
        key_id = signing.key_id(keys.load_or_create(state_dir).public_key)  # before the agent
        agent = start_agent(env)
        poll(lambda: len(stored(receiver, key_id)) >= 2)
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
        assert agent.returncode == 0
        assert receiver.key_nodes == {key_id: NODE}
        assert receiver.registrations == [(201, f"Bearer {token}")]
        assert f"registered key {key_id} for node {NODE}" in err
        assert token not in out + err
    finally:
        receiver.stop()


def test_records_name_the_pods_the_kubelet_and_the_processes_point_to(
    nvml_sim_dir: Path,
    state_dir: Path,
    tmp_path: Path,
    start_agent: Callable[[dict[str, str]], subprocess.Popen[str]],
) -> None:
    gpu = "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f0{}".format
    port = free_port()
    uid_b, uid_c = "a1b2c3d4-e5f6-4789-abcd-ef0123456789", "77e1a0c2-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    # GPU 1's process (pid 41002 in the scenario) runs in pod ml/b, cgroup v2, systemd driver.
    proc = tmp_path / "proc"
    (proc / "41002").mkdir(parents=True)
    (proc / "41002" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{uid_b.replace('-', '_')}.slice/cri-containerd-{'ab' * 32}.scope\n"
    )
    key = keys.load_or_create(state_dir)
    receiver = IngestDouble([key.public_key])
    receiver.start()
    with short_socket_path() as socket, running_cluster() as (_, url):
        kubelet = FakeKubelet(socket)
        # ml/a holds GPU 0 alone; ml/b and ml/c share GPU 1 (time-slicing replicas).
        kubelet.pods = [
            pod("ml", "a", [("nvidia.com/gpu", [gpu(0)])]),
            pod("ml", "b", [("nvidia.com/gpu", [f"{gpu(1)}::0"])]),
            pod("ml", "c", [("nvidia.com/gpu", [f"{gpu(1)}::1"])]),
        ]
        kubelet.start()
        api = core_api(url)
        for name, uid in (("b", uid_b), ("c", uid_c)):
            api.create_namespaced_pod(
                "ml",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"namespace": "ml", "name": name, "uid": uid},
                    "spec": {"nodeName": NODE, "containers": [{"name": "c0", "image": "x"}]},
                },
            )
        try:
            env = environment(
                nvml_sim_dir,
                state_dir,
                shipping__api_url=receiver.url,
                kubeconfig=str(write_kubeconfig(tmp_path / "kubeconfig", url)),
                attribution__socket=str(socket),
                attribution__proc_root=str(proc),
                server__port=str(port),
            )
            agent = start_agent(env)
            poll(lambda: len(stored(receiver, key.key_id)) >= 3)
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
        finally:
            kubelet.stop()
            receiver.stop()
    documents = receiver.stored[(NODE, key.key_id)]
    batches.verify_chain(documents, key.public_key)
    records = [record for document in documents[1:] for record in document["records"]]
    pods_by_gpu = {record["gpu_uuid"]: tuple(record["pods"]) for record in records}
    assert pods_by_gpu[gpu(0)] == ("ml/a",)
    assert pods_by_gpu[gpu(1)] == ("ml/b",)  # of the two holders, the one running on it
    assert pods_by_gpu[gpu(2)] == ()
    pod_info = sorted(
        line for line in scraped.splitlines() if line.startswith("gpudelivery_meter_gpu_pod_info{")
    )
    assert pod_info == [
        f'gpudelivery_meter_gpu_pod_info{{gpu="0",node="{NODE}",pod="ml/a",uuid="{gpu(0)}"}} 1.0',
        f'gpudelivery_meter_gpu_pod_info{{gpu="1",node="{NODE}",pod="ml/b",uuid="{gpu(1)}"}} 1.0',
    ]
