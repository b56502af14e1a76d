"""Measuring speed and memory: :mod:`~fanlora.latency.timing` (balanced rounds, decode timing),
:mod:`~fanlora.latency.profile` (``fanlora profile``: the per-module decode cost that latency budgets use),
:mod:`~fanlora.latency.bench` (``fanlora bench``: Table 3) and :mod:`~fanlora.latency.rss` (peak memory).
Serving does not depend on this package; this package measures serving's engine."""
