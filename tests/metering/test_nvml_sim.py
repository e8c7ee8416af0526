"""The NVML simulator, driven through the real nvidia-ml-py (pynvml) over ctypes."""

from __future__ import annotations

import re
from pathlib import Path

from utils.nvml import SCENARIOS, PynvmlRunner

OPEN = """
pynvml.nvmlInit()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
"""


def test_default_node_is_eight_idle_h100s(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        OPEN
        + """
result = [
    [pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetPciInfo(h).busId,
     pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20, pynvml.nvmlDeviceGetEnforcedPowerLimit(h),
     pynvml.nvmlDeviceGetUtilizationRates(h).gpu, pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    for h in handles
]
"""
    )
    assert len(result) == 8
    assert {row[0] for row in result} == {"NVIDIA H100 80GB HBM3"}
    assert len({row[1] for row in result}) == 8
    assert result[0][1:] == [
        "GPU-00000000-0000-4000-8000-000000000000",
        "00000000:18:00.0",
        81559,
        700000,
        0,
        [],
    ]


def test_scenario_timeline_drives_utilization_power_and_processes(run_pynvml: PynvmlRunner) -> None:
    code = (
        OPEN
        + """
h = handles[2]
procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
memory = pynvml.nvmlDeviceGetMemoryInfo(h)
rates = pynvml.nvmlDeviceGetUtilizationRates(h)
result = {
    "uuid": pynvml.nvmlDeviceGetUUID(h),
    "serial": pynvml.nvmlDeviceGetSerial(h),
    "util": [rates.gpu, rates.memory],
    "power_mw": pynvml.nvmlDeviceGetPowerUsage(h),
    "temperature": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
    "processes": [[p.pid, p.usedGpuMemory] for p in procs],
    "used_mib": memory.used // 2**20,
}
"""
    )
    before = run_pynvml(code, scenario=SCENARIOS / "h100x8.yaml", seconds_in=1)
    after = run_pynvml(code, scenario=SCENARIOS / "h100x8.yaml", seconds_in=20)
    assert before == {
        "uuid": "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f02",
        "serial": "1652823051102",
        "util": [0, 0],
        "power_mw": 70000,
        "temperature": 33,
        "processes": [],
        "used_mib": 512,
    }
    assert after == {
        **before,
        "util": [97, 61],
        "power_mw": 650000,
        "temperature": 64,
        "processes": [[41003, 71680 * 2**20]],
        "used_mib": 512 + 71680,
    }


def test_energy_is_the_integral_of_power(run_pynvml: PynvmlRunner) -> None:
    # 70 W until 10 s, then 650 W: at 40 s in, 10 x 70 000 + 30 x 650 000 mJ, give or take the
    # time between the epoch being set and the call (each second of it at most 650 J).
    first, second = run_pynvml(
        OPEN
        + """
first = pynvml.nvmlDeviceGetTotalEnergyConsumption(handles[0])
time.sleep(0.05)
result = [first, pynvml.nvmlDeviceGetTotalEnergyConsumption(handles[0])]
""",
        scenario=SCENARIOS / "h100x8.yaml",
        seconds_in=40,
    )
    expected = 10 * 70_000 + 30 * 650_000
    assert expected <= first < expected + 650_000
    assert first + 0.05 * 650_000 <= second < first + 650_000


def test_energy_reset_starts_the_counter_again(run_pynvml: PynvmlRunner, tmp_path: Path) -> None:
    scenario = tmp_path / "reset.yaml"
    scenario.write_text(
        "gpus: [{power_w: 100}]\ntimeline: [{at: 50, gpu: 0, energy_reset: true}]\n"
    )
    energy = run_pynvml(
        OPEN + "result = pynvml.nvmlDeviceGetTotalEnergyConsumption(handles[0])",
        scenario=scenario,
        seconds_in=60,
    )
    assert 10 * 100_000 <= energy < 11 * 100_000


def test_xid_is_delivered_through_an_event_set_and_the_gpu_is_lost(
    run_pynvml: PynvmlRunner,
) -> None:
    result = run_pynvml(
        OPEN
        + """
events = pynvml.nvmlEventSetCreate()
for h in handles:
    pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, events)
try:
    pynvml.nvmlEventSetWait_v2(events, 1)
    waited = "event"
except pynvml.NVMLError_Timeout:
    waited = "timeout"
data = pynvml.nvmlEventSetWait_v2(events, 5000)
try:
    pynvml.nvmlDeviceGetUtilizationRates(handles[3])
    lost = False
except pynvml.NVMLError_GpuIsLost:
    lost = True
result = {
    "first_wait": waited,
    "xid": data.eventData,
    "type": data.eventType,
    "uuid": pynvml.nvmlDeviceGetUUID(data.device),
    "lost": lost,
    "neighbour_util": pynvml.nvmlDeviceGetUtilizationRates(handles[2]).gpu,
}
""",
        scenario=SCENARIOS / "xid79.yaml",
        seconds_in=29.8,
    )
    assert result == {
        "first_wait": "timeout",
        "xid": 79,
        "type": 8,
        "uuid": "GPU-0a1b2c3d-0000-4000-8000-000000000003",
        "lost": True,
        "neighbour_util": 95,
    }


