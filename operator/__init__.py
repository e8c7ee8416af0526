"""The delivery operator (kopf): books capacity, isolates, substitutes and releases nodes.

Not built yet: issue 5. This package only reserves the import name
`gpudelivery.operator`, mapped from the `operator/` folder by pyproject.toml.
"""

__all__: list[str] = []
