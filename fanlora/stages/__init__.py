"""The method's stages as library calls, one module each: :mod:`~fanlora.stages.search` (a),
:mod:`~fanlora.stages.score` (b, running a scorer of :mod:`fanlora.scoring`), :mod:`~fanlora.stages.select` (c,
with :mod:`~fanlora.stages.selection`, :mod:`~fanlora.stages.budget` and :mod:`~fanlora.stages.plots`),
:mod:`~fanlora.stages.finetune` (d: fit a method, evaluate it in memory), :mod:`~fanlora.stages.evaluate`, and
what runs several: :mod:`~fanlora.stages.stability` and :mod:`~fanlora.stages.demo` (read it first). The CLI is a
thin layer over these."""
