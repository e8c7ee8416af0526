"""gpudelivery: physical delivery, metering, proof and settlement of GPU-compute futures.

This package is the shared core (contract terms, GPU-second accounting and settlement,
canonical JSON, signing, Merkle commitments, meter batches, delivery proofs) and the
`gpudelivery` command. The deployables import it as `gpudelivery.operator`,
`gpudelivery.metering` and `gpudelivery.api`; it imports none of them.
"""

__all__ = [
    "accounting",
    "batches",
    "canonical",
    "errors",
    "evidence",
    "merkle",
    "node_signals",
    "proof",
    "settlement",
    "signing",
    "terms",
    "timefmt",
]

__version__ = "0.1.0"
