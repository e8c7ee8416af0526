"""Interval records from consecutive readings: deltas, stalls, resets and unreadable GPUs."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import batches, canonical
from gpudelivery.metering.readings import GpuReading
from gpudelivery.metering.records import GpuRecorder

from utils.factories import EPOCH

UUID = "GPU-aaaa"


def reading(second: int, **fields: Any) -> GpuReading:
    values: dict[str, Any] = {
        "utilization_gpu_pct": 97,
        "utilization_memory_pct": 60,
        "memory_used_bytes": 2**36,
        "power_mw": 650_000,
        "energy_mj": 650_000 * second,
        "temperature_c": 64,
        "ecc_corrected": 3,
        "ecc_uncorrected": 0,
        "remapped_correctable": 0,
        "remapped_uncorrectable": 0,
    }
    values.update(fields)
    return GpuReading(UUID, EPOCH + second, **values)


def recorder() -> GpuRecorder:
    return GpuRecorder(UUID, interval_s=1, max_interval_s=3)


def test_the_first_reading_only_sets_the_baseline() -> None:
    assert recorder().record(reading(0)) is None


def test_a_record_covers_the_interval_between_readings_with_counter_deltas() -> None:
    meter = recorder()
    meter.record(reading(0))
    assert meter.record(reading(1, ecc_corrected=5), pods=["b/y", "a/x"]) == {
        "gpu_uuid": UUID,
        "t0": "2026-03-03T00:00:00Z",
        "t1": "2026-03-03T00:00:01Z",
        "healthy": True,
        "xids": [],
        "utilization_gpu_pct": 97,
        "utilization_memory_pct": 60,
        "memory_used_bytes": 2**36,
        "power_mw": 650_000,
        "energy_mj": 650_000,
        "temperature_c": 64,
        "ecc_corrected": 2,
        "ecc_uncorrected": 0,
        "remapped_rows": 0,
        "pods": ["a/x", "b/y"],
    }


def test_an_xid_belongs_to_the_interval_it_arrived_in_and_a_critical_one_sticks() -> None:
    meter = recorder()
    meter.record(reading(0))
    meter.observe_xid(13)
    meter.observe_xid(79)
    first = meter.record(reading(1))
    second = meter.record(reading(2))
    assert first is not None
    assert second is not None
    assert (first["xids"], first["healthy"], first["reasons"]) == (
        [13, 79],
        False,
        ["critical XID 79 since the last reset"],
    )
    assert (second["xids"], second["healthy"]) == ([], False)


def test_an_energy_counter_going_backwards_is_a_reset_that_clears_critical_xids() -> None:
    meter = recorder()
    meter.record(reading(10))
    meter.observe_xid(79)
    assert meter.record(reading(11))["healthy"] is False  # type: ignore[index]
    after_reset = meter.record(reading(12, energy_mj=400_000))
    assert after_reset is not None
    assert (after_reset["healthy"], after_reset["energy_mj"]) == (True, 400_000)


def test_a_stall_claims_only_the_last_interval_and_no_deltas() -> None:
    meter = recorder()
    meter.record(reading(0))
    record = meter.record(reading(60, ecc_corrected=9))
    assert record is not None
    assert (record["t0"], record["t1"]) == ("2026-03-03T00:00:59Z", "2026-03-03T00:01:00Z")
    assert "energy_mj" not in record
    assert "ecc_corrected" not in record


def test_an_unreadable_gpu_yields_an_unhealthy_record_without_measurements() -> None:
    meter = recorder()
    meter.record(reading(0))
    record = meter.record(GpuReading(UUID, EPOCH + 1, error="Unknown Error"), pods=["a/x"])
    assert record == {
        "gpu_uuid": UUID,
        "t0": "2026-03-03T00:00:00Z",
        "t1": "2026-03-03T00:00:01Z",
        "healthy": False,
        "reasons": ["NVML does not answer: Unknown Error"],
        "xids": [],
    }


def test_energy_after_an_unreadable_round_restarts_from_the_next_good_pair() -> None:
    meter = recorder()
    meter.record(reading(0))
    meter.record(GpuReading(UUID, EPOCH + 1, error="Unknown Error"))
    after = meter.record(reading(2))
    again = meter.record(reading(3))
    assert after is not None
    assert again is not None
    assert "energy_mj" not in after
    assert again["energy_mj"] == 650_000


def test_a_lost_gpu_is_unhealthy() -> None:
    meter = recorder()
    meter.record(reading(0))
    record = meter.record(GpuReading(UUID, EPOCH + 1, error="GPU is lost", lost=True))
    assert record is not None
    assert record["reasons"] == ["GPU fallen off the bus (GPU_IS_LOST)"]


def test_a_pending_row_remap_is_unhealthy() -> None:
    meter = recorder()
    meter.record(reading(0))
    record = meter.record(reading(1, remap_pending=True, remapped_uncorrectable=1))
    assert record is not None
    assert (record["healthy"], record["remapped_rows"]) == (False, 1)


def test_a_reading_that_does_not_move_forward_makes_no_record() -> None:
    meter = recorder()
    meter.record(reading(5))
    assert meter.record(reading(5)) is None


def test_interval_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="need 0 < interval_s <= max_interval_s"):
        GpuRecorder(UUID, interval_s=5, max_interval_s=2)


counts = st.none() | st.integers(min_value=0, max_value=2**53 - 1)
readings = st.builds(
    GpuReading,
    uuid=st.just(UUID),
    at_s=st.integers(min_value=EPOCH, max_value=EPOCH + 30),
    error=st.none() | st.sampled_from(["Unknown Error", "GPU is lost"]),
    utilization_gpu_pct=st.none() | st.integers(0, 100),
    utilization_memory_pct=st.none() | st.integers(0, 100),
    memory_used_bytes=counts,
    power_mw=st.none() | st.integers(0, 2**32 - 1),
    energy_mj=counts,
    temperature_c=st.none() | st.integers(0, 2**32 - 1),
    ecc_corrected=counts,
    ecc_uncorrected=counts,
    remapped_correctable=st.none() | st.integers(0, 2**32 - 1),
    remapped_uncorrectable=st.none() | st.integers(0, 2**32 - 1),
    remap_pending=st.booleans(),
    remap_failed=st.booleans(),
)


@given(
    st.lists(readings, min_size=2, max_size=6),
    st.lists(st.integers(0, 2**53 - 1), max_size=3),
    st.lists(st.text(max_size=8), max_size=2),
)
def test_records_are_plain_json_so_the_spool_may_sign_them_unchecked(
    sequence: list[GpuReading], xids: list[int], pods: list[str]
) -> None:
    meter = recorder()
    produced = []
    for code in xids:
        meter.observe_xid(code)
    for item in sequence:
        record = meter.record(item, pods=pods)
        if record is not None:
            produced.append(record)
    assert canonical.is_plain(produced)
    assert canonical.canonical_json(produced, assume_plain=True) == rfc8785.dumps(produced)


def test_every_record_the_recorder_writes_is_in_the_shape_the_api_decodes_fastest() -> None:
    """The API decodes batches of these records typed (batches.UsualRecord); a field added
    here and not there would send every batch down its slower plain-JSON path."""
    meter = recorder()
    meter.record(reading(0))
    meter.observe_xid(79)
    written = [
        meter.record(reading(1, remap_pending=True), pods=["a/x"]),
        meter.record(reading(2, error="GPU is lost")),
        meter.record(reading(3, energy_mj=None, power_mw=None)),
    ]
    for record in written:
        assert record is not None
        typed = msgspec.json.decode(orjson.dumps(record), type=batches.UsualRecord)
        assert msgspec.to_builtins(typed) == record
    assert set().union(*written) == set(batches.UsualRecord.__struct_fields__) - {"node"}
