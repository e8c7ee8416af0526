"""The durable spool: chain continuity across restarts and kill -9, pruning, full disks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gpudelivery import batches, signing, timefmt
from gpudelivery.metering import errors, spool

from utils.factories import EPOCH

KEY = signing.generate()
NODE = "gpu-node-7"


def records(second: int, padding: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "gpu_uuid": "GPU-aaaa",
            "t0": timefmt.format_utc(EPOCH + second),
            "t1": timefmt.format_utc(EPOCH + second + 10),
            "healthy": True,
            "note": "x" * padding,
        }
    ]


def open_spool(path: Path, **options: Any) -> spool.Spool:
    return spool.Spool(path / "spool.sqlite3", node=NODE, key=KEY, **options)


def all_documents(path: Path) -> list[dict[str, Any]]:
    import json
    import sqlite3

    with sqlite3.connect(path / "spool.sqlite3") as db:
        rows = db.execute("SELECT document FROM batches ORDER BY seq").fetchall()
    return [json.loads(row[0]) for row in rows]


def test_appended_batches_form_a_verified_chain(tmp_path: Path) -> None:
    store = open_spool(tmp_path)
    appended = [
        store.append(records(10 * i), span=(EPOCH + 10 * i, EPOCH + 10 * i + 10)) for i in range(3)
    ]
    assert [b["seq"] for b in appended if b] == [0, 1, 2]
    assert [b.seq for b in batches.verify_chain(store.pending(10), KEY.public_key)] == [0, 1, 2]
    assert store.head() == (2, batches.batch_hash(appended[2]))  # type: ignore[arg-type]
    assert store.depth() == 3


def test_a_reopened_spool_continues_the_chain(tmp_path: Path) -> None:
    first = open_spool(tmp_path)
    first.append(records(0), span=(EPOCH, EPOCH + 10))
    first.append(records(10), span=(EPOCH + 10, EPOCH + 20))
    first.close()
    second = open_spool(tmp_path)
    second.append(records(20), span=(EPOCH + 20, EPOCH + 30))
    chain = batches.verify_chain(second.pending(10), KEY.public_key)
    assert [b.seq for b in chain] == [0, 1, 2]


def test_shipped_batches_are_pruned_but_the_chain_head_is_kept(tmp_path: Path) -> None:
    store = open_spool(tmp_path)
    for i in range(4):
        store.append(records(10 * i), span=(EPOCH + 10 * i, EPOCH + 10 * i + 10))
    store.mark([(KEY.key_id, 0), (KEY.key_id, 1), (KEY.key_id, 2)], spool.SHIPPED)
    assert [b["seq"] for b in store.pending(10)] == [3]
    store.mark([(KEY.key_id, 3)], spool.SHIPPED)
    assert [d["seq"] for d in all_documents(tmp_path)] == [3]
    kept = all_documents(tmp_path)[0]
    nxt = store.append(records(40), span=(EPOCH + 40, EPOCH + 50))
    assert nxt is not None
    assert (nxt["seq"], nxt["prev_hash"]) == (4, batches.batch_hash(kept))


def test_rejected_batches_stay_as_evidence(tmp_path: Path) -> None:
    store = open_spool(tmp_path)
    store.append(records(0), span=(EPOCH, EPOCH + 10))
    store.mark([(KEY.key_id, 0)], spool.REJECTED, "fork")
    assert (store.depth(), store.count(spool.REJECTED)) == (0, 1)


def gap_of(batch: dict[str, Any]) -> tuple[str, str] | None:
    return (batch["gap"]["from"], batch["gap"]["to"]) if "gap" in batch else None


def test_a_full_spool_loses_records_but_writes_a_signed_gap_marker_as_soon_as_one_fits(
    tmp_path: Path,
) -> None:
    store = open_spool(tmp_path, max_bytes=64 * 1024)
    second = 0
    while store.append(records(second, padding=3000), span=(EPOCH + second, EPOCH + second + 10)):
        second += 10
    lost = second
    assert store.lost_span == (EPOCH + lost, EPOCH + lost + 10)
    # Large records still do not fit, but the small gap marker for the first lost span does.
    assert (
        store.append(records(lost + 10, padding=3000), span=(EPOCH + lost + 10, EPOCH + lost + 20))
        is None
    )
    assert store.lost_span == (EPOCH + lost + 10, EPOCH + lost + 20)
    assert gap_of(store.pending(1000)[-1]) == (
        timefmt.format_utc(EPOCH + lost),
        timefmt.format_utc(EPOCH + lost + 10),
    )
    # The API takes what waited: room again. The next append writes the second gap marker first.
    store.mark([(KEY.key_id, batch["seq"]) for batch in store.pending(1000)], spool.SHIPPED)
    assert store.append(records(lost + 20), span=(EPOCH + lost + 20, EPOCH + lost + 30)) is not None
    assert store.lost_span is None
    gap_batch, records_batch = store.pending(10)
    assert gap_batch["records"] == []
    assert gap_batch["gap"] == {
        "from": timefmt.format_utc(EPOCH + lost + 10),
        "to": timefmt.format_utc(EPOCH + lost + 20),
        "reason": spool.GAP_REASON,
    }
    batches.check_link(
        batches.verify_batch(gap_batch, KEY.public_key),
        batches.verify_batch(records_batch, KEY.public_key),
    )


def test_consecutive_lost_spans_merge_into_one_gap(tmp_path: Path) -> None:
    store = open_spool(tmp_path, max_bytes=64 * 1024)
    second = 0
    while store.append(records(second, padding=3000), span=(EPOCH + second, EPOCH + second + 10)):
        second += 10
    while store.append([], span=(EPOCH, EPOCH + 1)) is not None:  # fill the last pages
        pass
    lost_before = store.lost_span
    assert lost_before is not None
    store.append(records(second + 10), span=(EPOCH + second + 10, EPOCH + second + 20))
    assert store.lost_span == (min(lost_before[0], EPOCH + second + 10), EPOCH + second + 20)


def test_a_spool_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "spool.sqlite3") as db:
        db.execute("PRAGMA user_version=7")
    with pytest.raises(errors.MeteringError, match="spool schema version 7 is newer"):
        open_spool(tmp_path)


WRITER = """
import sys
from pathlib import Path
from gpudelivery import signing, timefmt
from gpudelivery.metering import spool
key = signing.load_private_pem(Path(sys.argv[2]).read_bytes())
store = spool.Spool(Path(sys.argv[1]), node="gpu-node-7", key=key)
second = 0
while True:
    record = {"gpu_uuid": "GPU-aaaa", "t0": timefmt.format_utc(1772496000 + second),
              "t1": timefmt.format_utc(1772496010 + second), "healthy": True}
    batch = store.append([record], span=(1772496000 + second, 1772496010 + second))
    print(batch["seq"], flush=True)
    second += 10
"""


def test_every_batch_acknowledged_before_kill_9_survives_and_the_chain_continues(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_bytes(KEY.private_pem())
    command = [
        sys.executable,
        "-c",
        textwrap.dedent(WRITER),
        str(tmp_path / "spool.sqlite3"),
        str(key_file),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout is not None
        acknowledged = [int(writer.stdout.readline()) for _ in range(40)]
        os.kill(writer.pid, signal.SIGKILL)
        acknowledged += [int(line) for line in writer.stdout.read().split()]
    store = open_spool(tmp_path)
    stored = batches.verify_chain(store.pending(10_000), KEY.public_key)
    assert [b.seq for b in stored][: len(acknowledged)] == acknowledged
    assert len(stored) in (len(acknowledged), len(acknowledged) + 1)  # one may land unprinted
    after = store.append(records(0), span=(EPOCH, EPOCH + 10))
    assert after is not None
    assert after["seq"] == stored[-1].seq + 1
    assert after["prev_hash"] == stored[-1].hash
