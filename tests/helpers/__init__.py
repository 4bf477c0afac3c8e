"""Helpers the tests share: generated videos, tiny configs, runs in a thread, an S3 proxy, scripts run in a
subprocess. One place, imported as ``helpers.<module>`` (tests/ is on the path: pyproject.toml)."""
