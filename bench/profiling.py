"""CPU profiles of every thread of a benchmark, and where their time goes.

cProfile profiles the thread that enables it; a benchmark that runs the operator and the
cluster emulator in threads of one process needs one profile per thread. `profiled` gives
every thread started inside it a profile of its own (and the calling thread one), timed in
the thread's own CPU time, so that a thread waiting for the GIL or a socket is not charged.
`print_profile` groups them by thread and says which code took the CPU: each function's own
time goes to the package it is in, and a built-in's (`isinstance`, `dict.get`, ...) to its
callers'.

Not for timing: timing every call costs a system call, so a profiled run is several times
slower than a plain one. The shares are what to read.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import pstats
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

__all__ = ["print_profile", "profiled"]

# Where a function's file puts its time, first match: (part of the path, what it is).
_PACKAGES = (
    ("gpudelivery/operator/", "operator code (gpudelivery.operator)"),
    ("/gpudelivery/", "other gpudelivery code"),
    ("/kubernetes/", "kubernetes client (models, (de)serialisation)"),
    ("/pydantic", "pydantic (the kubernetes client's models)"),
    ("/urllib3/", "urllib3 and http.client (the kubernetes client's HTTP)"),
    ("/http/client.py", "urllib3 and http.client (the kubernetes client's HTTP)"),
    ("/tests/utils/", "emulator (tests/utils)"),
    ("/kmock/", "kmock"),
    ("/kopf/", "kopf"),
    ("/aiohttp/", "aiohttp, yarl, multidict (HTTP server and kopf's client)"),
    ("/yarl/", "aiohttp, yarl, multidict (HTTP server and kopf's client)"),
    ("/multidict/", "aiohttp, yarl, multidict (HTTP server and kopf's client)"),
    ("/json/", "json"),
    ("/copy.py", "copy (deepcopy)"),
    ("/asyncio/", "asyncio"),
)
# How long to wait for the profiled threads to end before reading their profiles.
_JOIN_S = 60.0
# The threads, by name: what each runs.
_THREADS = {
    "kmock": "the emulator's event loop (kmock thread)",
    "operator": "kopf's event loop (operator thread)",
    "ThreadPoolExecutor-0": "the operator's handlers (kopf's executor threads)",
    "MainThread": "the benchmark (setup, polls)",
}


@contextlib.contextmanager
def profiled(enabled: bool) -> Iterator[list[tuple[str, cProfile.Profile]]]:
    """When `enabled`, a CPU-time profile of this thread and of every thread started
    meanwhile, each with its thread's name (filled in as threads start)."""
    profiles: list[tuple[str, cProfile.Profile]] = []
    if not enabled:
        yield profiles
        return

    threads: list[threading.Thread] = []

    def start(*_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append((threading.current_thread().name, profile))
        threads.append(threading.current_thread())
        profile.enable()  # in place of this hook, in the new thread

    main = cProfile.Profile(time.thread_time)
    profiles.append((threading.current_thread().name, main))
    threading.setprofile(start)
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.setprofile(None)
        # A profile read while its thread still runs closes the thread's open calls with
        # the reading thread's clock, which is nonsense in CPU time: wait for the threads to
        # end. Idle executor threads end once their executor is collected.
        gc.collect()
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            print(f"profiles of threads still running are not exact: {', '.join(alive)}")


def package_of(filename: str) -> str:
    return next((what for part, what in _PACKAGES if part in filename), "other (stdlib, ...)")


def by_package(stats: pstats.Stats) -> Counter[str]:
    """CPU seconds by package: own time, a built-in's shared among its callers."""
    seconds: Counter[str] = Counter()
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, own_s, _, callers) in table.items():
        if filename == "~" and callers:
            for (caller_file, _, _), caller in callers.items():
                seconds[package_of(caller_file)] += caller[2]
        else:
            seconds[package_of(filename)] += own_s
    return seconds


def print_profile(profiles: list[tuple[str, cProfile.Profile]], lines: int) -> None:
    """For each group of threads: its CPU seconds by package, the functions with most own
    time, and the operator's functions by cumulative time."""
    groups: dict[str, list[cProfile.Profile]] = {}
    for name, profile in profiles:
        group = name.partition("_")[0] if name.startswith("ThreadPoolExecutor") else name
        groups.setdefault(group, []).append(profile)
    merged = {group: pstats.Stats(*members) for group, members in groups.items()}
    overall = sum(_seconds(stats) for stats in merged.values())
    for group, stats in sorted(merged.items(), key=lambda item: -_seconds(item[1])):
        total = _seconds(stats)
        if total < 0.01 * overall:
            continue  # threads that barely ran
        what = _THREADS.get(group, group)
        print(f"\n== {what}: {total:.1f} s CPU ({total / overall:.0%} of all threads)")
        for package, seconds in by_package(stats).most_common():
            print(f"   {seconds:8.1f} s  {seconds / total:4.0%}  {package}")
        stats.sort_stats("tottime").print_stats(lines)
        stats.sort_stats("cumulative").print_stats(r"gpudelivery/operator/", lines)


def _seconds(stats: pstats.Stats) -> float:
    """The CPU seconds of a profile: the sum of every function's own time."""
    total: float = stats.total_tt  # type: ignore[attr-defined]
    return total