def test_an_event_set_sees_only_what_happens_after_it_is_created(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        OPEN
        + """
events = pynvml.nvmlEventSetCreate()
pynvml.nvmlDeviceRegisterEvents(handles[5], pynvml.nvmlEventTypeXidCriticalError, events)
try:
    pynvml.nvmlEventSetWait_v2(events, 20)
    result = "event"
except pynvml.NVMLError_Timeout:
    result = "timeout"
""",
        scenario=SCENARIOS / "ecc-rising.json",
        seconds_in=300,  # the XID 48 of GPU 5 came at 240 s
    )
    assert result == "timeout"


def test_ecc_and_row_remap_counters_rise(run_pynvml: PynvmlRunner) -> None:
    code = (
        OPEN
        + """
h = handles[5]
volatile = pynvml.NVML_VOLATILE_ECC
result = [
    pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, volatile),
    pynvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, volatile),
    list(pynvml.nvmlDeviceGetRemappedRows(h)),
]
"""
    )
    scenario = SCENARIOS / "ecc-rising.json"
    assert run_pynvml(code, scenario=scenario, seconds_in=130) == [52, 0, [0, 0, 0, 0]]
    assert run_pynvml(code, scenario=scenario, seconds_in=250) == [202, 1, [1, 1, 1, 0]]


def test_injected_nvml_errors_last_for_their_duration(
    run_pynvml: PynvmlRunner, tmp_path: Path
) -> None:
    scenario = tmp_path / "errors.yaml"
    scenario.write_text(
        "gpus: [{}, {}]\n"
        "timeline:\n"
        "  - {at: 10, gpu: 0,\n"
        "     nvml_error: {function: nvmlDeviceGetPowerUsage, code: 999, for_s: 100}}\n"
        "  - {at: 10, gpu: 1, nvml_error: {code: 2}}\n"
    )
    code = (
        OPEN
        + """
def status(call):
    try:
        call()
        return 0
    except pynvml.NVMLError as error:
        return error.value
result = [
    status(lambda: pynvml.nvmlDeviceGetPowerUsage(handles[0])),
    status(lambda: pynvml.nvmlDeviceGetUtilizationRates(handles[0])),
    status(lambda: pynvml.nvmlDeviceGetUtilizationRates(handles[1])),
]
"""
    )
    assert run_pynvml(code, scenario=scenario, seconds_in=50) == [999, 0, 2]
    assert run_pynvml(code, scenario=scenario, seconds_in=115) == [0, 0, 2]


def test_every_symbol_pynvml_knows_is_exported(
    nvml_sim_dir: Path, run_pynvml: PynvmlRunner
) -> None:
    result = run_pynvml(
        f"""
import ctypes, inspect, re
library = ctypes.CDLL("{nvml_sim_dir}/libnvidia-ml.so.1")
names = set(re.findall(r'_nvmlGetFunctionPointer\\("(\\w+)"\\)', inspect.getsource(pynvml)))
result = sorted(name for name in names if not hasattr(library, name))
"""
    )
    assert result == []


def test_unimplemented_calls_answer_not_supported(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        OPEN
        + """
try:
    pynvml.nvmlDeviceGetClockInfo(handles[0], pynvml.NVML_CLOCK_SM)
    result = None
except pynvml.NVMLError_NotSupported as error:
    result = str(error)
"""
    )
    assert result == "Not Supported"


def test_calls_before_init_answer_uninitialized(run_pynvml: PynvmlRunner) -> None:
    result = run_pynvml(
        """
import ctypes
pynvml._LoadNvmlLibrary()
count = ctypes.c_uint()
result = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetCount_v2")(ctypes.byref(count))
"""
    )
    assert result == 1


def test_a_bad_scenario_fails_init_naming_the_problem(
    run_pynvml: PynvmlRunner, tmp_path: Path
) -> None:
    one = "gpus: [{}]\ntimeline: "
    cases = {
        "gpus: [{uuid: GPU-1, colour: red}]\n": "gpus[0].colour: unknown field",
        one + "[{at: 5, gpu: 3, power_w: 10}]\n": "timeline[0].gpu must lie in 0..0",
        one + "[{gpu: 0, power_w: 10}]\n": "timeline[0].at is missing",
        one + "[{at: 1, gpu: all, xid: 79}]\n": 'timeline[0].xid needs one gpu, not "all"',
        "gpus: [{uuid: A}, {uuid: A}]\n": "gpus[1].uuid repeats gpus[0].uuid",
        "gpus: [{]\n": ":1: ",
    }
    for number, (text, message) in enumerate(cases.items()):
        scenario = tmp_path / f"bad-{number}.yaml"
        scenario.write_text(text)
        completed = run_pynvml(
            "pynvml.nvmlInit()\nresult = 0", scenario=scenario, expect_failure=True
        )
        assert completed.returncode == 1
        assert "NVMLError_Unknown" in completed.stderr
        first = completed.stderr.splitlines()[0]
        assert re.match(rf"nvml-sim: {re.escape(str(scenario))}", first), first
        assert message in first, first
