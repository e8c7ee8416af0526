"""The GPU UUIDs annotation's text: one set of GPUs is always the same text, and reading it
back gives the set, whatever a hand edit left around it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import node_signals

GPU_A, GPU_B, GPU_C = (
    "GPU-aaaaaaaa-0000-4000-8000-000000000000",
    "GPU-bbbbbbbb-0000-4000-8000-000000000000",
    "GPU-cccccccc-0000-4000-8000-000000000000",
)

# Any text but the separator, whitespace included.
items = st.text(alphabet=st.characters(exclude_characters=","))


def test_uuids_are_written_sorted_without_repeats() -> None:
    assert node_signals.format_gpu_uuids([GPU_C, GPU_A, GPU_C, GPU_B]) == f"{GPU_A},{GPU_B},{GPU_C}"
    assert node_signals.format_gpu_uuids(iter([GPU_B])) == GPU_B
    assert node_signals.format_gpu_uuids([]) == ""


def test_blank_uuids_are_left_out_and_whitespace_dropped() -> None:
    assert node_signals.format_gpu_uuids(["", " ", f" {GPU_B}\t", GPU_A]) == f"{GPU_A},{GPU_B}"


def test_a_uuid_holding_a_comma_is_refused() -> None:
    with pytest.raises(ValueError, match="a GPU UUID cannot hold a comma: 'GPU-a,GPU-b'"):
        node_signals.format_gpu_uuids([GPU_C, "GPU-a,GPU-b"])


def test_no_annotation_or_an_empty_one_lists_no_gpus() -> None:
    assert node_signals.parse_gpu_uuids(None) == ()
    assert node_signals.parse_gpu_uuids("") == ()
    assert node_signals.parse_gpu_uuids(" , ,") == ()


def test_a_hand_edited_annotation_reads_as_its_sorted_set() -> None:
    text = f" {GPU_C}, ,{GPU_A},,{GPU_C} ,{GPU_B},"
    assert node_signals.parse_gpu_uuids(text) == (GPU_A, GPU_B, GPU_C)


@given(st.lists(items))
def test_parsing_what_was_written_gives_the_sorted_set_of_uuids(uuids: list[str]) -> None:
    expected = tuple(sorted({uuid.strip() for uuid in uuids} - {""}))
    assert node_signals.parse_gpu_uuids(node_signals.format_gpu_uuids(uuids)) == expected


@given(st.lists(items.filter(lambda uuid: uuid == uuid.strip() and uuid != "")))
def test_uuids_without_whitespace_come_back_exactly(uuids: list[str]) -> None:
    written = node_signals.format_gpu_uuids(uuids)
    assert node_signals.parse_gpu_uuids(written) == tuple(sorted(set(uuids)))
    assert node_signals.format_gpu_uuids(reversed(uuids)) == written


@given(st.text())
def test_any_text_reads_as_the_set_its_rewrite_reads_as(text: str) -> None:
    uuids = node_signals.parse_gpu_uuids(text)
    assert node_signals.parse_gpu_uuids(node_signals.format_gpu_uuids(uuids)) == uuids
