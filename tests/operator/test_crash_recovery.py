"""The operator killed at any write converges, restarted, to what it leaves without a crash.

Issue 5: "the operator can be killed at any point and, restarted, converges without double
assignment and without leaving taints, cordons or namespaces behind." A lifecycle of two
contracts in one pool (booking, preparation with a pod to evict, the start, a node's GPUs
failing mid-window, the end-of-window warning, the end) runs once without a crash, counting
its writes to the API server; then once per write and per way of dying (tests/utils/crashes.py:
before the write left, or after it landed with the answer lost), restarting the operator
after the crash and going on. At the end of every stage the cluster must be what the
crash-free run left there, and no node may be held twice, even at the crash itself.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes import client

from gpudelivery import timefmt
from gpudelivery.operator import claims, executor, nodes, resources, tenancy

from utils import crashes
from utils.crashes import CrashMode, CrashPoint, OperatorLife, Write
from utils.factories import EPOCH
from utils.operators import (
    NOW,
    Clock,
    Cluster,
    add_contract,
    add_gpu_nodes,
    add_pool,
    cluster_at,
)

START, END = EPOCH, EPOCH + 3_600
# Within the pool's default lead time (10 minutes), and its default grace (5 minutes).
PREPARING, WARNED = START - 300, END - 300
BLOCKS = {"a": ["gpu-a1", "gpu-a2"], "b": ["gpu-b1", "gpu-b2"]}
# Where the pod to evict runs, and the node whose GPUs fail mid-window: both the first
# contract's (block a, as the crash-free run asserts).
BUSY, FAILING = "gpu-a1", "gpu-a2"
# What the operator makes in a buyer's namespace (operator/buyers.py).
BUYER_OBJECTS = ("resourcequotas", "networkpolicies", "serviceaccounts", "rolebindings", "secrets")
SECRET = tenancy.KUBECONFIG_SECRET


@dataclasses.dataclass(frozen=True)
class Stage:
    """A step of the lifecycle: at `now_s`, after what the world does (`world`), the operator
    does `step` (book, or a delivery pass) until it writes nothing more."""

    name: str
    now_s: int
    step: Callable[[OperatorLife], None]
    world: Callable[[Cluster, dict[str, str]], None] = lambda cluster, names: None


def fail_gpus(cluster: Cluster, names: dict[str, str]) -> None:
    """The metering agent reports the GPUs of FAILING unhealthy."""
    condition = {
        "type": nodes.CONDITION_GPU_HEALTHY,
        "status": "False",
        "lastTransitionTime": timefmt.format_utc(START + 1_200),
    }
    cluster.core.patch_node_status(FAILING, {"status": {"conditions": [condition]}})


def run_buyer_job(cluster: Cluster, names: dict[str, str]) -> None:
    """The first contract's buyer runs a job on BUSY (the warning annotates it)."""
    add_pod(cluster, resources.namespace_name(names["EX-1"]), "job", on=BUSY)


STAGES = (
    Stage("booked", NOW, OperatorLife.book),
    Stage("preparing", PREPARING, OperatorLife.deliver),
    Stage("delivering", START, OperatorLife.deliver),
    Stage("substituted", START + 1_200, OperatorLife.deliver, fail_gpus),
    Stage("warned", WARNED, OperatorLife.deliver, run_buyer_job),
    Stage("completed", END, OperatorLife.deliver),
)


@dataclasses.dataclass
class Run:
    """What a lifecycle left at the end of each stage, every write it sent (with the stage
    it fell in), and the crashes it went through."""

    names: dict[str, str]
    states: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    writes: list[tuple[str, Write]] = dataclasses.field(default_factory=list)
    crashed: list[crashes.Crash] = dataclasses.field(default_factory=list)


def add_pod(cluster: Cluster, namespace: str, name: str, on: str) -> None:
    pod = {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": on, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running"},
    }
    cluster.core.create_namespaced_pod(namespace, client.V1Pod.model_validate(pod))


