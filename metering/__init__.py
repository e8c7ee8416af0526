"""The metering agent (DaemonSet): samples GPUs through NVML and ships signed batches.

Not built yet: issue 3. This package only reserves the import name
`gpudelivery.metering`, mapped from the `metering/` folder by pyproject.toml.
"""

__all__: list[str] = []
