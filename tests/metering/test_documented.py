"""The README documents every setting of the agent and every metric it serves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from gpudelivery.metering import metrics
from gpudelivery.metering.settings import MeterSettings

README = (Path(__file__).parents[2] / "README.md").read_text()
METRICS_SOURCE = Path(metrics.__file__).read_text()


def variables(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from variables(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def test_every_setting_has_a_row_in_the_readme() -> None:
    names = list(variables(MeterSettings, "GPUDELIVERY_METER_"))
    assert len(names) == 23
    missing = [name for name in names if f"| `{name}` |" not in README]
    assert missing == []


def test_every_metric_is_named_in_the_readme() -> None:
    served = re.findall(r'PREFIX \+ "([a-z_]+)"', METRICS_SOURCE)
    assert len(served) == 22
    counters = set(re.findall(r'CounterMetricFamily\(\s*PREFIX \+ "([a-z_]+)"', METRICS_SOURCE))
    documented = {name + "_total" if name in counters else name for name in served}
    missing = sorted(name for name in documented if f"`{name}" not in README)
    assert missing == []