def lifecycle(directory: Path, crash: CrashPoint | None = None) -> Run:
    """The lifecycle on a fresh cluster, the operator dying at `crash` if given."""
    with cluster_at(directory) as cluster:
        clock = Clock()
        clock.attach(cluster)
        add_pool(cluster)
        for block, names in BLOCKS.items():
            add_gpu_nodes(cluster, names, block=block)
        add_pod(cluster, "team", "batch", on=BUSY)
        run = Run(
            {"EX-1": add_contract(cluster, "EX-1", 16), "EX-2": add_contract(cluster, "EX-2", 8)}
        )

        def at_crash(crash: crashes.Crash) -> None:
            assert_sound(state_of(cluster), f"at the {crash}")

        with crashes.Lives(cluster.url, clock, crash, on_crash=at_crash) as lives:
            for stage in STAGES:
                clock.now_s = stage.now_s
                stage.world(cluster, run.names)
                done = len(lives.writes)
                lives.settle(stage.step, what=stage.name)
                run.writes += [(stage.name, write) for write in lives.writes[done:]]
                run.states[stage.name] = state = state_of(cluster)
                assert_sound(state, f"after {stage.name}")
            run.crashed = list(lives.crashes)
        return run


def stored(cluster: Cluster) -> dict[str, dict[tuple[str | None, str], dict[str, Any]]]:
    """The objects the API server holds: resource -> (namespace, name) -> object."""
    found: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = {}
    for (resource, namespace, name), obj in cluster.emulator.objects.items():
        if not obj.deleted:
            found.setdefault(resource.plural or "", {})[(namespace, name)] = dict(obj.raw)
    return found


def state_of(cluster: Cluster) -> dict[str, Any]:
    """What the operator is responsible for on the cluster: every node's marks, every
    contract's status (its history apart), the buyers' namespaces with their objects (and
    whose token their kubeconfig holds, until when), and the pods with the warning's
    annotation."""
    objects = stored(cluster)
    found: dict[str, Any] = {key: {} for key in ("nodes", "contracts", "history", "namespaces")}
    for (_, name), node in sorted(objects["nodes"].items()):
        metadata, spec = node["metadata"], node.get("spec") or {}
        found["nodes"][name] = {
            "claimed-by": (metadata.get("annotations") or {}).get(claims.ANNOTATION_CLAIMED_BY),
            "label": (metadata.get("labels") or {}).get(resources.LABEL_CONTRACT),
            "taints": sorted(
                f"{taint['key']}={taint.get('value', '')}:{taint['effect']}"
                for taint in spec.get("taints") or []
            ),
            "cordoned": bool(spec.get("unschedulable")),
        }
    for (_, name), body in objects[resources.CONTRACTS].items():
        status = dict(body.get("status") or {})
        # The phases seen on the way depend on when the operator looked (a restart may skip a
        # Degraded moment): the history is checked for soundness (assert_sound), not equality.
        found["history"][name] = status.pop("transitions", [])
        found["contracts"][name] = status
    for (_, name), namespace in objects.get("namespaces", {}).items():
        metadata = namespace["metadata"]
        if (metadata.get("labels") or {}).get(tenancy.LABEL_MANAGED_BY) != tenancy.MANAGED_BY:
            continue
        found["namespaces"][name] = {
            "terminating": "deletionTimestamp" in metadata,
            **{
                plural: sorted(each for where, each in objects.get(plural, {}) if where == name)
                for plural in BUYER_OBJECTS
            },
            "kubeconfig": kubeconfig_holder(
                cluster, objects.get("secrets", {}).get((name, SECRET))
            ),
        }
    found["pods"] = {
        f"{namespace}/{name}": (
            pod["spec"]["nodeName"],
            (pod["metadata"].get("annotations") or {}).get(executor.ANNOTATION_WINDOW_ENDS),
        )
        for (namespace, name), pod in objects.get("pods", {}).items()
    }
    return found


def kubeconfig_holder(cluster: Cluster, secret: dict[str, Any] | None) -> list[str] | None:
    """The namespace and ServiceAccount whose token the kubeconfig `secret` holds, and when
    that token expires."""
    if secret is None:
        return None
    text = base64.b64decode(secret["data"]["kubeconfig"]).decode()
    (user,) = yaml.safe_load(text)["users"]
    issued = cluster.emulator.issued_tokens[user["user"]["token"]]
    expires = timefmt.format_utc(int(issued.expires.timestamp()))
    return [issued.namespace, issued.service_account, expires]


