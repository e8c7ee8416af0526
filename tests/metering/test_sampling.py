"""Sampling rounds over the simulated driver, and `gpudelivery meter --once`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from utils.nvml import SCENARIOS, PynvmlRunner

SAMPLE = """
import threading
from gpudelivery.metering import nvml, sampling
source = nvml.PynvmlSource()
sampler = sampling.Sampler(source, interval_s=1, max_interval_s=2)
stop = threading.Event()
pump = threading.Thread(target=sampler.pump_xids, args=(stop,))
pump.start()
rounds = []
start = int(time.time()) + 1
for at_s in range(start, start + {rounds}):
    time.sleep(max(0.0, at_s - time.time()))
    rounds.append(sampler.round(at_s))
stop.set()
pump.join()
source.close()
result = rounds
"""


def test_the_first_round_sets_baselines_and_later_rounds_make_one_record_per_gpu(
    run_pynvml: PynvmlRunner,
) -> None:
    rounds = run_pynvml(SAMPLE.format(rounds=2), scenario=SCENARIOS / "h100x8.yaml", seconds_in=20)
    assert rounds[0] == []
    assert len(rounds[1]) == 8
    record = rounds[1][0]
    assert (record["healthy"], record["utilization_gpu_pct"], record["xids"]) == (True, 97, [])
    # 1 s at 650 W, give or take the scheduling of the two reads
    assert 500_000 <= record["energy_mj"] <= 800_000


def test_an_xid_during_sampling_turns_its_gpu_unhealthy_from_that_interval_on(
    run_pynvml: PynvmlRunner,
) -> None:
    # The scenario's XID 79 comes 30 s in; start 28.5 s in and sample for 4 rounds.
    rounds = run_pynvml(SAMPLE.format(rounds=4), scenario=SCENARIOS / "xid79.yaml", seconds_in=28.5)
    gpu3 = [next(r for r in records if r["gpu_uuid"].endswith("3")) for records in rounds[1:]]
    first_bad = next(i for i, r in enumerate(gpu3) if not r["healthy"])
    with_xid = [i for i, r in enumerate(gpu3) if r["xids"]]
    assert [gpu3[i]["xids"] for i in with_xid] == [[79]]
    # The XID belongs to the interval it arrived in. The GPU is lost at the same instant, and
    # a read may see that up to one event poll (10 ms) before the XID arrives.
    assert first_bad in (with_xid[0], with_xid[0] - 1)
    assert all(r["healthy"] for r in gpu3[:first_bad])
    assert not any(r["healthy"] for r in gpu3[first_bad:])
    assert gpu3[-1]["reasons"] == [
        "critical XID 79 since the last reset",
        "GPU fallen off the bus (GPU_IS_LOST)",
    ]
    others = [r for records in rounds[1:] for r in records if not r["gpu_uuid"].endswith("3")]
    assert all(r["healthy"] for r in others)


def test_meter_once_prints_one_json_line_per_gpu(nvml_sim_dir: Path) -> None:
    environment = {
        **os.environ,
        "LD_LIBRARY_PATH": str(nvml_sim_dir),
        "GPUDELIVERY_NVML_SCENARIO": str(SCENARIOS / "h100x8.yaml"),
        "GPUDELIVERY_NVML_EPOCH": repr(time.time() - 60),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "gpudelivery", "meter", "--once"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["gpu_uuid"][-2:] for line in lines] == [
        "00",
        "01",
        "02",
        "03",
        "04",
        "05",
        "06",
        "07",
    ]
    assert {(line["healthy"], line["power_mw"], line["pods"] == []) for line in lines} == {
        (True, 650_000, True)
    }


def test_meter_once_without_a_driver_names_the_problem(tmp_path: Path) -> None:
    environment = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    environment.pop("GPUDELIVERY_NVML_SCENARIO", None)
    completed = subprocess.run(
        [sys.executable, "-m", "gpudelivery", "meter", "--once"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert (
        completed.stderr
        == "gpudelivery: error: NVML is not available: NVML Shared Library Not Found\n"
    )
