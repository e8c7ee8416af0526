"""Roll-ups: meter records summed into a few values that a proof reads in their place.

A month of one GPU metered once a second is 2.6 million records; a proof needs from them
only which seconds were metered healthy or unhealthy, and the utilization and energy summed
over the seconds assigned to the contract. A `MeterRollup` holds exactly that for records of
one GPU in one health state whose t0 lie in one aligned bucket of `width_s` seconds and
whose intervals connect: it covers exactly [t0_s, t1_s), the union of its records.

It stands for its records in `proof.build_proof` wherever it lies wholly inside or wholly
outside the assigned spans, because then each of its records does too, and a record's share
of the summaries is all or nothing. Across the edge of an assigned span the records
themselves are needed (the API keeps them, and a narrower roll-up of the same bucket may
do: see api.rollups). The sums are exact: utilization x seconds as a `Fraction`, energy in
whole mJ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from gpudelivery.evidence import GpuKey, MeterRecord

__all__ = [
    "MeterRollup",
    "RollupAccumulator",
    "bucket_of",
    "fraction_text",
    "parse_fraction",
    "roll_up",
]


@dataclass(frozen=True, slots=True)
class MeterRollup:
    """Meter records of one GPU and one health state covering exactly [t0_s, t1_s), summed.

    `utilization_sum` is the sum of utilization x seconds over those of its records that
    carry a utilization, and `utilization_s` the seconds they cover (None and 0 when none
    does); `energy_mj` sums the energy of those that carry one (None when none does).
    """

    node: str
    gpu_uuid: str
    t0_s: int
    t1_s: int
    healthy: bool
    records: int
    utilization_sum: Fraction | None
    utilization_s: int
    energy_mj: int | None

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_uuid)


def bucket_of(t0_s: int, width_s: int) -> int:
    """The start of the aligned bucket of `width_s` seconds holding the instant `t0_s`."""
    return t0_s - t0_s % width_s


class RollupAccumulator:
    """A roll-up being built: add records of its GPU, health state and bucket that connect
    to it (`connects`), then read it back with `rollup()`."""

    __slots__ = (
        "bucket_s",
        "energy_mj",
        "gpu_uuid",
        "healthy",
        "node",
        "records",
        "t0_s",
        "t1_s",
        "utilization_s",
        "utilization_sum",
        "width_s",
    )

    def __init__(
        self,
        *,
        node: str,
        gpu_uuid: str,
        healthy: bool,
        width_s: int,
        bucket_s: int,
        t0_s: int,
        t1_s: int,
        records: int = 0,
        utilization_sum: Fraction | int | None = None,
        utilization_s: int = 0,
        energy_mj: int | None = None,
    ) -> None:
        self.node = node
        self.gpu_uuid = gpu_uuid
        self.healthy = healthy
        self.width_s = width_s
        self.bucket_s = bucket_s
        self.t0_s = t0_s
        self.t1_s = t1_s
        self.records = records
        self.utilization_sum = utilization_sum
        self.utilization_s = utilization_s
        self.energy_mj = energy_mj

    @classmethod
    def of(cls, record: MeterRecord, *, width_s: int) -> RollupAccumulator:
        """A roll-up of the one record `record`, in its bucket of `width_s` seconds."""
        accumulator = cls(
            node=record.node,
            gpu_uuid=record.gpu_uuid,
            healthy=record.healthy,
            width_s=width_s,
            bucket_s=bucket_of(record.t0_s, width_s),
            t0_s=record.t0_s,
            t1_s=record.t1_s,
        )
        accumulator._sum(record)
        return accumulator

    def connects(self, record: MeterRecord) -> bool:
        """Whether `record` may join: same GPU, health and bucket, and its interval meets
        or overlaps the roll-up's, so their union stays one interval."""
        return (
            record.t0_s <= self.t1_s
            and record.t1_s >= self.t0_s
            and record.healthy == self.healthy
            and record.node == self.node
            and record.gpu_uuid == self.gpu_uuid
            and bucket_of(record.t0_s, self.width_s) == self.bucket_s
        )

    def add(self, record: MeterRecord) -> None:
        if not self.connects(record):
            raise ValueError("the record does not connect to this roll-up")
        if record.t0_s < self.t0_s:
            self.t0_s = record.t0_s
        if record.t1_s > self.t1_s:
            self.t1_s = record.t1_s
        self._sum(record)

    def _sum(self, record: MeterRecord) -> None:
        self.records += 1
        utilization = record.utilization_gpu_pct
        if utilization is not None:
            seconds = record.t1_s - record.t0_s
            # Whole percentages (what NVML reports) stay integers: exact, and far cheaper.
            if isinstance(utilization, int):
                weighted: Fraction | int = utilization * seconds
            elif utilization.is_integer():
                weighted = int(utilization) * seconds
            else:
                weighted = Fraction(utilization) * seconds
            self.utilization_sum = (
                weighted if self.utilization_sum is None else self.utilization_sum + weighted
            )
            self.utilization_s += seconds
        if record.energy_mj is not None:
            self.energy_mj = (
                record.energy_mj if self.energy_mj is None else self.energy_mj + record.energy_mj
            )

    def rollup(self) -> MeterRollup:
        return MeterRollup(
            self.node,
            self.gpu_uuid,
            self.t0_s,
            self.t1_s,
            self.healthy,
            self.records,
            None if self.utilization_sum is None else Fraction(self.utilization_sum),
            self.utilization_s,
            self.energy_mj,
        )


def roll_up(records: Iterable[MeterRecord], *, width_s: int) -> list[MeterRollup]:
    """The records as roll-ups of `width_s`-second buckets (each record in exactly one),
    joining a record to the latest roll-up of its GPU, health and bucket it connects to."""
    open_rollups: dict[tuple[str, str, bool, int], list[RollupAccumulator]] = {}
    for record in records:
        key = (record.node, record.gpu_uuid, record.healthy, bucket_of(record.t0_s, width_s))
        candidates = open_rollups.setdefault(key, [])
        for accumulator in reversed(candidates):
            if accumulator.connects(record):
                accumulator.add(record)
                break
        else:
            candidates.append(RollupAccumulator.of(record, width_s=width_s))
    return [
        accumulator.rollup() for candidates in open_rollups.values() for accumulator in candidates
    ]


def fraction_text(value: Fraction | int) -> str:
    """A fraction as exact text: `n` or `n/d` (what `parse_fraction` reads)."""
    return str(value)


def parse_fraction(text: str) -> Fraction:
    """The exact fraction `fraction_text` wrote."""
    numerator, slash, denominator = text.partition("/")
    if not slash:
        return Fraction(int(numerator))
    return Fraction(int(numerator), int(denominator))
