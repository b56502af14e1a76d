"""Grids of runs and what is concluded from them: :mod:`~fanlora.experiments.config` (the YAML),
:mod:`~fanlora.experiments.grid` (cells, resumable), :mod:`~fanlora.experiments.report` and
:mod:`~fanlora.experiments.plots` (tables and figures), :mod:`~fanlora.experiments.stats` (clustered, seed-aware
paired intervals) and :mod:`~fanlora.experiments.compare` (``fanlora compare``)."""
