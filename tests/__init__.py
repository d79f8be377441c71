"""
pbroker's test suite; it runs under both ``trial tests`` and ``python -m pytest``.

Hypothesis is set up here (not in a conftest) so that both runners get the same settings:
derandomised, so every run draws the same examples, and without an example database.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "pbroker",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("pbroker")
