"""The stages of a protection experiment, shared by ``raeg pipeline`` and ``raeg grid``.

Each stage runs in its own folder of a run directory, records its recipe (``recipe.json``)
and its results (``results.json``, the done-marker), and is skipped when done:

- :mod:`~raeg_pl.stages.common`: stage folders, done-markers, recipe checks, the Trainer
  factory, classifier training, :class:`~raeg_pl.stages.common.StageRunner`;
- :mod:`~raeg_pl.stages.surrogate`: the surrogate classifiers;
- :mod:`~raeg_pl.stages.protector`: the RAEG protector and the owner's key file;
- :mod:`~raeg_pl.stages.export`: protected / recovered PNG folders measured from the files;
- :mod:`~raeg_pl.stages.classifiers`: pirates, authorised and clean-data classifiers;
- :mod:`~raeg_pl.stages.report`: the summary (``results.json``) and ``report.md``;
- :mod:`~raeg_pl.stages.check`: builds a grid's networks and methods before any training.

The submodules import Lightning; import them, not this package, for their names.
"""
