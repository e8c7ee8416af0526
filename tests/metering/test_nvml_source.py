"""The pynvml adapter, against the simulated driver: readings, lost GPUs, XIDs, NVML errors."""

from __future__ import annotations

from pathlib import Path

from utils.nvml import SCENARIOS, PynvmlRunner

OPEN = """
from gpudelivery.metering import nvml
source = nvml.PynvmlSource()
def read(index):
    return source.read(index, at_s=1000)._asdict()
"""


def test_a_busy_gpu_reads_every_field(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        OPEN + "result = [source.uuids(), read(1)]",
        scenario=SCENARIOS / "h100x8.yaml",
        seconds_in=20,
    )
    uuids, reading = result
    assert len(uuids) == 8
    energy = reading.pop("energy_mj")
    assert 10 * 70_000 + 10 * 650_000 <= energy < 10 * 70_000 + 11 * 650_000
    assert reading == {
        "uuid": "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f01",
        "at_s": 1000,
        "error": None,
        "lost": False,
        "utilization_gpu_pct": 97,
        "utilization_memory_pct": 61,
        "memory_used_bytes": (512 + 71680) * 2**20,
        "power_mw": 650_000,
        "temperature_c": 64,
        "ecc_corrected": 0,
        "ecc_uncorrected": 0,
        "remapped_correctable": 0,
        "remapped_uncorrectable": 0,
        "remap_pending": False,
        "remap_failed": False,
        "pids": [41002],
    }


def test_a_lost_gpu_reads_as_an_error_and_its_neighbours_do_not(run_pynvml: PynvmlRunner) -> None:
    lost, neighbour = run_pynvml(
        OPEN + "result = [read(3), read(4)]", scenario=SCENARIOS / "xid79.yaml", seconds_in=40
    )
    assert (lost["error"], lost["lost"], lost["power_mw"]) == ("GPU is lost", True, None)
    assert (neighbour["error"], neighbour["utilization_gpu_pct"]) == (None, 95)


def test_xids_arrive_with_their_gpu_and_code(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        OPEN
        + """
first = source.wait_xid(1)
event = source.wait_xid(5000)
result = [first, event.uuid, event.code]
""",
        scenario=SCENARIOS / "xid79.yaml",
        seconds_in=29.7,
    )
    assert result == [None, "GPU-0a1b2c3d-0000-4000-8000-000000000003", 79]


def test_pending_row_remap_is_read(run_pynvml: PynvmlRunner) -> None:
    reading = run_pynvml(
        OPEN + "result = read(5)", scenario=SCENARIOS / "ecc-rising.json", seconds_in=250
    )
    assert (
        reading["ecc_corrected"],
        reading["ecc_uncorrected"],
        reading["remapped_uncorrectable"],
        reading["remap_pending"],
    ) == (202, 1, 1, True)


def test_an_nvml_error_on_one_call_makes_the_reading_an_error(
    run_pynvml: PynvmlRunner, tmp_path: Path
) -> None:
    scenario = tmp_path / "error.yaml"
    scenario.write_text(
        "gpus: [{}]\ntimeline: [{at: 1, gpu: 0, nvml_error: {function: nvmlDeviceGetPowerUsage}}]\n"
    )
    reading = run_pynvml(OPEN + "result = read(0)", scenario=scenario, seconds_in=5)
    assert (reading["error"], reading["lost"], reading["utilization_gpu_pct"]) == (
        "Unknown Error",
        False,
        None,
    )


def test_a_driver_that_does_not_start_is_named(run_pynvml: PynvmlRunner, tmp_path: Path) -> None:
    scenario = tmp_path / "broken.yaml"
    scenario.write_text("gpus: 3\n")
    result = run_pynvml(
        """
from gpudelivery.metering import errors, nvml
try:
    nvml.PynvmlSource()
    result = None
except errors.NvmlUnavailableError as error:
    result = str(error)
""",
        scenario=scenario,
    )
    assert result == "NVML is not available: Unknown Error"
