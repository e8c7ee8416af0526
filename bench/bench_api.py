"""Benchmark: the API on PostgreSQL: meter ingest throughput and proof build time.

Ingest. Nodes of 8 GPUs ship signed batches as the metering agent makes them: 10 one-second
rounds of 8 GPUs (80 records with the agent's fields), each node's chain signed beforehand
with its own key (the meter signs; the API verifies). Two clients, threads with a connection
each, post requests of one node's consecutive batches to the real API, served by
`gpudelivery api serve --workers 2` (uvicorn, processes of their own, periodic jobs off) on a
local port; every answer must accept every batch. Two workers, one per core here, as a
provider serves it on PostgreSQL: verifying and parsing is Python, one core per process
(`--workers 1` measures a single one). The kernel hands each connection to either worker, so
two kept-alive connections share one in half the runs; each client's is placed on a worker
of its own (`spread_clients`), as a fleet's many connections spread. The floor is a
raw `COPY meter_records FROM STDIN` of exactly the rows the ingest stored, in halves from 2
connections at once, into the same table emptied first. Both are wall-clock throughput in
GPU-samples per second; each repetition empties the tables and runs them all, and each keeps
its best (the figure that repeats on a shared machine). Beside them, the CPU time per sample
of the API's processes and of the PostgreSQL backends, which says where the time goes.
Goal: >= 50 % of COPY. Requests hold 50 batches, the agent's own `batch_limit` (what it
sends when batches are waiting, the case where throughput counts: a fleet catching up after
an outage of the API); 10 batches and 1 batch a request (what an agent that keeps up
sends) are reported beside it.

Proofs. The evidence of a 512-GPU fleet (64 nodes) over a 30-day window is bulk-loaded
(COPY, not timed) as ingest stores it, batches in the evidence log and one row per record,
then vacuumed and analyzed. The `rollups` job then runs until it has caught up (timed:
records a second, and against what 512 GPUs metered at 1 Hz write). Contracts of 64, 128,
256 and 512 GPUs hold the fleet's first nodes for the whole window, and
`api.proofs.build_proof` runs for each in a fresh process, warmed by an untimed build of the
first hour: wall and CPU time of that process, CPU time of its PostgreSQL backend, peak
memory, and (in a second, untimed build) the roll-up and record rows it read; best of a few.
The evidence log's head is signed once beforehand and timed on its own: a build reuses it
while the log has not grown. Goal: linear in GPUs (`proof_linearity_*` near 1.0). Each proof
is checked against the delivered GPU-seconds the generator knows it wrote, so a fast wrong
answer cannot pass for a result.

Scaled: the proof's evidence holds one record per GPU per 10 minutes by default, not one a
second as the agent sends (30 days of 512 GPUs at 1 Hz are 1.3 billion rows). Batches keep
10 records per GPU (80 records, spanning 100 minutes); their documents are placeholders,
not signed batches, since a proof reads only the records and each batch's place in the log.
A whole-window proof reads hour roll-ups, one per GPU, hour and health state, however many
records they hold, so at 1 Hz it reads the same rows: `proof_512_30d_1hz_records_per_row_read`
is what each of them would stand for.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import report
from psycopg import sql
from sqlmodel import Session

from gpudelivery import batches, merkle, signing, timefmt
from gpudelivery.api import (
    auth,
    contracts,
    db,
    evidence_log,
    ingest,
    ingest_store,
    ledger,
    migrations,
    proofs,
    rollups,
)
from gpudelivery.api.models import Contract
from gpudelivery.evidence import MeterRecord

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
START_S = 1_772_496_000  # 2026-03-03T00:00:00Z
SEED = 20261125
GPUS_PER_NODE = 8
# The agent's defaults: a round a second, a batch every 10 rounds (80 records on 8 GPUs).
ROUNDS_PER_BATCH = 10
CLIENTS = 2
# The API's worker processes: one per core of the machines this runs on (2), as a provider
# would serve it on PostgreSQL (`api serve --workers`); one alone leaves a core to the
# database and the clients, but Python then verifies and parses on one core only.
WORKERS = 2
# meter_records and meter_batches as api.ingest writes them.
RECORD_COLUMNS = ingest_store.RECORD_COLUMNS
BATCH_COLUMNS = ingest_store.BATCH_COLUMNS
INSTRUMENT = "H100-SXM-80GB"
PROOF_SIZES = (64, 128, 256, 512)
# 30 days of 512 GPUs metered once a second, as the agent does.
ONE_HZ_RECORDS = 512 * 30 * 86_400
# Mean seconds between health changes of one GPU (~6 hours), and how many records of a GPU
# go by, on average, before one is missing.
HEALTH_CHANGE_S = 6 * 3_600
GAP_EVERY = 2_000
# The benchmark's parts; `--only` runs one of them.
PARTS = ("ingest", "proofs")


@dataclass(frozen=True)
class Node:
    """A GPU node with its meter key (`key_id` kept: the key computes it on each call)."""

    name: str
    key: signing.SigningKey
    key_id: str
    gpus: tuple[str, ...]


def make_nodes(count: int, prefix: str) -> list[Node]:
    nodes = []
    for index in range(count):
        key = signing.generate()
        gpus = tuple(
            f"GPU-{index:04x}{gpu:04x}-7f3b-4c9d-8e6f-0a1b2c3d4e5f" for gpu in range(GPUS_PER_NODE)
        )
        nodes.append(Node(f"{prefix}-{index:03d}", key, key.key_id, gpus))
    return nodes


def register_keys(database_url: str, nodes: Sequence[Node]) -> None:
    engine = db.engine_for(database_url)
    with Session(engine) as session:
        for node in nodes:
            pem = signing.public_pem(node.key.public_key).decode("ascii")
            ingest.register_key(session, node=node.name, public_key_pem=pem, now_s=START_S)
        session.commit()
    engine.dispose()


def execute(database_url: str, statement: str) -> Any:
    """Run one statement outside a transaction; its first row's first value, if any."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        cursor = connection.execute(statement.encode("utf-8"))
        row = cursor.fetchone() if cursor.description is not None else None
    return None if row is None else row[0]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A migrated database of its own, dropped at the end."""
    name = f"gpudelivery_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        migrations.upgrade(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def in_parallel(work: Sequence[Callable[[threading.Barrier], None]]) -> float:
    """Run each piece of work in a thread of its own; wall seconds from the moment all are
    ready (each waits at the barrier it is given) until the last is done."""
    start = threading.Barrier(len(work) + 1)
    with ThreadPoolExecutor(len(work)) as pool:
        futures = [pool.submit(piece, start) for piece in work]
        start.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        return time.perf_counter() - started


# -- ingest -----------------------------------------------------------------------------------


def agent_record(gpu_uuid: str, t0_s: int, index: int) -> dict[str, Any]:
    """A healthy GPU's record of one second, with the fields metering.records writes."""
    return {
        "gpu_uuid": gpu_uuid,
        "t0": timefmt.format_utc(t0_s),
        "t1": timefmt.format_utc(t0_s + 1),
        "healthy": True,
        "xids": [],
        "utilization_gpu_pct": 90 + index % 11,
        "utilization_memory_pct": 55 + index % 7,
        "memory_used_bytes": 60 * 2**30 + index % 97 * 2**20,
        "power_mw": 650_000 + index % 5_000,
        "energy_mj": 650_000 + index % 5_000,
        "temperature_c": 60 + index % 9,
        "pods": [],
    }


