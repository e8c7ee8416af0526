"""Settings shared by every test area."""

from hypothesis import HealthCheck, settings

# CI runs on a 2-core machine shared with PostgreSQL: no deadline (speed lives in bench/),
# and a fixed profile so a run explores the same number of examples everywhere.
settings.register_profile(
    "gpudelivery", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gpudelivery")
