"""The method's stages as library calls, one module each: :mod:`~fanlora.stages.search` (a), stage b in
:mod:`fanlora.scoring`, :mod:`~fanlora.stages.select` (c, with :mod:`~fanlora.stages.budget` and
:mod:`~fanlora.stages.plots`), :mod:`~fanlora.stages.adapt` (d and evaluation), and what runs several:
:mod:`~fanlora.stages.stability` and :mod:`~fanlora.stages.demo`. The CLI is a thin layer over these."""