def assert_sound(state: dict[str, Any], when: str) -> None:
    """No node bears two contracts' names, no two contracts list one node, no contract lists
    or marks more nodes than it needs, and each contract's history ends in its phase and
    never records a phase twice in a row."""
    marked: dict[str, set[str]] = {}
    tainted = f"{resources.TAINT_CONTRACT}="
    for name, marks in state["nodes"].items():
        taints = {
            t.removeprefix(tainted).split(":")[0] for t in marks["taints"] if t.startswith(tainted)
        }
        bears = {marks["claimed-by"], marks["label"], *taints} - {None}
        assert len(bears) <= 1, f"{when}: node {name} bears {sorted(bears)}"
        for contract in bears:
            marked.setdefault(contract, set()).add(name)
    listed: dict[str, str] = {}
    for contract, status in state["contracts"].items():
        for node in status.get("nodes") or []:
            assert node not in listed, f"{when}: {contract} and {listed[node]} list {node}"
            listed[node] = contract
        need = status.get("nodesNeeded", 0)
        assert len(status.get("nodes") or []) <= need, f"{when}: {contract} lists too many"
        assert len(marked.get(contract, ())) <= need, f"{when}: {contract} marks too many"
        phases = [transition["phase"] for transition in state["history"][contract]]
        assert phases[-1:] == ([status["phase"]] if "phase" in status else []), when
        assert all(one != two for one, two in itertools.pairwise(phases)), f"{when}: {phases}"


def differences(wanted: Any, found: Any) -> list[str]:
    """The paths where `found` differs from `wanted`, with both values."""
    if isinstance(wanted, dict) and isinstance(found, dict):
        return [
            f"{key}: {difference}"
            for key in sorted(set(wanted) | set(found))
            for difference in differences(wanted.get(key), found.get(key))
        ]
    return [] if wanted == found else [f"wanted {wanted!r}, found {found!r}"]


def compared(state: dict[str, Any]) -> dict[str, Any]:
    """What a crash may not change of a state: all but the contracts' histories."""
    return {key: value for key, value in state.items() if key != "history"}