def sign_chain(node: Node, length: int) -> list[dict[str, Any]]:
    """The node's first `length` batches, signed as its meter signs them."""
    chain: list[dict[str, Any]] = []
    prev_hash = None
    for seq in range(length):
        first_s = START_S + seq * ROUNDS_PER_BATCH
        records = [
            agent_record(gpu, first_s + second, seq + second + number)
            for second in range(ROUNDS_PER_BATCH)
            for number, gpu in enumerate(node.gpus)
        ]
        document = batches.sign_batch(
            key=node.key, node=node.name, seq=seq, prev_hash=prev_hash, records=records
        )
        prev_hash = batches.batch_hash(document)
        chain.append(document)
    return chain


def request_bodies(chains: Sequence[list[dict[str, Any]]], per_request: int) -> list[bytes]:
    """One client's requests, encoded: each node's chain in order, `per_request` batches a
    request, the client's nodes taking turns as their agents would."""
    return [
        orjson.dumps({"batches": chain[start : start + per_request]})
        for start in range(0, len(chains[0]), per_request)
        for chain in chains
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the workers of `api serve --workers N`)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(child) for child in children)]


def api_workers(pid: int) -> list[int]:
    """The processes serving requests: uvicorn's worker processes, or the command itself."""
    workers = [
        child
        for child in process_tree(pid)[1:]
        if b"multiprocessing-fork" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    return workers or [pid]


@contextlib.contextmanager
def served_api(database_url: str, workdir: Path, workers: int) -> Iterator[tuple[str, int]]:
    """The API served by `gpudelivery api serve --workers N` in processes of their own:
    (URL, pid of the command)."""
    port = free_port()
    env = {
        **os.environ,
        "GPUDELIVERY_DATABASE_URL": database_url,
        "GPUDELIVERY_API_PROVIDER_KEY_FILE": str(workdir / "provider.key"),
        "GPUDELIVERY_API_JOBS_ENABLED": "false",
    }
    command = [sys.executable, "-m", "gpudelivery", "api", "serve", "--port", str(port)]
    command += ["--workers", str(workers)]
    log_path = workdir / "api.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not _ready(base):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise SystemExit(f"the API did not start:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield base, server.pid
        finally:
            server.terminate()
            server.wait(timeout=30)


def _connect(base: str) -> tuple[httpx.Client, int]:
    """A client with its connection open (kept alive from request to request), and the
    local port it connected from."""
    client = httpx.Client(base_url=base, timeout=300, headers={"content-type": "application/json"})
    response = client.get("/healthz")
    host_port = response.extensions["network_stream"].get_extra_info("client_addr")
    return client, int(host_port[1])


def _worker_of(client_port: int, workers: Sequence[int]) -> int | None:
    """The worker process holding the server end of the connection from `client_port`:
    the socket's inode in /proc/net/tcp, then the worker with a descriptor on it."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == client_port:  # remote end: the client
            inode = fields[9]
    for pid in workers:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    return None


def spread_clients(base: str, count: int, workers: Sequence[int]) -> list[httpx.Client]:
    """`count` connected clients, each on a worker of its own while there are workers
    enough: a provider's fleet spreads many agents' connections over the workers, where
    two kept-alive connections share one worker in half the runs (the kernel's draw)."""
    clients: list[httpx.Client] = []
    taken: set[int | None] = set()
    for _ in range(count):
        for _attempt in range(50):
            client, port = _connect(base)
            worker = _worker_of(port, workers)
            if worker not in taken or len(taken) >= len(workers) or worker is None:
                break
            client.close()
        clients.append(client)
        taken.add(worker)
    return clients


def _post_all(client: httpx.Client, bodies: Sequence[bytes], start: threading.Barrier) -> None:
    try:
        start.wait()
        for body in bodies:
            response = client.post("/v1/meter/batches", content=body)
            if response.status_code != 200:
                raise SystemExit(f"ingest answered {response.status_code}: {response.text}")
            refused = [r for r in response.json()["results"] if r["status"] != "accepted"]
            if refused:
                raise SystemExit(f"ingest did not accept a batch: {refused[0]}")
    finally:
        client.close()


def _copy_rows(
    database_url: str,
    rows: Sequence[tuple[Any, ...]],
    db_cpu_s: list[float],
    start: threading.Barrier,
) -> None:
    statement = f"COPY meter_records ({', '.join(RECORD_COLUMNS)}) FROM STDIN"
    with psycopg.connect(database_url) as connection:
        backend = connection.execute(b"SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        before = cpu_seconds(backend[0])
        start.wait()
        with connection.cursor() as cursor, cursor.copy(statement.encode("ascii")) as copy:
            for row in rows:
                copy.write_row(row)
        connection.commit()
        db_cpu_s.append(cpu_seconds(backend[0]) - before)


def copy_floor(database_url: str, rows: Sequence[tuple[Any, ...]]) -> tuple[float, float]:
    """Wall seconds of a raw COPY of `rows` into the emptied table, in halves from 2
    connections at once, and the CPU seconds of their PostgreSQL backends."""
    execute(database_url, "TRUNCATE meter_records RESTART IDENTITY")
    size = len(rows)
    shares = [rows[k * size // CLIENTS : (k + 1) * size // CLIENTS] for k in range(CLIENTS)]
    db_cpu_s: list[float] = []
    wall = in_parallel(
        [functools.partial(_copy_rows, database_url, share, db_cpu_s) for share in shares]
    )
    return wall, sum(db_cpu_s)


def backends_cpu(database_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend on the database (the API's pool)."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        pids = connection.execute(
            b"SELECT pid FROM pg_stat_activity "
            b"WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {pid: cpu_seconds(pid) for (pid,) in pids}


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings by processes alive at the second."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def empty_evidence(database_url: str) -> None:
    execute(database_url, "TRUNCATE meter_records, meter_batches, incidents RESTART IDENTITY")


def stored_rows(database_url: str) -> list[tuple[Any, ...]]:
    columns = ", ".join(RECORD_COLUMNS)
    with psycopg.connect(database_url) as connection:
        query = f"SELECT {columns} FROM meter_records ORDER BY id"
        return connection.execute(query.encode("ascii")).fetchall()


def bench_ingest(
    database_url: str,
    workdir: Path,
    *,
    nodes: int,
    chain_length: int,
    per_request: Sequence[int],
    repeats: int,
    workers: int,
) -> dict[str, Any]:
    fleet = make_nodes(nodes, "ingest-node")
    register_keys(database_url, fleet)
    chains = [sign_chain(node, chain_length) for node in fleet]
    shares = [chains[k * nodes // CLIENTS : (k + 1) * nodes // CLIENTS] for k in range(CLIENTS)]
    requests = {n: [request_bodies(share, n) for share in shares] for n in per_request}
    samples = nodes * chain_length * ROUNDS_PER_BATCH * GPUS_PER_NODE
    best = {n: float("inf") for n in per_request}
    api_cpu_s = dict.fromkeys(per_request, 0.0)
    db_cpu_s = dict.fromkeys(per_request, 0.0)
    best_copy, copy_db_cpu_s = float("inf"), 0.0
    rows: list[tuple[Any, ...]] = []
    with served_api(database_url, workdir, workers) as (base, pid):
        for _ in range(repeats):
            for n, clients in requests.items():
                empty_evidence(database_url)
                api_before = {p: cpu_seconds(p) for p in process_tree(pid)}
                db_before = backends_cpu(database_url)
                connected = spread_clients(base, len(clients), api_workers(pid))
                wall = in_parallel(
                    [
                        functools.partial(_post_all, client, bodies)
                        for client, bodies in zip(connected, clients, strict=True)
                    ]
                )
                if wall < best[n]:
                    best[n] = wall
                    api_cpu_s[n] = cpu_since(
                        api_before, {p: cpu_seconds(p) for p in process_tree(pid)}
                    )
                    db_cpu_s[n] = cpu_since(db_before, backends_cpu(database_url))
                stored = execute(database_url, "SELECT count(*) FROM meter_records")
                if stored != samples:
                    raise SystemExit(f"ingest stored {stored} records, not {samples}")
                rows = rows or stored_rows(database_url)
            wall, db_cpu = copy_floor(database_url, rows)
            if wall < best_copy:
                best_copy, copy_db_cpu_s = wall, db_cpu
    main, *others = per_request
    figures: dict[str, Any] = {
        "ingest_path": f"HTTP: gpudelivery api serve --workers {workers} (uvicorn), "
        f"{CLIENTS} client threads",
        "ingest_nodes": nodes,
        "ingest_gpu_samples": samples,
        "ingest_batches_per_request": main,
        "ingest_best_wall_s": round(best[main], 3),
        "ingest_gpu_samples_per_s": round(samples / best[main]),
        "copy_gpu_samples_per_s": round(samples / best_copy),
        "ingest_ratio_to_copy": round(best_copy / best[main], 3),
        "ingest_api_cpu_us_per_sample": round(api_cpu_s[main] / samples * 1e6, 1),
        "ingest_db_cpu_us_per_sample": round(db_cpu_s[main] / samples * 1e6, 1),
        "copy_db_cpu_us_per_sample": round(copy_db_cpu_s / samples * 1e6, 1),
    }
    for n in others:
        figures[f"ingest_{n}_per_request_gpu_samples_per_s"] = round(samples / best[n])
        figures[f"ingest_{n}_per_request_ratio_to_copy"] = round(best_copy / best[n], 3)
        figures[f"ingest_{n}_per_request_api_cpu_us_per_sample"] = round(
            api_cpu_s[n] / samples * 1e6, 1
        )
        figures[f"ingest_{n}_per_request_db_cpu_us_per_sample"] = round(
            db_cpu_s[n] / samples * 1e6, 1
        )
    return figures


# -- proofs -----------------------------------------------------------------------------------


@dataclass
class Health:
    """Each GPU's health changes (record indexes, last first) and missing records, seeded;
    `records` and `healthy_s` tally what the generator wrote per GPU."""

    flips: list[list[int]]
    gaps: list[set[int]]
    records: list[int]
    healthy_s: list[int]


def make_health(gpu_count: int, records: int, record_s: int) -> Health:
    rng = random.Random(SEED)
    every = max(2, HEALTH_CHANGE_S // record_s)
    flips, gaps = [], []
    for _ in range(gpu_count):
        changes, index = [], 0
        while True:
            index += rng.randint(every // 2, every * 3 // 2)
            if index >= records:
                break
            changes.append(index)
        flips.append(changes[::-1])
        gaps.append({rng.randrange(records) for _ in range(records // GAP_EVERY)})
    return Health(flips, gaps, [0] * gpu_count, [0] * gpu_count)


def evidence_batches(fleet: Sequence[Node], periods: int, span_s: int) -> Iterator[tuple[Any, ...]]:
    """meter_batches rows, in the order ingest accepts them (time first, then node)."""
    for period in range(periods):
        for number, node in enumerate(fleet):
            document = json.dumps({"placeholder": node.name, "seq": period}).encode()
            yield (
                node.key_id,
                period,
                node.name,
                hashlib.sha256(document).hexdigest(),
                period * len(fleet) + number,
                merkle.leaf_hash(document).hex(),
                document,
                START_S + (period + 1) * span_s,
            )


def evidence_records(
    fleet: Sequence[Node], health: Health, periods: int, record_s: int
) -> Iterator[tuple[Any, ...]]:
    """meter_records rows in the order ingest writes them: batch by batch, each batch's
    records round by round."""
    healthy = [True] * len(health.flips)
    energy_mj = 650_000 * record_s
    for period in range(periods):
        for number, node in enumerate(fleet):
            for step in range(ROUNDS_PER_BATCH):
                index = period * ROUNDS_PER_BATCH + step
                t0_s = START_S + index * record_s
                for gpu_index, gpu in enumerate(node.gpus):
                    gpu_number = number * GPUS_PER_NODE + gpu_index
                    flips = health.flips[gpu_number]
                    if flips and flips[-1] == index:
                        flips.pop()
                        healthy[gpu_number] = not healthy[gpu_number]
                    if index in health.gaps[gpu_number]:
                        continue
                    health.records[gpu_number] += 1
                    if healthy[gpu_number]:
                        health.healthy_s[gpu_number] += record_s
                    yield (
                        node.key_id,
                        period,
                        node.name,
                        gpu,
                        t0_s,
                        t0_s + record_s,
                        healthy[gpu_number],
                        90 + (index + gpu_index) % 11,
                        energy_mj,
                    )


def copy_in(database_url: str, table: str, columns: Sequence[str], rows: Iterator[Any]) -> int:
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    count = 0
    with psycopg.connect(database_url) as connection:
        with connection.cursor() as cursor, cursor.copy(statement.encode("ascii")) as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        connection.commit()
    return count


def contract_terms(gpus: int, end_s: int) -> dict[str, Any]:
    return {
        "contract_id": f"BENCH-{gpus}",
        "buyer": "bench-buyer",
        "instrument": INSTRUMENT,
        "gpu_count": gpus,
        "start": timefmt.format_utc(START_S),
        "end": timefmt.format_utc(end_s),
        "price_per_gpu_hour": "2.50",
        "currency": "USD",
        "penalty_tiers": [{"below": "0.99", "rate": "0.05"}, {"below": "0.95", "rate": "0.2"}],
    }


def book_contracts(database_url: str, fleet: Sequence[Node], end_s: int) -> None:
    """One contract per size over the fleet's first GPUs for the whole window, each GPU in
    the ledger from start to end."""
    gpus = [(node.name, gpu) for node in fleet for gpu in node.gpus]
    exchange = auth.Principal(key_id="bench", name="bench-exchange", role=auth.Role.EXCHANGE)
    booked_s = START_S - 86_400
    engine = db.engine_for(database_url)
    with Session(engine) as session:
        contracts.set_capacity(
            session, instrument=INSTRUMENT, gpus=sum(PROOF_SIZES), now_s=booked_s
        )
        for size in PROOF_SIZES:
            contract, _ = contracts.create_contract(
                session,
                exchange=exchange,
                idempotency_key=f"bench-{size}",
                data=contract_terms(size, end_s),
                now_s=booked_s,
            )
            session.flush()
            intervals = [ledger.Interval(node, gpu, START_S, end_s) for node, gpu in gpus[:size]]
            ledger.record_intervals(session, contract=contract, intervals=intervals, now_s=booked_s)
        session.commit()
    engine.dispose()


def sign_tree_head(database_url: str, key: signing.SigningKey, now_s: int) -> tuple[float, float]:
    """Sign the head of the whole evidence log: (wall, CPU) seconds."""
    engine = db.engine_for(database_url)
    with Session(engine) as session:
        wall, cpu = time.perf_counter(), time.process_time()
        evidence_log.tree_head(session, key=key, now_s=now_s)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        session.commit()
    engine.dispose()
    return wall, cpu


def build_here(database_url: str, contract_id: str, key_file: str, now_s: int) -> dict[str, Any]:
    """Build one proof in this process: the timed part of the proof benchmark.

    A provisional proof of the contract's first hour is built first, untimed, so that the
    figure is not that of a cold process (imports, statement compilation): the API's is warm.
    """
    engine = db.engine_for(database_url)
    key = signing.load_private_pem(Path(key_file).read_bytes())
    with Session(engine) as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        proofs.build_proof(session, contract=contract, key=key, now_s=contract.start_s + 3_600)
        session.rollback()
    with Session(engine) as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        backend = int(session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        db_cpu = cpu_seconds(backend)
        wall, cpu = time.perf_counter(), time.process_time()
        document = proofs.build_proof(session, contract=contract, key=key, now_s=now_s)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        db_cpu = cpu_seconds(backend) - db_cpu
        session.rollback()
    with Session(engine) as session:  # again, untimed, counting what it read
        read = evidence_read(session, contract_id, key, now_s)
        session.rollback()
    engine.dispose()
    return read | {
        "wall_s": wall,
        "cpu_s": cpu,
        "db_cpu_s": db_cpu,
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "delivered": document["settlement"]["delivered_gpu_seconds"],
        "tree_size": document["meter_evidence"]["tree_size"],
    }


def evidence_read(
    session: Session, contract_id: str, key: signing.SigningKey, now_s: int
) -> dict[str, int]:
    """The rows of each kind a proof of the contract reads: roll-ups and meter records."""
    counts = {"rollup_rows": 0, "record_rows": 0}
    reading = rollups.evidence

    def counting(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in reading(*args, **kwargs):
            counts["record_rows" if isinstance(item, MeterRecord) else "rollup_rows"] += 1
            yield item

    contract = session.get(Contract, contract_id)
    assert contract is not None
    rollups.evidence = counting
    try:
        proofs.build_proof(session, contract=contract, key=key, now_s=now_s)
    finally:
        rollups.evidence = reading
    return counts


def build_in_fresh_process(
    database_url: str, contract_id: str, key_file: Path, now_s: int
) -> dict[str, Any]:
    options = ["--database-url", database_url, "--contract", contract_id]
    options += ["--key-file", str(key_file), "--now", str(now_s)]
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", "proof", *options],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        raise SystemExit(f"the proof build failed:\n{completed.stderr}")
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result


def load_evidence(
    database_url: str, fleet: Sequence[Node], health: Health, periods: int, record_s: int
) -> tuple[int, int]:
    """Store the fleet's evidence as ingest would (untimed): (log size, records)."""
    span_s = ROUNDS_PER_BATCH * record_s
    log_size = copy_in(
        database_url, "meter_batches", BATCH_COLUMNS, evidence_batches(fleet, periods, span_s)
    )
    records = evidence_records(fleet, health, periods, record_s)
    stored = copy_in(database_url, "meter_records", RECORD_COLUMNS, records)
    execute(database_url, "VACUUM ANALYZE meter_batches, meter_records")
    return log_size, stored


def roll_up_evidence(database_url: str, now_s: int) -> dict[str, Any]:
    """Run the roll-up job until it has caught up (timed), then vacuum and analyze."""
    engine = db.engine_for(database_url)
    with Session(engine) as session:
        wall, cpu = time.perf_counter(), time.process_time()
        records = 0
        while read := rollups.roll_up_all(session, now_s=now_s):
            records += read
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert rollups.lag(session) == 0
        rows: dict[int, int] = dict(
            session.connection()
            .exec_driver_sql("SELECT width_s, count(*) FROM meter_rollups GROUP BY width_s")
            .all()
        )
    engine.dispose()
    execute(database_url, "VACUUM ANALYZE meter_rollups")
    return {
        "rollup_records": records,
        "rollup_wall_s": round(wall, 1),
        "rollup_cpu_s": round(cpu, 1),
        "rollup_records_per_s": round(records / wall),
        "rollup_hour_rows": rows.get(rollups.HOUR_S, 0),
        "rollup_minute_rows": rows.get(rollups.MINUTE_S, 0),
        # The job against what a 512-GPU fleet metered at 1 Hz writes a second.
        "rollup_headroom_512_gpus_1hz": round(records / wall / 512, 1),
    }


def bench_proofs(
    database_url: str, workdir: Path, *, days: int, record_s: int, repeats: int
) -> dict[str, Any]:
    fleet = make_nodes(max(PROOF_SIZES) // GPUS_PER_NODE, "proof-node")
    register_keys(database_url, fleet)
    periods = days * 86_400 // (ROUNDS_PER_BATCH * record_s)
    end_s = START_S + periods * ROUNDS_PER_BATCH * record_s
    health = make_health(len(fleet) * GPUS_PER_NODE, periods * ROUNDS_PER_BATCH, record_s)
    loading = time.perf_counter()
    log_size, stored = load_evidence(database_url, fleet, health, periods, record_s)
    load_s = time.perf_counter() - loading
    book_contracts(database_url, fleet, end_s)
    key = signing.generate()
    key_file = workdir / "provider.key"
    key_file.write_bytes(key.private_pem())
    now_s = end_s + 3_600
    rolled = roll_up_evidence(database_url, now_s)
    head_wall, head_cpu = sign_tree_head(database_url, key, now_s)
    best: dict[int, dict[str, Any]] = {}
    for _ in range(repeats):
        for size in PROOF_SIZES:
            result = build_in_fresh_process(database_url, f"BENCH-{size}", key_file, now_s)
            expected = sum(health.healthy_s[:size])
            if result["delivered"] != expected or result["tree_size"] != log_size:
                raise SystemExit(f"wrong proof for {size} GPUs: {result}, expected {expected}")
            if size not in best or result["wall_s"] < best[size]["wall_s"]:
                best[size] = result
    figures: dict[str, Any] = {
        "proof_window_days": days,
        "proof_record_interval_s": record_s,
        "proof_meter_records_stored": stored,
        "proof_evidence_log_size": log_size,
        "proof_setup_load_s": round(load_s, 1),
        "tree_head_wall_s": round(head_wall, 2),
        "tree_head_cpu_s": round(head_cpu, 2),
    } | rolled
    for size, result in best.items():
        figures[f"proof_{size}_records"] = sum(health.records[:size])
        figures[f"proof_{size}_wall_s"] = round(result["wall_s"], 2)
        figures[f"proof_{size}_cpu_s"] = round(result["cpu_s"], 2)
        figures[f"proof_{size}_db_cpu_s"] = round(result["db_cpu_s"], 2)
        figures[f"proof_{size}_wall_ms_per_gpu"] = round(result["wall_s"] / size * 1e3, 1)
        figures[f"proof_{size}_peak_rss_mib"] = round(result["max_rss_kib"] / 1024)
        for kind in ("rollup_rows", "record_rows"):
            figures[f"proof_{size}_{kind}_read"] = result[kind]
    return figures | linearity(best, health)


def rows_read(result: dict[str, Any]) -> int:
    return int(result["rollup_rows"] + result["record_rows"])


def linearity(best: dict[int, dict[str, Any]], health: Health) -> dict[str, Any]:
    """The largest build against the smallest scaled up, and the cost per row read.

    At 1 Hz a GPU's hour holds 3,600 records instead of 6, but still one hour row a health
    state: the rows a whole-window proof reads do not grow with the metering rate, so the
    1 Hz estimates are the rows read times the measured cost a row."""
    small, large = min(PROOF_SIZES), max(PROOF_SIZES)
    scale = large // small
    rows = rows_read(best[large])
    extra_rows = rows - rows_read(best[small])
    extra_kib = best[large]["max_rss_kib"] - best[small]["max_rss_kib"]
    return {
        "proof_linearity_wall": round(best[large]["wall_s"] / (scale * best[small]["wall_s"]), 2),
        "proof_linearity_cpu": round(best[large]["cpu_s"] / (scale * best[small]["cpu_s"]), 2),
        "proof_512_wall_us_per_row": round(best[large]["wall_s"] / rows * 1e6, 1),
        "proof_memory_kib_per_row": round(extra_kib / extra_rows, 3),
        "proof_512_records_per_row_read": round(sum(health.records[:large]) / rows, 1),
        "proof_512_30d_1hz_records_per_row_read": round(ONE_HZ_RECORDS / rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run")
    parser.add_argument(
        "--only", choices=PARTS, help="run one part: ingest or proofs (default: both)"
    )
    parser.add_argument("--nodes", type=int, default=16, help="ingest: nodes of 8 GPUs")
    parser.add_argument("--chain", type=int, default=100, help="ingest: batches per node")
    parser.add_argument(
        "--per-request",
        default="50,10,1",
        help="ingest: batches a request (the first is the goal's: the agent's batch_limit)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="ingest and COPY: best of")
    parser.add_argument(
        "--workers", type=int, default=WORKERS, help="ingest: worker processes of the API"
    )
    parser.add_argument("--days", type=int, default=30, help="proofs: the contracts' window")
    parser.add_argument("--record-s", type=int, default=600, help="proofs: seconds a record")
    parser.add_argument("--proof-repeats", type=int, default=2, help="proofs: best of")
    parser.add_argument("--phase", choices=["proof"], help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--contract", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--now", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.phase:
        result = build_here(options.database_url, options.contract, options.key_file, options.now)
        print(json.dumps(result))
        return
    if options.quick:
        options.nodes, options.chain, options.repeats = 4, 10, 2
        options.days, options.record_s, options.proof_repeats = 1, 600, 1
    per_request = [int(n) for n in options.per_request.split(",")]
    parts = PARTS if options.only is None else (options.only,)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir, bench_database() as database_url:
        if "ingest" in parts:
            figures |= bench_ingest(
                database_url,
                Path(workdir),
                nodes=options.nodes,
                chain_length=options.chain,
                per_request=per_request,
                repeats=options.repeats,
                workers=options.workers,
            )
            empty_evidence(database_url)
        if "proofs" in parts:
            figures |= bench_proofs(
                database_url,
                Path(workdir),
                days=options.days,
                record_s=options.record_s,
                repeats=options.proof_repeats,
            )
    titles = {
        "ingest": f"ingest best of {options.repeats}",
        "proofs": f"proofs best of {options.proof_repeats}, {options.days} days, "
        f"a record per GPU every {options.record_s} s",
    }
    report.print_figures("api on PostgreSQL: " + "; ".join(titles[part] for part in parts), figures)


if __name__ == "__main__":
    main()
