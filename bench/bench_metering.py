"""Benchmark: the metering agent's CPU cost per GPU-sample, and its load on a node.

The floor is a bare pynvml loop making the same NVML calls as the agent's reader, on the
same simulated driver (metering/nvml-sim), in the same run. The agent path is what the
agent does per round: read through the adapter, build interval records, judge health, and
per batch sign and spool durably (SQLite WAL, fsync). Goal: at most 2x the bare loop.

The second figure runs the real `gpudelivery meter` process for a while on an 8-GPU node
at 1 Hz (shipping to nowhere: spool only) and reads its CPU time from /proc. Goal: under
1 % of one core. The simulated driver's own event poll (10 ms) runs inside that process
and is counted against the agent: a real driver blocks instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "metering" / "nvml-sim"
SCENARIO = SIM / "scenarios" / "h100x8.yaml"

# Both paths run in one process on the same driver handles, alternating in short
# repetitions (10 batches each), and each keeps its fastest: on a noisy machine the
# minimum of many short runs is the figure that repeats.
PROGRAM = """
import json, tempfile, time
from pathlib import Path
import pynvml
from gpudelivery import signing
from gpudelivery.metering import nvml, sampling, spool

source = nvml.PynvmlSource()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
sampler = sampling.Sampler(source, interval_s=1, max_interval_s=3)
spool_path = Path(tempfile.mkdtemp()) / "spool.sqlite3"
store = spool.Spool(spool_path, node="bench", key=signing.generate())

def bare(rounds):
    for _ in range(rounds):
        for h in handles:
            pynvml.nvmlDeviceGetUtilizationRates(h)
            pynvml.nvmlDeviceGetMemoryInfo(h)
            pynvml.nvmlDeviceGetPowerUsage(h)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
            pynvml.nvmlDeviceGetTotalEccErrors(h, 0, 0)
            pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 0)
            pynvml.nvmlDeviceGetRemappedRows(h)
            pynvml.nvmlDeviceGetComputeRunningProcesses(h)

clock = [1_772_496_000]
def agent(rounds):
    pending = []
    for round_number in range(rounds):
        clock[0] += 1
        pending.extend(sampler.round(clock[0]))
        if round_number % BATCH == BATCH - 1:
            store.append(pending, span=(clock[0] - BATCH, clock[0]))
            pending = []

def timed(path):
    started = time.process_time()
    path(ROUNDS)
    return time.process_time() - started

agent(BATCH)  # warm up: the first record of each GPU, the spool's first page
best = {"bare": float("inf"), "agent": float("inf")}
for _ in range(REPEATS):
    best["bare"] = min(best["bare"], timed(bare))
    best["agent"] = min(best["agent"], timed(agent))
print(json.dumps(best))
"""


def run(rounds: int, batch: int, repeats: int) -> dict[str, float]:
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(SIM / "build"),
        "GPUDELIVERY_NVML_SCENARIO": str(SCENARIO),
        "GPUDELIVERY_NVML_EPOCH": repr(time.time() - 20),
    }
    source = (
        PROGRAM.replace("ROUNDS", str(rounds))
        .replace("BATCH", str(batch))
        .replace("REPEATS", str(repeats))
    )
    completed = subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(completed.stdout.splitlines()[-1])
    return result


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def node_load(seconds: int) -> tuple[float, float]:
    """(share of one core, wall seconds) used by a real agent on 8 GPUs at 1 Hz."""
    with tempfile.TemporaryDirectory() as state:
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": str(SIM / "build"),
            "GPUDELIVERY_NVML_SCENARIO": str(SCENARIO),
            "GPUDELIVERY_METER_NODE_NAME": "bench-node",
            "GPUDELIVERY_METER_SPOOL__STATE_DIR": state,
            "GPUDELIVERY_METER_SERVER__HOST": "127.0.0.1",
            "GPUDELIVERY_METER_SERVER__PORT": "0",
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "gpudelivery", "meter"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(5)  # start-up (imports, nvmlInit) is not the steady state
            cpu_before, wall_before = cpu_seconds(agent.pid), time.monotonic()
            time.sleep(seconds)
            cpu_after, wall_after = cpu_seconds(agent.pid), time.monotonic()
        finally:
            agent.terminate()
            agent.wait()
    wall = wall_after - wall_before
    return (cpu_after - cpu_before) / wall, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per repetition")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="10 x 100 rounds, 10 s of load")
    options = parser.parse_args()
    rounds, repeats, load_s = (
        (100, 10, 10) if options.quick else (options.rounds, options.repeats, options.load_seconds)
    )
    subprocess.run(["make", "--silent", "-C", str(SIM)], check=True)
    gpus = 8
    best = run(rounds, 10, repeats)
    bare_s, agent_s = best["bare"], best["agent"]
    share, wall = node_load(load_s)
    figures = {
        "gpu_samples": rounds * gpus,
        "bare_pynvml_us_per_gpu_sample": round(bare_s / (rounds * gpus) * 1e6, 1),
        "agent_us_per_gpu_sample": round(agent_s / (rounds * gpus) * 1e6, 1),
        "ratio_to_bare": round(agent_s / bare_s, 2),
        "node_load_share_of_one_core_pct": round(share * 100, 3),
        "node_load_wall_s": round(wall, 1),
    }
    report.print_figures(
        f"metering: {gpus} simulated H100s, best of {repeats} x {rounds} rounds; "
        f"agent at 1 Hz for {load_s} s",
        figures,
        thousands=False,
    )


if __name__ == "__main__":
    main()