@pytest.fixture(scope="module")
def crash_free(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return lifecycle(tmp_path_factory.mktemp("crash-free"))


def test_the_crash_free_lifecycle_delivers_substitutes_and_gives_everything_back(
    crash_free: Run,
) -> None:
    one, two = crash_free.names["EX-1"], crash_free.names["EX-2"]
    states = crash_free.states
    phases = {stage: {c: s.get("phase") for c, s in state["contracts"].items()}
              for stage, state in states.items()}  # fmt: skip
    assert phases == {
        "booked": {one: "Booked", two: "Booked"},
        "preparing": {one: "Preparing", two: "Preparing"},
        "delivering": {one: "Delivering", two: "Delivering"},
        "substituted": {one: "Delivering", two: "Delivering"},
        "warned": {one: "Delivering", two: "Delivering"},
        "completed": {one: "Completed", two: "Completed"},
    }
    held = {stage: {c: s.get("nodes") for c, s in state["contracts"].items()}
            for stage, state in states.items()}  # fmt: skip
    assert held["preparing"] == held["delivering"] == {one: ["gpu-a1", "gpu-a2"], two: ["gpu-b1"]}
    assert held["substituted"] == held["warned"] == {one: ["gpu-a1", "gpu-b2"], two: ["gpu-b1"]}
    assert "team/batch" not in states["preparing"]["pods"]
    job = f"{resources.namespace_name(one)}/job"
    assert states["warned"]["pods"][job] == (BUSY, timefmt.format_utc(END))
    assert sorted(states["delivering"]["namespaces"]) == sorted(
        resources.namespace_name(name) for name in (one, two)
    )
    namespace = resources.namespace_name(one)
    assert states["delivering"]["namespaces"][namespace] == {
        "terminating": False,
        "resourcequotas": ["gpudelivery-gpus"],
        "networkpolicies": ["gpudelivery-isolation"],
        "serviceaccounts": ["buyer"],
        "rolebindings": ["buyer-edit"],
        "secrets": [SECRET],
        "kubeconfig": [namespace, "buyer", timefmt.format_utc(END)],
    }
    free: dict[str, Any] = {"claimed-by": None, "label": None, "taints": [], "cordoned": False}
    quarantined = free | {"taints": [f"{resources.TAINT_QUARANTINE}=:NoSchedule"]}
    assert states["completed"]["nodes"] == {
        "gpu-a1": free, "gpu-a2": quarantined, "gpu-b1": free, "gpu-b2": free,
    }  # fmt: skip
    assert states["completed"]["namespaces"] == {}
    assert states["completed"]["pods"] == {}
    histories = {
        c: [t["phase"] for t in history] for c, history in states["completed"]["history"].items()
    }
    assert histories == {
        one: ["Booked", "Preparing", "Delivering", "Degraded", "Delivering", "Completed"],
        two: ["Booked", "Preparing", "Delivering", "Completed"],
    }
    assert crash_free.crashed == []


def test_the_operator_killed_at_any_write_converges_as_if_it_had_not_been(
    crash_free: Run, tmp_path: Path
) -> None:
    failures = []
    for number, (stage, write) in enumerate(crash_free.writes, start=1):
        for mode in CrashMode:
            point = CrashPoint(number, mode)
            run = lifecycle(tmp_path, point)
            assert len(run.crashed) == 1, f"{point} ({write}, {stage}): {run.crashed}"
            for name, state in crash_free.states.items():
                found = differences(compared(state), compared(run.states[name]))
                if found:
                    failures.append(f"{point} ({write}, in {stage}): after {name}: {found}")
                    break
    assert failures == [], "\n".join(failures)


@pytest.mark.parametrize("mode", list(CrashMode))
def test_the_harness_dies_at_exactly_the_kth_write_before_or_after_it_lands(
    cluster: Cluster, mode: CrashMode
) -> None:
    life = OperatorLife(cluster.url, clock=Clock(), crash=CrashPoint(3, mode))
    core = client.CoreV1Api(life.api_client)
    core.create_namespace(client.V1Namespace.model_validate({"metadata": {"name": "first"}}))
    core.list_namespace()  # reads are no crash points
    core.patch_namespace("first", {"metadata": {"labels": {"seen": "yes"}}})
    core.read_namespace("first")
    second = client.V1Namespace.model_validate({"metadata": {"name": "second"}})
    with pytest.raises(
        crashes.Crash, match=rf"^crash {mode.value} write 3: POST /api/v1/namespaces$"
    ):
        core.create_namespace(second)
    with pytest.raises(crashes.Crash, match="the operator is dead"):
        core.read_namespace("first")  # a dead operator sends nothing more
    life.close()
    assert life.writes == [
        Write("POST", "/api/v1/namespaces"),
        Write("PATCH", "/api/v1/namespaces/first"),
        Write("POST", "/api/v1/namespaces"),
    ]
    namespaces = {name for (_, name) in stored(cluster)["namespaces"]}
    assert {"first", "second"} & namespaces == (
        {"first", "second"} if mode is CrashMode.AFTER else {"first"}
    )
    assert stored(cluster)["namespaces"][(None, "first")]["metadata"]["labels"] == {"seen": "yes"}


def test_lives_restart_the_operator_after_its_crash_and_settle_once_it_writes_nothing(
    cluster: Cluster,
) -> None:
    def make_namespaces(life: OperatorLife) -> None:
        core = client.CoreV1Api(life.api_client)
        there = {
            (item.metadata.name if item.metadata else "") for item in core.list_namespace().items
        }
        for name in ("one", "two"):
            if name not in there:
                core.create_namespace(
                    client.V1Namespace.model_validate({"metadata": {"name": name}})
                )

    seen: list[crashes.Crash] = []
    point = CrashPoint(2, CrashMode.BEFORE)
    with crashes.Lives(cluster.url, Clock(), point, on_crash=seen.append) as lives:
        # Round 1 dies creating "two", round 2 (the next life) creates it, round 3 writes nothing.
        assert lives.settle(make_namespaces) == 3
        assert [str(crash) for crash in seen] == ["crash before write 2: POST /api/v1/namespaces"]
        assert lives.crashes == seen
        assert lives.writes == [Write("POST", "/api/v1/namespaces")] * 3
        assert [len(life.writes) for life in (*lives.past, lives.life)] == [2, 1]
    assert {"one", "two"} <= {name for (_, name) in stored(cluster)["namespaces"]}


def test_lives_refuse_a_step_that_never_stops_writing(cluster: Cluster) -> None:
    def touch(life: OperatorLife) -> None:  # a patch that changes nothing is still a write
        client.CoreV1Api(life.api_client).patch_namespace("default", {"metadata": {}})

    cluster.core.create_namespace(
        client.V1Namespace.model_validate({"metadata": {"name": "default"}})
    )
    with (
        crashes.Lives(cluster.url, Clock()) as lives,
        pytest.raises(AssertionError, match=r"^touching still writes after 12 rounds"),
    ):
        lives.settle(touch, what="touching")
