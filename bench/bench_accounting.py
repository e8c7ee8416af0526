"""Benchmark: accounting of delivered GPU-seconds at provider scale.

512 GPUs (64 nodes of 8) metered once a minute for 30 days, about 22 million meter records,
each GPU changing health every ~6 hours and missing an occasional minute. One contract
holds all of them for the whole window.

The floor is a plain loop over the same record stream that only reads each record's fields:
what any consumer of the records pays before doing anything with them (here the records are
produced by a generator, standing in for a file or database cursor). The benchmark reports
the accounting's CPU time against that floor in the same run (goal: within 3x), and the peak
resident memory of each, measured in fresh processes, for a 3-day and a 30-day window (goal:
memory does not grow with the window: it grows with coalesced spans, not records).

It also checks the result against the delivered GPU-seconds the generator knows it produced,
so a fast wrong answer cannot pass for a benchmark result.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import report

from gpudelivery import accounting
from gpudelivery.evidence import Assignment, MeterRecord

START_S = 1_772_496_000  # 2026-03-03T00:00:00Z
GPUS_PER_NODE = 8
SEED = 20261124
CONTRACT_ID = "BENCH-1"
# Mean minutes between health changes of one GPU (~6 hours) and share of minutes missing.
HEALTH_CHANGE_MIN = 360
GAP_EVERY_MIN = 2_000


@dataclass
class Fleet:
    """The GPUs, their health-change minutes and their missing minutes, all seeded."""

    gpus: list[tuple[str, str]]
    flips: list[list[int]]
    gaps: list[set[int]]
    minutes: int


def make_fleet(gpu_count: int, days: int) -> Fleet:
    rng = random.Random(SEED)
    minutes = days * 24 * 60
    gpus = [
        (f"node-{index // GPUS_PER_NODE:03d}", f"GPU-{index:08x}-0000-0000-0000-000000000000")
        for index in range(gpu_count)
    ]
    flips, gaps = [], []
    for _ in gpus:
        changes, minute = [], 0
        while True:
            minute += rng.randint(HEALTH_CHANGE_MIN // 2, HEALTH_CHANGE_MIN * 3 // 2)
            if minute >= minutes:
                break
            changes.append(minute)
        flips.append(changes)
        gaps.append({rng.randrange(minutes) for _ in range(minutes // GAP_EVERY_MIN)})
    return Fleet(gpus, flips, gaps, minutes)


def stream(fleet: Fleet, tally: list[int]) -> Iterator[MeterRecord]:
    """Records in time order, minute by minute; `tally[0]` counts healthy records made."""
    healthy = [True] * len(fleet.gpus)
    next_flip = [0] * len(fleet.gpus)
    for minute in range(fleet.minutes):
        t0 = START_S + minute * 60
        t1 = t0 + 60
        for index, (node, gpu_uuid) in enumerate(fleet.gpus):
            flips = fleet.flips[index]
            if next_flip[index] < len(flips) and flips[next_flip[index]] == minute:
                healthy[index] = not healthy[index]
                next_flip[index] += 1
            if minute in fleet.gaps[index]:
                continue
            if healthy[index]:
                tally[0] += 1
            yield MeterRecord(node, gpu_uuid, t0, t1, healthy[index])


def run_phase(phase: str, gpu_count: int, days: int) -> dict[str, float | int]:
    fleet = make_fleet(gpu_count, days)
    tally = [0]
    records = stream(fleet, tally)
    window = (START_S, START_S + fleet.minutes * 60)
    started = time.process_time()
    count = 0
    if phase == "floor":
        for record in records:
            _ = (record.node, record.gpu_uuid, record.t0_s, record.t1_s, record.healthy)
            count += 1
        delivered = -1
    else:
        ledger = [Assignment(CONTRACT_ID, node, gpu, *window) for node, gpu in fleet.gpus]
        result = accounting.account(
            gpu_count=gpu_count,
            contract_id=CONTRACT_ID,
            window=window,
            assignments=ledger,
            records=records,
        )
        delivered = result.delivered_gpu_seconds
        if delivered != tally[0] * 60:
            raise SystemExit(f"wrong result: {delivered} != {tally[0] * 60} GPU-seconds")
    cpu_s = time.process_time() - started
    return {
        "cpu_s": cpu_s,
        "records": count,
        "delivered": delivered,
        "healthy_records": tally[0],
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def in_fresh_process(phase: str, gpu_count: int, days: int) -> dict[str, float | int]:
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--gpus", str(gpu_count), "--days", str(days)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float | int] = json.loads(completed.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=512)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="64 GPUs x 3 days: a sanity run")
    parser.add_argument("--phase", choices=["floor", "accounting"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.phase:
        print(json.dumps(run_phase(options.phase, options.gpus, options.days)))
        return
    gpus, days = (64, 3) if options.quick else (options.gpus, options.days)
    short_days = max(1, days // 10)
    floor = in_fresh_process("floor", gpus, days)
    records = int(floor["records"])
    account = in_fresh_process("accounting", gpus, days)
    short = in_fresh_process("accounting", gpus, short_days)
    figures = {
        "gpus": gpus,
        "days": days,
        "records": records,
        "floor_cpu_s": round(float(floor["cpu_s"]), 2),
        "accounting_cpu_s": round(float(account["cpu_s"]), 2),
        "floor_records_per_s": round(records / float(floor["cpu_s"])),
        "accounting_records_per_s": round(records / float(account["cpu_s"])),
        "ratio_to_floor": round(float(account["cpu_s"]) / float(floor["cpu_s"]), 2),
        "accounting_ns_per_record_above_floor": round(
            (float(account["cpu_s"]) - float(floor["cpu_s"])) / records * 1e9
        ),
        "floor_peak_rss_mib": round(int(floor["max_rss_kib"]) / 1024, 1),
        "accounting_peak_rss_mib": round(int(account["max_rss_kib"]) / 1024, 1),
        f"accounting_peak_rss_mib_{short_days}d": round(int(short["max_rss_kib"]) / 1024, 1),
        "memory_ratio_long_to_short_window": round(
            int(account["max_rss_kib"]) / int(short["max_rss_kib"]), 2
        ),
        "delivered_gpu_seconds": account["delivered"],
    }
    report.print_figures(f"accounting: {gpus} GPUs x {days} days, 1 record/GPU/minute", figures)


if __name__ == "__main__":
    main()
